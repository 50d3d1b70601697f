"""Finetuning end to end on the real runner: every --init source, evaluation reports, MLflow, inference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from avssl import AvsslError
from avssl.cli import main
from avssl.config import load_config
from avssl.data.corpus import CorpusRecipe, synthesize_corpus
from avssl.data.shards import CorpusIndex, iter_raw_samples

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# configs/finetune/*.yaml are written for the demo corpus; these make them fit the tiny one.
TINY = [
    "data.clip_seconds=1.0", "data.batch_size=4", "features.num_mel_bins=64", "features.image_size=32",
    "features.num_frames=2", "trainer.total_steps=8", "trainer.log_every=4", "trainer.checkpoint_every=8",
]


def sets(*items: str) -> list[str]:
    return [w for item in items for w in ("--set", item)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny corpus and a pretraining run registered in MLflow as avssl-ft-test."""
    root = tmp_path_factory.mktemp("ft")
    corpus = root / "tiny"
    synthesize_corpus(load_config(CorpusRecipe, REPO / "configs/data/tiny.yaml"), corpus)
    runs = root / "runs"
    code = main(["pretrain", "--config", str(REPO / "configs/pretrain/tiny.yaml"),
                 *sets(f"data.corpus={corpus}", f"trainer.storage_path={runs}", "trainer.name=pre", "trainer.total_steps=8",
                       "mlflow.register_model=avssl-ft-test", f"mlflow.tracking_uri=sqlite:///{runs}/mlflow.db")])
    assert code == 0
    return {"corpus": corpus, "runs": runs, "uri": f"sqlite:///{runs}/mlflow.db"}


def finetune(world, task: str, init: str, name: str) -> Path:
    runs = world["runs"]
    code = main(["finetune", "--config", str(REPO / f"configs/finetune/{task}.yaml"), "--init", init,
                 *sets(*TINY, f"data.corpus={world['corpus']}", f"trainer.storage_path={runs}/ft", f"trainer.name={name}",
                       f"mlflow.tracking_uri={world['uri']}")])
    assert code == 0
    return runs / "ft" / name / "avssl" / "release"


def test_speaker_from_run_directory_with_report_and_verify(world, tmp_path, capsys, monkeypatch):
    """--init RUN_DIR finetunes the speaker head, writes the report, plots and calibration, logs them, and verify/embed work."""
    release = finetune(world, "speaker", str(world["runs"] / "pre"), "spk")
    assert {"backbone", "head.safetensors", "head.json", "labels.json", "avssl_features.json", "calibration.json"} <= {
        p.name for p in release.iterdir()}
    report = json.loads((release.parent / "eval" / "report.json").read_text())
    assert report["task"] == "speaker" and set(report["results"]) == {"av", "a", "v"}
    assert {"det_curve.png", "scores_av.png"} <= set(report["plots"])
    assert 0.0 <= report["results"]["av"]["eer"] <= 1.0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(world["uri"])
    exp = client.get_experiment_by_name("avssl-finetune")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`avssl.run_name` = 'spk'")
    assert "eval.av.eer" in run.data.metrics and "evaluation" in {a.path for a in client.list_artifacts(run.info.run_id)}

    media = []
    for sample in iter_raw_samples(CorpusIndex.load(world["corpus"]).shards("test")):
        path = tmp_path / f"{sample['__key__']}.flac"
        path.write_bytes(sample["flac"])
        media.append(path)
        if len(media) == 3:
            break
    capsys.readouterr()
    assert main(["verify", str(media[0]), str(media[1]), "--checkpoint", str(release)]) == 0
    assert "threshold" in capsys.readouterr().out
    assert main(["embed", *map(str, media), "--checkpoint", str(release), "--out", str(tmp_path / "e.npy")]) == 0
    import numpy as np

    emb = np.load(tmp_path / "e.npy")
    assert emb.shape[0] == 3 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)


