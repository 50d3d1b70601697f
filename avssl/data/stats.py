"""Corpus normalization statistics (`stats.json`): computed while synthesizing, or from shards."""

from __future__ import annotations

from pathlib import Path

from avssl import AvsslError
from avssl.data.features import FbankStats, FeatureConfig, RunningMoments, fbank, save_stats
from avssl.data.shards import CorpusIndex, decode_clip, iter_raw_samples
from avssl.progress import progress_bar


def stats_from_moments(moments: RunningMoments, cfg: FeatureConfig, clips: int) -> FbankStats:
    if moments.n == 0:
        raise AvsslError("no audio to compute normalization statistics from")
    return FbankStats(
        mean=moments.mean,
        std=moments.std,
        num_mel_bins=cfg.num_mel_bins,
        frame_shift_ms=cfg.frame_shift_ms,
        frame_length_ms=cfg.frame_length_ms,
        norm_std_scale=cfg.norm_std_scale,
        num_clips=clips,
    )


def compute_stats(corpus: Path, features: FeatureConfig, split: str = "train", max_clips: int | None = None) -> FbankStats:
    """Recompute stats.json from a corpus's shards (real datasets after `avssl data prepare`)."""
    import torch

    index = CorpusIndex.load(corpus)
    total = index.count(split) if max_clips is None else min(max_clips, index.count(split))
    moments, clips = RunningMoments(), 0
    with progress_bar(f"fbank statistics ({split})", total) as bar:
        for sample in iter_raw_samples(index.shards(split)):
            if clips >= total:
                break
            try:
                clip = decode_clip(sample)
            except Exception:  # counted in the progress description, never fatal
                continue
            if clip.audio is not None:
                moments.update(fbank(torch.from_numpy(clip.audio), features))
                clips += 1
            bar.advance()
    stats = stats_from_moments(moments, features, clips)
    save_stats(corpus, stats)
    return stats
