"""Inference on real recordings: whole-file windows, batching across files, bad files, folders and
lists, the modality record, flat memory on long video, zero-shot calibration for verify, predict's task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avssl import AvsslError
from avssl.cli import main

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "realdata"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} (real recordings) is missing")

# The tiny model's input settings (configs/pretrain/tiny.yaml): 1 s windows, 64 mel bins, 2 frames of 32 px.
TINY = {"audio_num_mel_bins": 64, "audio_num_frames": 98, "video_image_size": 32, "video_num_frames": 2}
STATS = {"mean": -6.0, "std": 4.0, "num_mel_bins": 64, "frame_shift_ms": 10.0, "frame_length_ms": 25.0,
         "norm_std_scale": 2.0, "num_clips": 1}


def _features(modalities: list[str]) -> dict:
    from avssl.data.features import FeatureConfig

    features = FeatureConfig(num_mel_bins=64, image_size=32, num_frames=2).model_dump(mode="json")
    return {"features": features, "fbank_stats": STATS, "clip_seconds": 1.0, "modalities": modalities}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A pretrained-release folder (backbone + feature settings) of the tiny model with its initial
    weights: the real model and input pipeline, for the mechanics that do not depend on training."""
    import torch

    from avssl.pretrain.modeling import AVViTModel
    from avssl.pretrain.registry import avvit_config

    out = tmp_path_factory.mktemp("backbone")
    torch.manual_seed(0)
    AVViTModel(avvit_config("avvit_tiny_patch16", **TINY)).save_pretrained(out, safe_serialization=True)
    (out / "avssl_features.json").write_text(json.dumps(_features(["audio", "video"])))
    return out


def _emotion_release(out: Path) -> Path:
    """A finetuned emotion release (initial weights) laid out as `avssl finetune` writes it."""
    from safetensors.torch import save_file

    from avssl.finetune.config import HeadConfig
    from avssl.finetune.heads import TaskModel
    from avssl.pretrain.modeling import AVViTModel
    from avssl.pretrain.registry import avvit_config

    model = TaskModel(AVViTModel(avvit_config("avvit_tiny_patch16", **TINY)),
                      HeadConfig(task="emotion", num_classes=3, modalities=["audio"]))
    model.backbone.save_pretrained(out / "backbone", safe_serialization=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("backbone.")},
              out / "head.safetensors")
    (out / "head.json").write_text(model.cfg.model_dump_json())
    (out / "labels.json").write_text(json.dumps(["ANG", "HAP", "SAD"]))
    (out / "avssl_features.json").write_text(json.dumps(_features(["audio"])))
    return out


def _wavs(speaker: str, n: int) -> list[Path]:
    return sorted((REAL / "vctk16k" / speaker).glob("*.wav"))[:n]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("AVSSL_PROGRESS", "0")


# ----------------------------------------------------------------------------- windows


def test_windows_cover_the_whole_file_with_the_last_one_right_aligned():
    """Windows tile the file at the hop, a remainder gets one right-aligned window on the fbank grid,
    a short file is one padded window, --center one centred window."""
    from avssl.finetune.inference import window_starts

    assert window_starts(6.0, 2.0) == [0.0, 2.0, 4.0]
    assert window_starts(7.425, 2.0, grid=0.01) == [0.0, 2.0, 4.0, 5.42]  # 5.425 floored to the 10 ms grid
    assert window_starts(7.425, 2.0) == [0.0, 2.0, 4.0, 5.425]
    assert window_starts(1.5, 2.0) == [0.0]
    assert window_starts(5.0, 2.0, hop=1.0) == [0.0, 1.0, 2.0, 3.0]
    assert window_starts(330.0, 2.0, center=True) == [164.0]
    assert len(window_starts(330.0, 2.0)) == 165


