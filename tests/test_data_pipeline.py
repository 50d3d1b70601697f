"""Shards, features and the streaming loader on a small corpus built in the test."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from avssl import AvsslError
from avssl.data.stats import compute_stats
from avssl.data.features import FeatureConfig, RunningMoments, fbank, frame_indices, load_stats
from avssl.data.loader import DataConfig, ShardStream, StreamingLoader, rank_shards
from avssl.data.schema import Clip, Meta
from avssl.data.shards import CorpusIndex, CorpusWriter, ShardConfig, decode_clip, iter_raw_samples

FEATURES = FeatureConfig(num_mel_bins=32, image_size=32, num_frames=2)


def make_clip(i: int, audio: bool = True, video: bool = True, seconds: float = 1.0) -> Clip:
    rng = np.random.default_rng(i)
    n = int(seconds * 16000)
    wave = (0.3 * np.sin(2 * np.pi * (100 + 10 * i) * np.arange(n) / 16000) + 0.01 * rng.standard_normal(n)).astype(np.float32)
    frames = rng.integers(0, 255, size=(int(seconds * 25), 32, 32, 3), dtype=np.uint8)
    meta = Meta(
        dataset="test", speaker=f"spk{i % 4}", utterance=f"spk{i % 4}/utt{i:03d}", duration=seconds,
        emotion=["ANG", "SAD", None][i % 3], spoof="spoof" if i % 5 == 0 else "bonafide",
        attack="A01" if i % 5 == 0 else "-", fps=25.0 if video else None,
    )
    return Clip(meta=meta, audio=wave if audio else None, video=frames if video else None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """20 AV clips + 2 audio-only + 2 video-only in 6 train shards (4 samples each)."""
    root = tmp_path_factory.mktemp("corpus")
    clips = [make_clip(i) for i in range(20)] + [make_clip(20 + i, video=False) for i in range(2)]
    clips += [make_clip(22 + i, audio=False) for i in range(2)]
    with CorpusWriter(root, ShardConfig(max_count=4), dataset="test") as w:
        for c in clips:
            w.write(c)
    compute_stats(root, FEATURES)
    return root


def loader(corpus: Path, **kw) -> StreamingLoader:
    data = DataConfig(corpus=str(corpus), batch_size=4, num_workers=0, clip_seconds=1.0, shuffle_buffer=0, **kw)
    return StreamingLoader(data, FEATURES)


def test_shard_round_trip(corpus):
    """Clips written to shards decode back: lossless audio, every frame, identical metadata, index counts."""
    index = CorpusIndex.load(corpus)
    assert index.count("train") == 24 and len(index.shards("train")) == 6
    assert not list(corpus.glob(".*.tmp")), "temporary shard files left behind"
    back = {c.meta.utterance: c for c in map(decode_clip, iter_raw_samples(index.shards("train")))}
    original = make_clip(7)
    got = back[original.meta.utterance]
    assert np.abs(got.audio - original.audio).max() < 1e-4  # 16-bit quantization only
    assert got.video.shape == original.video.shape and got.meta.to_dict() == original.meta.to_dict()
    assert back["spk0/utt020"].video is None and back["spk2/utt022"].audio is None


def test_the_same_clips_write_byte_identical_shards(corpus, tmp_path):
    """Shards are a pure function of their samples (no wall-clock mtimes): rewriting the corpus
    gives the same bytes, so checksums and caches of a regenerated corpus agree."""
    again = tmp_path / "again"
    clips = [make_clip(i) for i in range(20)] + [make_clip(20 + i, video=False) for i in range(2)]
    clips += [make_clip(22 + i, audio=False) for i in range(2)]
    with CorpusWriter(again, ShardConfig(max_count=4), dataset="test") as w:
        for c in clips:
            w.write(c)
    for shard in sorted(corpus.glob("train-*.tar")):
        assert (again / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_writer_rejects_duplicates(tmp_path):
    """Two clips with one utterance id are an error, not a silent overwrite."""
    with pytest.raises(AvsslError, match="duplicate"):
        with CorpusWriter(tmp_path, ShardConfig(), dataset="t") as w:
            w.write(make_clip(1))
            w.write(make_clip(1))
    assert not (tmp_path / "index.json").exists()


def test_stats_match_direct_computation(corpus):
    """stats.json equals the mean/std of all train fbank values computed in one go."""
    stats = load_stats(corpus)
    feats = [fbank(torch.from_numpy(c.audio), FEATURES) for c in map(decode_clip, iter_raw_samples(CorpusIndex.load(corpus).shards("train"))) if c.audio is not None]
    allv = torch.cat([f.flatten() for f in feats]).double()
    assert stats.num_clips == 22
    assert stats.mean == pytest.approx(float(allv.mean()), rel=1e-6)
    assert stats.std == pytest.approx(float(allv.std()), rel=1e-6)
    m = RunningMoments()
    for chunk in allv.split(1000):
        m.update(chunk)
    assert m.std == pytest.approx(float(allv.std()), rel=1e-9)


def test_feature_shapes_and_frame_window():
    """fbank frame count follows Kaldi's rule, and face frames come from the crop window."""
    assert FEATURES.num_audio_frames(1.0) == fbank(torch.zeros(16000), FEATURES).shape[0] == 98
    idx = frame_indices(100, 25.0, start_s=1.0, seconds=1.0, count=5)
    assert idx[0] == 25 and idx[-1] == 49 and np.all(np.diff(idx) > 0)


