"""Inference for users: embeddings, verification decisions and predictions from media files.

Inputs are made exactly as in training from the release's `avssl_features.json` (fbank
settings, normalization statistics, window length `clip_seconds`, face size), and a file is
covered by windows of that length:

- Windows: starts 0, hop, 2 hop, ... (hop = the window by default) while the window fits; a
  remainder gets one more window, right-aligned to the file's end; a file shorter than one window
  is one zero-padded window. `center=True` keeps only the centred window (what training's
  evaluation crops, and the one-file-at-a-time path `avssl bench embed` measures as its baseline).
- A file's embedding is the mean of its windows' L2-normalized embeddings, renormalized; a
  prediction is the mean of its windows' class (or bona fide) probabilities.
- Batches: windows of several files go through the model together, up to `batch_size` per
  forward, grouped by modality setting.
- Modality per file (`modality`): `auto` uses audio and video where the file has both (and the
  model uses both), else what it has; `av`, `a`, `v` force one setting, and a file that lacks what
  it needs is a bad file. The setting used is recorded per file.
- Memory: audio is decoded whole (16 kHz float32); video is read frame by frame and only the
  windows' frames are kept, as face crops (`avssl.data.faces.face_crops(..., keep=...)`), so a
  long or high-resolution video costs its cropped window frames, not its decoded frames.
- Bad files: a file that cannot be read (missing, unsupported, undecodable, no usable modality)
  is skipped with its reason, and the others are processed; `strict=True` makes it fatal.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from avssl import AvsslError
from avssl.cluster.export import FEATURES_FILE
from avssl.data.features import (FbankStats, FeatureConfig, audio_features, crop_window, fbank, frame_indices,
                                 normalize_fbank, video_features)
from avssl.data.media import SUPPORTED, media_file_kind, media_kind, read_audio
from avssl.data.schema import SAMPLE_RATE
from avssl.finetune.evaluate import CALIBRATION_FILE, as_norm
from avssl.progress import progress_bar

log = logging.getLogger("avssl.inference")

SHORT_FRACTION = 0.5  # a file shorter than this fraction of the window gets a warning: most of its input is padding
MODALITY_CHOICES = ("auto", "av", "a", "v")
TASK_CONFIGS = "configs/finetune/{task}.yaml"


# ----------------------------------------------------------------------------- file lists


def collect_files(items: Iterable[str | Path], files_from: str | Path | None = None) -> tuple[list[Path], list[dict[str, str]]]:
    """Command-line arguments -> (media files in order, skipped entries {file, reason}).

    An argument is a media file, a directory (walked recursively for supported files, sorted), or
    `@LIST` (a text file naming one path per line; blank lines and lines starting with # are
    ignored; relative paths are taken from the current directory, like `tar -T`). `files_from` is
    one more such list. A directory without media files is a skipped entry, not an error."""
    files: list[Path] = []
    skipped: list[dict[str, str]] = []

    def add(item: str | Path) -> None:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and media_kind(p) is not None)
            if not found:
                skipped.append({"file": str(path), "reason": f"a folder without media files ({SUPPORTED})"})
            files.extend(found)
        else:
            files.append(path)  # a missing or unsupported file is named when it is read

    def read_list(path: Path) -> None:
        if not path.is_file():
            raise AvsslError(f"{path}: file list not found (one media path per line)")
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                add(line)

    for item in items:
        if isinstance(item, str) and item.startswith("@"):
            read_list(Path(item[1:]))
        else:
            add(item)
    if files_from is not None:
        read_list(Path(files_from))
    return files, skipped


# ----------------------------------------------------------------------------- windows and decoding


def window_starts(duration: float, seconds: float, hop: float | None = None, center: bool = False,
                  grid: float | None = None) -> list[float]:
    """Start times (s) of the windows covering a file (see the module docstring). `grid` (the fbank
    frame shift): the right-aligned last window starts on it, at most one shift before the end
    would put it, so its fbank is a slice of the file's (`Release.window_inputs`)."""
    if center or duration <= seconds:
        return [crop_window(duration, seconds, "center", np.random.default_rng(0))]
    hop = seconds if hop is None else hop
    if hop <= 0:
        raise AvsslError(f"the window hop must be positive, got {hop}")
    count = int(math.floor((duration - seconds) / hop + 1e-6)) + 1
    starts = [k * hop for k in range(count)]
    if starts[-1] + seconds < duration - 1e-3:  # a remainder: one more window, right-aligned
        last = duration - seconds
        if grid:
            last = math.floor(last / grid + 1e-6) * grid
        starts.append(round(last, 6))
    return starts


