"""The talking face of a video: detected, tracked over the clip, and cropped square.

Real recordings are full frames (head and shoulders, a room, several people); the model sees
faces. `face_track` finds one face track per clip and `crop_faces` cuts every frame to it:

1. Detection on every `detect_every`-th frame, downscaled to at most `detect_width` pixels wide,
   with OpenCV's frontal-face Haar cascade (`haarcascade_frontalface_default.xml`, inside the
   opencv-python-headless wheel; why this detector: docs/data.md).
2. Tracking: the main face is the largest detection of the probed frame where faces are largest;
   from it the track follows, probe by probe, the detection nearest to its last position (a
   detection further than one face width away is another face, or a false hit). Probes without a
   match are filled by linear interpolation between the neighbouring matches.
3. Smoothing: a moving average of centre and size over `smooth_probes` probes, so the crop does
   not jitter with the detector.
4. Crop: a square of side (1 + 2 * margin) x the face's size, centred on the face, moved (and if
   need be shrunk) to stay inside the frame, resized to `crop_size` pixels: the aspect ratio is
   always kept.

A clip where fewer than `min_detected` of the probes hold a face has no usable face
(`FaceTrack.found` is False): preparation keeps it audio-only and counts it. In `auto` mode a
video that already is a face crop passes through (its frames are only resized): a square one
whose face crop would cover `passthrough_fill` of the frame anyway, or a small square one (VoxCeleb2 and
LRS-style corpora: 224 x 224) where the detector finds no face, since there a miss is far more
likely a profile view than a frame without a face. `off` never crops (already-cropped corpora
can say so and skip the detector); `on` always crops to the detected face.

Video is read twice, frame by frame (`iter_frames`): once to detect, once to crop. Only the probes'
small grey images and the cropped frames are kept, so memory does not grow with the source
resolution, and a long video costs its cropped frames only.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from avssl.config import Section

CASCADE = "haarcascade_frontalface_default.xml"
FaceMode = Literal["auto", "on", "off"]


class FaceConfig(Section):
    """How video frames become face crops, in preparation and at inference."""

    mode: FaceMode = Field(
        "auto",
        description="auto: crop full frames to the face, pass already-cropped videos through; "
        "on: always crop to the detected face; off: keep the whole frame.",
    )
    crop_size: int = Field(112, ge=16, description="Side in pixels of the square face crops written to shards.")
    margin: float = Field(0.3, ge=0.0, le=2.0, description="Space added on each side of the face, as a fraction of its size.")
    detect_every: int = Field(5, ge=1, description="Run the detector on every n-th frame; the track is interpolated between.")
    detect_width: int = Field(320, ge=64, description="Frames are downscaled to at most this width for detection.")
    min_detected: float = Field(
        0.5, ge=0.0, le=1.0, description="Fraction of probed frames that must hold the face, else the clip has no face."
    )
    smooth_probes: int = Field(3, ge=1, description="Moving-average window of the face track, in probed frames.")
    passthrough_fill: float = Field(
        0.9, gt=0.0, le=1.0,
        description="In auto mode, a square video whose face crop would cover at least this fraction of its side "
        "is already a face crop and passes through.",
    )
    cropped_max_side: int = Field(
        256, ge=16,
        description="In auto mode, a square video at most this many pixels wide where no face is found is taken for an "
        "already-cropped face video (a profile the detector misses) and passes through.",
    )


@dataclass
class FaceTrack:
    """One clip's face track: a square box (x0, y0, side) per frame, in source pixels."""

    boxes: np.ndarray  # int [T, 3]: x0, y0, side
    detected: float  # fraction of probes with the face
    frame_size: tuple[int, int]  # (height, width)
    passthrough: bool = False  # the video already is a face crop: frames are only resized

    @property
    def found(self) -> bool:
        return self.passthrough or len(self.boxes) > 0

    def summary(self) -> dict:
        """For the sample metadata (`Meta.extra["face"]`): how the crop was made and its boxes."""
        if self.passthrough:
            return {"crop": "passthrough", "detected": round(self.detected, 3), "frame_size": list(self.frame_size)}
        return {
            "crop": "face" if self.found else "none",
            "detected": round(self.detected, 3),
            "frame_size": list(self.frame_size),
            "boxes": self.boxes.tolist(),
        }