def test_rank_shards_disjoint_and_complete():
    """Ranks get disjoint shard sets whose union is every shard; too few shards fail clearly."""
    shards = [Path(f"s{i}.tar") for i in range(7)]
    parts = [rank_shards(shards, r, 3, resampled=False) for r in range(3)]
    assert sorted(sum(parts, []), key=str) == sorted(shards, key=str)
    assert all(not set(a) & set(b) for i, a in enumerate(parts) for b in parts[i + 1 :])
    with pytest.raises(AvsslError, match="hang"):
        rank_shards(shards[:1], 1, 2, resampled=False)
    assert rank_shards(shards[:1], 1, 2, resampled=True) == shards[:1]


def test_worker_split_is_disjoint(corpus):
    """In finite mode each DataLoader worker reads its own shards, each shard exactly once."""
    shards = CorpusIndex.load(corpus).shards("train")
    stream = ShardStream(shards, resampled=False, shuffle=True, seed=0, rank=0)
    urls = [u["url"] for u in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)]
    assert sorted(urls) == sorted(map(str, shards))


def test_finite_loader_reads_each_sample_once(corpus):
    """A finite (evaluation) pass over two ranks sees every sample exactly once."""
    seen: Counter[str] = Counter()
    for rank in range(2):
        data = DataConfig(corpus=str(corpus), batch_size=4, num_workers=2, clip_seconds=1.0, resampled=False, crop="center", shuffle_buffer=0)
        for batch in StreamingLoader(data, FEATURES, rank=rank, world_size=2):
            seen.update(m["utterance"] for m in batch["meta"])
    assert len(seen) == 24 and set(seen.values()) == {1}


def test_equal_steps_per_rank_on_uneven_shards(corpus):
    """Resampled mode yields exactly steps_per_epoch batches on every rank, though 6 shards split 3/3 and the loads differ."""
    counts = []
    for rank in range(4):  # 6 shards over 4 ranks: ranks get 2, 2, 1, 1 shards
        data = DataConfig(corpus=str(corpus), batch_size=4, num_workers=1, clip_seconds=1.0, steps_per_epoch=5)
        ld = StreamingLoader(data, FEATURES, rank=rank, world_size=4)
        counts.append(sum(1 for _ in ld))
        assert len(ld) == 5
    assert counts == [5, 5, 5, 5]


