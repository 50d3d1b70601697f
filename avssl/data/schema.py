"""The one sample schema shared by every corpus, synthetic or real.

A sample in a shard is a webdataset group of files with one key (`__key__`, the utterance id
with `/` replaced by `~` because webdataset splits keys on dots and folders):

| member       | content                                                              |
|--------------|----------------------------------------------------------------------|
| `flac`       | audio, 16 kHz mono, 16-bit FLAC (lossless); absent for video-only    |
| `mp4`        | face frames, H.264 in MP4 at the clip's frame rate; absent for audio-only |
| `json`       | metadata, the fields of `Meta` below                                  |

`Meta` fields: dataset, speaker, utterance, emotion (one of `EMOTIONS` or null), spoof
("bonafide" or "spoof"), attack ("-" for bona fide, else an attack id like "A01"), duration
(seconds), fps (video frame rate or null), split ("train", "val", "test"), and `extra`, a free
dict for dataset-specific fields (sentence, intensity, codec...).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

SAMPLE_RATE = 16_000
EMOTIONS: tuple[str, ...] = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")  # CREMA-D's six classes
SPOOF_LABELS: tuple[str, ...] = ("bonafide", "spoof")
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass
class Meta:
    dataset: str
    speaker: str
    utterance: str
    duration: float
    emotion: str | None = None
    spoof: str = "bonafide"
    attack: str = "-"
    fps: float | None = None
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.spoof not in SPOOF_LABELS:
            raise ValueError(f"meta.spoof must be one of {SPOOF_LABELS}, got {self.spoof!r}")
        if (self.spoof == "bonafide") != (self.attack == "-"):
            raise ValueError(f"meta.attack {self.attack!r} does not match meta.spoof {self.spoof!r}")
        if self.split not in SPLITS:
            raise ValueError(f"meta.split must be one of {SPLITS}, got {self.split!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Meta":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass
class Clip:
    """One utterance in memory: what synthesizers and dataset preparers produce.

    audio: float32 [num_samples] in [-1, 1] at 16 kHz, or None (video-only).
    video: uint8 [num_frames, H, W, 3] RGB at `meta.fps`, or None (audio-only).
    """

    meta: Meta
    audio: np.ndarray | None = None
    video: np.ndarray | None = None

    @property
    def key(self) -> str:
        return utterance_to_key(self.meta.utterance)


def utterance_to_key(utterance: str) -> str:
    # webdataset splits a member name at the first dot and treats "/" as folders.
    return utterance.replace("/", "~").replace(".", "_")


def encode_audio(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """float32 [N] -> FLAC bytes (16-bit PCM, lossless)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Audio bytes (FLAC, WAV, OGG...) -> (float32 [N] mono, sample_rate)."""
    import soundfile as sf

    wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return wave.mean(axis=1), sr


def encode_video(frames: np.ndarray, fps: float, crf: int = 18) -> bytes:
    """uint8 [T, H, W, 3] RGB -> H.264 MP4 bytes (yuv420p, so H and W are made even)."""
    import av

    t, h, w, _ = frames.shape
    frames = frames[:, : h - h % 2, : w - w % 2]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decode_video(data: bytes, keep: Callable[[int, float], np.ndarray] | None = None) -> tuple[np.ndarray, float]:
    """Video bytes (MP4, FLV, ...) -> (uint8 [T, H, W, 3] RGB, fps).

    `keep(num_frames, fps)` may choose frame indices to return (in that order): H.264 must be
    decoded in sequence, but only the kept frames pay for the RGB conversion.
    """
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 25)
        frames = list(container.decode(stream))
    if not frames:
        raise ValueError("video stream has no frames")
    idx = range(len(frames)) if keep is None else keep(len(frames), fps)
    return np.stack([frames[i].to_ndarray(format="rgb24") for i in idx]), fps
