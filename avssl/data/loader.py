"""Streaming training data: webdataset shards -> decoded, cropped features -> batches.

Built for many ranks x many DataLoader workers:
- Node splitting is explicit (`rank`, `world_size` are arguments, never guessed from the
  environment): rank r reads shards r, r+W, r+2W, ... of the split.
- Worker splitting: DataLoader worker w of a rank reads every n-th shard of that rank's list
  (finite mode) or draws shards from it with its own seed (resampled mode).
- Resampled mode (training default) draws shards with replacement forever and the loader
  stops after exactly `steps_per_epoch` batches on every rank, so ranks never hang on uneven
  data. Shuffling: shard order (seeded by seed, epoch, rank, worker) and a sample buffer.
- Decoding and features run inside the DataLoader workers.
- A corrupt, truncated or empty sample is skipped, counted and reported: every batch carries
  `skipped`, the number of samples dropped by its worker since its previous batch, and
  `skipped_keys`, the names of the bad samples that worker met for the first time since then
  (`<shard file>:<sample key>`, or `<shard file>` when the shard itself cannot be read). A
  damaged shard is met again on every resampled draw and every epoch: `skipped` counts each
  meeting, a name is sent once per worker, and the training loop keeps the run's distinct set.

Batch layout (B samples; missing modalities are zero-filled and flagged):
  audio     float32 [B, T, F]        normalized log-mel fbank (T = frames in clip_seconds)
  video     float32 [B, V, 3, S, S]  normalized face frames, or None when video is not loaded
  has_audio bool [B], has_video bool [B]
  emotion   int64 [B]  index into schema.EMOTIONS, -1 when unlabelled
  is_spoof  int64 [B]  1 spoof, 0 bona fide
  meta      list[dict] the samples' metadata (speaker, utterance, attack, ...)
  skipped   int
  skipped_keys list[str]
"""

from __future__ import annotations

import functools
import json
import logging
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch.utils.data import IterableDataset, get_worker_info

from avssl import AvsslError, NoRestartError
from avssl.config import Section
from avssl.data.features import (
    FbankStats,
    FeatureConfig,
    audio_features,
    crop_window,
    frame_indices,
    load_stats,
    resample,
    video_features,
)
from avssl.data.schema import EMOTIONS, SAMPLE_RATE, Meta, decode_audio, decode_video
from avssl.data.shards import CorpusIndex

log = logging.getLogger(__name__)

Modality = Literal["audio", "video"]
# Unreadable shard reads with no good sample in between before a loader gives up: a few bad
# shards are skipped and counted, a corpus that is gone is an error.
MAX_FAILED_READS_IN_A_ROW = 64


class DataConfig(Section):
    """Which corpus to stream and how to batch it."""

    corpus: str = Field("data/demo", description="corpus directory (index.json, shards, stats.json)")
    split: str = Field("train", description="split to stream: train, val or test")
    batch_size: int = Field(8, ge=1, description="micro-batch per rank")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank")
    clip_seconds: float = Field(2.0, gt=0, le=60, description="length of each training crop")
    crop: Literal["random", "center"] = Field("random", description="where each crop of clip_seconds starts in its clip")
    modalities: list[Modality] = Field(default_factory=lambda: ["audio", "video"], description="modalities to load")
    resampled: bool = Field(True, description="draw shards with replacement; fixed steps per epoch")
    steps_per_epoch: int | None = Field(None, ge=1, description="default: split count / (batch x world)")
    shard_shuffle: bool = Field(True, description="shuffle the shard order of each epoch")
    shuffle_buffer: int = Field(256, ge=0, description="sample shuffle buffer per worker (0: off)")
    bona_fide_only: bool = Field(
        False,
        description="drop spoofed samples before decoding (pretraining learns from bona fide speech, "
        "as on VoxCeleb2; a spoof shares its bona fide clip's video, so it would also be a false negative)",
    )
    seed: int = Field(0, description="seed of the shard order, the sample shuffle and the crops")

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("list audio, video or both, once each")
        return v


def _seed(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode())