def test_batches_carry_modality_presence(corpus):
    """Audio-only, video-only and AV samples batch together with flags and zero-filled gaps."""
    data = DataConfig(corpus=str(corpus), batch_size=24, num_workers=0, clip_seconds=1.0, resampled=False, crop="center", shuffle_buffer=0)
    batch = next(iter(StreamingLoader(data, FEATURES)))
    assert batch["audio"].shape == (24, 98, 32) and batch["video"].shape == (24, 2, 3, 32, 32)
    by_utt = {m["utterance"]: i for i, m in enumerate(batch["meta"])}
    a_only, v_only, av = by_utt["spk0/utt020"], by_utt["spk2/utt022"], by_utt["spk1/utt001"]
    assert batch["has_audio"][a_only] and not batch["has_video"][a_only] and batch["video"][a_only].abs().sum() == 0
    assert batch["has_video"][v_only] and not batch["has_audio"][v_only] and batch["audio"][v_only].abs().sum() == 0
    assert batch["has_audio"][av] and batch["has_video"][av]
    assert batch["emotion"][by_utt["spk1/utt001"]] == 5 and batch["emotion"][by_utt["spk2/utt002"]] == -1
    assert batch["is_spoof"][by_utt["spk0/utt000"]] == 1 and batch["is_spoof"][av] == 0
    assert torch.isfinite(batch["audio"]).all() and torch.isfinite(batch["video"]).all()


def test_bona_fide_only_drops_spoofs_before_decoding(corpus):
    """bona_fide_only (pretraining) reads every bona fide sample once and no spoof (i % 5 == 0)."""
    data = DataConfig(corpus=str(corpus), batch_size=4, num_workers=0, clip_seconds=1.0, resampled=False,
                      shuffle_buffer=0, bona_fide_only=True)
    batches = list(StreamingLoader(data, FEATURES))
    utts = [m["utterance"] for b in batches for m in b["meta"]]
    assert len(utts) == len(set(utts)) == 24 - 5 and all(b["is_spoof"].sum() == 0 for b in batches)
    assert sum(b["skipped"] for b in batches) == 0  # filtered, not counted as corrupt
    # The index counts bona fide samples, so a resampled epoch spans the bona fide data once,
    # not the spoofs it never yields too.
    assert CorpusIndex.load(corpus).count("train", bona_fide_only=True) == 24 - 5
    resampled = data.model_copy(update={"resampled": True})
    assert len(StreamingLoader(resampled, FEATURES)) == (24 - 5) // 4
    assert len(StreamingLoader(resampled.model_copy(update={"bona_fide_only": False}), FEATURES)) == 24 // 4


def test_audio_only_config_drops_video(corpus):
    """modalities=[audio] loads no video and skips (counts) samples that only have video."""
    data = DataConfig(corpus=str(corpus), batch_size=4, num_workers=0, clip_seconds=1.0, resampled=False, shuffle_buffer=0, modalities=["audio"])
    batches = list(StreamingLoader(data, FEATURES))
    assert all(b["video"] is None for b in batches)
    assert sum(len(b["meta"]) for b in batches) == 22 and sum(b["skipped"] for b in batches) == 2