def test_emotion_from_registered_model_and_predict(world, tmp_path, capsys, monkeypatch):
    """--init models:/NAME/VERSION pulls the registered release; the emotion report has UA per modality; predict labels files."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    release = finetune(world, "emotion", "models:/avssl-ft-test/1", "emo")
    report = json.loads((release.parent / "eval" / "report.json").read_text())
    assert set(report["results"]) == {"av", "a", "v"}
    assert all("unweighted_accuracy" in r and len(r["confusion_matrix"]) == 6 for r in report["results"].values())
    sample = next(iter_raw_samples(CorpusIndex.load(world["corpus"]).shards("test")))
    wav = tmp_path / "clip.flac"
    wav.write_bytes(sample["flac"])
    from avssl.finetune.inference import predict

    (row,) = predict(release, [wav])
    assert row["file"] == str(wav) and row["label"] in row["probabilities"]
    assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    capsys.readouterr()
    assert main(["predict", "--task", "emotion", "--checkpoint", str(release), str(wav)]) == 0
    assert row["label"] in capsys.readouterr().out


def test_spoof_report_with_asv_scores_gives_both_tdcf_forms(world, tmp_path, capsys):
    """A spoof model from the pretraining run (a run directory as --init); `avssl evaluate --asv-scores`
    adds min t-DCF 2019 and 2021 per modality, equal to the metrics module on the report's own scores."""
    import numpy as np

    from avssl.finetune import metrics as M
    from avssl.finetune.evaluate import read_asv_scores

    release = finetune(world, "spoof", str(world["runs"] / "pre"), "cm")
    rng = np.random.default_rng(0)
    lines = [f"bonafide target {x:.3f}" for x in rng.normal(3, 1, 40)] + [f"bonafide nontarget {x:.3f}" for x in rng.normal(-3, 1, 40)]
    lines += [f"spoof spoof {x:.3f}" for x in rng.normal(1.5, 1.5, 40)]
    asv = tmp_path / "ASVspoof2019.LA.asv.eval.gi.trl.scores.txt"
    asv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(release), "--task", "spoof", "--data", str(world["corpus"]),
                 "--asv-scores", str(asv), "--out", str(out), "--no-mlflow"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert "t-DCF" in printed  # the printed table has both columns, with the report's values
    assert all(f"{r[k]:.4f}" in printed for r in report["results"].values() for k in ("min_tdcf_2019", "min_tdcf_2021"))
    scores, labels = read_asv_scores(asv)
    assert labels.count("spoof") == 40 and report["asv_scores"] == str(asv)
    for r in report["results"].values():
        assert 0.0 < r["min_tdcf_2019"] <= 1.0 + 1e-9 and 0.0 < r["min_tdcf_2021"] <= 1.0 + 1e-9
    # The metrics module recomputed on the same CM scores agrees (the AV mode's raw scores come from the model).
    from avssl.finetune.evaluate import eval_loader, evaluate_spoof
    from avssl.finetune.runner import load_task_model

    model, _, features = load_task_model(release)
    loader = eval_loader(world["corpus"], "test", features, 16, ["audio", "video"])
    _, raw = evaluate_spoof(model, loader, ["av"], None)
    expect = M.tdcf_2019(raw["av"]["scores"], raw["av"]["labels"], scores, labels).min_tdcf
    assert report["results"]["av"]["min_tdcf_2019"] == pytest.approx(expect, rel=1e-6)
    bad = tmp_path / "bad.txt"
    bad.write_text("bonafide target 1.0\nbonafide maybe 2.0\n")
    with pytest.raises(AvsslError, match=r"bad.txt:2: expected 'CM_KEY ASV_KEY SCORE'"):
        read_asv_scores(bad)


