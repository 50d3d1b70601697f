"""Frozen-feature probe: how much emotion and spoof information each representation carries.

A diagnostic script, not a test and not the proof (`avssl prove` is the proof: the product's own
finetuning runner, heads and budget). This one fits scikit-learn's logistic regression to
convergence on standardized frozen features of the corpus's train split and scores the test split
(unseen speakers), so it measures the representation, not how fast a head learns on it:

  emotion UA  classifier on bona fide clips, unweighted accuracy over the six emotions
  spoof EER   classifier bona fide vs spoof, EER of its bona fide score (finetune.metrics.eer)

Representations, each in modality settings AV / A / V where it has them:
  <release>   the mean-pooled last hidden state of a released backbone (AV: the backbone's
              `fused_embeds` of the joint sequence); `--layers all` adds every layer's mean and
              std over tokens. Two more rows split the joint pass: "av.audio" / "av.video" pool
              only the audio / video tokens of the joint sequence (what joint attention did to them)
  random      the same architecture from a random initialization (avssl prove's baseline: seed 0)
  raw         hand-made input statistics, no network: per-mel-bin mean and std of the fbank and std
              of its frame-to-frame difference (A); per-8x8-pixel-block mean and std over frames (V)

Usage:
  python benchmarks/probe_features.py --release runs/demo/avssl/release --data data/demo
  python benchmarks/probe_features.py --release R1 --release R2 --data data/demo --no-random --json out.json
  python benchmarks/probe_features.py --release R --data data/demo --train-speakers 2,4,8   (fewer labels:
      the classifiers see only K random training speakers' clips, mean over --draws draws)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from avssl.finetune.evaluate import eval_loader, mode_flags
from avssl.finetune.metrics import eer, unweighted_accuracy
from avssl.finetune.proof import random_backbone_release
from avssl.pretrain.modeling import AVViTModel, masked_mean

MODES = ("av", "a", "v")
JOINT_PARTS = ("av.audio", "av.video")  # each modality's tokens pooled from the joint pass


Split = tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]  # features per mode, emotion, is_spoof, speaker


def backbone_features(release: Path, corpus: Path, split: str, all_layers: bool, pool: str = "embedding") -> Split:
    """Pooled frozen features per mode: {mode: [N, P]}, emotion [N], is_spoof [N], speaker [N].
    pool "embedding": the backbone's pooled embeddings (the CLS output when it has CLS tokens);
    "tokens": the mean of each modality's output tokens, AV the mean of the two (what the heads'
    mean pooling reads; the same as "embedding" without CLS tokens, up to the AV joint pass)."""
    model = AVViTModel.from_pretrained(release).eval()
    features = json.loads((release / "avssl_features.json").read_text())
    loader = eval_loader(corpus, split, features, 32, ["audio", "video"])
    out: dict[str, list[np.ndarray]] = {m: [] for m in (*MODES, *JOINT_PARTS)}
    emotion, spoof, speaker = [], [], []
    with torch.no_grad():
        for batch in loader:
            for mode in MODES:
                has_audio, has_video, _ = mode_flags(batch, mode)
                audio = batch["audio"] if mode != "v" else None
                video = batch["video"] if mode != "a" else None
                o = model(audio=audio, video=video, has_audio=has_audio if audio is not None else None,
                          has_video=has_video if video is not None else None, output_hidden_states=all_layers)
                if pool == "tokens":
                    names = {"av": ("audio", "video"), "a": ("audio",), "v": ("video",)}[mode]
                    # the heads' mean pooling: every real output token, the CLS one included
                    means = [masked_mean(o[f"{n}_last_hidden_state"], o[f"{n}_token_mask"]) for n in names]
                    pooled = torch.stack(means).mean(0)  # (B, D)
                else:
                    pooled = {"av": o.fused_embeds, "a": o.audio_embeds, "v": o.video_embeds}[mode]  # (B, D)
                parts = [pooled]
                if all_layers:
                    parts += [h.mean(1) for h in o.hidden_states] + [h.std(1) for h in o.hidden_states]
                out[mode].append(torch.cat(parts, -1).numpy())
                if mode == "av":
                    out["av.audio"].append(o.audio_embeds.numpy())
                    out["av.video"].append(o.video_embeds.numpy())
            emotion.append(batch["emotion"].numpy())
            spoof.append(batch["is_spoof"].numpy())
            speaker += [m["speaker"] for m in batch["meta"]]
    return {m: np.concatenate(v) for m, v in out.items()}, np.concatenate(emotion), np.concatenate(spoof), np.array(speaker)


def raw_features(corpus: Path, split: str, features: dict) -> Split:
    """Input statistics without a network: A = fbank [B, T, F] -> mean, std, delta std [B, 3F];
    V = frames [B, V, 3, H, W] -> 8x8 block means, then their mean and std over frames."""
    loader = eval_loader(corpus, split, features, 32, ["audio", "video"])
    audio_rows, video_rows, emotion, spoof, speaker = [], [], [], [], []
    for batch in loader:
        fbank = batch["audio"].float()  # (B, T, F)
        delta = fbank[:, 1:] - fbank[:, :-1]
        audio_rows.append(torch.cat([fbank.mean(1), fbank.std(1), delta.std(1)], -1).numpy())
        frames = batch["video"].float()  # (B, V, 3, H, W)
        blocks = torch.nn.functional.avg_pool2d(frames.flatten(0, 1), 8).view(frames.shape[0], frames.shape[1], -1)  # (B, V, 3*H/8*W/8)
        video_rows.append(torch.cat([blocks.mean(1), blocks.std(1)], -1).numpy())
        emotion.append(batch["emotion"].numpy())
        spoof.append(batch["is_spoof"].numpy())
        speaker += [m["speaker"] for m in batch["meta"]]
    return ({"a": np.concatenate(audio_rows), "v": np.concatenate(video_rows)}, np.concatenate(emotion), np.concatenate(spoof),
            np.array(speaker))


def probe(train: Split, test: Split, c: float) -> dict[str, dict[str, float]]:
    """Logistic regression per mode -> {mode: {"emotion_ua": %, "spoof_eer": %}}."""
    (x_train, emo_train, spoof_train, _), (x_test, emo_test, spoof_test, _) = train, test
    results = {}
    for mode in x_train:
        scaler = StandardScaler().fit(x_train[mode])
        xtr, xte = scaler.transform(x_train[mode]), scaler.transform(x_test[mode])
        bona_tr, bona_te = spoof_train == 0, spoof_test == 0
        results[mode] = {"emotion_ua": float("nan"), "spoof_eer": float("nan")}  # a subset with one class only
        if len(np.unique(emo_train[bona_tr])) > 1:
            emo = LogisticRegression(C=c, max_iter=3000).fit(xtr[bona_tr], emo_train[bona_tr])
            results[mode]["emotion_ua"] = round(100 * unweighted_accuracy(emo_test[bona_te], emo.predict(xte[bona_te])), 1)
        if len(np.unique(spoof_train)) > 1:
            bona_score = -LogisticRegression(C=c, max_iter=3000).fit(xtr, spoof_train).decision_function(xte)  # higher = bona fide
            results[mode]["spoof_eer"] = round(100 * eer(bona_score, bona_te.astype(int)).eer, 1)
    return results


def probe_fewer_speakers(train: Split, test: Split, c: float, k: int, draws: int) -> dict[str, dict[str, float]]:
    """`probe` trained on the clips of `k` random training speakers, averaged over `draws` draws
    (seeded: every representation sees the same draws)."""
    rng = np.random.default_rng(0)
    speakers = np.unique(train[3])
    if not 0 < k <= len(speakers):
        raise SystemExit(f"--train-speakers {k}: the train split has {len(speakers)} speakers")
    runs = []
    for _ in range(draws):
        keep = np.isin(train[3], rng.choice(speakers, k, replace=False))
        runs.append(probe(({m: x[keep] for m, x in train[0].items()}, train[1][keep], train[2][keep], train[3][keep]), test, c))
    return {m: {key: round(float(np.nanmean([r[m][key] for r in runs])), 1) for key in runs[0][m]} for m in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, action="append", default=[], help="a released backbone (repeatable)")
    parser.add_argument("--data", type=Path, required=True, help="a corpus with train and test splits")
    parser.add_argument("--no-random", action="store_true", help="skip the random-init twin of the first release")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw input statistics")
    parser.add_argument("--layers", choices=("last", "all"), default="last")
    parser.add_argument("--pool", choices=("embedding", "tokens"), default="embedding",
                        help="pooled embedding (CLS output when the model has one) or the mean of output tokens")
    parser.add_argument("--C", type=float, default=0.1, help="inverse L2 strength of the logistic regression")
    parser.add_argument("--train-speakers", default="", help="comma-separated K: also probe with K training speakers only")
    parser.add_argument("--draws", type=int, default=5, help="random speaker draws per K (with --train-speakers)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not args.release:
        parser.error("--release is required (the random twin and the feature settings come from it)")

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        releases = {str(r): r.resolve() for r in args.release}
        if not args.no_random:
            releases["random"] = random_backbone_release(args.release[0].resolve(), Path(tmp) / "random")
        all_layers = args.layers == "all"
        splits = {name: {s: backbone_features(release, args.data, s, all_layers, args.pool) for s in ("train", "test")}
                  for name, release in releases.items()}
    if not args.no_raw:
        features = json.loads((args.release[0] / "avssl_features.json").read_text())
        splits["raw"] = {s: raw_features(args.data, s, features) for s in ("train", "test")}
    ks = [int(k) for k in args.train_speakers.split(",") if k.strip()]
    for name, split in splits.items():
        results[name] = probe(split["train"], split["test"], args.C)
        print(f"{name}: {results[name]}", flush=True)
        for k in ks:
            results[f"{name}, {k} train speakers"] = probe_fewer_speakers(split["train"], split["test"], args.C, k, args.draws)
            print(f"{name}, {k} train speakers: {results[f'{name}, {k} train speakers']}", flush=True)

    print(f"\n| features | emotion UA % (AV / A / V) | spoof EER % (AV / A / V) |\n| --- | --- | --- |")
    for name, r in results.items():
        cell = lambda key: " / ".join(str(r[m][key]) if m in r else "-" for m in MODES)  # noqa: E731
        print(f"| {name} | {cell('emotion_ua')} | {cell('spoof_eer')} |")
    for name, r in results.items():
        if "av.audio" in r:
            parts = ", ".join(f"{p} {r[p]['emotion_ua']} / {r[p]['spoof_eer']}" for p in JOINT_PARTS)
            print(f"{name}, tokens of the joint pass (emotion UA / spoof EER): {parts}")
    if args.json:
        args.json.write_text(json.dumps({"data": str(args.data), "C": args.C, "layers": args.layers, "results": results}, indent=2))


if __name__ == "__main__":
    main()