_detector = None


def detector():
    """The Haar cascade, loaded once per process."""
    global _detector
    if _detector is None:
        import cv2

        _detector = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / CASCADE))
        if _detector.empty():
            raise RuntimeError(f"OpenCV could not load {CASCADE} from {cv2.data.haarcascades}")
    return _detector


def detect(gray: np.ndarray, scale: float) -> np.ndarray:
    """Faces in one downscaled grey frame -> float [K, 4] (cx, cy, size, score) in source pixels."""
    import cv2

    h, w = gray.shape
    min_side = max(24, int(0.08 * min(h, w)))
    boxes, _, weights = detector().detectMultiScale3(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side), outputRejectLevels=True
    )
    if len(boxes) == 0:
        return np.zeros((0, 4), np.float32)
    b = np.asarray(boxes, np.float32) / scale
    size = np.sqrt(b[:, 2] * b[:, 3])
    return np.stack([b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2, size, np.asarray(weights, np.float32).reshape(-1)], 1)


def iter_frames(source: str | Path | bytes) -> Iterator[np.ndarray]:
    """A video's frames in order as uint8 [H, W, 3] RGB, one at a time (PyAV)."""
    import av

    with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")


def probe_faces(frames: Iterator[np.ndarray], cfg: FaceConfig) -> tuple[list[tuple[int, np.ndarray]], int, tuple[int, int]]:
    """Detections on every `detect_every`-th frame: ([(frame index, [K, 4])], frame count, (H, W))."""
    import cv2

    probes: list[tuple[int, np.ndarray]] = []
    count, size = 0, (0, 0)
    for i, frame in enumerate(frames):
        count = i + 1
        size = frame.shape[:2]
        if i % cfg.detect_every:
            continue
        scale = min(1.0, cfg.detect_width / frame.shape[1])
        small = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else frame
        probes.append((i, detect(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY), scale)))
    return probes, count, size


def _follow(probes: list[tuple[int, np.ndarray]]) -> list[tuple[int, np.ndarray]]:
    """The main face's detection (cx, cy, size) at each probe where it was found."""
    if not any(len(d) for _, d in probes):
        return []
    start = max(range(len(probes)), key=lambda k: probes[k][1][:, 2].max() if len(probes[k][1]) else -1.0)
    seed = probes[start][1][np.argmax(probes[start][1][:, 2]), :3]
    track: dict[int, np.ndarray] = {start: seed}
    for order in (range(start + 1, len(probes)), range(start - 1, -1, -1)):
        last = seed
        for k in order:
            dets = probes[k][1]
            if not len(dets):
                continue
            dist = np.hypot(dets[:, 0] - last[0], dets[:, 1] - last[1])
            j = int(np.argmin(dist))
            if dist[j] <= last[2] and 0.6 * last[2] <= dets[j, 2] <= 1.6 * last[2]:
                last = dets[j, :3]
                track[k] = last
    return [(probes[k][0], track[k]) for k in sorted(track)]


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(x) < 2:
        return x
    pad = window // 2
    padded = np.concatenate([np.repeat(x[:1], pad, 0), x, np.repeat(x[-1:], window - 1 - pad, 0)])
    kernel = np.ones(window) / window
    return np.stack([np.convolve(padded[:, c], kernel, mode="valid") for c in range(x.shape[1])], 1)