@needs_real
def test_window_features_are_the_crops_features_and_batching_does_not_mix_files(backbone):
    """Each window's fbank equals `audio_features` of its crop (the sliced whole-file fbank is exact),
    and embeddings batched across files equal those made one window per forward."""
    from avssl.data.features import audio_features
    from avssl.finetune.inference import Release, embed_with

    rel = Release.load(backbone)
    item = rel.read(_wavs("p225", 1)[0])
    assert len(item.starts) > 3
    for (a, _), start in zip(rel.window_inputs(item), item.starts):
        assert np.abs(a.numpy() - audio_features(item.audio, start, 1.0, rel.fcfg, rel.stats).numpy()).max() < 1e-3
    files = _wavs("p225", 2) + _wavs("p226", 2) + [REAL / "grid" / "bbaf2n.mpg"]
    batched = embed_with(rel, files, batch_size=7)
    single = embed_with(rel, files, batch_size=1)
    assert batched.names == single.names == [str(f) for f in files]
    np.testing.assert_allclose(batched.vectors, single.vectors, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(batched.vectors, axis=1), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- embed: files, folders, bad files


@needs_real
def test_embed_writes_the_good_files_and_names_the_bad_one(backbone, tmp_path, capsys):
    """A corrupt wav and a missing file among real ones: the good ones are written, the bad ones named on
    stderr and in the JSON; --strict stops at the bad file and writes nothing."""
    good = _wavs("p225", 2) + _wavs("p227", 1)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(200))
    missing = tmp_path / "missing.flac"
    out = tmp_path / "emb.npy"
    args = [str(good[0]), str(corrupt), str(good[1]), str(missing), str(good[2])]
    assert main(["embed", *args, "--checkpoint", str(backbone), "--out", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "corrupt.wav" in captured.err and "missing.flac" in captured.err and "Traceback" not in captured.err
    record = json.loads(out.with_suffix(".json").read_text())
    assert [r["file"] for r in record["files"]] == [str(p) for p in good]
    assert {s["file"] for s in record["skipped"]} == {str(corrupt), str(missing)}
    assert any("cannot decode" in s["reason"] for s in record["skipped"])
    assert np.load(out).shape == (3, record["shape"][1])

    strict_out = tmp_path / "strict.npy"
    assert main(["embed", *args, "--strict", "--checkpoint", str(backbone), "--out", str(strict_out)]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "corrupt.wav" in err and "Traceback" not in err
    assert not strict_out.exists()


@needs_real
def test_embed_takes_a_folder_and_file_lists(backbone, tmp_path, capsys):
    """A folder is searched for media files; @LIST and --files-from read one path per line."""
    out = tmp_path / "dir.npy"
    assert main(["embed", str(REAL / "vctk16k" / "p226"), "--checkpoint", str(backbone), "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert len(record["files"]) == 10 and not record["skipped"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two files\n{_wavs('p227', 1)[0]}\n\n{_wavs('p228', 1)[0]}\n")
    other = tmp_path / "other.txt"
    other.write_text(f"{REAL / 'wavefake' / 'bonafide'}\n")
    out = tmp_path / "list.npy"
    assert main(["embed", f"@{listing}", "--files-from", str(other), "--checkpoint", str(backbone), "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert len(record["files"]) == 2 + len(list((REAL / "wavefake" / "bonafide").glob("*.wav")))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["embed", str(empty), "--checkpoint", str(backbone), "--out", str(tmp_path / "e.npy")]) == 2
    assert "without media files" in capsys.readouterr().err.replace("\n", "")


@needs_real
def test_embed_records_modality_and_windows_per_file(backbone, tmp_path):
    """Talking-head video is embedded audio-visually, wav audio-only, and each row says so with its windows
    and duration; --modality a / v force one setting (a wav under v is skipped, named); --center is one window."""
    from avssl.finetune.inference import window_starts

    video, wav = REAL / "grid" / "bbaf2n.mpg", _wavs("p228", 1)[0]
    out = tmp_path / "e.npy"
    assert main(["embed", str(video), str(wav), "--checkpoint", str(backbone), "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["files"]
    assert [r["modality"] for r in rows] == ["av", "a"]
    for r in rows:
        assert r["windows"] == len(window_starts(r["duration"], 1.0, grid=0.01)) and r["windows"] >= 3

    assert main(["embed", str(video), str(wav), "--modality", "v", "--checkpoint", str(backbone), "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert [r["modality"] for r in record["files"]] == ["v"] and record["modality_requested"] == "v"
    assert record["skipped"][0]["file"] == str(wav) and "--modality v" in record["skipped"][0]["reason"]

    assert main(["embed", str(video), str(wav), "--modality", "a", "--center", "--checkpoint", str(backbone),
                 "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["files"]
    assert [(r["modality"], r["windows"]) for r in rows] == [("a", 1), ("a", 1)]


MEMORY_SCRIPT = """
import json, resource, sys
from pathlib import Path
from avssl.finetune.inference import Release, embed_with
rel = Release.load(Path(sys.argv[1]))
embed_with(rel, [Path(sys.argv[3])], 16)  # warm-up on a short video: imports, face detector, decoders
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = embed_with(rel, [Path(sys.argv[2])], 16)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "after": after, "rows": out.rows, "skipped": out.skipped}))
"""


@needs_real
def test_embedding_a_long_video_keeps_memory_flat(backbone, tmp_path):
    """A 60 s 640x480 talking-head mp4 (1.4 GB as RGB frames): embedding it grows peak RSS by a small
    fraction of that (only the windows' face crops are kept), where decoding every frame would not fit."""
    import av
    import cv2

    from avssl.data.faces import iter_frames

    width, height, fps, seconds = 640, 480, 25, 60
    faces = [cv2.resize(f, (width, height)) for f in iter_frames(REAL / "grid" / "bbaf2n.mpg")]
    long_video = tmp_path / "long.mp4"
    with av.open(str(long_video), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(fps * seconds):
            for packet in stream.encode(av.VideoFrame.from_ndarray(faces[i % len(faces)], format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    rgb_bytes = fps * seconds * width * height * 3
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(backbone), str(long_video), str(REAL / "grid" / "bbaf2n.mpg")],
                         capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "AVSSL_PROGRESS": "0"})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    (row,) = result["rows"]
    assert row["modality"] == "v" and row["windows"] == 60 and abs(row["duration"] - 60) < 0.1
    growth = result["after"] - result["before"]
    assert growth < 0.1 * rgb_bytes, f"peak RSS grew {growth / 2**20:.0f} MiB for {rgb_bytes / 2**20:.0f} MiB of RGB frames"


# ----------------------------------------------------------------------------- predict


@needs_real
def test_predict_honours_task_and_says_how_to_get_a_head(backbone, tmp_path, capsys):
    """--task spoof on an emotion release names both tasks; a pretrained release names the finetune
    command; the matching task predicts the real files."""
    release = _emotion_release(tmp_path / "emo")
    wav = str(_wavs("p225", 1)[0])
    assert main(["predict", wav, "--task", "spoof", "--checkpoint", str(release), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "holds the emotion head, not a spoof one" in err and "--task emotion" in err and "Traceback" not in err

    assert main(["predict", wav, "--task", "emotion", "--checkpoint", str(backbone), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "no emotion head" in err and f"avssl finetune --config configs/finetune/emotion.yaml --init {backbone}" in err

    assert main(["predict", wav, str(REAL / "grid"), "--task", "emotion", "--checkpoint", str(release)]) == 0
    out = capsys.readouterr().out
    assert "emotion predictions" in out and "bbaf2n" in out  # grid videos: audio-only model, their sound


# ----------------------------------------------------------------------------- verify on a pretrained release


def sets(*items: str) -> list[str]:
    return [w for item in items for w in ("--set", item)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A real pretrained release: the tiny model, 8 steps on the tiny synthetic corpus."""
    from avssl.config import load_config
    from avssl.data.corpus import CorpusRecipe, synthesize_corpus

    root = tmp_path_factory.mktemp("pre")
    corpus = root / "tiny"
    synthesize_corpus(load_config(CorpusRecipe, REPO / "configs/data/tiny.yaml"), corpus)
    runs = root / "runs"
    code = main(["pretrain", "--config", str(REPO / "configs/pretrain/tiny.yaml"),
                 *sets(f"data.corpus={corpus}", f"trainer.storage_path={runs}", "trainer.name=pre", "trainer.total_steps=8",
                       f"mlflow.tracking_uri=sqlite:///{runs}/mlflow.db")])
    assert code == 0
    return runs / "pre" / "avssl" / "release"


@pytest.mark.slow
@needs_real
def test_zero_shot_evaluate_writes_calibration_that_verify_uses(pretrained, tmp_path, capsys):
    """verify on a pretrained release first names the command that calibrates it; `evaluate --zero-shot`
    on a corpus prepared from real VCTK files writes calibration.json (EER threshold, AS-Norm cohort)
    into the release, and verify then decides with it, scoring as the calibration did; --calibration
    PATH works for both."""
    from avssl.data.features import FeatureConfig
    from avssl.data.prepare import prepare_dataset
    from avssl.data.stats import compute_stats

    a, b = _wavs("p225", 2)
    c = _wavs("p226", 1)[0]
    capsys.readouterr()
    assert main(["verify", str(a), str(b), "--checkpoint", str(pretrained), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert f"avssl evaluate --checkpoint {pretrained} --task speaker --data CORPUS --zero-shot" in err

    corpus = tmp_path / "vctk"
    prepare_dataset("folder", REAL / "vctk16k", corpus, test_speakers=2, workers=1)
    assert (corpus / "trials" / "folder_test.txt").is_file()
    # The release's features (64 mel bins) differ from preparation's default: statistics to match.
    compute_stats(corpus, FeatureConfig(num_mel_bins=64, image_size=32, num_frames=2), split="train")
    assert main(["evaluate", "--checkpoint", str(pretrained), "--task", "speaker", "--data", str(corpus), "--zero-shot",
                 "--as-norm", "5", "--no-mlflow", "--out", str(tmp_path / "eval")]) == 0
    calib = json.loads((pretrained / "calibration.json").read_text())
    assert set(calib) == {"a"}  # VCTK has no video
    entry = calib["a"]
    assert entry["zero_shot"] and 0 <= entry["eer"] <= 1 and entry["as_norm"]["top"] == 5
    assert (pretrained / entry["as_norm"]["cohort"]).is_file()

    capsys.readouterr()
    assert main(["verify", str(a), str(b), "--checkpoint", str(pretrained), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"threshold {entry['threshold']:.4f}" in out and "AS-Norm" in out
    from avssl.finetune.inference import verify

    same, diff = verify(pretrained, a, b), verify(pretrained, a, c)
    assert same["threshold"] == diff["threshold"] == pytest.approx(entry["threshold"])
    # Scored as the calibration's scores were (centred windows); a given raw threshold scores whole files.
    assert same["mode"] == "a" and same["center"] and same["windows"] == [1, 1]
    whole = verify(pretrained, a, b, threshold=0.5)
    assert not whole["center"] and min(whole["windows"]) > 1 and "calibration" not in whole

    elsewhere = tmp_path / "cal" / "mine.json"
    assert main(["evaluate", "--checkpoint", str(pretrained), "--task", "speaker", "--data", str(corpus), "--zero-shot",
                 "--no-mlflow", "--out", str(tmp_path / "eval2"), "--calibration", str(elsewhere)]) == 0
    mine = json.loads(elsewhere.read_text())
    assert "as_norm" not in mine["a"]
    capsys.readouterr()
    assert main(["verify", str(a), str(c), "--checkpoint", str(pretrained), "--calibration", str(elsewhere)]) == 0
    assert f"threshold {mine['a']['threshold']:.4f}" in capsys.readouterr().out
    with pytest.raises(AvsslError, match="no calibration"):
        verify(pretrained, a, c, calibration=tmp_path / "nowhere.json")
