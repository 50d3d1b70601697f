"""`avssl data prepare`: each real dataset's exact layout, in miniature, converted to shards.

Fixtures write a few files under the real names and folder structure with generated media (0.5 s
tones as WAV / FLAC / AAC, 4-frame 32x32 videos as MP4 / FLV via PyAV) and real protocol lines,
plus one corrupt file each, then run `prepare_dataset` and read the shards back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from avssl import AvsslError
from avssl.data.schema import Clip
from avssl.data.shards import CorpusIndex, ShardConfig, decode_clip, iter_raw_samples
from avssl.data.prepare import DATASETS, prepare_dataset

SHARDS = ShardConfig(target_mb=8.0, max_count=3)  # several shards even for these tiny corpora


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("AVSSL_PROGRESS", "0")


# ----------------------------------------------------------------------------- media writers


def _tone(sr: int, seconds: float = 0.5, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    rng = np.random.default_rng(int(freq))
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def write_audio(path: Path, sr: int = 16_000, seconds: float = 0.5, freq: float = 220.0) -> Path:
    """WAV or FLAC (by suffix) via soundfile."""
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), _tone(sr, seconds, freq), sr, format="FLAC" if path.suffix == ".flac" else "WAV")
    return path


def write_av(path: Path, frames: int = 4, audio_sr: int | None = None, vcodec: str = "libx264", seconds: float = 0.5) -> Path:
    """A container by suffix (.mp4, .flv, .m4a) with `frames` 32x32 frames at 25 fps (none if 0)
    and, when audio_sr is set, an AAC mono track of `seconds`."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        vs = c.add_stream(vcodec, rate=25) if frames else None
        if vs is not None:
            vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
        aus = c.add_stream("aac", rate=audio_sr) if audio_sr else None
        if aus is not None:
            aus.layout = "mono"
        for i in range(frames):
            img = np.full((32, 32, 3), 40 * i, np.uint8)
            img[8:24, 8:24, 0] = 255  # a red square: something to see in the decoded frames
            for packet in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        if vs is not None:
            for packet in vs.encode():
                c.mux(packet)
        if aus is not None:
            frame = av.AudioFrame.from_ndarray(_tone(audio_sr, seconds)[None], format="flt", layout="mono")
            frame.sample_rate = audio_sr
            for packet in list(aus.encode(frame)) + list(aus.encode()):
                c.mux(packet)
    return path


def write_garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not media \x00\x01\x02" * 20)
    return path


def read_corpus(out: Path) -> dict[str, Clip]:
    """Every sample of a corpus, decoded with `decode_clip`, by utterance id."""
    index = CorpusIndex.load(out)
    clips = {}
    for split in index.splits:
        for sample in iter_raw_samples(index.shards(split)):
            clip = decode_clip(sample)
            assert clip.meta.split == split
            clips[clip.meta.utterance] = clip
    return clips


def unreadable_names(summary) -> dict[str, str]:
    return {Path(p).name: reason for p, reason in summary.unreadable}


def assert_common(out: Path, summary, counts: dict[str, int]) -> dict[str, Clip]:
    """Counts per split in summary and index, stats.json and prepare.json written, all samples decode."""
    assert summary.counts == counts
    index = CorpusIndex.load(out)
    assert {s: index.count(s) for s in index.splits} == counts
    assert json.loads((out / "stats.json").read_text())["num_clips"] > 0
    assert json.loads((out / "prepare.json").read_text())["counts"] == counts
    clips = read_corpus(out)
    assert len(clips) == sum(counts.values())
    for clip in clips.values():
        if clip.audio is not None:
            assert clip.audio.dtype == np.float32 and abs(clip.meta.duration - len(clip.audio) / 16_000) < 1e-3
    return clips


# ----------------------------------------------------------------------------- VoxCeleb


