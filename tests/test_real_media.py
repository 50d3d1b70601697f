"""Real recordings (../shared/realdata: GRID talking heads, VCTK at 16 and 48 kHz, LJSpeech and
WaveFake vocoded pairs) through preparation and face cropping, as a user's own folder would go."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avssl import AvsslError
from avssl.data.faces import FaceConfig, face_crops, probe_faces, iter_frames
from avssl.data.media import AUDIO_EXTENSIONS, SUPPORTED, VIDEO_EXTENSIONS, load_media
from avssl.data.prepare import prepare_dataset
from avssl.data.shards import CorpusIndex, decode_clip, iter_raw_samples

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "realdata"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"real recordings not found at {REAL}")
SOURCES = ("vctk16k", "vctk48k", "wavefake", "grid")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("AVSSL_PROGRESS", "0")


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    """A user's folder: the four real sources side by side (linked, never copied), plus a note
    file that is not media, and a labels CSV marking WaveFake's vocoded files as spoofs."""
    root = tmp_path_factory.mktemp("user") / "my recordings"
    root.mkdir()
    for name in SOURCES:
        (root / name).symlink_to(REAL / name, target_is_directory=True)
    (root / "notes.txt").write_text("what these files are")
    rows = ["path,speaker,spoof,attack"]
    for f in sorted((REAL / "wavefake/spoof").glob("*.wav")):
        rows.append(f"wavefake/spoof/{f.name},LJ,spoof,vocoder")
    for f in sorted((REAL / "wavefake/bonafide").glob("*.wav")):
        rows.append(f"wavefake/bonafide/{f.stem},LJ,bonafide,")  # without the extension: matched all the same
    (root.parent / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def read_clips(out: Path) -> dict[str, object]:
    index = CorpusIndex.load(out)
    return {c.meta.utterance: c for s in index.splits for c in map(decode_clip, iter_raw_samples(index.shards(s)))}


def test_prepare_folder_reads_every_real_source_and_drops_nothing(user_folder: Path, tmp_path: Path):
    """vctk16k + vctk48k + wavefake + grid: counts per source, nothing dropped but the non-media (named),
    48 kHz resampled to 16 kHz, speakers from folders, spoof labels from the CSV, GRID face-cropped."""
    out = tmp_path / "corpus"
    summary = prepare_dataset("folder", user_folder, out, labels=user_folder.parent / "labels.csv", test_speakers=2)
    assert sorted(Path(p).name for p, _ in summary.unreadable) == ["notes.txt", "swwp2s.align"]  # not media, named
    clips = read_clips(out)
    expected = {name: len([f for f in (REAL / name).rglob("*") if f.suffix in AUDIO_EXTENSIONS + VIDEO_EXTENSIONS])
                for name in SOURCES}
    got = {name: sum(u.startswith(name + "/") for u in clips) for name in SOURCES}
    assert got == expected == {"vctk16k": 40, "vctk48k": 10, "wavefake": 10, "grid": 11}

    import soundfile as sf

    p228 = clips["vctk48k/p228/p228_023"]
    info = sf.info(str(REAL / "vctk48k/p228/p228_023.wav"))
    assert info.samplerate == 48_000 and abs(len(p228.audio) - info.frames / 3) <= 2  # resampled to 16 kHz
    assert p228.meta.speaker == "p228" == clips["vctk16k/p228/p228_023"].meta.speaker  # one speaker, two sources
    assert {c.meta.spoof for u, c in clips.items() if u.startswith("wavefake/spoof/")} == {"spoof"}
    assert {c.meta.attack for u, c in clips.items() if u.startswith("wavefake/spoof/")} == {"vocoder"}
    assert {c.meta.spoof for u, c in clips.items() if u.startswith("wavefake/bonafide/")} == {"bonafide"}
    assert {c.meta.speaker for u, c in clips.items() if u.startswith("wavefake/")} == {"LJ"}
    for utt, clip in clips.items():
        if utt.startswith("grid/"):
            assert clip.audio is not None and clip.video is not None
            assert clip.video.shape[1:] == (112, 112, 3) and clip.meta.extra["face"]["crop"] == "face"
        else:
            assert clip.video is None
    index = CorpusIndex.load(out)
    speakers = sorted({c.meta.speaker for c in clips.values()})
    assert index.data["splits"]["test"]["speakers"] == speakers[-2:]  # --test-speakers 2: the last two
    trials = (out / "trials/folder_test.txt").read_text().splitlines()
    test_speakers = [c.meta.speaker for c in clips.values() if c.meta.split == "test"]
    same_possible = any(test_speakers.count(s) > 1 for s in test_speakers)
    assert trials and {t.split()[0] for t in trials} == ({"0", "1"} if same_possible else {"0"})
    assert all(clips[u].meta.split == "test" for t in trials for u in t.split()[1:])

    from avssl.cli import main

    assert main(["data", "inspect", str(out)]) == 0  # `avssl data inspect` shows the crops
    assert (out / "faces.png").stat().st_size > 10_000


def test_faces_are_found_in_nearly_every_grid_frame_and_the_crop_is_square_inside_and_centred():
    """The detector finds the talker in >= 95 % of probed frames of every GRID clip; each crop box is
    square, inside the frame, and centred on the detected face (moved inside the frame where the
    face is near its edge): within a tenth of the face's
    size in the median probe, a quarter at most (the track is smoothed over three probes)."""
    cfg = FaceConfig()
    for path in sorted((REAL / "grid").glob("*.mpg")):
        probes, count, (h, w) = probe_faces(iter_frames(path), cfg)
        crops, track = face_crops(path, cfg)
        assert track.detected >= 0.95, (path.name, track.detected)
        assert crops.shape == (count, cfg.crop_size, cfg.crop_size, 3)
        x0, y0, side = track.boxes.T
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + side <= w).all() and (y0 + side <= h).all()
        offsets = []
        for frame, dets in probes:
            if len(dets):
                bx, by = x0[frame] + side[frame] / 2, y0[frame] + side[frame] / 2
                half = side[frame] / 2  # a face near the edge: the square is moved inside the frame
                offsets.append(min(np.hypot(bx - np.clip(cx, half, w - half), by - np.clip(cy, half, h - half)) / size
                                   for cx, cy, size, _ in dets))
        assert np.median(offsets) <= 0.1 and max(offsets) <= 0.25, (path.name, np.median(offsets), max(offsets))