@dataclass
class FileInput:
    """One file's decoded windows: audio wave (whole) and/or its windows' face crops."""

    path: Path
    duration: float
    starts: list[float]
    audio: np.ndarray | None  # float32 [N] at 16 kHz
    video: np.ndarray | None  # uint8 [W, F, S, S, 3]: the F frames of each of the W windows
    mode: str = "av"  # modality setting used: av, a, v

    def restrict(self, mode: str) -> "FileInput":
        """The same file in a poorer modality setting (verify compares both files in one)."""
        return FileInput(self.path, self.duration, self.starts, self.audio if mode != "v" else None,
                         self.video if mode != "a" else None, mode)


def _video_length(path: Path) -> tuple[int, float]:
    """(frame count, fps) of a video stream without decoding it (packets are counted when the
    container does not store the count)."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 25)
        count = int(stream.frames or 0)
        if count <= 0:
            count = sum(1 for packet in container.demux(stream) if packet.size)
    if count <= 0:
        raise ValueError("video stream has no frames")
    return count, fps


def _model_modes(modalities: list[str]) -> set[str]:
    has_a, has_v = "audio" in modalities, "video" in modalities
    return {m for m, ok in (("av", has_a and has_v), ("a", has_a), ("v", has_v)) if ok}


def read_windows(path: Path, fcfg: FeatureConfig, seconds: float, modalities: list[str], modality: str = "auto",
                 hop: float | None = None, center: bool = False, faces=None) -> FileInput:
    """A user's file -> its windows' inputs in the modality setting `modality`. Errors (AvsslError)
    name the file and say what is wrong with it."""
    from avssl.data.faces import FaceConfig, face_crops

    faces = FaceConfig() if faces is None else faces
    grid = fcfg.frame_shift_ms / 1000
    path = Path(path)
    kind = media_file_kind(path)
    want_audio = modality != "v" and "audio" in modalities
    want_video = kind == "video" and modality != "a" and "video" in modalities
    audio = video = None
    count, fps, no_face = 0, 0.0, False
    try:
        if want_audio:
            try:
                audio = read_audio(path)
            except ValueError as exc:  # a video without sound is still a video
                if kind == "audio" or "no audio" not in str(exc):
                    raise
        if want_video:
            count, fps = _video_length(path)
            duration = len(audio) / SAMPLE_RATE if audio is not None else count / fps
            starts = window_starts(duration, seconds, hop, center, grid)
            # Only the windows' frames are cropped and kept: [W * F] indices, window-major.
            keep = np.concatenate([frame_indices(count, fps, s, seconds, fcfg.num_frames) for s in starts])
            crops, _ = face_crops(path, faces, keep=keep)
            if crops is None:
                no_face = True
            else:
                video = crops.reshape(len(starts), fcfg.num_frames, *crops.shape[1:])
    except AvsslError:
        raise
    except Exception as exc:
        raise AvsslError(f"{path}: cannot decode ({str(exc).strip() or type(exc).__name__}); supported: {SUPPORTED}") from None
    has = "av" if audio is not None and video is not None else "a" if audio is not None else "v" if video is not None else None
    if modality == "auto":
        mode = has
    elif modality == has or (has == "av" and modality in ("a", "v")):
        mode = modality
    else:
        mode = None
    if mode is None:
        what = {"av": "audio and a face in its video", "a": "audio", "v": "a face in its video"}
        if has is None:
            reason = "no face found in its video and no audio stream" if no_face else "no audio or video stream"
            if modality != "auto":
                reason += f" (--modality {modality})"
        else:
            reason = (f"--modality {modality} needs {what[modality]}, but it has only {what[has]}"
                      + ("" if not no_face else " (no face found in its video)") + "; use --modality auto")
        raise AvsslError(f"{path}: {reason}")
    duration = len(audio) / SAMPLE_RATE if audio is not None else count / fps
    starts = window_starts(duration, seconds, hop, center, grid)
    if duration < SHORT_FRACTION * seconds:
        pad = seconds - duration
        log.warning("%s: %.0f ms long, far shorter than the model's %.2f s window: zero-padded with %.3f s "
                    "(%.1f %% of the input is padding), so its result says little", path,
                    1000 * duration, seconds, pad, 100 * pad / seconds)
    return FileInput(path, duration, starts, audio if mode != "v" else None, video if mode != "a" else None, mode)


# ----------------------------------------------------------------------------- models


def _features(release: Path) -> dict[str, Any]:
    path = release / FEATURES_FILE
    if not path.is_file():
        raise AvsslError(f"{release}: no {FEATURES_FILE}; this is not an avssl release")
    info = json.loads(path.read_text())
    if info.get("fbank_stats") is None:
        raise AvsslError(f"{path}: no normalization statistics stored; re-export from a run whose corpus has stats.json")
    return info


def _load(release: Path, device: torch.device):
    """A finetuned release (TaskModel) or a pretraining release (backbone only, zero-shot)."""
    from avssl.finetune.runner import HEAD_WEIGHTS, load_task_model
    from avssl.pretrain.modeling import AVViTModel

    if not release.is_dir():
        raise AvsslError(f"{release}: release folder not found")
    if (release / HEAD_WEIGHTS).is_file():
        model, labels, info = load_task_model(release)
        _check_inputs_fit(release, model.backbone.config, info)
        return model.to(device), labels, info
    if (release / "config.json").is_file():
        model, info = AVViTModel.from_pretrained(release).eval(), _features(release)
        _check_inputs_fit(release, model.config, info)
        return model.to(device), None, info
    raise AvsslError(f"{release}: not an avssl release (no config.json)")


def _check_inputs_fit(release: Path, config: Any, info: dict[str, Any]) -> None:
    """The release's feature settings must make the inputs its backbone was built for (a
    features file copied from a release of another model size would fail deep in the model)."""
    f = info.get("features") or {}
    for key, feature_key in (("audio_num_mel_bins", "num_mel_bins"), ("video_image_size", "image_size")):
        want, got = getattr(config, key, None), f.get(feature_key)
        if want is not None and got is not None and want != got:
            raise AvsslError(f"{release / FEATURES_FILE}: features.{feature_key}={got}, but the backbone was built for "
                             f"{key}={want}: the release mixes files of two models; use the folder as avssl wrote it")


@dataclass
class Skipped:
    file: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "reason": self.reason}


@dataclass
class FileResult:
    file: str
    modality: str
    windows: int
    duration: float
    value: np.ndarray  # embedding [E] or probabilities [C] / [1]


@dataclass
class Release:
    """A loaded release and the settings its inputs are made with."""

    path: Path
    model: Any
    labels: list[str] | None
    info: dict[str, Any]
    device: torch.device
    fcfg: FeatureConfig = field(init=False)
    stats: FbankStats = field(init=False)

    def __post_init__(self) -> None:
        self.fcfg = FeatureConfig.model_validate(self.info["features"])
        self.stats = FbankStats.model_validate(self.info["fbank_stats"])

    @classmethod
    def load(cls, release: str | Path, device: str | torch.device = "cpu") -> "Release":
        dev = torch.device(device)
        model, labels, info = _load(Path(release), dev)
        return cls(Path(release), model, labels, info, dev)

    @property
    def seconds(self) -> float:
        return float(self.info["clip_seconds"])

    @property
    def task(self) -> str | None:
        """The head's task, None for a pretrained backbone."""
        return None if self.labels is None else self.model.cfg.task

    @property
    def modalities(self) -> list[str]:
        if self.task is not None:
            return list(self.model.cfg.modalities)
        return list(self.info.get("modalities") or ["audio", "video"])

    def read(self, path: Path, modality: str = "auto", hop: float | None = None, center: bool = False) -> FileInput:
        return read_windows(path, self.fcfg, self.seconds, self.modalities, modality, hop, center)

    def window_inputs(self, item: FileInput) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """A file's windows, in order -> (audio [T, M] or None, video [F, 3, S, S] or None) each.

        Audio is exactly `audio_features` of each window's crop. The fbank of a window that starts
        on the fbank frame grid and lies inside the file is a slice of the whole file's fbank (Kaldi
        frames are independent: each frame loses its own DC offset, so the crop's mean removal
        changes nothing), so a file is analysed once instead of once per window."""
        shift = int(SAMPLE_RATE * self.fcfg.frame_shift_ms / 1000)
        frames_t = self.fcfg.num_audio_frames(self.seconds)
        whole = None
        for w, start in enumerate(item.starts):
            a = None
            if item.audio is not None:
                first = start * SAMPLE_RATE / shift
                k = int(round(first))
                if abs(first - k) < 1e-6 and (k * shift + round(self.seconds * SAMPLE_RATE)) <= len(item.audio):
                    if whole is None:
                        whole = normalize_fbank(fbank(torch.from_numpy(item.audio), self.fcfg), self.stats)
                    a = whole[k : k + frames_t]
                if a is None or a.shape[0] != frames_t:
                    a = audio_features(item.audio, start, self.seconds, self.fcfg, self.stats)
            v = video_features(item.video[w], self.fcfg) if item.video is not None else None
            yield a, v

    # The per-window functions: inputs of one modality setting -> [B, ...] float on CPU.
    def embed_fn(self, audio, video, mode: str) -> torch.Tensor:
        from avssl.finetune.heads import zero_shot_embeddings

        ha = None if audio is None else torch.ones(audio.shape[0], dtype=torch.bool, device=audio.device)
        hv = None if video is None else torch.ones(video.shape[0], dtype=torch.bool, device=video.device)
        if self.task is not None:
            return self.model.embed(audio, video, ha, hv, mode=mode)
        return zero_shot_embeddings(self.model, audio, video, ha, hv, mode)

    def score_fn(self, audio, video, mode: str) -> torch.Tensor:
        ha = None if audio is None else torch.ones(audio.shape[0], dtype=torch.bool, device=audio.device)
        hv = None if video is None else torch.ones(video.shape[0], dtype=torch.bool, device=video.device)
        s = self.model.scores(audio, video, ha, hv).float()
        return s.reshape(s.shape[0], -1)

    def run(self, items: Iterable[FileInput | Skipped], fn: Callable, batch_size: int, reduce: str,
            total: int | None = None, description: str = "embedding") -> tuple[list[FileResult], list[Skipped]]:
        """Every window of every file through `fn`, `batch_size` windows per forward (windows of
        several files share a batch; one batch per modality setting), then one value per file:
        reduce "embedding" (mean of normalized window embeddings, renormalized) or "mean"."""
        if batch_size < 1:
            raise AvsslError(f"--batch-size must be at least 1, got {batch_size}")
        files: list[FileInput] = []
        skipped: list[Skipped] = []
        sums: list[torch.Tensor | None] = []
        pending: dict[str, list[tuple[int, torch.Tensor | None, torch.Tensor | None]]] = {}

        def flush(mode: str) -> None:
            queue = pending.pop(mode, [])
            if not queue:
                return
            audio = torch.stack([a for _, a, _ in queue]).to(self.device) if queue[0][1] is not None else None
            video = torch.stack([v for _, _, v in queue]).to(self.device) if queue[0][2] is not None else None
            out = fn(audio, video, mode).float().cpu()  # [B, E]
            if reduce == "embedding":
                out = torch.nn.functional.normalize(out, dim=-1)
            for (k, _, _), row in zip(queue, out):
                sums[k] = row.clone() if sums[k] is None else sums[k] + row

        with torch.no_grad(), progress_bar(description, total) as bar:
            for item in items:
                if isinstance(item, Skipped):
                    skipped.append(item)
                    bar.advance(1)
                    continue
                k = len(files)
                files.append(item)
                sums.append(None)
                for a, v in self.window_inputs(item):
                    pending.setdefault(item.mode, []).append((k, a, v))
                    if len(pending[item.mode]) >= batch_size:
                        flush(item.mode)
                bar.advance(1)
            for mode in list(pending):
                flush(mode)
        results = []
        for item, total_value in zip(files, sums):
            value = total_value / len(item.starts)
            if reduce == "embedding":
                value = torch.nn.functional.normalize(value, dim=-1)
            results.append(FileResult(str(item.path), item.mode, len(item.starts), round(item.duration, 3), value.numpy()))
        return results, skipped

    def read_all(self, files: list[Path], modality: str, hop: float | None, center: bool, strict: bool
                 ) -> Iterator[FileInput | Skipped]:
        """Files decoded one at a time (memory holds one file's input); bad ones as Skipped unless strict."""
        for path in files:
            try:
                yield self.read(path, modality, hop, center)
            except AvsslError as exc:
                if strict:
                    raise
                yield Skipped(str(path), _reason(exc, path))


