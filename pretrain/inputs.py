"""`AVInputs`: the one input type of the model, its objective and the finetuning tasks.

A batch of audio, video or both, with per-sample modality presence. Audio-only, video-only and
audio-visual samples mix in one batch: a missing modality is a zero-filled row whose presence flag
is False (the loader's `has_audio` / `has_video`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AVInputs:
    """One batch of model inputs. audio: [B, T, F] fbank | None; video: [B, V, 3, H, W] face frames | None
    (None only when the whole run has none of that modality); has_audio, has_video: [B] bool presence
    (absent inputs are zero-filled rows)."""

    audio: torch.Tensor | None
    video: torch.Tensor | None
    has_audio: torch.Tensor
    has_video: torch.Tensor

    @classmethod
    def of(
        cls,
        audio: torch.Tensor | None = None,
        video: torch.Tensor | None = None,
        has_audio: torch.Tensor | None = None,
        has_video: torch.Tensor | None = None,
    ) -> AVInputs:
        """Presence filled in: given flags as bool, all True for an input given without flags, all
        False for a missing input."""
        if audio is None and video is None:
            raise ValueError("the model needs audio, video or both")
        ref = audio if audio is not None else video
        batch, device = ref.shape[0], ref.device
        return cls(audio, video, _presence(has_audio, audio, batch, device), _presence(has_video, video, batch, device))

    @property
    def batch_size(self) -> int:
        return self.has_audio.shape[0]

    @property
    def device(self) -> torch.device:
        return self.has_audio.device

    def present(self, modality: str) -> torch.Tensor:
        """[B] bool presence of "audio" or "video"."""
        return self.has_audio if modality == "audio" else self.has_video

    def tensor(self, modality: str) -> torch.Tensor | None:
        """The input of "audio" or "video" (None when the batch has none of it)."""
        return self.audio if modality == "audio" else self.video

    def with_presence(self, has_audio: torch.Tensor, has_video: torch.Tensor) -> AVInputs:
        """The same inputs with other presence flags (e.g. after modality dropout)."""
        return dataclasses.replace(self, has_audio=has_audio, has_video=has_video)


def _presence(flags: torch.Tensor | None, inputs: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """[B] bool presence: given flags, all True when the input is given without flags, all False without input."""
    if inputs is None:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    if flags is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    return flags.to(device=device, dtype=torch.bool)


__all__ = ["AVInputs"]
