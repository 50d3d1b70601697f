"""Inference for users: embeddings, verification decisions and predictions from media files.

Inputs are made exactly as in training from the release's `avssl_features.json` (fbank
settings, normalization statistics, clip length, face size): a centered crop of `clip_seconds`
per file. Files are processed in batches with a progress bar, on CPU or GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from avssl import AvsslError
from avssl.cluster.export import FEATURES_FILE
from avssl.data.features import FbankStats, FeatureConfig, audio_features, crop_window, frame_indices, video_features
from avssl.data.media import load_media
from avssl.finetune.evaluate import CALIBRATION_FILE
from avssl.progress import progress_bar


def _features(release: Path) -> dict[str, Any]:
    path = release / FEATURES_FILE
    if not path.is_file():
        raise AvsslError(f"{release}: no {FEATURES_FILE}; this is not an avssl release")
    info = json.loads(path.read_text())
    if info.get("fbank_stats") is None:
        raise AvsslError(f"{path}: no normalization statistics stored; re-export from a run whose corpus has stats.json")
    return info


def batches(files: list[Path], info: dict[str, Any], batch_size: int) -> Iterator[tuple[list[Path], dict[str, torch.Tensor]]]:
    fcfg = FeatureConfig.model_validate(info["features"])
    stats = FbankStats.model_validate(info["fbank_stats"])
    seconds = info["clip_seconds"]
    frames_t = fcfg.num_audio_frames(seconds)
    for i in range(0, len(files), batch_size):
        chunk = files[i : i + batch_size]
        b = len(chunk)
        audio = torch.zeros(b, frames_t, fcfg.num_mel_bins)
        video = torch.zeros(b, fcfg.num_frames, 3, fcfg.image_size, fcfg.image_size)
        has_a, has_v = torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)
        for j, path in enumerate(chunk):
            clip = load_media(path)
            start = crop_window(clip.meta.duration, seconds, "center", np.random.default_rng(0))
            if clip.audio is not None:
                audio[j], has_a[j] = audio_features(clip.audio, start, seconds, fcfg, stats), True
            if clip.video is not None:
                idx = frame_indices(len(clip.video), clip.meta.fps, start, seconds, fcfg.num_frames)
                video[j], has_v[j] = video_features(clip.video[idx], fcfg), True
        yield chunk, {"audio": audio, "video": video, "has_audio": has_a, "has_video": has_v}


def _load(release: Path, device: torch.device):
    """A finetuned release (TaskModel) or a pretraining release (backbone only, zero-shot)."""
    from avssl.finetune.runner import HEAD_WEIGHTS, load_task_model
    from avssl.pretrain.modeling import AVViTModel

    if (release / HEAD_WEIGHTS).is_file():
        model, labels, info = load_task_model(release)
        return model.to(device), labels, info
    if (release / "config.json").is_file():
        return AVViTModel.from_pretrained(release).eval().to(device), None, _features(release)
    raise AvsslError(f"{release}: not an avssl release (no config.json)")


def _mode(inputs: dict[str, torch.Tensor]) -> str:
    ha, hv = bool(inputs["has_audio"].all()), bool(inputs["has_video"].all())
    return "av" if ha and hv else ("a" if ha else "v")


def embed_files(release: Path, files: list[Path], batch_size: int = 16, device: str = "cpu",
                mode: str | None = None) -> tuple[np.ndarray, list[str]]:
    """L2-normalized embeddings [N, E] (speaker head, or the backbone's pooled embedding zero-shot).
    `mode` (av, a, v) forces one modality setting; by default each file uses what it has."""
    from avssl.finetune.heads import zero_shot_embeddings

    dev = torch.device(device)
    model, _, info = _load(Path(release), dev)
    out, names = [], []
    with torch.no_grad(), progress_bar("embedding", len(files)) as bar:
        for chunk, inputs in batches([Path(f) for f in files], info, batch_size):
            inputs = {k: v.to(dev) for k, v in inputs.items()}
            for j in range(len(chunk)):  # per file: each uses the modalities it has
                one = {k: v[j : j + 1] for k, v in inputs.items()}
                m = mode or _mode(one)
                if hasattr(model, "embed"):
                    e = model.embed(one["audio"], one["video"], one["has_audio"], one["has_video"], mode=m)
                else:
                    e = zero_shot_embeddings(model, one["audio"], one["video"], one["has_audio"], one["has_video"], m)
                out.append(e[0].float().cpu().numpy())
            names.extend(str(p) for p in chunk)
            bar.advance(len(chunk))
    return np.stack(out), names


def verify(release: Path, a: Path, b: Path, threshold: float | None = None) -> dict[str, Any]:
    """Cosine score of two files and the decision at the calibrated threshold (EER point of the
    release's evaluation trials, per modality setting) unless one is given."""
    # Both sides must be compared in one modality setting: the richest one both files have.
    _, inputs = next(batches([Path(a), Path(b)], _features(Path(release)), 2))
    if inputs["has_audio"].all() and inputs["has_video"].all():
        mode = "av"
    elif inputs["has_audio"].all():
        mode = "a"
    elif inputs["has_video"].all():
        mode = "v"
    else:
        raise AvsslError(f"{a} and {b} share no modality: one has only audio, the other only video")
    emb, _ = embed_files(release, [a, b], batch_size=2, mode=mode)
    score = float(emb[0] @ emb[1])
    if threshold is None:
        calib = Path(release) / CALIBRATION_FILE
        if not calib.is_file():
            raise AvsslError(f"{release}: no {CALIBRATION_FILE}; run `avssl evaluate` on it with a trial list or pass --threshold")
        table = json.loads(calib.read_text())
        if mode not in table:
            raise AvsslError(f"{calib}: no threshold for modality setting {mode!r}; pass --threshold")
        threshold = table[mode]["threshold"]
    return {"score": score, "threshold": threshold, "mode": mode, "same_speaker": score >= threshold}


def predict(release: Path, files: list[Path], batch_size: int = 16, device: str = "cpu") -> list[dict[str, Any]]:
    """Emotion: label and class probabilities; spoof: label and bona fide probability."""
    dev = torch.device(device)
    model, labels, info = _load(Path(release), dev)
    if labels is None or model.cfg.task == "speaker":
        raise AvsslError(f"{release}: predict needs an emotion or spoof model; use `avssl embed`/`avssl verify` for speakers")
    rows = []
    with torch.no_grad(), progress_bar("predicting", len(files)) as bar:
        for chunk, inputs in batches([Path(f) for f in files], info, batch_size):
            inputs = {k: v.to(dev) for k, v in inputs.items()}
            scores = model.scores(inputs["audio"], inputs["video"], inputs["has_audio"], inputs["has_video"]).float().cpu()
            for path, s in zip(chunk, scores):
                if model.cfg.task == "spoof":
                    p = float(s)
                    rows.append({"file": str(path), "label": "bonafide" if p >= 0.5 else "spoof", "p_bonafide": p})
                else:
                    probs = {name: float(v) for name, v in zip(labels, s)}
                    rows.append({"file": str(path), "label": max(probs, key=probs.get), "probabilities": probs})
            bar.advance(len(chunk))
    return rows