def square_boxes(centres: np.ndarray, frame_size: tuple[int, int], margin: float) -> np.ndarray:
    """(cx, cy, size) per frame -> int [T, 3] squares (x0, y0, side) inside the frame."""
    h, w = frame_size
    side = np.minimum(np.round(centres[:, 2] * (1 + 2 * margin)), min(h, w)).astype(np.int64)
    side = np.maximum(side, 2)
    x0 = np.clip(np.round(centres[:, 0] - side / 2), 0, w - side).astype(np.int64)
    y0 = np.clip(np.round(centres[:, 1] - side / 2), 0, h - side).astype(np.int64)
    return np.stack([x0, y0, side], 1)


def face_track(probes: list[tuple[int, np.ndarray]], num_frames: int, frame_size: tuple[int, int], cfg: FaceConfig) -> FaceTrack:
    """One smoothed square face box per frame from the probes' detections (see the module docstring)."""
    h, w = frame_size
    followed = _follow(probes)
    detected = len(followed) / max(1, len(probes))
    if cfg.mode == "auto":
        square = max(h, w) <= 1.15 * min(h, w)
        fill = np.median([c[2] for _, c in followed]) * (1 + 2 * cfg.margin) / min(h, w) if followed else 0.0
        small_miss = max(h, w) <= cfg.cropped_max_side and detected < cfg.min_detected
        if square and (fill >= cfg.passthrough_fill or small_miss):
            return FaceTrack(np.zeros((0, 3), np.int64), detected, frame_size, passthrough=True)
    if not followed or detected < cfg.min_detected:
        return FaceTrack(np.zeros((0, 3), np.int64), detected, frame_size)
    at = np.array([i for i, _ in followed], np.float64)
    values = _moving_average(np.stack([c for _, c in followed]), cfg.smooth_probes)
    frames = np.arange(num_frames, dtype=np.float64)
    centres = np.stack([np.interp(frames, at, values[:, c]) for c in range(3)], 1)
    return FaceTrack(square_boxes(centres, frame_size, cfg.margin), detected, frame_size)


def crop_frame(frame: np.ndarray, box: np.ndarray | None, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: the square box (or, without one, the centred
    square of the frame's shorter side), resized; the aspect ratio is kept either way."""
    import cv2

    if box is None:
        h, w = frame.shape[:2]
        side = min(h, w)
        box = np.array([(w - side) // 2, (h - side) // 2, side])
    x0, y0, side = (int(v) for v in box)
    patch = frame[y0 : y0 + side, x0 : x0 + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(patch, (size, size), interpolation=interp))


def face_crops(source: str | Path | bytes, cfg: FaceConfig, keep: np.ndarray | None = None) -> tuple[np.ndarray | None, FaceTrack | None]:
    """A video's face crops: (uint8 [T', crop_size, crop_size, 3] or None without a face, track).

    `keep` (frame indices, ascending or not) limits the frames cropped and returned, in that
    order; the detector still probes the whole video. With `mode="off"` the frames are only
    centre-cropped to a square and resized (no track is returned).
    """
    wanted = None if keep is None else set(int(i) for i in keep)
    if cfg.mode == "off":
        track = None
    else:
        probes, count, size = probe_faces(iter_frames(source), cfg)
        if count == 0:
            raise ValueError("video stream has no frames")
        track = face_track(probes, count, size, cfg)
        if not track.found:
            return None, track
    crops: dict[int, np.ndarray] = {}
    for i, frame in enumerate(iter_frames(source)):
        if wanted is not None and i not in wanted:
            continue
        box = None if track is None or track.passthrough else track.boxes[min(i, len(track.boxes) - 1)]
        crops[i] = crop_frame(frame, box, cfg.crop_size)
    if not crops:
        raise ValueError("video stream has no frames")
    order = sorted(crops) if keep is None else [min(int(i), max(crops)) for i in keep]
    return np.stack([crops[i] for i in order]), track


def contact_sheet(crops: list[tuple[str, np.ndarray]], path: Path, columns: int = 6) -> Path:
    """A PNG grid of face crops (one uint8 [S, S, 3] image per clip, titled) for `avssl data inspect`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(crops) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, image) in zip(axes.flat, crops):
        ax.imshow(image)
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