def _append_bad_samples(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in {
            "bad~flac": {"json": json.dumps(make_clip(90).meta.to_dict()).encode(), "flac": b"not audio"},
            "empty": {"json": json.dumps(make_clip(91).meta.to_dict()).encode(), "flac": b""},
        }.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_corrupt_samples_and_truncated_shard_are_skipped_and_counted(corpus, tmp_path):
    """Garbage audio, an empty sample and a truncated shard are skipped and counted; the pass completes."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    _append_bad_samples(bad / "train-000000.tar")  # replaces shard 0 with 2 broken samples
    whole = (bad / "train-000001.tar").read_bytes()
    (bad / "train-000001.tar").write_bytes(whole[: len(whole) // 2])  # truncated mid-member
    data = DataConfig(corpus=str(bad), batch_size=4, num_workers=0, clip_seconds=1.0, resampled=False, shuffle_buffer=0)
    batches = list(StreamingLoader(data, FEATURES))
    good = sum(len(b["meta"]) for b in batches)
    skipped = sum(b["skipped"] for b in batches)
    assert 16 <= good < 20 and skipped >= 3  # shards 2-5 intact (16), shard 1 partly readable


def test_missing_corpus_and_stats_errors(tmp_path):
    """A folder that is not a corpus, or lacks stats, fails with the command that fixes it."""
    with pytest.raises(AvsslError, match="avssl data synth"):
        StreamingLoader(DataConfig(corpus=str(tmp_path)), FEATURES)
    with CorpusWriter(tmp_path, ShardConfig(), dataset="t") as w:
        w.write(make_clip(0))
    with pytest.raises(AvsslError, match="avssl data stats"):
        StreamingLoader(DataConfig(corpus=str(tmp_path)), FEATURES)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_position_replays_the_same_batches(corpus, workers):
    """Starting an epoch 3 batches in yields exactly batches 3.. of the uninterrupted epoch (crops included)."""
    data = DataConfig(corpus=str(corpus), batch_size=2, num_workers=workers, clip_seconds=0.5, steps_per_epoch=6, shuffle_buffer=8)
    full = StreamingLoader(data, FEATURES)
    full.set_epoch(1)
    reference = list(full)
    resumed = StreamingLoader(data, FEATURES)
    resumed.set_epoch(1, batches_done=3)
    tail = list(resumed)
    assert len(tail) == 3
    for a, b in zip(reference[3:], tail):
        assert [m["utterance"] for m in a["meta"]] == [m["utterance"] for m in b["meta"]]
        assert torch.equal(a["audio"], b["audio"]) and torch.equal(a["video"], b["video"])
    other = StreamingLoader(data, FEATURES)
    other.set_epoch(2)
    assert [m["utterance"] for b in other for m in b["meta"]] != [m["utterance"] for b in reference for m in b["meta"]]


def test_a_corpus_that_disappears_is_an_error_not_a_spin(corpus, tmp_path):
    """Resampled loaders draw shards forever: when none can be read (moved, deleted, unmounted),
    the loader stops with an error naming the corpus instead of skipping forever."""
    import shutil

    from avssl import AvsslError

    gone = tmp_path / "gone"
    shutil.copytree(corpus, gone)
    batches = iter(loader(gone))
    assert len(next(batches)["meta"]) == 4
    for shard in gone.glob("train-*.tar"):
        shard.unlink()
    with pytest.raises(AvsslError, match=rf"shard reads in a row failed.*{gone}.*avssl data inspect"):
        for _ in range(50):
            next(batches)


def test_evaluation_reads_a_corpus_with_the_releases_own_statistics(corpus, tmp_path):
    """`avssl evaluate` normalizes the fbank as the release's inference does: with the statistics stored
    in the release (avssl_features.json), whatever the corpus's stats.json holds and whether it has
    one, so the scores and the calibration `avssl verify` reads come from the features inference
    computes. A release stored without statistics reads the corpus's stats.json."""
    import shutil

    from avssl.finetune.evaluate import eval_loader

    own = load_stats(corpus)
    release = {"features": FEATURES.model_dump(mode="json"), "clip_seconds": 1.0, "fbank_stats": own.model_dump()}
    other = {**release, "fbank_stats": {**own.model_dump(), "mean": own.mean + 1.0}}  # trained on another corpus
    without = {k: v for k, v in release.items() if k != "fbank_stats"}

    def first_batch(features, where=corpus):
        batch = next(iter(eval_loader(where, "train", features, 4, ["audio", "video"])))
        return batch["audio"][batch["has_audio"]]

    reference = first_batch(release)
    assert torch.equal(first_batch(without), reference)  # the corpus's own statistics: the same here
    assert torch.allclose(first_batch(other), reference - 1.0 / (own.norm_std_scale * own.std), atol=1e-5)
    bare = tmp_path / "no_stats"  # a corpus prepared without `avssl data stats`
    shutil.copytree(corpus, bare)
    (bare / "stats.json").unlink()
    assert torch.equal(first_batch(release, bare), reference)
    with pytest.raises(AvsslError, match="avssl data stats"):
        first_batch(without, bare)
