"""Evaluation of a finetuned (or, for speaker verification, a pretrained) model on a corpus split.

Every task is reported per modality setting: `av` (both inputs), `a` (audio only: video marked
absent), `v` (video only). A sample that lacks the modality a setting needs is left out of it.

- emotion: WA (accuracy), UA (mean per-class recall), macro and weighted F1, per-class recall,
  confusion matrix, over the bona fide clips (a spoofed copy carries its source's label but not
  necessarily its expression: a monotone resynthesis has no prosody left).
- spoof: EER (interpolated ROC crossing, `finetune.metrics.eer`) and minDCF of the bona fide
  score (higher = bona fide), overall and per attack (bona fide vs that attack).
- speaker: cosine scores of L2-normalized embeddings on a VoxCeleb-format trial list; EER and
  minDCF at P_target 0.01 and 0.05; optional AS-Norm with a top-N cohort from the train split.
  `zero_shot=True` scores a pretrained backbone's mean-pooled embeddings with no head at all.

Outputs: `report.json`, plots (DET curve, score histograms per class or attack, confusion
matrix) and per-sample score files (`scores_<mode>.tsv`, `write_scores`) in `out`, and a table
printed by the CLI.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from avssl import AvsslError
from avssl.data.features import FeatureConfig
from avssl.data.loader import DataConfig, StreamingLoader
from avssl.finetune import metrics as M
from avssl.finetune.labels import LabelMap
from avssl.io import atomic_write_text, write_json
from avssl.progress import progress_bar

MODES = ("av", "a", "v")
CALIBRATION_FILE = "calibration.json"


def mode_flags(batch: dict[str, Any], mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(has_audio, has_video, keep) for a modality setting; keep marks samples that have what it needs."""
    ha, hv = batch["has_audio"], batch["has_video"]
    if mode == "av":
        return ha, hv, ha & hv
    if mode == "a":
        return ha, torch.zeros_like(hv), ha.clone()
    if mode == "v":
        return torch.zeros_like(ha), hv, hv.clone()
    raise AvsslError(f"unknown modality setting {mode!r}: use av, a or v")


def eval_loader(corpus: Path, split: str, features: dict[str, Any], batch_size: int, modalities: list[str]) -> StreamingLoader:
    """The corpus split read as the release reads its inputs (`features`, its avssl_features.json):
    its fbank settings, clip length and normalization statistics, so that evaluation scores (and
    the calibration `avssl verify` decides with) come from the features inference computes. A
    release stored without statistics falls back to the corpus's stats.json."""
    from avssl.data.features import FbankStats

    fcfg = FeatureConfig.model_validate(features["features"])
    data = DataConfig(corpus=str(corpus), split=split, batch_size=batch_size, num_workers=0, crop="center",
                      clip_seconds=features["clip_seconds"], resampled=False, shuffle_buffer=0, modalities=modalities)
    stats = features.get("fbank_stats")
    return StreamingLoader(data, fcfg, stats=FbankStats.model_validate(stats) if stats else None)


def _forward_all(loader: StreamingLoader, modes: list[str], fn: Callable, total: int | None) -> dict[str, dict[str, list]]:
    """Run `fn(audio, video, has_audio, has_video, mode) -> [B, ...]` over the split for each mode."""
    out: dict[str, dict[str, list]] = {m: defaultdict(list) for m in modes}
    with torch.no_grad(), progress_bar("evaluating", total) as bar:
        for batch in loader:
            for mode in modes:
                ha, hv, keep = mode_flags(batch, mode)
                if not keep.any():
                    continue
                video = batch["video"] if batch["video"] is not None else None
                values = fn(batch["audio"], video, ha, hv, mode)[keep]
                out[mode]["values"].append(values.float().cpu())
                out[mode]["meta"].extend(m for m, k in zip(batch["meta"], keep.tolist()) if k)
                out[mode]["is_spoof"].append(batch["is_spoof"][keep])
            bar.advance(len(batch["meta"]))
    return {m: {k: (torch.cat(v).numpy() if k != "meta" else v) for k, v in d.items()} for m, d in out.items() if d}


