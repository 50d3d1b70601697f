"""`avssl bench data`: throughput of the streaming pipeline against a plain per-file baseline.

Both sides do the same work per sample (decode FLAC + MP4, crop, fbank, resize, normalize,
collate) with the same number of DataLoader workers; they differ only in where bytes come
from: webdataset shards read sequentially, or one loose file per member opened by a
map-style Dataset (the usual `Dataset.__getitem__` design). Printed as samples/s and ratio.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from avssl.data.features import FeatureConfig, load_stats
from avssl.data.loader import DataConfig, SampleDecoder, StreamingLoader, collate
from avssl.data.shards import CorpusIndex, iter_raw_samples


def export_loose(corpus: Path, split: str, limit: int, out: Path) -> list[Path]:
    """Write up to `limit` samples as loose files `<key>.<ext>`; returns one stem per sample."""
    stems = []
    for sample in iter_raw_samples(CorpusIndex.load(corpus).shards(split)):
        if len(stems) >= limit:
            break
        stem = out / sample["__key__"]
        for ext, data in sample.items():
            if not ext.startswith("__"):
                stem.with_suffix("." + ext).write_bytes(data)
        stems.append(stem)
    return stems


class LooseFiles(torch.utils.data.Dataset):
    """Baseline: a map-style Dataset reading one file per member, same decoding as the loader."""

    def __init__(self, stems: list[Path], decoder: SampleDecoder) -> None:
        self.stems, self.decoder = stems, decoder

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, i: int) -> dict[str, Any]:
        stem = self.stems[i]
        sample = {p.suffix[1:]: p.read_bytes() for p in stem.parent.glob(stem.name + ".*")}
        return self.decoder.example(sample, np.random.default_rng(i))


@dataclass
class BenchRow:
    workers: int
    shards_sps: float
    loose_sps: float

    @property
    def ratio(self) -> float:
        return self.shards_sps / self.loose_sps


def _time_batches(batches, n: int, batch_size: int) -> float:
    it = iter(batches)
    next(it)  # warm-up: worker start-up and first decode are not throughput
    t0 = time.perf_counter()
    done = 0
    for _ in range(n):
        try:
            next(it)
        except StopIteration:
            break
        done += 1
    return done * batch_size / (time.perf_counter() - t0)


def bench_data(corpus: Path, workers: list[int], batches: int, batch_size: int, clip_seconds: float) -> list[BenchRow]:
    stats = load_stats(corpus)
    features = FeatureConfig(num_mel_bins=stats.num_mel_bins)
    rows = []
    with tempfile.TemporaryDirectory(prefix="avssl-bench-") as tmp:
        stems = export_loose(corpus, "train", (batches + 1) * batch_size, Path(tmp))
        for w in workers:
            data = DataConfig(
                corpus=str(corpus), batch_size=batch_size, num_workers=w, clip_seconds=clip_seconds,
                steps_per_epoch=batches + 1, shuffle_buffer=0,
            )
            shard_sps = _time_batches(StreamingLoader(data, features), batches, batch_size)
            decoder = SampleDecoder(data, features, stats, rank=0)
            loose = torch.utils.data.DataLoader(
                LooseFiles(stems, decoder),
                batch_size=batch_size,
                num_workers=w,
                collate_fn=lambda ex: collate(ex, data, features, 0),
            )
            rows.append(BenchRow(w, shard_sps, _time_batches(loose, batches, batch_size)))
    return rows


def print_bench(rows: list[BenchRow], console: Console) -> None:
    table = Table(title="data pipeline: decode + fbank + crop + resize + collate (samples/s)")
    for col in ("workers", "webdataset shards", "loose files (baseline)", "ratio"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r.workers), f"{r.shards_sps:.1f}", f"{r.loose_sps:.1f}", f"{r.ratio:.2f}x")
    console.print(table)