def worker_role(rotation: int = 0) -> tuple[int, int]:
    """(role, num_workers) of the current DataLoader worker. After resuming k batches into an
    epoch the DataLoader restarts its round-robin at worker 0 while the next batch belongs to
    worker k % W, so worker w takes the role (seeds, shards, skip count) of worker (w + k) % W."""
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
    return (worker + rotation) % num_workers, num_workers


def rank_shards(shards: list[Path], rank: int, world_size: int, resampled: bool) -> list[Path]:
    """Rank r's shards: r, r+W, ... Finite reading needs at least one shard per rank; resampled
    reading lets every rank draw from all shards when there are fewer shards than ranks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    mine = shards[rank::world_size]
    if not mine:
        if resampled:
            return list(shards)
        raise AvsslError(
            f"{len(shards)} shard(s) for {world_size} ranks: rank {rank} would get none and the job would hang; "
            "write more shards (shards.min_shards_per_split) or use data.resampled=true"
        )
    return mine


class ShardStream(IterableDataset):
    """Yields {"url": path} for this rank's DataLoader worker (first stage of the pipeline)."""

    def __init__(self, shards: list[Path], resampled: bool, shuffle: bool, seed: int, rank: int) -> None:
        self.shards, self.resampled, self.shuffle, self.seed, self.rank = shards, resampled, shuffle, seed, rank
        self.epoch = 0
        self.rotation = 0

    def __iter__(self) -> Iterator[dict[str, str]]:
        worker, num_workers = worker_role(self.rotation)
        rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker))
        if self.resampled:
            while True:
                yield {"url": str(rng.choice(self.shards))}
        order = list(self.shards)
        if self.shuffle:
            random.Random(_seed(self.seed, self.epoch, self.rank)).shuffle(order)
        for url in order[worker::num_workers]:
            yield {"url": str(url)}