@pytest.fixture
def vox1_root(tmp_path: Path) -> Path:
    root = tmp_path / "VoxCeleb1"
    write_audio(root / "wav/id10270/x6uYqmx31kE/00001.wav")
    write_audio(root / "wav/id10270/8jEAjG6SegY/00008.wav", freq=330)
    write_audio(root / "wav/id10309/0cYFdtyWVds/00001.wav", freq=440)
    write_audio(root / "wav/id10001/1zcIwhmdeo4/00001.wav", freq=550)
    write_garbage(root / "wav/id10001/1zcIwhmdeo4/00002.wav")
    write_audio(root / "wav/id10001/stray.wav")  # not at wav/<spk>/<yt>/<n>.wav
    (root / "veri_test2.txt").write_text(
        "1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav\n"
        "0 id10270/x6uYqmx31kE/00001.wav id10309/0cYFdtyWVds/00001.wav\n"
    )
    (root / "list_test_all2.txt").write_text("1 id10001/1zcIwhmdeo4/00001.wav id10001/1zcIwhmdeo4/00002.wav\n")
    return root


def test_voxceleb1_splits_trials_and_corrupt_file(vox1_root: Path, tmp_path: Path):
    """Vox1-O speakers go to test, others to train; trial lists are copied verbatim; garbage and misplaced wavs are reported."""
    out = tmp_path / "out"
    summary = prepare_dataset("voxceleb1", vox1_root, out, shards=SHARDS)
    clips = assert_common(out, summary, {"train": 1, "test": 3})
    assert clips["id10270/x6uYqmx31kE/00001"].meta.speaker == "id10270"
    assert clips["id10309/0cYFdtyWVds/00001"].meta.split == "test"  # id10309 is the last Vox1-O speaker
    assert clips["id10001/1zcIwhmdeo4/00001"].meta.split == "train"
    assert clips["id10001/1zcIwhmdeo4/00001"].meta.extra == {"youtube_id": "1zcIwhmdeo4"}
    assert all(c.video is None and c.meta.emotion is None and c.meta.spoof == "bonafide" for c in clips.values())
    assert (out / "trials/vox1_O.txt").read_bytes() == (vox1_root / "veri_test2.txt").read_bytes()
    assert (out / "trials/vox1_E.txt").read_bytes() == (vox1_root / "list_test_all2.txt").read_bytes()
    assert not (out / "trials/vox1_H.txt").exists()
    assert sorted(summary.files) == ["trials/vox1_E.txt", "trials/vox1_O.txt"]
    bad = unreadable_names(summary)
    assert bad.keys() == {"00002.wav", "stray.wav"} and "unreadable audio" in bad["00002.wav"]
    text = summary.describe()
    assert "train 1, test 3" in text and "00002.wav: unreadable audio" in text and "trials/vox1_O.txt" in text


def test_voxceleb1_malformed_trial_line_names_file_and_line(vox1_root: Path, tmp_path: Path):
    """A trial line that is not `<1|0> <enroll> <test>` stops the run naming the file and line number."""
    (vox1_root / "list_test_hard2.txt").write_text("1 a.wav b.wav\n\nyes id10270/x.wav id10309/y.wav\n")
    with pytest.raises(AvsslError, match=r"list_test_hard2\.txt:3: expected '<1\|0> <enroll> <test>'"):
        prepare_dataset("voxceleb1", vox1_root, tmp_path / "out")