def test_emotion_with_a_user_label_csv(world, tmp_path):
    """A user's own label set (arousal high/low from a CSV) trains a 2-class head, is stored with the
    release and drives `avssl evaluate`; a CSV naming an unknown class fails before any worker starts."""
    rows = ["utterance,label"]
    for shard_split in ("train", "test"):
        for sample in iter_raw_samples(CorpusIndex.load(world["corpus"]).shards(shard_split)):
            meta = json.loads(sample["json"])
            if meta["emotion"] is not None:
                rows.append(f"{meta['utterance']},{'high' if meta['emotion'] in ('ANG', 'FEA', 'HAP') else 'low'}")
    labels_csv = tmp_path / "arousal.csv"
    labels_csv.write_text("\n".join(rows) + "\n")
    runs = world["runs"]
    common = [*TINY, f"data.corpus={world['corpus']}", f"trainer.storage_path={runs}/ft", f"mlflow.tracking_uri={world['uri']}",
              "labels.names=[low, high]", f"labels.csv={labels_csv}"]
    code = main(["finetune", "--config", str(REPO / "configs/finetune/emotion.yaml"), "--init", str(runs / "pre"),
                 *sets(*common, "trainer.name=arousal")])
    assert code == 0
    release = runs / "ft" / "arousal" / "avssl" / "release"
    assert json.loads((release / "labels.json").read_text()) == ["low", "high"]
    report = json.loads((release.parent / "eval" / "report.json").read_text())
    assert all(len(r["confusion_matrix"]) == 2 and r["n"] > 0 for r in report["results"].values())
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(release), "--task", "emotion", "--data", str(world["corpus"]),
                 "--labels-csv", str(labels_csv), "--out", str(out), "--no-mlflow"]) == 0
    assert json.loads((out / "report.json").read_text())["results"]["av"]["n"] == report["results"]["av"]["n"]
    labels_csv.write_text("utterance,label\nspk0000/utt0000,medium\n")
    assert main(["finetune", "--config", str(REPO / "configs/finetune/emotion.yaml"), *sets(*common, "trainer.name=bad")]) != 0


def test_resolve_init_sources_and_errors(world, tmp_path):
    """A release directory is copied as is; a bad source and a backbone of another geometry fail clearly."""
    from avssl.finetune.recipe import FinetuneRecipe
    from avssl.finetune.runner import check_release_fits, resolve_init

    release = world["runs"] / "pre" / "avssl" / "release"
    got = resolve_init(str(release), tmp_path / "init")
    assert (got / "config.json").is_file() and (got / "avssl_features.json").is_file()
    with pytest.raises(AvsslError, match="not a release directory"):
        resolve_init(str(tmp_path / "nothing-here.txt"), tmp_path / "init2")
    recipe = load_config(FinetuneRecipe, REPO / "configs/finetune/emotion.yaml")  # 128 mel bins, tiny has 64
    with pytest.raises(AvsslError, match="audio_num_mel_bins=64"):
        check_release_fits(got, recipe)
    shutil.rmtree(tmp_path / "init")