def _reason(exc: AvsslError, path: Path) -> str:
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _check_modality(release: Release, modality: str) -> None:
    if modality not in MODALITY_CHOICES:
        raise AvsslError(f"unknown modality {modality!r}: use one of {', '.join(MODALITY_CHOICES)}")
    if modality != "auto" and modality not in _model_modes(release.modalities):
        raise AvsslError(f"{release.path} uses {' and '.join(release.modalities)} only: --modality {modality} is not "
                         "available; use --modality auto")


# ----------------------------------------------------------------------------- embed


@dataclass
class Embeddings:
    """Embeddings [N, E] of the files read, one row each, and the files skipped."""

    vectors: np.ndarray
    rows: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    settings: dict[str, Any]

    @property
    def names(self) -> list[str]:
        return [r["file"] for r in self.rows]

    def record(self, npy_name: str) -> dict[str, Any]:
        """What `avssl embed` writes beside the .npy: which row is which file, and how it was made."""
        return {"embeddings": npy_name, "shape": list(self.vectors.shape), **self.settings,
                "files": self.rows, "skipped": self.skipped}


def embed_with(release: Release, files: list[Path], batch_size: int = 16, modality: str = "auto",
               hop: float | None = None, center: bool = False, strict: bool = False,
               skipped: list[dict[str, str]] | None = None) -> Embeddings:
    """L2-normalized embeddings of media files with a loaded release (speaker head, or the
    backbone's pooled embedding zero-shot), made over windows as the module docstring says."""
    _check_modality(release, modality)
    items = release.read_all([Path(f) for f in files], modality, hop, center, strict)
    results, bad = release.run(items, release.embed_fn, batch_size, "embedding", len(files))
    rows = [{"file": r.file, "modality": r.modality, "windows": r.windows, "duration": r.duration} for r in results]
    skipped_rows = list(skipped or []) + [s.as_dict() for s in bad]
    dim = results[0].value.shape[-1] if results else 0
    vectors = np.stack([r.value for r in results]).astype(np.float32) if results else np.zeros((0, dim), np.float32)
    settings = {"release": str(release.path), "window_seconds": release.seconds,
                "hop_seconds": None if center else (hop or release.seconds), "center": center,
                "modality_requested": modality, "batch_size": batch_size}
    return Embeddings(vectors, rows, skipped_rows, settings)


