"""Asymmetric masking: which patch tokens the encoder sees, per modality and per view.

MAE-style: the encoder receives only the visible tokens (a gather by `ids_keep`), never mask tokens.

Exactness: a sample with ratio `r` over `L` tokens has exactly `n_mask = round(r * L)` masked tokens
(Python's `round`; clamped to `L - 1` so that at least one token stays visible). Samples that share a
ratio therefore have equal visible counts; when several ratios are used in one batch (AVSiam's
{0, .2, .4, .6, .8} for the contrastive view) the ratios are assigned to contiguous sub-batches
(`ratios_per_sample`), visible counts differ, `ids_keep` is padded to the largest count and
`keep_valid` marks the real slots (the encoder turns it into a key-padding mask).

Structured modes group tokens into units and mask whole units in random order:
- audio "unstructured": each patch is its own unit (random patches);
- audio "time": a unit is a time column (all frequency patches at one time step);
- audio "frequency": a unit is a frequency row;
- audio "tf_block": a unit is a block of `block_size = (freq, time)` patches of the grid (blocks at the
  high-frequency / late-time edge may be smaller when the grid is not a multiple of the block);
- video "random": each patch is its own unit; video "tube": a unit is one spatial position across
  all frames (VideoMAE's tube masking).
The token count stays exact: units are masked whole, in random order, until `n_mask` tokens are
masked, so at most one unit (the last one reached) is masked partially.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

AudioMaskMode = Literal["unstructured", "time", "frequency", "tf_block"]
VideoMaskMode = Literal["random", "tube"]
AUDIO_MASK_MODES: tuple[str, ...] = ("unstructured", "time", "frequency", "tf_block")
VIDEO_MASK_MODES: tuple[str, ...] = ("random", "tube")


@dataclass(frozen=True)
class ModalityMask:
    """The tokens of one modality that the encoder sees.

    ids_keep: [B, Lk] long, indices (into the modality's L patch tokens) of the visible tokens; slots
        past a sample's visible count are padding (their index is meaningless).
    keep_valid: [B, Lk] bool, True on real slots; None when every sample keeps exactly Lk tokens.
    mask: [B, L] bool, True = masked (hidden from the encoder; the reconstruction target).
    """

    ids_keep: torch.Tensor
    keep_valid: torch.Tensor | None
    mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[1]


def ratios_per_sample(batch_size: int, ratios: Sequence[float]) -> list[float]:
    """Assign `ratios` to contiguous, near-equal sub-batches: [0, .5] over 5 samples -> [0, 0, 0, .5, .5].

    Assignment by position keeps shapes known on the host (no device sync); batches are shuffled by
    the loader, so position carries no information.
    """
    if not ratios:
        raise ValueError("ratios must not be empty")
    k = len(ratios)
    base, extra = divmod(batch_size, k)
    out: list[float] = []
    for i, ratio in enumerate(ratios):
        out.extend([float(ratio)] * (base + (1 if i < extra else 0)))
    return out


def num_masked(ratio: float, length: int) -> int:
    """Exact masked count: `round(ratio * length)`, at most `length - 1` (one token always stays visible)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return min(length - 1, round(ratio * length))


def visible_counts(batch_size: int, length: int, ratios: Sequence[float]) -> list[int]:
    """Visible tokens per sample for `ratios` assigned to sub-batches."""
    return [length - num_masked(r, length) for r in ratios_per_sample(batch_size, ratios)]


def audio_mask_units(
    grid: tuple[int, int], mode: str, block_size: Sequence[int] = (2, 2)
) -> tuple[torch.Tensor, int]:
    """Unit id of every audio token (frequency-major grid `(nf, nt)`): ([nf * nt] long, number of units)."""
    n_freq, n_time = grid
    freq = torch.arange(n_freq).repeat_interleave(n_time)  # (L,) row of each token
    time = torch.arange(n_time).repeat(n_freq)  # (L,) column of each token
    if mode == "unstructured":
        return torch.arange(n_freq * n_time), n_freq * n_time
    if mode == "time":
        return time, n_time
    if mode == "frequency":
        return freq, n_freq
    if mode == "tf_block":
        bf, bt = int(block_size[0]), int(block_size[1])
        blocks_time = math.ceil(n_time / bt)
        return (freq // bf) * blocks_time + time // bt, math.ceil(n_freq / bf) * blocks_time
    raise ValueError(f"unknown audio mask mode {mode!r}; choose one of {AUDIO_MASK_MODES}")


def video_mask_units(grid: tuple[int, int, int], mode: str) -> tuple[torch.Tensor, int]:
    """Unit id of every video token (frame-major grid `(V, h, w)`): ([V * h * w] long, number of units)."""
    frames, h, w = grid
    if mode == "random":
        return torch.arange(frames * h * w), frames * h * w
    if mode == "tube":
        return torch.arange(h * w).repeat(frames), h * w
    raise ValueError(f"unknown video mask mode {mode!r}; choose one of {VIDEO_MASK_MODES}")


def random_masking(
    batch_size: int,
    units: torch.Tensor,
    num_units: int,
    ratios: Sequence[float],
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> ModalityMask:
    """Mask whole units in random order, exactly `round(r * L)` tokens per sample.

    units: [L] long unit id of every token. Each sample draws a random order of the units and a random
    order of tokens inside a unit; sorting tokens by (unit rank, token rank) lists them unit by unit,
    the first `n_mask` of that list are masked and the rest are kept.
    """
    length = units.numel()
    n_keep = visible_counts(batch_size, length, ratios)
    max_keep = max(n_keep)
    units = units.to(device)
    # Random permutation rank of the units and of the tokens, per sample.
    unit_rank = torch.rand(batch_size, num_units, device=device, generator=generator).argsort(1).argsort(1)  # (B, U)
    token_rank = torch.rand(batch_size, length, device=device, generator=generator).argsort(1).argsort(1)  # (B, L)
    key = unit_rank[:, units] * length + token_rank  # (B, L): unique, grouped by unit
    # Descending: the highest-ranked units are kept first, the lowest ones are masked whole.
    ids_order = key.argsort(dim=1, descending=True)  # (B, L)
    position = ids_order.argsort(dim=1)  # (B, L) place of each token in that order
    n_keep_t = torch.tensor(n_keep, device=device)  # (B,)
    mask = position >= n_keep_t[:, None]  # (B, L) True = masked
    ids_keep = ids_order[:, :max_keep]  # (B, Lk)
    keep_valid = None
    if min(n_keep) != max_keep:
        keep_valid = torch.arange(max_keep, device=device)[None, :] < n_keep_t[:, None]  # (B, Lk)
    return ModalityMask(ids_keep=ids_keep, keep_valid=keep_valid, mask=mask)


def mask_audio(
    batch_size: int,
    grid: tuple[int, int],
    ratios: Sequence[float],
    mode: str = "unstructured",
    block_size: Sequence[int] = (2, 2),
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> ModalityMask:
    """Mask of the audio patch grid `(nf, nt)` (frequency-major tokens)."""
    units, num_units = audio_mask_units(grid, mode, block_size)
    return random_masking(batch_size, units, num_units, ratios, device=device, generator=generator)


def mask_video(
    batch_size: int,
    grid: tuple[int, int, int],
    ratios: Sequence[float],
    mode: str = "random",
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> ModalityMask:
    """Mask of the video patch grid `(V, h, w)` (frame-major tokens)."""
    units, num_units = video_mask_units(grid, mode)
    return random_masking(batch_size, units, num_units, ratios, device=device, generator=generator)


def _end_views(batch_size: int, time_of_token: torch.Tensor, length_in_time: int, steps: int, device) -> ModalityMask:
    """Rows 0..B-1 see the tokens of the first `steps` time steps, rows B..2B-1 those of the last
    `steps` (both views hold as many tokens; the steps between them are seen by neither)."""
    ids = [
        (time_of_token < steps).nonzero().squeeze(1),
        (time_of_token >= length_in_time - steps).nonzero().squeeze(1),
    ]
    ids_keep = torch.stack(ids).repeat_interleave(batch_size, dim=0).to(device)  # (2B, L')
    mask = torch.ones(2 * batch_size, time_of_token.numel(), dtype=torch.bool, device=device)  # (2B, L)
    mask.scatter_(1, ids_keep, False)
    return ModalityMask(ids_keep=ids_keep, keep_valid=None, mask=mask)


def _time_axis(modality: str, grid: Sequence[int]) -> tuple[torch.Tensor, int]:
    """The time step of every token of a modality's patch grid and the number of steps: audio
    `(nf, nt)` (frequency-major), video `(V, h, w)` (frame-major)."""
    if modality == "audio":
        return audio_mask_units(tuple(grid), "time")
    if modality == "video":
        frames, h, w = grid
        return torch.arange(frames).repeat_interleave(h * w), frames
    raise ValueError(f"modality must be 'audio' or 'video', got {modality!r}")


def end_segments(
    modality: str, batch_size: int, grid: Sequence[int], fraction: float, *, device: torch.device | str | None = None
) -> ModalityMask:
    """Two views of every sample's patch grid, stacked [2B, ...]: its first and its last
    `max(1, floor(fraction * steps))` time steps (`fraction` <= 0.5, so the views never overlap).
    0.5 gives the two halves (an odd length leaves its middle step out); 1/3 the first and last
    thirds, which a splice in the middle third (a partial spoof) puts on either side of it."""
    if not 0.0 < fraction <= 0.5:
        raise ValueError(f"the end-segment fraction must be in (0, 0.5], got {fraction}")
    time, n_time = _time_axis(modality, grid)
    if n_time < 2:
        raise ValueError(f"the {modality} grid {tuple(grid)} has {n_time} time step: it cannot be split in time")
    steps = max(1, math.floor(fraction * n_time + 1e-9))
    return _end_views(batch_size, time, n_time, steps, device)


def audio_halves(batch_size: int, grid: tuple[int, int], *, device: torch.device | str | None = None) -> ModalityMask:
    """Two time-disjoint views of every sample's audio patch grid `(nf, nt)`, stacked: [2B, ...]."""
    return end_segments("audio", batch_size, grid, 0.5, device=device)


def video_halves(batch_size: int, grid: tuple[int, int, int], *, device: torch.device | str | None = None) -> ModalityMask:
    """Two time-disjoint views of every sample's video patch grid `(V, h, w)`, stacked: [2B, ...]."""
    return end_segments("video", batch_size, grid, 0.5, device=device)


__all__ = [
    "AUDIO_MASK_MODES",
    "AudioMaskMode",
    "ModalityMask",
    "VIDEO_MASK_MODES",
    "VideoMaskMode",
    "audio_halves",
    "audio_mask_units",
    "end_segments",
    "mask_audio",
    "mask_video",
    "num_masked",
    "random_masking",
    "ratios_per_sample",
    "video_halves",
    "video_mask_units",
    "visible_counts",
]