def _write_video(path: Path, frames: np.ndarray, fps: int = 25, audio: np.ndarray | None = None) -> Path:
    import av

    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        aus = c.add_stream("aac", rate=16_000) if audio is not None else None
        if aus is not None:
            aus.layout = "mono"
        for f in frames:
            for packet in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in vs.encode():
            c.mux(packet)
        if aus is not None:
            frame = av.AudioFrame.from_ndarray(audio[None].astype(np.float32), format="flt", layout="mono")
            frame.sample_rate = 16_000
            for packet in list(aus.encode(frame)) + list(aus.encode()):
                c.mux(packet)
    return path


def test_a_video_without_a_face_becomes_an_audio_only_sample_and_is_counted(tmp_path: Path):
    """A 4:3 video of a plain wall with sound: no face -> the sample keeps its audio, and the video is
    reported as degraded with the share of frames without a face."""
    root = tmp_path / "mine" / "alice"
    root.mkdir(parents=True)
    wall = np.full((25, 240, 320, 3), 120, np.uint8)
    tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(16_000) / 16_000)
    _write_video(root / "wall clip.MP4", wall, audio=tone)  # spaces and an upper-case extension
    summary = prepare_dataset("folder", tmp_path / "mine", tmp_path / "out")
    (clip,) = read_clips(tmp_path / "out").values()
    assert clip.meta.utterance == "alice/wall_clip" and clip.meta.speaker == "alice"
    assert clip.audio is not None and clip.video is None and clip.meta.extra["face"]["crop"] == "none"
    ((path, reason),) = summary.unreadable
    assert path.endswith("wall clip.MP4") and "no face in 100 % of probed frames: kept audio only" in reason


def test_face_crop_memory_stays_flat_on_a_long_high_resolution_video(tmp_path: Path):
    """60 s of 960x720 video (3.7 GB as RGB frames): cropping it peaks far below that, since frames
    are read one at a time and only 112-pixel crops are kept."""
    video = tmp_path / "long.mp4"
    script = f"""
import numpy as np, av, resource, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_real_media import _write_video
from pathlib import Path
rng = np.random.default_rng(0)
frames = np.repeat(rng.integers(0, 255, (1, 720, 960, 3), dtype=np.uint8), 25, 0)
with av.open({str(video)!r}, "w") as c:
    vs = c.add_stream("libx264", rate=25); vs.width, vs.height, vs.pix_fmt = 960, 720, "yuv420p"
    vs.options = {{"preset": "ultrafast"}}
    for _ in range(60):
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")): c.mux(p)
    for p in vs.encode(): c.mux(p)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=600)
    # VmHWM: this process's peak resident memory (ru_maxrss would carry over the forking parent's).
    probe = f"""
