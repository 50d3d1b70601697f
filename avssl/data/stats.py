"""Corpus normalization statistics (`stats.json`): computed while synthesizing, or from shards."""

from __future__ import annotations

import logging
from pathlib import Path

from avssl import AvsslError
from avssl.data.features import FbankStats, FeatureConfig, RunningMoments, fbank, save_stats
from avssl.data.shards import CorpusIndex, ReadReport, decode_clip, iter_checked_samples
from avssl.progress import progress_bar

log = logging.getLogger(__name__)


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


def compute_stats(corpus: Path, features: FeatureConfig, split: str = "train", max_clips: int | None = None,
                  report: ReadReport | None = None) -> FbankStats:
    """Recompute stats.json from a corpus's shards (real datasets after `avssl data prepare`).
    Unreadable shards and samples that do not decode are passed over, never silently: they are
    named in a warning and recorded in `report` when one is given."""
    import torch

    index = CorpusIndex.load(corpus)
    report = ReadReport() if report is None else report
    total = index.count(split) if max_clips is None else min(max_clips, index.count(split))
    moments, clips = RunningMoments(), 0
    with progress_bar(f"fbank statistics ({split})", total) as bar:
        for sample in iter_checked_samples(index.shards(split), report):
            if clips >= total:
                break
            try:
                clip = decode_clip(sample)
            except Exception as exc:  # named in the report, never fatal
                report.sample(sample, exc)
                continue
            if clip.audio is not None:
                moments.update(fbank(torch.from_numpy(clip.audio), features))
                clips += 1
            bar.advance()
    if report:
        log.warning("%s: statistics computed without %s", corpus, report.describe())
    stats = stats_from_moments(moments, features, clips)
    save_stats(corpus, stats)
    return stats