def test_prove_compares_pretrained_and_random_and_names_runs_by_the_release(world, tmp_path, capsys):
    """`avssl prove` finetunes the same recipe from the release and from a random backbone, writes the
    table (gain and its two-standard-error margin per modality) and keys its runs by the weights' hash."""
    from avssl.finetune.evaluate import read_scores
    from avssl.finetune.proof import config_tag, release_tag

    release = world["runs"] / "pre" / "avssl" / "release"
    shape = [item for item in TINY if not item.startswith("trainer.")]
    storage, out = tmp_path / "runs", tmp_path / "report"
    capsys.readouterr()
    assert main(["prove", "--pretrained", str(release), "--data", str(world["corpus"]), "--steps", "4", "--tasks", "emotion",
                 "--storage", str(storage), "--out", str(out), *sets(*shape, f"mlflow.tracking_uri={world['uri']}")]) == 0
    printed = capsys.readouterr().out
    assert "emotion" in printed and "proof.md" in printed  # the rich table (wrapped to the capture's width)
    proof = json.loads((out / "proof.json").read_text())
    rows = {(t["task"], t["mode"]) for t in proof["table"]}
    assert proof["attacks"] == []  # per-attack spoof EERs only when spoof is proved
    assert rows == {(task, mode) for task in ("emotion", "speaker (zero-shot)") for mode in ("AV", "A", "V")}
    for t in proof["table"]:
        assert t["gain"] == pytest.approx((t["pretrained"] - t["random"]) * (1 if t["metric"] == "UA %" else -1))
        assert t["clearly_better"] == (t["gain"] > t["clear_margin"]) and 0 <= t["clear_margin"] < 100
        assert t["interval"][0] <= t["interval"][1] and t["speakers"] >= 2  # the paired speaker bootstrap
    assert read_scores(out / "emotion_pretrained" / "scores_a.tsv")["key"]  # what the verdicts were computed from
    tag = release_tag(release)
    names = sorted(p.name for p in storage.iterdir() if p.name.startswith("prove-"))
    random_tag = release_tag(storage / f"random_backbone-{config_tag(release)}")  # the random weights' own hash
    assert random_tag != tag
    assert [n.rsplit("-", 1)[0] for n in names] == [f"prove-emotion-pretrained-{tag}", f"prove-emotion-random-{random_tag}"]
    assert len({n.rsplit("-", 1)[1] for n in names}) == 1  # one recipe hash for the pair
    assert "| emotion | AV | UA % |" in (out / "proof.md").read_text()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(world["uri"]).get_run(proof_run_id(printed))
    assert run.data.metrics["proof.emotion.av.gain"] == pytest.approx(
        next(t["gain"] for t in proof["table"] if (t["task"], t["mode"]) == ("emotion", "AV")))
    assert {"proof.speaker_zero_shot.v.clear_margin", "proof.emotion.a.random"} <= set(run.data.metrics)

    # --seeds 0 1: seed 0's runs are kept (same recipe hash), seed 1 trains one head per backbone,
    # and each clip's class probabilities are averaged over the two heads before the verdict.
    from avssl.finetune.evaluate import headline

    def released_at(name: str) -> int:
        return (storage / name / "avssl" / "release").stat().st_mtime_ns

    # Seed 0's runs are finished under the same recipes: returned as they are, not re-run. (The random
    # one's recipe names the random backbone in --storage, one folder per config, not one per call.)
    kept = {name: released_at(name) for name in names}
    pooled_out = tmp_path / "pooled"
    assert main(["prove", "--pretrained", str(release), "--data", str(world["corpus"]), "--steps", "4", "--tasks", "emotion",
                 "--seeds", "0", "1", "--storage", str(storage), "--out", str(pooled_out),
                 *sets(*shape, f"mlflow.tracking_uri={world['uri']}")]) == 0
    printed = capsys.readouterr().out
    pooled = json.loads((pooled_out / "proof.json").read_text())
    assert pooled["seeds"] == [0, 1]
    assert len([p for p in storage.iterdir() if p.name.startswith("prove-")]) == 4
    assert {name: released_at(name) for name in kept} == kept and len(kept) == 2
    single = {(t["task"], t["mode"]): t for t in proof["table"]}
    for t in pooled["table"]:
        if t["task"] == "emotion":
            assert len(t["seed_gains"]) == 2 and t["seed_gains"][0] == pytest.approx(single[("emotion", t["mode"])]["gain"])
            assert f"{t['seed_gains'][1]:+.1f}" in printed  # the table's per-seed column (wrapped to the capture's width)
        else:
            assert t["seed_gains"] == [] and t["gain"] == pytest.approx(single[(t["task"], t["mode"])]["gain"])
    for r in pooled["rows"]:
        if r["task"] == "emotion":
            assert Path(r["scores"]).parent.name == f"emotion_{r['init']}" and r["value"] == pytest.approx(headline(r["scores"]))
            assert [s["seed"] for s in r["seeds"]] == [0, 1] and Path(r["seeds"][1]["scores"]).parent.name == "seed1"
            assert any(c.startswith("p_") for c in read_scores(r["scores"]))  # pooled class probabilities
    assert "| per seed |" in (pooled_out / "proof.md").read_text()

    # Another release of the same architecture: its own pretrained runs, the random backbone's kept.
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other_release"
    shutil.copytree(release, other)
    weights = next(other.glob("*.safetensors"))
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    before = {p.name for p in storage.iterdir() if p.name.startswith("prove-")}
    random_run = next(name for name in before if "-random-" in name)
    random_released = released_at(random_run)
    assert main(["prove", "--pretrained", str(other), "--data", str(world["corpus"]), "--steps", "4", "--tasks", "emotion",
                 "--storage", str(storage), "--out", str(tmp_path / "other_report"),
                 *sets(*shape, f"mlflow.tracking_uri={world['uri']}")]) == 0
    added = {p.name for p in storage.iterdir() if p.name.startswith("prove-")} - before
    assert [n.rsplit("-", 1)[0] for n in added] == [f"prove-emotion-pretrained-{release_tag(other)}"]
    assert released_at(random_run) == random_released  # one random backbone per config: its run kept
    again = json.loads((tmp_path / "other_report" / "proof.json").read_text())
    assert {t["mode"]: t["random"] for t in again["table"] if t["task"] == "emotion"} == pytest.approx(
        {t["mode"]: t["random"] for t in proof["table"] if t["task"] == "emotion"})