def embed_files(release: Path, files: list[Path], batch_size: int = 16, device: str = "cpu", modality: str = "auto",
                hop: float | None = None, center: bool = False, strict: bool = False) -> Embeddings:
    """`embed_with` after loading the release."""
    return embed_with(Release.load(release, device), files, batch_size, modality, hop, center, strict)


def write_embeddings(result: Embeddings, out: Path) -> tuple[Path, Path]:
    """OUT.npy (float32 [N, E], rows in the order of the JSON's `files`) and OUT.json, atomically."""
    import io

    from avssl.io import atomic_write_bytes, write_json

    out = Path(out)
    npy = out if out.suffix == ".npy" else out.with_name(out.name + ".npy")
    buffer = io.BytesIO()
    np.save(buffer, result.vectors)
    atomic_write_bytes(npy, buffer.getvalue())
    record = npy.with_suffix(".json")
    write_json(record, result.record(npy.name))
    return npy, record


# ----------------------------------------------------------------------------- verify


def calibration_command(release: Path, finetuned: bool) -> str:
    zero = "" if finetuned else " --zero-shot"
    return f"avssl evaluate --checkpoint {release} --task speaker --data CORPUS{zero} --no-mlflow"


CORPUS_HINT = ("CORPUS: a prepared corpus with a trial list, e.g. from `avssl data prepare folder --root DIR --out CORPUS "
               "--test-speakers 2`")


