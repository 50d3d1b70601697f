"""Model inputs from decoded media: Kaldi-compatible log-mel filterbanks and face frames.

Audio follows CAV-MAE / AudioMAE / AST: `torchaudio.compliance.kaldi.fbank` on mean-removed
16 kHz audio (Hanning window, HTK-compatible mel scale, no energy, no dither), normalized with
corpus statistics as `(x - mean) / (norm_std_scale * std)`. The default scale is 2 (AST and
AudioMAE; CAV-MAE uses 1): whatever is chosen is stored in `stats.json` next to the corpus and
in released checkpoints, so inputs can be reproduced exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from avssl import AvsslError
from avssl.config import Section
from avssl.data.schema import SAMPLE_RATE
from avssl.io import read_json, write_json

STATS_FILE = "stats.json"


class FeatureConfig(Section):
    """How raw audio and face frames become model inputs."""

    num_mel_bins: int = Field(128, ge=16, le=256, description="mel filterbank channels")
    frame_shift_ms: float = Field(10.0, gt=0, description="fbank hop in milliseconds")
    frame_length_ms: float = Field(25.0, gt=0, description="fbank window in milliseconds")
    norm_std_scale: float = Field(2.0, gt=0, description="divide by scale*std (AST/AudioMAE: 2, CAV-MAE: 1)")
    image_size: int = Field(64, ge=16, le=512, description="face frame side in pixels after resizing")
    num_frames: int = Field(4, ge=1, le=64, description="face frames sampled evenly from each crop")
    # Lists, not tuples: a resolved config must load back from YAML, which has no tuples.
    image_mean: list[float] = Field(
        default_factory=lambda: [0.485, 0.456, 0.406], min_length=3, max_length=3,
        description="RGB mean subtracted from face frames (ImageNet's)",
    )
    image_std: list[float] = Field(
        default_factory=lambda: [0.229, 0.224, 0.225], min_length=3, max_length=3,
        description="RGB standard deviation face frames are divided by (ImageNet's)",
    )

    def num_audio_frames(self, seconds: float) -> int:
        """Frames the fbank yields for `seconds` of audio (Kaldi snip_edges=True)."""
        window = int(SAMPLE_RATE * self.frame_length_ms / 1000)
        shift = int(SAMPLE_RATE * self.frame_shift_ms / 1000)
        samples = int(round(seconds * SAMPLE_RATE))
        return max(0, 1 + (samples - window) // shift) if samples >= window else 0


class FbankStats(Section):
    """Corpus-level normalization statistics of the log-mel filterbank (stored as stats.json)."""

    mean: float
    std: float = Field(gt=0)
    num_mel_bins: int
    frame_shift_ms: float
    frame_length_ms: float
    norm_std_scale: float
    num_clips: int = Field(ge=0)

    def check_matches(self, cfg: FeatureConfig, where: str) -> None:
        for key in ("num_mel_bins", "frame_shift_ms", "frame_length_ms"):
            if getattr(self, key) != getattr(cfg, key):
                raise AvsslError(
                    f"{where}: statistics were computed with {key}={getattr(self, key)} but features.{key}="
                    f"{getattr(cfg, key)}; recompute them with `avssl data stats {Path(where).parent}`"
                    f" --set features.{key}=... or change the config"
                )


def fbank(wave: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """wave: float32 [N] at 16 kHz -> raw log-mel filterbank [T, num_mel_bins]."""
    import torchaudio.compliance.kaldi as kaldi

    wave = wave - wave.mean()
    return kaldi.fbank(
        wave.unsqueeze(0),
        htk_compat=True,
        sample_frequency=SAMPLE_RATE,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=cfg.num_mel_bins,
        dither=0.0,
        frame_shift=cfg.frame_shift_ms,
        frame_length=cfg.frame_length_ms,
    )


def normalize_fbank(feats: torch.Tensor, stats: FbankStats) -> torch.Tensor:
    return (feats - stats.mean) / (stats.norm_std_scale * stats.std)


def resample(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Any rate -> 16 kHz (RAVDESS is 48 kHz, some corpora 44.1 kHz)."""
    if sample_rate == SAMPLE_RATE:
        return wave
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(wave), sample_rate, SAMPLE_RATE).numpy()


def crop_window(duration: float, seconds: float, mode: Literal["random", "center"], rng: np.random.Generator) -> float:
    """Start time (s) of a `seconds`-long window inside a clip of `duration` (0 if shorter)."""
    slack = max(0.0, duration - seconds)
    if mode == "center":
        return slack / 2
    return float(rng.uniform(0.0, slack)) if slack > 0 else 0.0


def crop_audio(wave: np.ndarray, start_s: float, seconds: float) -> np.ndarray:
    """float32 [N] -> float32 [seconds*16k], zero-padded at the end when the clip is short."""
    start = int(round(start_s * SAMPLE_RATE))
    length = int(round(seconds * SAMPLE_RATE))
    out = wave[start : start + length]
    if len(out) < length:
        out = np.pad(out, (0, length - len(out)))
    return out.astype(np.float32, copy=False)


def audio_features(wave: np.ndarray, start_s: float, seconds: float, cfg: FeatureConfig, stats: FbankStats) -> torch.Tensor:
    """Cropped, normalized fbank: float32 [T, num_mel_bins], T = cfg.num_audio_frames(seconds)."""
    return normalize_fbank(fbank(torch.from_numpy(crop_audio(wave, start_s, seconds)), cfg), stats)


def frame_indices(num_video_frames: int, fps: float, start_s: float, seconds: float, count: int) -> np.ndarray:
    """`count` frame indices spread evenly over the window [start_s, start_s + seconds)."""
    first = int(math.floor(start_s * fps))
    last = max(first, min(num_video_frames, int(math.ceil((start_s + seconds) * fps))) - 1)
    idx = np.linspace(first, last, count).round().astype(np.int64)
    return np.clip(idx, 0, num_video_frames - 1)


def video_features(frames: np.ndarray, cfg: FeatureConfig) -> torch.Tensor:
    """Selected frames (see `frame_indices`), uint8 [V, H, W, 3] -> float32 [V, 3, S, S], resized and normalized."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)  # (V, 3, H, W)
    if x.shape[-2:] != (cfg.image_size, cfg.image_size):
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


class RunningMoments:
    """Streaming mean/std over many fbank matrices (Chan et al. parallel update, float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.double().flatten()
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        self.merge(n_b, mean_b, m2_b)

    def merge(self, n_b: int, mean_b: float, m2_b: float) -> None:
        """Add the moments (count, mean, sum of squared deviations) of another batch."""
        if n_b == 0:
            return
        delta = mean_b - self.mean
        total = self.n + n_b
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta**2 * self.n * n_b / total
        self.n = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / max(1, self.n - 1))


def save_stats(corpus_dir: Path, stats: FbankStats) -> Path:
    return write_json(Path(corpus_dir) / STATS_FILE, stats.model_dump(mode="json"))


def load_stats(corpus_dir: Path) -> FbankStats:
    path = Path(corpus_dir) / STATS_FILE
    if not path.is_file():
        raise AvsslError(f"{path}: no normalization statistics; compute them with `avssl data stats {corpus_dir}`")
    from avssl.config import validate

    return validate(FbankStats, read_json(path), str(path))