def proof_run_id(printed: str) -> str:
    import re

    return re.search(r"MLflow run\s+([0-9a-f]{32})", printed).group(1)


def test_frozen_feature_probe_script_scores_release_random_twin_and_raw_inputs(world, tmp_path):
    """benchmarks/probe_features.py (the diagnostic tables of docs/pretraining-experiments.md) runs on a release and writes every row."""
    import subprocess
    import sys

    release = world["runs"] / "pre" / "avssl" / "release"
    out = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/probe_features.py"), "--release", str(release),
                           "--data", str(world["corpus"]), "--layers", "all", "--train-speakers", "2", "--draws", "2",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| raw |" in done.stdout and "tokens of the joint pass" in done.stdout
    results = json.loads(out.read_text())["results"]
    assert set(results) == {f"{name}{suffix}" for name in (str(release), "random", "raw") for suffix in ("", ", 2 train speakers")}
    assert set(results["raw"]) == {"a", "v"} and set(results["random"]) == {"av", "a", "v", "av.audio", "av.video"}
    for row in results.values():
        for cell in row.values():
            assert 0.0 <= cell["emotion_ua"] <= 100.0 and 0.0 <= cell["spoof_eer"] <= 100.0


def test_target_baselines_script_bounds_every_reconstruction_loss(world, tmp_path):
    """benchmarks/target_baselines.py (how docs/model.md reads the reconstruction losses): a hand case,
    then a run on a release whose numbers obey what least squares guarantees."""
    import importlib.util
    import subprocess
    import sys

    import torch

    spec = importlib.util.spec_from_file_location("target_baselines", REPO / "benchmarks/target_baselines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # One clip, two rows, three time steps, one-pixel patches: row 0 = [1, 1, 1], row 1 = [0, 2, 4].
    grid = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 2.0, 4.0]]]).unsqueeze(-1)
    got = module.baselines(grid, (torch.tensor([0]), torch.tensor([1])))
    assert got == {"zero": round((3 + 0 + 4 + 16) / 6, 4), "time nbr": round((0 + 0 + 4 + 4) / 4, 4),
                   "row nbr": round((1 + 1 + 9) / 3, 4), "clip mean": round((0 + 0 + 0 + 4 + 0 + 4) / 6, 4)}

    release = world["runs"] / "pre" / "avssl" / "release"
    out = tmp_path / "targets.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/target_baselines.py"), "--release", str(release),
                           "--data", str(world["corpus"]), "--clips", "16", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| audio | normalized |" in done.stdout and "| video | raw |" in done.stdout
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"audio", "video"} and all(set(forms) == {"normalized", "raw"} for forms in results.values())
    for modality, forms in results.items():
        # Per-patch normalized targets have unit (unbiased) variance and zero mean: predicting 0 scores
        # (P - 1) / P, just under 1, except for flat patches, which normalize to 0.
        assert 0.5 < forms["normalized"]["zero"] < 1.0, (modality, forms)
        for form, row in forms.items():
            # The clip's row mean is the least-squares constant per row, so it never loses to predicting 0.
            assert 0.0 <= row["clip mean"] <= row["zero"] + 1e-6, (modality, form, row)
            assert row["time nbr"] >= 0.0 and row["row nbr"] >= 0.0