def test_missing_root_or_wrong_layout_is_a_clear_error(tmp_path: Path):
    """A missing root, a root without the dataset's landmark folder, or an unknown name: AvsslError saying what is missing."""
    with pytest.raises(AvsslError, match="dataset root not found"):
        prepare_dataset("voxceleb1", tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AvsslError, match=r"no wav/ folder"):
        prepare_dataset("voxceleb1", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(AvsslError, match=r"no AudioWAV/ folder"):
        prepare_dataset("cremad", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(AvsslError, match=r"ASVspoof2019_LA_cm_protocols/ folder"):
        prepare_dataset("asvspoof2019_la", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(AvsslError, match=r"keys/DF/CM/trial_metadata\.txt: not found"):
        prepare_dataset("asvspoof2021_df", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(AvsslError, match="unknown dataset 'voxceleb3'"):
        prepare_dataset("voxceleb3", tmp_path / "empty", tmp_path / "out")
    assert set(DATASETS) == {
        "voxceleb1", "voxceleb2", "cremad", "ravdess", "asvspoof2019_la", "asvspoof2021_la", "asvspoof2021_df", "in_the_wild", "folder",
    }


def test_resume_returns_without_redoing_and_limit_spreads_over_splits(vox1_root: Path, tmp_path: Path):
    """A second run on a complete corpus changes nothing (stats recomputed if missing); --limit keeps both splits."""
    out = tmp_path / "out"
    first = prepare_dataset("voxceleb1", vox1_root, out, limit=2)
    assert first.counts == {"train": 1, "test": 1}  # evenly spaced: the first (id10001) and last (id10309) files
    shard = CorpusIndex.load(out).shards("train")[0]
    mtime = shard.stat().st_mtime_ns
    (out / "stats.json").unlink()
    again = prepare_dataset("voxceleb1", vox1_root, out)
    assert again.resumed and again.counts == first.counts and "already prepared" in again.notes[0]
    assert shard.stat().st_mtime_ns == mtime and (out / "stats.json").is_file()
    assert again.unreadable == first.unreadable
    with pytest.raises(AvsslError, match="already holds a prepared 'voxceleb1' corpus"):
        prepare_dataset("cremad", vox1_root, out)


def test_stats_fall_back_to_the_first_split_with_audio(vox1_root: Path, tmp_path: Path):
    """When every train file is unreadable, stats.json comes from the test split instead of being skipped."""
    write_garbage(vox1_root / "wav/id10001/1zcIwhmdeo4/00001.wav")
    out = tmp_path / "out"
    summary = prepare_dataset("voxceleb1", vox1_root, out)
    assert summary.counts == {"test": 3}
    assert json.loads((out / "stats.json").read_text())["num_clips"] == 3


def test_interrupted_run_restarts_and_removes_stale_shards(vox1_root: Path, tmp_path: Path):
    """Without index.json the run starts over: leftover shards from an interrupted run are deleted."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000007.tar").write_bytes(b"stale")
    (out / ".test-000000.tar.tmp").write_bytes(b"stale")
    summary = prepare_dataset("voxceleb1", vox1_root, out, shards=SHARDS)
    assert not (out / "train-000007.tar").exists() and not (out / ".test-000000.tar.tmp").exists()
    assert any("interrupted" in n for n in summary.notes)
    assert_common(out, summary, {"train": 1, "test": 3})


@pytest.fixture
def vox2_root(tmp_path: Path) -> Path:
    root = tmp_path / "VoxCeleb2"
    write_av(root / "dev/aac/id00012/21Uxsk56VDQ/00001.m4a", frames=0, audio_sr=16_000)
    write_av(root / "dev/mp4/id00012/21Uxsk56VDQ/00001.mp4", frames=4, audio_sr=16_000)
    write_av(root / "dev/aac/id00012/21Uxsk56VDQ/00002.m4a", frames=0, audio_sr=16_000)  # no mp4: audio-only
    write_av(root / "dev/aac/id00015/0fijmz4vTVU/00001.m4a", frames=0, audio_sr=16_000)
    write_garbage(root / "dev/mp4/id00015/0fijmz4vTVU/00001.mp4")  # corrupt video: keep the audio
    write_garbage(root / "dev/aac/id00015/0fijmz4vTVU/00002.m4a")  # corrupt audio: skip
    return root


def test_voxceleb2_pairs_m4a_with_mp4(vox2_root: Path, tmp_path: Path):
    """m4a + mp4 make one audio-visual sample; a missing or corrupt mp4 gives audio-only; a corrupt m4a is skipped."""
    out = tmp_path / "out"
    summary = prepare_dataset("voxceleb2", vox2_root, out, shards=SHARDS)
    clips = assert_common(out, summary, {"train": 3})
    both = clips["id00012/21Uxsk56VDQ/00001"]
    assert both.audio is not None and both.video is not None and both.video.shape == (4, 32, 32, 3)
    assert both.meta.fps == 25.0 and both.meta.speaker == "id00012"
    assert 0.4 < both.meta.duration < 0.7  # 0.5 s of AAC, plus at most one frame of encoder priming
    assert clips["id00012/21Uxsk56VDQ/00002"].video is None
    assert clips["id00015/0fijmz4vTVU/00001"].video is None and clips["id00015/0fijmz4vTVU/00001"].audio is not None
    bad = unreadable_names(summary)
    assert "unreadable video" in bad["00001.mp4"] and "kept audio only" in bad["00001.mp4"]
    assert "unreadable audio" in bad["00002.m4a"]


def test_voxceleb2_audio_only_when_video_disabled(vox2_root: Path, tmp_path: Path):
    """video=False never opens an mp4: every sample is audio-only and the corrupt mp4 goes unreported."""
    out = tmp_path / "out"
    summary = prepare_dataset("voxceleb2", vox2_root, out, video=False)
    clips = assert_common(out, summary, {"train": 3})
    assert all(c.video is None for c in clips.values())
    assert set(unreadable_names(summary)) == {"00002.m4a"}


def test_voxceleb_layouts_read_every_media_file_and_name_the_rest(tmp_path: Path):
    """VoxCeleb1 as .flac (a common conversion) counts like .wav; in VoxCeleb2 an mp4 without an
    m4a brings its own sound track and an .mpg video is read; any other file is named as skipped."""
    v1 = tmp_path / "vox1"
    write_audio(v1 / "wav/id10001/yt1/00001.wav")
    write_audio(v1 / "wav/id10001/yt1/00002.flac", freq=330)
    (v1 / "wav/id10001/yt1/notes.txt").write_text("not media")
    summary = prepare_dataset("voxceleb1", v1, tmp_path / "o1", workers=1)
    assert summary.counts == {"train": 2}
    assert unreadable_names(summary) == {"notes.txt": "skipped: not a wav/flac file"}

    v2 = tmp_path / "vox2"
    write_av(v2 / "dev/mp4/id00012/yt/00001.mp4", audio_sr=16_000)  # no m4a: the mp4's AAC track
    write_av(v2 / "dev/mp4/id00012/yt/00002.mpg", vcodec="mpeg1video")  # MPEG-1 video, no sound
    write_audio(v2 / "dev/aac/id00012/yt/00002.wav", freq=440)  # its audio as a WAV, not an m4a
    write_av(v2 / "dev/mp4/id00012/yt/00003.mp4")  # video only, no sound track anywhere
    (v2 / "dev/aac/id00012/yt/README").write_text("x")
    summary = prepare_dataset("voxceleb2", v2, tmp_path / "o2", workers=1)
    clips = assert_common(tmp_path / "o2", summary, {"train": 3})
    first, second, third = (clips[f"id00012/yt/0000{i}"] for i in (1, 2, 3))
    assert first.audio is not None and first.video is not None
    assert second.audio is not None and second.video is not None and second.video.shape[1:] == (32, 32, 3)  # faces off
    assert third.audio is None and third.video is not None
    assert set(unreadable_names(summary)) == {"README"}


# ----------------------------------------------------------------------------- emotion


@pytest.fixture
def cremad_root(tmp_path: Path) -> Path:
    root = tmp_path / "CREMA-D"
    for stem in ("1001_DFA_ANG_XX", "1005_IEO_HAP_HI", "1076_MTI_NEU_XX", "1002_TIE_SAD_LO"):
        write_audio(root / f"AudioWAV/{stem}.wav")
    write_av(root / "VideoFlash/1001_DFA_ANG_XX.flv", vcodec="flv")
    write_av(root / "VideoFlash/1005_IEO_HAP_HI.flv", vcodec="flv")
    write_av(root / "VideoFlash/1076_MTI_NEU_XX.flv", vcodec="flv")  # known broken: must be left out
    write_garbage(root / "AudioWAV/1003_ITS_FEA_MD.wav")
    write_audio(root / "AudioWAV/1004_ITS_XYZ_MD.wav")  # not one of the six emotions
    return root


def test_cremad_labels_folds_and_broken_videos(cremad_root: Path, tmp_path: Path):
    """Emotion, sentence, level and actor fold come from the name; fold 4 is test; broken videos are dropped, audio kept."""
    out = tmp_path / "out"
    summary = prepare_dataset("cremad", cremad_root, out, shards=SHARDS)
    clips = assert_common(out, summary, {"train": 3, "test": 1})
    ang = clips["1001_DFA_ANG_XX"]
    assert ang.meta.emotion == "ANG" and ang.meta.speaker == "1001"
    assert ang.meta.extra == {"sentence": "DFA", "level": "XX", "fold": 0, "face": ang.meta.extra["face"]}
    # Full-frame corpora are face-cropped (faces "auto"): a small square video without a face
    # passes through, resized to the crop size.
    assert ang.video is not None and ang.video.shape[1:] == (112, 112, 3) and ang.meta.fps == 25.0
    assert ang.meta.extra["face"]["crop"] == "passthrough"
    hap = clips["1005_IEO_HAP_HI"]  # (1005 - 1001) % 5 = 4 -> test
    assert hap.meta.split == "test" and hap.meta.emotion == "HAP" and hap.meta.extra["fold"] == 4 and hap.video is not None
    assert clips["1076_MTI_NEU_XX"].video is None and clips["1076_MTI_NEU_XX"].meta.emotion == "NEU"
    assert clips["1002_TIE_SAD_LO"].video is None  # no flv on disk
    assert set(unreadable_names(summary)) == {"1003_ITS_FEA_MD.wav", "1004_ITS_XYZ_MD.wav"}


def test_stats_match_compute_stats_over_the_shards(cremad_root: Path, tmp_path: Path):
    """stats.json gathered during writing equals `compute_stats` run afterwards over the train shards."""
    from avssl.data.features import FeatureConfig
    from avssl.data.stats import compute_stats

    out = tmp_path / "out"
    prepare_dataset("cremad", cremad_root, out, shards=SHARDS)
    ours = json.loads((out / "stats.json").read_text())
    theirs = compute_stats(out, FeatureConfig(), split="train")
    assert ours["num_clips"] == theirs.num_clips == 3
    # Only the 16-bit FLAC rounding of the stored audio separates the two.
    assert ours["mean"] == pytest.approx(theirs.mean, rel=1e-3) and ours["std"] == pytest.approx(theirs.std, rel=1e-3)


@pytest.fixture
def ravdess_root(tmp_path: Path) -> Path:
    root = tmp_path / "RAVDESS"
    write_audio(root / "Actor_12/03-01-05-01-02-01-12.wav", sr=48_000)  # audio-only, speech, angry
    write_av(root / "Actor_01/01-01-02-01-01-01-01.mp4", frames=4, audio_sr=48_000)  # AV, calm
    write_av(root / "Actor_01/02-01-06-02-01-02-01.mp4", frames=4)  # video-only, fearful, strong
    write_audio(root / "Actor_21/03-02-08-01-01-01-21.wav", sr=48_000)  # song, surprised, actor 21 -> test
    write_garbage(root / "Actor_21/03-01-04-01-01-01-21.wav")
    write_audio(root / "Actor_21/01-01-04-01-01-01-21.wav", sr=48_000)  # AV code on a .wav
    # As unzipped from the per-actor archives: Actor_XX one folder down; a second copy of a file is a duplicate.
    write_audio(root / "Audio_Speech_Actors_01-24/Actor_02/03-01-01-01-01-01-02.wav", sr=48_000)
    write_av(root / "Video_Speech_Actor_01/Actor_01/01-01-02-01-01-01-01.mp4", frames=4, audio_sr=48_000)
    return root


def test_ravdess_codes_modalities_and_resampling(ravdess_root: Path, tmp_path: Path):
    """The 7-part code gives modality, emotion (8-class and CREMA-D name), actor split; 48 kHz audio becomes 16 kHz."""
    out = tmp_path / "out"
    summary = prepare_dataset("ravdess", ravdess_root, out, shards=SHARDS)
    clips = assert_common(out, summary, {"train": 4, "test": 1})
    assert clips["03-01-01-01-01-01-02"].meta.emotion == "NEU" and clips["03-01-01-01-01-01-02"].meta.speaker == "Actor_02"
    ang = clips["03-01-05-01-02-01-12"]
    assert ang.meta.emotion == "ANG" and ang.meta.speaker == "Actor_12" and ang.video is None
    assert abs(len(ang.audio) - 8000) <= 2  # 0.5 s at 48 kHz -> 8000 samples at 16 kHz
    assert ang.meta.extra["emotion8"] == "angry" and ang.meta.extra["statement"] == 2 and ang.meta.extra["sex"] == "female"
    av_clip = clips["01-01-02-01-01-01-01"]
    assert av_clip.audio is not None and av_clip.video is not None  # both from the mp4
    assert av_clip.meta.emotion is None and av_clip.meta.extra["emotion8"] == "calm"
    assert av_clip.meta.extra["modality"] == "audio-video" and av_clip.meta.extra["recording"] == "01-02-01-01-01-01"
    vid = clips["02-01-06-02-01-02-01"]
    assert vid.audio is None and vid.video.shape == (4, 112, 112, 3) and vid.meta.emotion == "FEA"
    assert vid.meta.extra["face"]["crop"] == "passthrough"
    assert vid.meta.extra["intensity"] == "strong" and vid.meta.extra["repetition"] == 2
    song = clips["03-02-08-01-01-01-21"]
    assert song.meta.split == "test" and song.meta.emotion is None and song.meta.extra["vocal_channel"] == "song"
    assert song.meta.extra["fold"] == 5
    bad = dict(summary.unreadable)
    assert {Path(p).name for p in bad} == {"03-01-04-01-01-01-21.wav", "01-01-04-01-01-01-21.wav", "01-01-02-01-01-01-01.mp4"}
    assert "modality 01" in bad[str(ravdess_root / "Actor_21/01-01-04-01-01-01-21.wav")]
    assert "duplicate of" in bad[str(ravdess_root / "Video_Speech_Actor_01/Actor_01/01-01-02-01-01-01-01.mp4")]


# ----------------------------------------------------------------------------- spoofing


@pytest.fixture
def la19_root(tmp_path: Path) -> Path:
    root = tmp_path / "LA"
    proto = root / "ASVspoof2019_LA_cm_protocols"
    proto.mkdir(parents=True)
    (proto / "ASVspoof2019.LA.cm.train.trn.txt").write_text(
        "LA_0079 LA_T_1271820 - A01 spoof\nLA_0079 LA_T_1138215 - - bonafide\nLA_0080 LA_T_9999999 - A02 spoof\n"
    )
    (proto / "ASVspoof2019.LA.cm.dev.trl.txt").write_text("LA_0069 LA_D_1047731 - - bonafide\n")
    (proto / "ASVspoof2019.LA.cm.eval.trl.txt").write_text(
        "LA_0039 LA_E_2834763 - A11 spoof\nLA_0040 LA_E_1000001 - - bonafide\n"
    )
    write_audio(root / "ASVspoof2019_LA_train/flac/LA_T_1271820.flac")
    write_audio(root / "ASVspoof2019_LA_train/flac/LA_T_1138215.flac", freq=330)
    write_audio(root / "ASVspoof2019_LA_dev/flac/LA_D_1047731.flac")
    write_audio(root / "ASVspoof2019_LA_eval/flac/LA_E_2834763.flac")
    write_garbage(root / "ASVspoof2019_LA_eval/flac/LA_E_1000001.flac")
    scores = root / "ASVspoof2019_LA_asv_scores/ASVspoof2019.LA.asv.eval.gi.trl.scores.txt"
    scores.parent.mkdir()
    scores.write_text("bonafide target 2.1\nbonafide nontarget -1.3\nspoof spoof 0.4\n")
    return root


def test_asvspoof2019_la_protocols_labels_and_splits(la19_root: Path, tmp_path: Path):
    """Protocol keys and systems become spoof/attack labels in train/val/test; missing and corrupt flac are reported."""
    out = tmp_path / "out"
    summary = prepare_dataset("asvspoof2019_la", la19_root, out, shards=SHARDS)
    clips = assert_common(out, summary, {"train": 2, "val": 1, "test": 1})
    spoof = clips["LA_T_1271820"].meta
    assert (spoof.spoof, spoof.attack, spoof.speaker, spoof.split) == ("spoof", "A01", "LA_0079", "train")
    bona = clips["LA_T_1138215"].meta
    assert (bona.spoof, bona.attack) == ("bonafide", "-")
    assert clips["LA_D_1047731"].meta.split == "val" and clips["LA_E_2834763"].meta.attack == "A11"
    bad = unreadable_names(summary)
    assert "missing" in bad["LA_T_9999999.flac"] and "unreadable audio" in bad["LA_E_1000001.flac"]
    protocols = out / "protocols"
    assert (protocols / "cm_train.txt").read_text() == "LA_0079 LA_T_1271820 - A01 spoof\nLA_0079 LA_T_1138215 - - bonafide\n"
    assert (protocols / "cm_test.txt").read_text() == "LA_0039 LA_E_2834763 - A11 spoof\n"
    assert (protocols / "ASVspoof2019.LA.cm.train.trn.txt").read_bytes() == (
        la19_root / "ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.train.trn.txt"
    ).read_bytes()
    assert (protocols / "ASVspoof2019.LA.asv.eval.gi.trl.scores.txt").is_file()


def test_asvspoof2019_la_malformed_protocol_line(la19_root: Path, tmp_path: Path):
    """A protocol line with a missing column stops the run naming file:line and the expected format."""
    path = la19_root / "ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.dev.trl.txt"
    path.write_text("LA_0069 LA_D_1047731 - - bonafide\nLA_0069 LA_D_1000002 A05 spoof\n")
    with pytest.raises(AvsslError, match=r"ASVspoof2019\.LA\.cm\.dev\.trl\.txt:2: expected 'SPEAKER FILE - SYSTEM KEY'"):
        prepare_dataset("asvspoof2019_la", la19_root, tmp_path / "out")
    path.write_text("LA_0069 LA_D_1047731 - A05 bonafide\n")  # a bona fide row with an attack id
    with pytest.raises(AvsslError, match=r"dev\.trl\.txt:1:"):
        prepare_dataset("asvspoof2019_la", la19_root, tmp_path / "out")


KEYS_2021 = {
    "LA": [
        "LA_0009 LA_E_9332881 alaw ita_tx A07 spoof notrim eval",
        "LA_0009 LA_E_1000147 none loc_tx bonafide bonafide notrim eval",
        "LA_0012 LA_E_5000001 gsm sin_tx A19 spoof trim progress",
        "LA_0012 LA_E_5000002 gsm sin_tx A19 spoof notrim eval",  # listed, never on disk
    ],
    "DF": [
        "LA_0023 DF_E_2000011 nocodec asvspoof A14 spoof notrim progress traditional_vocoder - - - -",
        "LA_0023 DF_E_2000012 low_mp3 asvspoof bonafide bonafide notrim eval bonafide - - - -",
        "TEF2 DF_E_2000013 high_m4a vcc2020 Task1-team20 spoof notrim eval neural_vocoder_autoregressive - - - -",
        "LA_0024 DF_E_2000014 nocodec asvspoof A07 spoof notrim eval traditional_vocoder - - - -",
    ],
}


def make_2021_root(tmp_path: Path, track: str) -> Path:
    root = tmp_path / f"ASVspoof2021_{track}"
    key = root / f"keys/{track}/CM/trial_metadata.txt"
    key.parent.mkdir(parents=True)
    key.write_text("\n".join(KEYS_2021[track]) + "\n")
    # LA ships one flac folder; DF ships four parts, each with ASVspoof2021_DF_eval/flac inside.
    flac = root / ("ASVspoof2021_LA_eval/flac" if track == "LA" else "ASVspoof2021_DF_eval_part00/ASVspoof2021_DF_eval/flac")
    for line in KEYS_2021[track][:3]:
        write_audio(flac / f"{line.split()[1]}.flac")
    write_garbage(flac / f"{KEYS_2021[track][3].split()[1]}.flac") if track == "DF" else None
    return root


@pytest.mark.parametrize("track", ["LA", "DF"])
def test_asvspoof2021_keys_subsets_and_protocols(track: str, tmp_path: Path):
    """Label, attack and subset are found around the trim column in both LA and DF keys; cm_test_eval keeps subset eval only."""
    root = make_2021_root(tmp_path, track)
    out = tmp_path / "out"
    summary = prepare_dataset(f"asvspoof2021_{track.lower()}", root, out, shards=SHARDS)
    clips = assert_common(out, summary, {"test": 3})
    ids = [line.split()[1] for line in KEYS_2021[track]]
    first, bona, third = (clips[i].meta for i in ids[:3])
    assert first.spoof == "spoof" and first.attack == ("A07" if track == "LA" else "A14")
    assert first.extra["subset"] == ("eval" if track == "LA" else "progress")
    assert bona.spoof == "bonafide" and bona.attack == "-" and bona.extra["subset"] == "eval"
    if track == "LA":
        assert first.extra == {"codec": "alaw", "transmission": "ita_tx", "trim": "notrim", "subset": "eval"}
        assert third.extra["trim"] == "trim" and third.extra["subset"] == "progress"
    else:
        assert first.extra == {
            "codec": "nocodec", "source": "asvspoof", "trim": "notrim", "subset": "progress", "vocoder": "traditional_vocoder",
        }
        assert third.attack == "Task1-team20" and third.speaker == "TEF2" and third.extra["source"] == "vcc2020"
    evals = [line.split()[1] for line in (out / "protocols/cm_test_eval.txt").read_text().splitlines()]
    assert evals == [i for i in ids[:3] if clips[i].meta.extra["subset"] == "eval"]
    assert len((out / "protocols/cm_test.txt").read_text().splitlines()) == 3
    assert (out / f"protocols/{track}_CM_trial_metadata.txt").is_file()
    assert len(summary.unreadable) == 1 and summary.unreadable[0][0].endswith(f"{ids[3]}.flac")


def test_asvspoof2021_odd_and_malformed_key_lines(tmp_path: Path):
    """A spoof row without attack id gets attack "unknown" (noted); a bad label or no trim column names file:line."""
    root = make_2021_root(tmp_path, "DF")
    key = root / "keys/DF/CM/trial_metadata.txt"
    key.write_text("LA_0023 DF_E_2000011 nocodec asvspoof - spoof notrim eval - - - - -\n")
    summary = prepare_dataset("asvspoof2021_df", root, tmp_path / "out")
    assert read_corpus(tmp_path / "out")["DF_E_2000011"].meta.attack == "unknown"
    assert any("1 spoof rows name no attack" in n for n in summary.notes)
    key.write_text(KEYS_2021["DF"][0] + "\nLA_0023 DF_E_2000099 nocodec asvspoof A14 fake notrim eval - - - -\n")
    with pytest.raises(AvsslError, match=r"trial_metadata\.txt:2: expected 'SPEAKER TRIAL codec source attack label"):
        prepare_dataset("asvspoof2021_df", root, tmp_path / "out2")
    key.write_text("LA_0023 DF_E_2000011 nocodec asvspoof A14 spoof\n")
    with pytest.raises(AvsslError, match=r"trial_metadata\.txt:1:"):
        prepare_dataset("asvspoof2021_df", root, tmp_path / "out3")


@pytest.fixture
def itw_root(tmp_path: Path) -> Path:
    root = tmp_path / "itw"
    data = root / "release_in_the_wild"
    write_audio(data / "0.wav")
    write_audio(data / "1.wav", freq=330)
    write_garbage(data / "2.wav")
    (data / "meta.csv").write_text(
        "file,speaker,label\n0.wav,Alec Guinness,spoof\n1.wav,Alec Guinness,bona-fide\n2.wav,Barack Obama,spoof\n"
    )
    return root


def test_in_the_wild_meta_csv(itw_root: Path, tmp_path: Path):
    """meta.csv labels map to bonafide / spoof with attack "ITW"; speakers keep their names; all test."""
    out = tmp_path / "out"
    summary = prepare_dataset("in_the_wild", itw_root, out)
    clips = assert_common(out, summary, {"test": 2})
    assert (clips["0"].meta.spoof, clips["0"].meta.attack, clips["0"].meta.speaker) == ("spoof", "ITW", "Alec Guinness")
    assert (clips["1"].meta.spoof, clips["1"].meta.attack) == ("bonafide", "-")
    assert (out / "protocols/cm_test.txt").read_text() == "Alec_Guinness 0 - ITW spoof\nAlec_Guinness 1 - - bonafide\n"
    assert set(unreadable_names(summary)) == {"2.wav"}


def test_in_the_wild_malformed_label(itw_root: Path, tmp_path: Path):
    """An unknown label in meta.csv stops the run naming meta.csv and the line."""
    meta = itw_root / "release_in_the_wild/meta.csv"
    meta.write_text("file,speaker,label\n0.wav,Alec Guinness,spoof\n1.wav,Alec Guinness,fake\n")
    with pytest.raises(AvsslError, match=r"meta\.csv:3: expected '<n>\.wav,<speaker>,<bona-fide\|spoof>'"):
        prepare_dataset("in_the_wild", itw_root, tmp_path / "out")