def read_calibration(release: Release, path: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The calibration verify decides with (`calibration.json` of the release by default)."""
    path = Path(path) if path is not None else release.path / CALIBRATION_FILE
    if not path.is_file():
        where = "" if path.parent == release.path and path.name == CALIBRATION_FILE else f" --calibration {path}"
        raise AvsslError(f"{path}: no calibration, so verify has no threshold; write one with "
                         f"`{calibration_command(release.path, release.task is not None)}{where}` ({CORPUS_HINT}), "
                         "or pass --threshold")
    from avssl.io import read_json

    table = read_json(path)
    if not isinstance(table, dict) or not all(isinstance(v, dict) and "threshold" in v for v in table.values()):
        raise AvsslError(f"{path}: not a calibration file of avssl evaluate (expected a threshold per modality setting); "
                         f"write it again with `{calibration_command(release.path, release.task is not None)}`")
    return path, table


def verify(release: Path | Release, a: Path, b: Path, threshold: float | None = None, device: str = "cpu",
           calibration: Path | None = None) -> dict[str, Any]:
    """Cosine score of two files' embeddings in the richest modality setting both have, and the
    decision at the calibrated threshold (EER point of evaluation trials, with the AS-Norm the
    calibration was made with) unless `threshold` is given (raw cosine).

    The files are embedded the way the calibration's scores were made (its "windows": "center",
    the centred window, for calibrations of `avssl evaluate`, which scores each utterance's centred
    window): a cosine threshold does not carry over to whole-file embeddings, whose cosines are
    higher for every pair. With `threshold`, the files are embedded whole (windows)."""
    rel = release if isinstance(release, Release) else Release.load(release, device)
    calib_path, table = (None, None) if threshold is not None else read_calibration(rel, calibration)
    center = table is not None and any(e.get("windows", "center") == "center" for e in table.values())
    fa, fb = rel.read(Path(a), center=center), rel.read(Path(b), center=center)
    common = set(fa.mode) & set(fb.mode)
    if not common:
        raise AvsslError(f"{a} and {b} share no modality: one has only audio, the other only video (or no face)")
    mode = "av" if common == {"a", "v"} else common.pop()
    results, _ = rel.run([fa.restrict(mode), fb.restrict(mode)], rel.embed_fn, 16, "embedding", 2, "verifying")
    ea, eb = results[0].value, results[1].value
    score = float(ea @ eb)
    out = {"score": score, "raw_cosine": score, "mode": mode, "windows": [results[0].windows, results[1].windows],
           "center": center, "window_seconds": rel.seconds}
    if threshold is None:
        if mode not in table:
            raise AvsslError(f"{calib_path}: no threshold for modality setting {mode!r} (it has {', '.join(table)}); "
                             "pass --threshold")
        entry = table[mode]
        norm = entry.get("as_norm")
        if norm:
            cohort_path = calib_path.parent / norm["cohort"]
            if not cohort_path.is_file():
                raise AvsslError(f"{calib_path}: its AS-Norm cohort {cohort_path} is missing; write the calibration again")
            score = float(as_norm(score, ea, eb, np.load(cohort_path), int(norm["top"])))
            out["score"], out["as_norm_top"] = score, int(norm["top"])
        threshold = float(entry["threshold"])
        out["calibration"] = str(calib_path)
    out.update(threshold=threshold, same_speaker=score >= threshold)
    return out


# ----------------------------------------------------------------------------- predict


def check_task(release: Release, task: str | None) -> str:
    """The task predict runs: the release's head's; a clear error for a pretrained release or
    another task's head."""
    if release.task is None:
        want = task or "emotion or spoof"
        cfg = TASK_CONFIGS.format(task=task or "<emotion|spoof>")
        raise AvsslError(f"{release.path}: a pretrained release has no {want} head: finetune one first with "
                         f"`avssl finetune --config {cfg} --init {release.path}`, then predict with the release it writes "
                         "(runs/NAME/avssl/release)")
    if release.task == "speaker":
        raise AvsslError(f"{release.path} is a speaker model: it has no {task or 'emotion or spoof'} classes; use "
                         "`avssl embed` / `avssl verify` with it, or predict with an emotion or spoof release")
    if task is not None and task != release.task:
        raise AvsslError(f"{release.path} holds the {release.task} head, not a {task} one: use --task {release.task}, or a {task} "
                         f"release (`avssl finetune --config {TASK_CONFIGS.format(task=task)} --init PRETRAINED`)")
    return release.task