from avssl.data.faces import FaceConfig, face_crops
crops, track = face_crops({str(video)!r}, FaceConfig(mode="on", detect_every=25))
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(crops is None, track.detected, hwm // 1024)
"""
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    no_face, detected, peak_mb = proc.stdout.split()
    frames_mb = 1500 * 720 * 960 * 3 / 2**20
    assert no_face == "True" and int(peak_mb) < 500 < frames_mb, (peak_mb, frames_mb)


def test_one_list_of_supported_formats_each_decoded(tmp_path: Path):
    """Every extension in the supported list decodes through load_media (written here with PyAV or
    soundfile); an unsupported file and a directory get one clear line naming them."""
    import av
    import soundfile as sf

    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(16_000) / 16_000)).astype(np.float32)
    codecs = {".mp3": ("mp3", "mp3"), ".m4a": ("ipod", "aac"), ".aac": ("adts", "aac"), ".ogg": ("ogg", "libopus"),
              ".opus": ("ogg", "libopus")}
    for ext in AUDIO_EXTENSIONS:
        path = tmp_path / f"a{ext}"
        if ext in (".wav", ".flac"):
            sf.write(str(path), tone, 16_000)
        else:
            fmt, codec = codecs[ext]
            rate = 48_000 if codec == "libopus" else 16_000  # Opus encodes at 48 kHz (Vorbis: no encoder in PyAV's FFmpeg)
            with av.open(str(path), "w", format=fmt) as c:
                s = c.add_stream(codec, rate=rate)
                s.layout = "mono"
                wave = np.interp(np.arange(rate) / rate, np.arange(16_000) / 16_000, tone).astype(np.float32)
                fr = av.AudioFrame.from_ndarray(wave[None], format="flt", layout="mono")
                fr.sample_rate = rate
                for p in list(s.encode(fr)) + list(s.encode()):
                    c.mux(p)
        clip = load_media(path)
        assert clip.audio is not None and 0.9 < clip.meta.duration < 1.2, ext
    vcodec = {".webm": "libvpx", ".flv": "flv", ".mpg": "mpeg1video", ".mpeg": "mpeg2video", ".avi": "mpeg4"}
    frames = np.full((10, 64, 64, 3), 90, np.uint8)
    for ext in VIDEO_EXTENSIONS:
        path = tmp_path / f"v{ext}"
        with av.open(str(path), "w") as c:
            vs = c.add_stream(vcodec.get(ext, "libx264"), rate=25)
            vs.width, vs.height, vs.pix_fmt = 64, 64, "yuv420p"
            for f in frames:
                for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(p)
            for p in vs.encode():
                c.mux(p)
        clip = load_media(path)
        assert clip.video is not None and clip.audio is None, ext
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(AvsslError, match=r"notes\.txt: not a supported media file \(audio wav"):
        load_media(tmp_path / "notes.txt")
    with pytest.raises(AvsslError, match="is a directory"):
        load_media(tmp_path)
    assert "mpg" in SUPPORTED and "opus" in SUPPORTED


@pytest.mark.slow
def test_preparation_on_ray_tasks_writes_the_same_corpus_as_processes(user_folder: Path, tmp_path: Path):
    """Ray tasks (`--address local`) and a process pool write byte-identical shards: the corpus does
    not depend on how the work was spread."""
    a = prepare_dataset("folder", user_folder / "vctk16k", tmp_path / "procs", workers=2)
    b = prepare_dataset("folder", user_folder / "vctk16k", tmp_path / "ray", address="local")
    assert a.counts == b.counts == {"train": 40}
    shards = sorted(p.name for p in (tmp_path / "procs").glob("*.tar"))
    assert shards == sorted(p.name for p in (tmp_path / "ray").glob("*.tar")) and shards
    for name in shards:
        assert (tmp_path / "procs" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name


def test_an_audio_only_corpus_says_which_pretraining_objectives_are_off(tmp_path: Path):
    """Real speech without video: the index records the modalities, and the objectives that need
    video (the audio-visual contrast, video reconstruction) are named as off instead of logging 0."""
    from avssl.cluster.config import PretrainRecipe
    from avssl.cluster.launch import objectives_off
    from avssl.config import load_config

    prepare_dataset("folder", REAL / "vctk16k", tmp_path / "speech")
    index = CorpusIndex.load(tmp_path / "speech")
    assert index.modalities("train") == {"audio": 40}
    del index.data["splits"]["train"]["modalities"]  # an index written before modalities were recorded
    assert index.modalities("train") == {"audio": 40}  # counted from the shards' member names
    recipe = load_config(PretrainRecipe, REPO / "configs/pretrain/quick.yaml")
    off = objectives_off(recipe, index.modalities("train"))
    assert [o.split()[0] for o in off] == ["loss_contrastive", "loss_rec_video"]
    assert objectives_off(recipe, {"audio+video": 3, "audio": 40}) == []


def test_preparation_killed_midway_resumes_to_the_same_corpus(tmp_path: Path):
    """SIGKILL during `prepare folder` (vctk16k, a checkpoint every 8 utterances), then the same
    command: it keeps the finished shards, goes on from the last checkpoint, and the corpus is
    byte-identical to one prepared without interruption."""
    import signal
    import time

    def run(out: Path) -> str:
        return (f"from avssl.data.prepare import prepare_dataset; from pathlib import Path\n"
                f"prepare_dataset('folder', Path({str(REAL / 'vctk16k')!r}), Path({str(out)!r}), workers=1, checkpoint_items=8)")

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", run(killed)], env={**os.environ, "AVSSL_PROGRESS": "0"})
    progress = killed / ".prepare-progress.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["items_done"] >= 16:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert progress.is_file() and not (killed / "index.json").exists(), "the run finished before it could be killed"
    summary = prepare_dataset("folder", REAL / "vctk16k", killed, workers=1, checkpoint_items=8)
    assert any("resumed an interrupted run after" in n for n in summary.notes)
    whole = tmp_path / "whole"
    prepare_dataset("folder", REAL / "vctk16k", whole, workers=1, checkpoint_items=8)
    for name in ("index.json", "stats.json", *sorted(p.name for p in whole.glob("*.tar"))):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    assert not progress.exists()


@pytest.mark.slow
def test_real_files_chain_prepare_pretrain_export_embed_evaluate_verify(user_folder: Path, tmp_path: Path, capsys):
    """Real recordings end to end: `prepare folder` (VCTK speech; GRID talking heads beside it) -> 4
    steps of pretraining on Ray + DeepSpeed, which names the objectives an audio-only corpus turns
    off -> `avssl export` -> `embed` of real files (speech and a talking-head video) -> `evaluate
    --zero-shot` on the test speakers' trials -> `verify` at the calibrated threshold."""
    from avssl.cli import main

    def sets(*items: str) -> list[str]:
        return [w for item in items for w in ("--set", item)]

    corpus, runs = tmp_path / "corpus", tmp_path / "runs"
    assert main(["data", "prepare", "folder", "--root", str(user_folder / "vctk16k"), "--out", str(corpus),
                 "--test-speakers", "2", "--workers", "1"]) == 0
    grid = prepare_dataset("folder", user_folder / "grid", tmp_path / "grid", workers=1)
    assert grid.counts == {"train": 11}
    assert main(["pretrain", "--config", str(REPO / "configs/pretrain/quick.yaml"),
                 *sets(f"data.corpus={corpus}", f"trainer.storage_path={runs}", "trainer.name=real", "trainer.total_steps=4",
                       "trainer.checkpoint_every=4", "trainer.log_every=2", "data.batch_size=4",
                       f"mlflow.tracking_uri=sqlite:///{runs}/mlflow.db", "mlflow.register_model=null")]) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{runs}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("avssl-pretrain").experiment_id])
    # VCTK has no video: the run says so instead of logging zeros silently.
    assert run.data.tags["avssl.objectives_off"].startswith("loss_contrastive")
    assert "loss_rec_video" in run.data.tags["avssl.objectives_off"]
    release = tmp_path / "release"
    assert main(["export", str(runs / "real"), "--out", str(release)]) == 0
    files = [*sorted((REAL / "vctk16k/p225").glob("*.wav"))[:2], REAL / "grid/bbaf2n.mpg"]
    assert main(["embed", *map(str, files), "--checkpoint", str(release), "--out", str(tmp_path / "e.npy")]) == 0
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape[0] == 3 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    assert main(["evaluate", "--checkpoint", str(release), "--task", "speaker", "--data", str(corpus), "--zero-shot",
                 "--no-mlflow", "--out", str(tmp_path / "eval")]) == 0
    assert (release / "calibration.json").is_file()
    capsys.readouterr()
    assert main(["verify", str(files[0]), str(files[1]), "--checkpoint", str(release)]) == 0
    assert "threshold" in capsys.readouterr().out
