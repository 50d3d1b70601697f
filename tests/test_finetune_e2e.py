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
    "features.num_frames=2", "model.audio_num_mel_bins=64", "model.audio_num_frames=98", "model.video_image_size=32",
    "model.video_num_frames=2", "trainer.total_steps=8", "trainer.log_every=4", "trainer.checkpoint_every=8",
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
