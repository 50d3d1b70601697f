"""Writing and reading corpus shards (webdataset tar files) and the corpus index.

A corpus directory holds, for every split, tar shards `<split>-NNNNNN.tar` of about
`target_mb` each, an `index.json` with per-shard sample counts and each split's bona fide count
(so loaders know the epoch size without reading the data, also when they drop spoofs), `stats.json` (fbank normalization), and optional `trials/*.txt`
(VoxCeleb-format verification trials). Shards are written under a temporary name and renamed
when complete, and the index is written last: a crash never leaves a corpus that looks whole.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from pydantic import Field

from avssl import AvsslError
from avssl.config import Section
from avssl.data.schema import Clip, Meta, decode_audio, decode_video, encode_audio, encode_video
from avssl.io import read_json, write_json

INDEX_FILE = "index.json"
SCHEMA_VERSION = 1


class ShardConfig(Section):
    """Shard sizing when writing a corpus."""

    target_mb: float = Field(64.0, gt=0, description="close a shard once it reaches this size")
    max_count: int = Field(10_000, ge=1, description="close a shard after this many samples")
    min_shards_per_split: int = Field(
        1, ge=1, description="split small corpora into at least this many shards (keep >= ranks x workers)"
    )


def _modality(members) -> str:
    """"audio+video", "audio" or "video" from a sample's member extensions."""
    audio, video = "flac" in members or "wav" in members, "mp4" in members
    return "audio+video" if audio and video else "audio" if audio else "video"


def encode_clip(clip: Clip) -> dict[str, bytes]:
    """A Clip -> the members of one webdataset sample (see avssl.data.schema)."""
    sample: dict[str, bytes] = {"json": json.dumps(clip.meta.to_dict(), sort_keys=True).encode()}
    if clip.audio is not None:
        sample["flac"] = encode_audio(clip.audio)
    if clip.video is not None:
        if clip.meta.fps is None:
            raise ValueError(f"{clip.meta.utterance}: video without meta.fps")
        sample["mp4"] = encode_video(clip.video, clip.meta.fps)
    return sample


def decode_clip(sample: dict[str, Any]) -> Clip:
    """The members of one sample -> a Clip (audio resampled to 16 kHz by the caller if needed)."""
    from avssl.data.features import resample

    if "json" not in sample:
        raise ValueError("sample has no json metadata")
    meta = Meta.from_dict(json.loads(sample["json"]))
    audio = video = None
    if "flac" in sample or "wav" in sample:
        wave, sr = decode_audio(sample.get("flac") or sample["wav"])
        if wave.size == 0:
            raise ValueError("audio is empty")
        audio = resample(wave, sr)
    if "mp4" in sample:
        video, fps = decode_video(sample["mp4"])
        meta.fps = meta.fps or fps
    if audio is None and video is None:
        raise ValueError("sample has neither audio nor video")
    return Clip(meta=meta, audio=audio, video=video)


@dataclass
class _OpenShard:
    path: Path
    tmp: Path
    tar: tarfile.TarFile
    count: int = 0
    bytes: int = 0