def bona_fide(source: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Pipeline stage: drops samples whose metadata says spoof, before shuffling and decoding.
    Unparsable metadata passes through, so the decoder counts it as a corrupt sample."""
    for sample in source:
        try:
            spoof = json.loads(sample["json"]).get("spoof") == "spoof"
        except Exception:
            spoof = False
        if not spoof:
            yield sample


@dataclass
class SampleDecoder:
    """Turns raw samples into feature examples; skips and counts the ones that fail, and names
    each bad sample or shard once (see `skipped_keys` in the module docstring)."""

    data: DataConfig
    features: FeatureConfig
    stats: FbankStats
    rank: int
    skipped: int = 0  # bad samples and unreadable shard reads met, each meeting counted
    epoch: int = 0
    failed_in_a_row: int = 0  # unreadable shard reads since the last good sample
    bad: list[str] = field(default_factory=list)  # distinct names met by this worker, in order
    _known: set[str] = field(default_factory=set, repr=False)

    def _skip(self, name: str, message: str, *args: Any) -> None:
        """Count one bad read; warn and record its name the first time this worker meets it."""
        self.skipped += 1
        if name not in self._known:
            self._known.add(name)
            self.bad.append(name)
            log.warning(message, *args)

    def read_shards(self, source: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        """Pipeline stage: {"url"} -> raw samples, each shard read with an error handler that
        knows its url (webdataset's exceptions do not always carry it)."""
        from webdataset.tariterators import tarfile_samples

        for item in source:
            yield from tarfile_samples([item], handler=functools.partial(self.tar_error, url=item["url"]))

    def tar_error(self, exn: Exception, url: str | None = None) -> bool:
        """webdataset handler for unreadable shards (truncated tar): count, warn, continue; but
        when reads keep failing with no good sample in between (the corpus was moved, deleted or
        unmounted), stop with an error instead of spinning on shards that are not there."""
        self.failed_in_a_row += 1
        if self.failed_in_a_row >= MAX_FAILED_READS_IN_A_ROW:
            raise NoRestartError(  # a restart would read the same shards
                f"{self.failed_in_a_row} shard reads in a row failed without one readable sample (last: {exn}); "
                f"check that the corpus at {self.data.corpus} is complete and reachable from every node "
                f"(`avssl data inspect {self.data.corpus}`), then re-run to resume")
        self._skip(Path(url).name if url else "unknown shard", "skipping unreadable shard data: %s", exn)
        return True

    def __call__(self, source: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in source:
            try:
                # Crop randomness depends on the sample and epoch only, not on stream position,
                # so a resumed run that skips ahead sees exactly the crops it would have seen.
                rng = np.random.default_rng(_seed(self.data.seed, self.epoch, sample.get("__key__")))
                example = self.example(sample, rng)
                self.failed_in_a_row = 0
                yield example
            except Exception as exc:  # one bad sample must never end a long run
                url, key = sample.get("__url__"), sample.get("__key__")
                self._skip(f"{Path(str(url)).name}:{key}", "skipping sample %s from %s: %s", key, url, exc)

    def example(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if "json" not in sample:
            raise ValueError("sample has no json metadata")
        meta = Meta.from_dict(json.loads(sample["json"]))
        want_audio = "audio" in self.data.modalities and ("flac" in sample or "wav" in sample)
        want_video = "video" in self.data.modalities and "mp4" in sample
        if not (want_audio or want_video):
            raise ValueError(f"sample has none of the requested modalities {self.data.modalities}")
        audio = None
        if want_audio:
            wave, sr = decode_audio(sample.get("flac") or sample["wav"])
            if wave.size == 0:
                raise ValueError("audio is empty")
            audio = resample(wave, sr)
        duration = len(audio) / SAMPLE_RATE if audio is not None else meta.duration
        start = crop_window(duration, self.data.clip_seconds, self.data.crop, rng)
        seconds, num_frames = self.data.clip_seconds, self.features.num_frames
        video = None
        if want_video:
            video, _ = decode_video(sample["mp4"], keep=lambda n, f: frame_indices(n, f, start, seconds, num_frames))
        return {
            "audio": None if audio is None else audio_features(audio, start, seconds, self.features, self.stats),
            "video": None if video is None else video_features(video, self.features),
            "meta": meta.to_dict(),
        }


def collate(examples: list[dict[str, Any]], data: DataConfig, features: FeatureConfig, skipped: int,
            skipped_keys: list[str] | None = None) -> dict[str, Any]:
    """Stack examples into one batch (layout in the module docstring)."""
    b = len(examples)
    t, f = features.num_audio_frames(data.clip_seconds), features.num_mel_bins
    v, s = features.num_frames, features.image_size
    audio = torch.zeros(b, t, f)
    video = torch.zeros(b, v, 3, s, s) if "video" in data.modalities else None
    has_audio = torch.zeros(b, dtype=torch.bool)
    has_video = torch.zeros(b, dtype=torch.bool)
    for i, ex in enumerate(examples):
        if ex["audio"] is not None:
            audio[i], has_audio[i] = ex["audio"], True
        if ex["video"] is not None and video is not None:
            video[i], has_video[i] = ex["video"], True
    metas = [ex["meta"] for ex in examples]
    return {
        "audio": audio,
        "video": video,
        "has_audio": has_audio,
        "has_video": has_video,
        "emotion": torch.tensor([EMOTIONS.index(m["emotion"]) if m.get("emotion") in EMOTIONS else -1 for m in metas]),
        "is_spoof": torch.tensor([int(m["spoof"] == "spoof") for m in metas]),
        "meta": metas,
        "skipped": skipped,
        "skipped_keys": list(skipped_keys or ()),
    }


@dataclass
class Skipper:
    """Pipeline stage: drops the raw samples of batches already consumed (resume), before any
    decoding. DataLoader workers deliver batches round-robin, so of the first k batches worker w
    produced k // W (+1 if w < k % W); roles are rotated on resume (see `worker_role`)."""

    batch_size: int
    num_workers: int
    batches: int = 0

    def __call__(self, source: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        w = max(1, self.num_workers)
        worker, _ = worker_role(self.batches % w)
        todo = (self.batches // w + (1 if worker < self.batches % w else 0)) * self.batch_size
        for sample in source:
            if todo > 0:
                todo -= 1
                continue
            yield sample


class Batcher:
    """Pipeline stage: groups examples into batches and attaches the skip count."""

    def __init__(self, decoder: SampleDecoder, partial: bool) -> None:
        self.decoder, self.partial = decoder, partial
        self._reported = 0
        self._named = 0  # of decoder.bad, the names already sent

    def __call__(self, source: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        d = self.decoder
        pending: list[dict[str, Any]] = []
        for ex in source:
            pending.append(ex)
            if len(pending) == d.data.batch_size:
                yield self._emit(pending)
                pending = []
        if pending and self.partial:
            yield self._emit(pending)

    def _emit(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        d = self.decoder
        skipped, self._reported = d.skipped - self._reported, d.skipped
        names, self._named = d.bad[self._named:], len(d.bad)
        return collate(examples, d.data, d.features, skipped, names)


class StreamingLoader:
    """A DataLoader over the webdataset pipeline with a fixed number of batches per epoch.

    `len(loader)` is the number of batches an epoch yields on this rank (equal on every rank in
    resampled mode). Call `set_epoch(e)` before iterating epoch e for a new shuffle.

    The fbank is normalized with the corpus's `stats.json`, or with `stats` where given: a release
    evaluated on another corpus reads it with the statistics it was trained with, as inference does.
    """

    def __init__(self, data: DataConfig, features: FeatureConfig, rank: int = 0, world_size: int = 1,
                 stats: FbankStats | None = None) -> None:
        import webdataset as wds

        self.data, self.features = data, features
        index = CorpusIndex.load(data.corpus)
        if stats is None:
            stats = load_stats(Path(data.corpus))
            stats.check_matches(features, str(Path(data.corpus) / "stats.json"))
        count = index.count(data.split, data.bona_fide_only)
        shards = rank_shards(index.shards(data.split), rank, world_size, data.resampled)
        if data.resampled:
            self.steps = data.steps_per_epoch or max(1, count // (data.batch_size * world_size))
        else:  # finite: every sample of this rank once, last batch may be partial
            self.steps = None
        self.stream = ShardStream(shards, data.resampled, data.shard_shuffle, data.seed, rank)
        self.decoder = SampleDecoder(data, features, stats, rank)
        stages: list[Any] = [
            self.stream,
            self.decoder.read_shards,
        ]
        if data.bona_fide_only:
            stages.append(bona_fide)
        if data.shuffle_buffer > 0:
            stages.append(wds.shuffle(data.shuffle_buffer, initial=min(64, data.shuffle_buffer), rng=random.Random(_seed(data.seed, rank))))
        self.skipper = Skipper(data.batch_size, data.num_workers)
        stages += [self.skipper, self.decoder, Batcher(self.decoder, partial=not data.resampled)]
        self.pipeline = wds.DataPipeline(*stages)
        self.loader = torch.utils.data.DataLoader(
            self.pipeline,
            batch_size=None,
            num_workers=data.num_workers,
            collate_fn=None,
            persistent_workers=False,
            prefetch_factor=2 if data.num_workers > 0 else None,
        )

    def set_epoch(self, epoch: int, batches_done: int = 0, known_bad: Iterable[str] = ()) -> None:
        """Position the next iteration at `batches_done` batches into epoch `epoch` (resume).
        Exact when no sample in the skipped part was corrupt. `known_bad`: names of bad samples
        the caller has counted already (in an earlier epoch or run): still skipped and counted
        in `skipped`, but neither warned about nor sent again in `skipped_keys`."""
        self.decoder._known.update(known_bad)
        self.stream.epoch = epoch
        self.decoder.epoch = epoch
        self.skipper.batches = batches_done
        self.stream.rotation = batches_done % max(1, self.data.num_workers)

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("a finite (resampled=false) loader has no fixed length")
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.steps is None:
            yield from self.loader
            return
        it = iter(self.loader)
        for _ in range(self.steps - self.skipper.batches):
            yield next(it)
        del it  # shuts the workers down