def predict_files(release: Path | Release, files: list[Path], batch_size: int = 16, device: str = "cpu",
                  task: str | None = None, modality: str = "auto", hop: float | None = None, center: bool = False,
                  strict: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(rows, skipped). Emotion rows: label and class probabilities; spoof: label and bona fide
    probability; each the mean over the file's windows."""
    rel = release if isinstance(release, Release) else Release.load(release, device)
    task = check_task(rel, task)
    _check_modality(rel, modality)
    items = rel.read_all([Path(f) for f in files], modality, hop, center, strict)
    results, bad = rel.run(items, rel.score_fn, batch_size, "mean", len(files), "predicting")
    rows = []
    for r in results:
        row: dict[str, Any] = {"file": r.file, "modality": r.modality, "windows": r.windows}
        if task == "spoof":
            p = float(r.value[0])
            row.update(label="bonafide" if p >= 0.5 else "spoof", p_bonafide=p)
        else:
            probs = {name: float(v) for name, v in zip(rel.labels, r.value)}
            row.update(label=max(probs, key=probs.get), probabilities=probs)
        rows.append(row)
    return rows, [s.as_dict() for s in bad]


def predict(release: Path, files: list[Path], batch_size: int = 16, device: str = "cpu", task: str | None = None
            ) -> list[dict[str, Any]]:
    """`predict_files` with every file required to be readable (the first bad one is an error)."""
    return predict_files(release, files, batch_size, device, task, strict=True)[0]