@dataclass
class CorpusWriter:
    """Writes clips into per-split shards and the corpus index.

    with CorpusWriter(out_dir, cfg, dataset="synth") as w:
        for clip in clips: w.write(clip)
    """

    out_dir: Path
    cfg: ShardConfig
    dataset: str
    expected_per_split: dict[str, int] = field(default_factory=dict)
    _open: dict[str, _OpenShard] = field(default_factory=dict)
    _done: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _keys: set[str] = field(default_factory=set)
    _speakers: dict[str, set[str]] = field(default_factory=dict)
    _bona_fide: dict[str, int] = field(default_factory=dict)
    _modalities: dict[str, dict[str, int]] = field(default_factory=dict)
    _index: Path | None = None

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "CorpusWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()  # no-op when the caller already closed with extra index fields
        else:  # leave no half-written shard that looks complete
            for shard in self._open.values():
                shard.tar.close()
                shard.tmp.unlink(missing_ok=True)

    def _max_count(self, split: str) -> int:
        expected = self.expected_per_split.get(split)
        if expected:  # spread small corpora over enough shards for ranks x workers
            return max(1, min(self.cfg.max_count, -(-expected // self.cfg.min_shards_per_split)))
        return self.cfg.max_count

    def _shard(self, split: str) -> _OpenShard:
        shard = self._open.get(split)
        if shard is None:
            index = len(self._done.setdefault(split, []))
            path = self.out_dir / f"{split}-{index:06d}.tar"
            tmp = path.with_name(f".{path.name}.tmp")
            shard = _OpenShard(path=path, tmp=tmp, tar=tarfile.open(tmp, "w"))
            self._open[split] = shard
        return shard

    def _finish(self, split: str) -> None:
        shard = self._open.pop(split)
        shard.tar.close()
        os.replace(shard.tmp, shard.path)
        self._done[split].append({"file": shard.path.name, "count": shard.count, "bytes": shard.path.stat().st_size})

    def write(self, clip: Clip) -> None:
        self.write_encoded(clip.meta, clip.key, encode_clip(clip))

    def write_encoded(self, meta: Meta, key: str, members: dict[str, bytes]) -> None:
        """Write one sample already encoded by `encode_clip` (in a worker process, say)."""
        split = meta.split
        if key in self._keys:
            raise AvsslError(f"duplicate utterance id {meta.utterance!r}: ids must be unique in a corpus")
        self._keys.add(key)
        self._speakers.setdefault(split, set()).add(meta.speaker)
        self._bona_fide[split] = self._bona_fide.get(split, 0) + (meta.spoof != "spoof")
        kinds = self._modalities.setdefault(split, {})
        kind = _modality(members)
        kinds[kind] = kinds.get(kind, 0) + 1
        shard = self._shard(split)
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            # A fixed mtime (the epoch) keeps a shard a pure function of its samples: the same seed
            # or the same raw dataset writes byte-identical tars (checksums, caches, dedup agree).
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            shard.tar.addfile(info, io.BytesIO(data))
            shard.bytes += len(data) + 512
        shard.count += 1
        if shard.bytes >= self.cfg.target_mb * 2**20 or shard.count >= self._max_count(split):
            self._finish(split)

    def flush(self) -> None:
        """Finish every open shard: afterwards every sample written so far is in a complete shard."""
        for split in list(self._open):
            self._finish(split)

    def state(self) -> dict[str, Any]:
        """What the index needs of the samples in finished shards (call after `flush`), for a
        run that resumes with `restore`. Keys are not kept: the caller's inputs are unique."""
        if self._open:
            raise RuntimeError("CorpusWriter.state() with open shards: flush() first")
        return {"done": self._done, "speakers": {k: sorted(v) for k, v in self._speakers.items()},
                "bona_fide": self._bona_fide, "modalities": self._modalities}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue after the finished shards of an interrupted run (see `state`)."""
        self._done = {k: list(v) for k, v in state["done"].items()}
        self._speakers = {k: set(v) for k, v in state["speakers"].items()}
        self._bona_fide = dict(state["bona_fide"])
        self._modalities = {k: dict(v) for k, v in state["modalities"].items()}

    def close(self, extra: dict[str, Any] | None = None) -> Path:
        if self._index is not None:
            return self._index
        for split in list(self._open):
            self._finish(split)
        index = {
            "schema_version": SCHEMA_VERSION,
            "dataset": self.dataset,
            "splits": {
                split: {
                    "count": sum(s["count"] for s in shards),
                    "bona_fide": self._bona_fide.get(split, 0),
                    "speakers": sorted(self._speakers.get(split, ())),
                    "modalities": dict(sorted(self._modalities.get(split, {}).items())),
                    "shards": shards,
                }
                for split, shards in sorted(self._done.items())
            },
            **(extra or {}),
        }
        self._index = write_json(self.out_dir / INDEX_FILE, index)
        return self._index


@dataclass(frozen=True)
class CorpusIndex:
    root: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, root: str | Path) -> "CorpusIndex":
        root = Path(root)
        path = root / INDEX_FILE
        if not path.is_file():
            raise AvsslError(
                f"{path}: not a corpus (no {INDEX_FILE}); create one with `avssl data synth` or `avssl data prepare`"
            )
        data = read_json(path)
        if data.get("schema_version") != SCHEMA_VERSION:
            raise AvsslError(f"{path}: schema_version {data.get('schema_version')!r}, this avssl reads {SCHEMA_VERSION}")
        return cls(root=root, data=data)

    @property
    def splits(self) -> list[str]:
        return list(self.data["splits"])

    def count(self, split: str, bona_fide_only: bool = False) -> int:
        """Samples of a split; with `bona_fide_only` its bona fide ones (indexes written before
        the writer recorded them count every sample)."""
        entry = self._split(split)
        return entry.get("bona_fide", entry["count"]) if bona_fide_only else entry["count"]

    def speakers(self, split: str) -> list[str]:
        """Sorted speaker ids of a split (recorded by the writer; read from the samples for older indexes)."""
        recorded = self._split(split).get("speakers")
        if recorded is not None:
            return list(recorded)
        return sorted({json.loads(s["json"])["speaker"] for s in iter_raw_samples(self.shards(split))})

    def shards(self, split: str) -> list[Path]:
        return [self.root / s["file"] for s in self._split(split)["shards"]]

    def modalities(self, split: str) -> dict[str, int]:
        """Samples per modality ("audio+video", "audio", "video") of a split: recorded by the
        writer, else counted from the shards' member names (tar headers only, nothing decoded)."""
        recorded = self._split(split).get("modalities")
        if recorded is not None:
            return dict(recorded)
        counts: dict[str, int] = {}
        for path in self.shards(split):
            members: dict[str, set[str]] = {}
            with tarfile.open(path) as tar:
                for name in tar.getnames():
                    key, _, ext = name.partition(".")
                    members.setdefault(key, set()).add(ext)
            for exts in members.values():
                kind = _modality(exts)
                counts[kind] = counts.get(kind, 0) + 1
        return counts

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.data["splits"]:
            raise AvsslError(f"{self.root / INDEX_FILE}: no split {split!r}; the corpus has {self.splits}")
        return self.data["splits"][split]


@dataclass
class ReadReport:
    """What a checked read could not use: whole shards (missing, not a tar, truncated: the
    samples before the damage are still read) and single samples, each with the reason."""

    bad_shards: list[str] = field(default_factory=list)
    bad_samples: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.bad_shards or self.bad_samples)

    def sample(self, sample: dict[str, Any], exc: BaseException) -> None:
        where = Path(str(sample.get("__url__", "?"))).name
        self.bad_samples.append(f"{where}:{sample.get('__key__', '?')} ({_reason(exc)})")

    def describe(self, limit: int = 10) -> str:
        parts = []
        for what, items in (("unreadable shard", self.bad_shards), ("bad sample", self.bad_samples)):
            if items:
                more = f", and {len(items) - limit} more" if len(items) > limit else ""
                parts.append(f"{len(items)} {what}{'s' if len(items) > 1 else ''}: {'; '.join(items[:limit])}{more}")
        return "; ".join(parts)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def iter_checked_samples(paths: Iterable[Path], report: ReadReport) -> Iterator[dict[str, Any]]:
    """Like `iter_raw_samples`, but a shard that cannot be read (missing, random bytes,
    truncated) is recorded in `report` and passed over instead of ending the iteration."""
    import webdataset as wds

    for path in paths:
        read = 0
        try:
            for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
                read += 1
                yield sample
        except Exception as exc:  # the shard's fault, not the caller's: name it, read on
            after = f" after {read} samples" if read else ""
            report.bad_shards.append(f"{Path(path).name} ({_reason(exc)}{after})")


def iter_raw_samples(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Plain (non-streaming) reader: groups tar members by key, yields {"__key__", ext: bytes}."""
    import webdataset as wds

    for path in paths:
        for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
            yield sample