def evaluate_emotion(model, labels: list[str], loader, modes, total, label_map: LabelMap
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """UA, WA, F1s and per-class recall per mode, and each clip's label and prediction; a sample's
    true class comes from `label_map` (the release's label source)."""
    got = _forward_all(loader, modes, lambda a, v, ha, hv, mode: model.scores(a, v, ha, hv), total)
    report, raw = {}, {}
    for mode, d in got.items():
        truth = label_map(d["meta"]).numpy()
        keep = (truth >= 0) & (d["is_spoof"] == 0)  # emotion of bona fide speech: a spoof's label is its source's
        if not keep.any():
            raise AvsslError(f"no {mode} sample of this split has a label among {labels}: check the label source "
                             "(labels.key / labels.csv of the recipe, or --labels-csv)")
        y_true, y_pred = truth[keep], d["values"][keep].argmax(-1)
        report[mode] = M.classification_report(y_true, y_pred, labels)
        report[mode]["n"] = int(keep.sum())
        meta = [m for m, k in zip(d["meta"], keep.tolist()) if k]
        raw[mode] = {"keys": [m["utterance"] for m in meta], "speakers": [m["speaker"] for m in meta],
                     "labels": [labels[i] for i in y_true], "predictions": [labels[i] for i in y_pred],
                     "classes": list(labels), "probabilities": d["values"][keep]}
    return report, raw


def read_asv_scores(path: Path) -> tuple[np.ndarray, list[str]]:
    """An ASVspoof 2019 ASV score file (`CM_KEY ASV_KEY SCORE` per line, e.g. `bonafide target 1.63`,
    `spoof spoof -2.4`) -> (scores, ASV labels target / nontarget / spoof)."""
    scores, labels = [], []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3 or parts[1] not in M.ASV_LABELS:
            raise AvsslError(f"{path}:{n}: expected 'CM_KEY ASV_KEY SCORE' with ASV_KEY one of {list(M.ASV_LABELS)} "
                             f"(the ASVspoof 2019 ASV score format), got {line!r}")
        try:
            scores.append(float(parts[2]))
        except ValueError:
            raise AvsslError(f"{path}:{n}: the score {parts[2]!r} is not a number") from None
        labels.append(parts[1])
    if not scores:
        raise AvsslError(f"{path}: no ASV scores")
    return np.asarray(scores), labels


def tdcf_report(cm_scores: np.ndarray, bona: np.ndarray, asv: tuple[np.ndarray, list[str]]) -> dict[str, float]:
    """min t-DCF, 2019 legacy and 2021 forms, of CM scores (higher = bona fide) with the given ASV."""
    out = {}
    for name, fn in (("min_tdcf_2019", M.tdcf_2019), ("min_tdcf_2021", M.tdcf_2021)):
        try:
            out[name] = fn(cm_scores, bona, *asv).min_tdcf
        except ValueError as exc:
            raise AvsslError(f"t-DCF ({name}): {exc}") from None
    return out


def evaluate_spoof(model, loader, modes, total, asv: tuple[np.ndarray, list[str]] | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    got = _forward_all(loader, modes, lambda a, v, ha, hv, mode: model.scores(a, v, ha, hv), total)
    report, raw = {}, {}
    for mode, d in got.items():
        scores, bona = d["values"], 1 - d["is_spoof"]
        attacks = np.array([m["attack"] for m in d["meta"]])
        r = M.binary_report(scores, bona)
        if asv is not None and (bona == 1).any() and (bona == 0).any():
            r.update(tdcf_report(scores, bona, asv))
        r["per_attack_eer"] = M.per_attack_eer(scores, bona, attacks)
        report[mode] = r
        raw[mode] = {"scores": scores, "labels": bona, "groups": np.where(bona == 1, "bonafide", attacks),
                     "keys": [m["utterance"] for m in d["meta"]], "speakers": [m["speaker"] for m in d["meta"]]}
    return report, raw


def read_trials(path: Path) -> list[tuple[int, str, str]]:
    trials = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3 or parts[0] not in ("0", "1"):
            raise AvsslError(f"{path}:{n}: expected '<1|0> <enroll> <test>', got {line!r}")
        trials.append((int(parts[0]), parts[1], parts[2]))
    if not trials:
        raise AvsslError(f"{path}: no trials")
    return trials


def _utt(path: str) -> str:
    return path.rsplit(".", 1)[0] if path.endswith((".wav", ".flac", ".m4a", ".mp4")) else path


def as_norm(score: float, e: np.ndarray, t: np.ndarray, cohort: np.ndarray, top: int) -> float:
    """Adaptive symmetric score normalization with the top-N cohort scores of each side."""
    se = np.sort(cohort @ e)[-top:]
    st = np.sort(cohort @ t)[-top:]
    return 0.5 * ((score - se.mean()) / (se.std() + 1e-8) + (score - st.mean()) / (st.std() + 1e-8))


def evaluate_speaker(embed_fn: Callable, loader, trials: list[tuple[int, str, str]], modes, total,
                     cohort: dict[str, np.ndarray] | None = None, top: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    got = _forward_all(loader, modes, embed_fn, total)
    report, raw = {}, {}
    for mode, d in got.items():
        emb = {m["utterance"]: e for m, e in zip(d["meta"], d["values"])}
        used = [(lab, _utt(a), _utt(b)) for lab, a, b in trials if _utt(a) in emb and _utt(b) in emb]
        if not used or len({lab for lab, _, _ in used}) < 2:
            continue
        scores = np.array([float(emb[a] @ emb[b]) for _, a, b in used])
        if cohort is not None and top > 0 and mode in cohort:
            scores = np.array([as_norm(s, emb[a], emb[b], cohort[mode], top) for s, (_, a, b) in zip(scores, used)])
        labels = np.array([lab for lab, _, _ in used])
        r = M.binary_report(scores, labels)
        r["n_trials"], r["n_missing_trials"] = len(used), len(trials) - len(used)
        report[mode] = r
        speaker_of = {m["utterance"]: m["speaker"] for m in d["meta"]}
        raw[mode] = {"scores": scores, "labels": labels, "groups": np.where(labels == 1, "target", "nontarget"),
                     "keys": [f"{a} {b}" for _, a, b in used], "speakers": [speaker_of[a] for _, a, _ in used]}
    return report, raw


SCORE_COLUMNS = {"binary": ("key", "speaker", "label", "group", "score"), "classes": ("key", "speaker", "label", "prediction")}
# Emotion score files also hold each class's probability, one column per class named PROB_PREFIX + class:
# what pooling several heads (pool_scores) averages.
PROB_PREFIX = "p_"


def score_file(out: Path, mode: str) -> Path:
    """Where `evaluate(..., out)` writes the per-sample results of one mode."""
    return Path(out) / f"scores_{mode}.tsv"


def write_scores(raw: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    """Per-sample results, one tab-separated file per mode (`scores_<mode>.tsv`, with a header):
    verification `key` = "enroll test", label 1 target / 0 non-target, speaker = the enrollment's;
    spoof `key` = utterance, label 1 bona fide / 0 spoof, group = bonafide or the attack id; both
    with `score` (higher = target / bona fide). Emotion: utterance, speaker, true label, prediction,
    then `p_<class>` per class (its probability) when the raw results have them.
    What `avssl prove` compares pretrained and random backbones with (read_scores)."""
    paths = []
    for mode, d in raw.items():
        kind = "binary" if "scores" in d else "classes"
        header = list(SCORE_COLUMNS[kind])
        columns = [d["keys"], d["speakers"]]
        if kind == "binary":
            columns += [[int(x) for x in d["labels"]], [str(g) for g in d["groups"]], [f"{x:.9g}" for x in d["scores"]]]
        else:
            columns += [d["labels"], d["predictions"]]
            if "probabilities" in d:
                probs = np.asarray(d["probabilities"], dtype=np.float64).reshape(len(d["keys"]), -1)
                header += [PROB_PREFIX + c for c in d["classes"]]
                columns += [[f"{x:.7g}" for x in probs[:, k]] for k in range(probs.shape[1])]
        lines = ["\t".join(header)] + ["\t".join(map(str, row)) for row in zip(*columns)]
        paths.append(score_file(out, mode))
        atomic_write_text(paths[-1], "\n".join(lines) + "\n")
    return paths


def read_scores(path: Path) -> dict[str, list[str]]:
    """A `scores_<mode>.tsv` of write_scores -> {column: values as text}."""
    rows = [line.split("\t") for line in Path(path).read_text().splitlines() if line]
    header = tuple(rows[0]) if rows else ()
    known = header == SCORE_COLUMNS["binary"] or (
        header[:4] == SCORE_COLUMNS["classes"] and all(h.startswith(PROB_PREFIX) for h in header[4:]))
    if not known:
        raise AvsslError(f"{path}: not a score file of avssl evaluate (header {rows[0] if rows else 'missing'}); "
                         "re-run the evaluation that wrote it")
    for n, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise AvsslError(f"{path}:{n}: {len(row)} fields where the header has {len(header)}")
    return {name: [row[i] for row in rows[1:]] for i, name in enumerate(header)}


def pool_scores(paths: list[Path], out: Path) -> Path:
    """One score file from several of the same samples (e.g. heads trained with different seeds):
    each sample's mean score (verification, spoof), or its mean class probabilities and their
    argmax as the prediction (emotion). Score-level fusion of the runs, so a proof's verdict is not
    one head initialization's luck. The files may list the samples in any order; written to `out`."""
    files = [read_scores(p) for p in paths]
    first, keys = files[0], files[0]["key"]
    header = list(first)
    probs = [h for h in header if h.startswith(PROB_PREFIX)]
    if "score" not in first and not probs:
        raise AvsslError(f"{paths[0]}: emotion scores without class probabilities cannot be pooled; re-run "
                         "`avssl evaluate` (or `avssl prove`) with this version to write them")
    cols = ["score"] if "score" in first else probs
    values = []
    for path, f in zip(paths, files):
        if list(f) != header or sorted(f["key"]) != sorted(keys):
            raise AvsslError(f"{path} and {paths[0]} score different samples or columns: pool the score files "
                             "of one task, mode, split and trial list")
        order = {k: i for i, k in enumerate(f["key"])}
        align = [order[k] for k in keys]
        values.append(np.array([[float(f[c][i]) for c in cols] for i in align], dtype=np.float64))
    mean = np.mean(values, axis=0)
    rows = {h: list(first[h]) for h in header}
    if "score" in first:
        rows["score"] = [f"{x:.9g}" for x in mean[:, 0]]
    else:
        for k, c in enumerate(probs):
            rows[c] = [f"{x:.7g}" for x in mean[:, k]]
        rows["prediction"] = [probs[k][len(PROB_PREFIX):] for k in mean.argmax(axis=1)]
    lines = ["\t".join(header)] + ["\t".join(row) for row in zip(*rows.values())]
    atomic_write_text(Path(out), "\n".join(lines) + "\n")
    return Path(out)


def headline(path: Path) -> float:
    """The proof's number of one score file: the EER of a verification or spoof file, the UA
    (mean recall over the true classes) of an emotion file."""
    f = read_scores(path)
    if "score" in f:
        return M.eer(np.array(f["score"], dtype=float), np.array(f["label"], dtype=int)).eer
    classes = {c: k for k, c in enumerate(sorted(set(f["label"]) | set(f["prediction"])))}
    return M.unweighted_accuracy(np.array([classes[c] for c in f["label"]]), np.array([classes[c] for c in f["prediction"]]))


def plot_binary(raw: dict[str, Any], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm
    from sklearn.metrics import DetCurveDisplay

    paths = []
    fig, ax = plt.subplots(figsize=(5, 5))
    # The display draws norm.ppf of the rates, -inf at 0, which matplotlib leaves out: clipped, a run
    # of error-free operating points still draws its line, along the plot's edge.
    clip = lambda x: np.clip(x, 1e-4, 1 - 1e-4)  # noqa: E731
    for mode, d in raw.items():
        # Our points, not DetCurveDisplay.from_predictions: the ones the EER is read from, both ends included.
        far, frr, _ = M.det_curve(d["scores"], d["labels"])
        DetCurveDisplay(fpr=clip(far), fnr=clip(frr)).plot(ax=ax, name=mode.upper())
    edge = 1.05 * norm.ppf(1 - 1e-4)  # the display's own limits (+-3, 0.13 %) would cut that edge off
    ax.set_xlim(-edge, edge)
    ax.set_ylim(-edge, edge)
    ax.set_xlabel("false acceptance")
    ax.set_ylabel("false rejection")
    ax.set_title(f"DET: {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out / "det_curve.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    for mode, d in raw.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for group in sorted(set(d["groups"])):
            ax.hist(d["scores"][d["groups"] == group], bins=30, alpha=0.5, label=str(group))
        ax.set_title(f"scores by class/attack ({mode.upper()})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"scores_{mode}.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


def plot_confusion(report: dict[str, Any], labels: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    paths = []
    for mode, r in report.items():
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ConfusionMatrixDisplay(np.array(r["confusion_matrix"]), display_labels=labels).plot(
            ax=ax, cmap="Blues", xticks_rotation=45, values_format="d", colorbar=False, text_kw={"fontsize": 7})
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"confusion ({mode.upper()}) UA {100 * r['unweighted_accuracy']:.1f}%")
        fig.tight_layout()
        paths.append(out / f"confusion_{mode}.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


def write_calibration(path: Path, raw: dict[str, dict[str, Any]], trials: Path, corpus: Path, split: str,
                      zero_shot: bool, cohort: dict[str, np.ndarray] | None, top: int, features: dict[str, Any]) -> Path | None:
    """The calibration `avssl verify` decides with: per modality setting, the EER threshold of these
    trials' scores and how they were made. With AS-Norm the threshold is on normalized scores, so
    the cohort embeddings go beside it (`<name>.cohort_<mode>.npy`) and verify normalizes the same
    way. Scores here are of each utterance's centred `clip_seconds` window (`"windows": "center"`), so
verify scores its two files the same way: a threshold holds only for the scores it was set on
(whole-file mean embeddings have higher cosines, pairs of other speakers too). Every file is written
    atomically; the JSON last, so it never names a cohort file that is not there."""
    import io

    from avssl.io import atomic_write_bytes

    path = Path(path)
    table: dict[str, Any] = {}
    for mode, r in raw.items():
        result = M.eer(r["scores"], r["labels"])
        entry = {"threshold": float(result.threshold), "eer": float(result.eer), "trials": str(trials),
                 "n_trials": int(len(r["scores"])), "corpus": str(corpus), "split": split, "zero_shot": zero_shot,
                 "windows": "center", "window_seconds": float(features["clip_seconds"])}
        if cohort is not None and top > 0 and mode in cohort:
            name = f"{path.stem}.cohort_{mode}.npy"
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(cohort[mode], dtype=np.float32))
            atomic_write_bytes(path.parent / name, buffer.getvalue())
            entry["as_norm"] = {"top": int(top), "cohort": name, "cohort_size": int(len(cohort[mode]))}
        table[mode] = entry
    if not table:  # the report says so too (no results); verify then names the command that writes one
        import logging

        logging.getLogger("avssl.evaluate").warning(
            "%s: no trial of %s [%s] could be scored (its utterances are not in the split, or all trials have one "
            "label): no calibration written to %s", trials, corpus, split, path)
        return None
    return write_json(path, table)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def evaluate(checkpoint: Path, corpus: Path, out: Path, *, task: str | None = None, split: str = "test",
             trials: Path | None = None, modes: list[str] | None = None, zero_shot: bool = False,
             batch_size: int = 16, as_norm_cohort: int = 0, asv_scores: Path | None = None,
             labels_csv: Path | None = None, calibration: Path | None = None) -> dict[str, Any]:
    """Evaluate a release on a corpus split; writes report.json and plots into `out`.
    asv_scores (spoof): an ASV score file (ASVspoof 2019 format) for min t-DCF in both forms.
    labels_csv (emotion): `utterance,label` CSV replacing the release's label source.
    calibration (speaker): where the calibration for `avssl verify` goes (default: the release's
    calibration.json; see write_calibration)."""
    from avssl.data.shards import CorpusIndex

    checkpoint, corpus, out = Path(checkpoint), Path(corpus), Path(out)
    if zero_shot and not (checkpoint / "config.json").is_file():
        raise AvsslError(
            f"{checkpoint}: not a pretrained release (no config.json). --zero-shot takes a backbone release: "
            "a pretraining run's runs/NAME/avssl/release, or one written by `avssl export`"
        )
    out.mkdir(parents=True, exist_ok=True)
    modes = list(modes or MODES)
    index = CorpusIndex.load(corpus)
    total = index.count(split)
    if zero_shot:
        from avssl.cluster.export import FEATURES_FILE
        from avssl.finetune.heads import zero_shot_embeddings
        from avssl.pretrain.modeling import AVViTModel

        backbone = AVViTModel.from_pretrained(checkpoint).eval()
        features = json.loads((checkpoint / FEATURES_FILE).read_text())
        labels: list[str] = []
        task = "speaker"
        embed_fn = lambda a, v, ha, hv, mode: zero_shot_embeddings(backbone, a, v, ha, hv, mode)  # noqa: E731
    else:
        from avssl.finetune.runner import load_task_model

        model, labels, features = load_task_model(checkpoint)
        if task is not None and task != model.cfg.task:
            raise AvsslError(f"{checkpoint} is a {model.cfg.task} model, not {task}")
        task = model.cfg.task
        embed_fn = lambda a, v, ha, hv, mode: model.embed(a, v, ha, hv, mode=mode)  # noqa: E731
    modalities = features.get("modalities", ["audio", "video"])
    modes = [m for m in modes if m == "av" or {"a": "audio", "v": "video"}[m] in modalities]
    loader = eval_loader(corpus, split, features, batch_size, modalities)
    plots: list[Path] = []
    calibrated: Path | None = None
    if task == "emotion":
        from avssl.finetune.runner import release_label_map

        report, raw = evaluate_emotion(model, labels, loader, modes, total, release_label_map(checkpoint, labels_csv))
        plots = plot_confusion(report, labels, out)
    elif task == "spoof":
        asv = read_asv_scores(Path(asv_scores)) if asv_scores is not None else None
        report, raw = evaluate_spoof(model, loader, modes, total, asv)
        plots = plot_binary(raw, out, "spoof detection (bona fide = target)")
    else:
        trials_path = trials or next(iter(sorted((corpus / "trials").glob("*.txt"))), None)
        if trials_path is None:
            raise AvsslError(f"{corpus}: no trial list; pass --trials FILE (VoxCeleb format)")
        cohort = None
        if as_norm_cohort > 0:
            train = _forward_all(eval_loader(corpus, "train", features, batch_size, modalities), modes, embed_fn, index.count("train"))
            cohort = {m: d["values"] for m, d in train.items()}
        report, raw = evaluate_speaker(embed_fn, loader, read_trials(Path(trials_path)), modes, total, cohort, as_norm_cohort)
        plots = plot_binary(raw, out, "speaker verification")
        # What `avssl verify` decides with, for finetuned and pretrained (zero-shot) releases alike.
        calibrated = write_calibration(Path(calibration) if calibration is not None else checkpoint / CALIBRATION_FILE,
                                       raw, trials_path, corpus, split, zero_shot, cohort, as_norm_cohort, features)
    score_files = write_scores(raw, out)
    full = _jsonable({"task": task, "checkpoint": str(checkpoint), "corpus": str(corpus), "split": split,
                      "zero_shot": zero_shot, "eer_method": "ROC crossing with linear interpolation",
                      "asv_scores": str(asv_scores) if asv_scores is not None else None,
                      "results": report, "plots": [p.name for p in plots], "scores": [p.name for p in score_files],
                      "calibration": str(calibrated) if calibrated is not None else None})
    write_json(out / "report.json", full)
    return full


def evaluate_recipe(release: Path, recipe: Any, out: Path) -> dict[str, Any]:
    """`evaluate` a finetuned release as its finetuning recipe's `eval` section says, on the
    recipe's corpus (what `avssl finetune` runs after training)."""
    corpus = Path(recipe.data.corpus)
    return evaluate(release, corpus, out, split=recipe.eval.split,
                    trials=corpus / recipe.eval.trials if recipe.eval.trials else None, modes=recipe.eval.modes,
                    batch_size=recipe.eval.batch_size, as_norm_cohort=recipe.eval.as_norm_cohort)


def log_report(report: dict[str, Any], out: Path, uri: str, run_id: str) -> None:
    """A report's metrics (`eval.<mode>.<metric>`), report.json and plots into an MLflow run."""
    from avssl.cluster.config import MlflowConfig
    from avssl.cluster.tracking import MlflowLogger

    metrics = {}
    for mode, r in report["results"].items():
        for key, value in r.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"eval.{mode}.{key}".replace("@", "_")] = float(value)
    logger = MlflowLogger(uri, run_id, MlflowConfig())
    logger.log_metrics(metrics, step=0)
    logger.log_artifact(out, "evaluation")
    logger.finish(status=None, timeout_s=60)


def summary_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Column headers and one row per modality for the printed table: every headline metric of
    the task under its own header (per-class recall and the confusion matrix stay in the plots)."""
    results = report["results"]
    if report["task"] == "emotion":
        header = ["modality", "UA %", "WA %", "macro-F1 %", "weighted-F1 %", "clips"]
        rows = [[mode.upper(), *(f"{100 * r[k]:.1f}" for k in ("unweighted_accuracy", "accuracy", "f1_macro", "f1_weighted")),
                 str(r["n"])] for mode, r in results.items()]
        return header, rows
    header = ["modality", "EER %", "minDCF 0.01", "minDCF 0.05"]
    tdcf = [k for k in ("min_tdcf_2019", "min_tdcf_2021") if any(k in r for r in results.values())]
    header += [f"min t-DCF {k[-4:]}" for k in tdcf]
    attacks = sorted({a for r in results.values() for a in r.get("per_attack_eer", {})})
    header += [f"EER {a} %" for a in attacks]
    rows = []
    for mode, r in results.items():
        row = [mode.upper(), f"{100 * r['eer']:.2f}", f"{r['min_dcf_0.01']:.3f}", f"{r['min_dcf_0.05']:.3f}"]
        row += [f"{r[k]:.4f}" if k in r else "-" for k in tdcf]
        per_attack = r.get("per_attack_eer", {})
        row += [f"{100 * per_attack[a]:.1f}" if a in per_attack else "-" for a in attacks]
        rows.append(row)
    return header, rows
