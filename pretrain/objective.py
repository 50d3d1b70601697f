"""The pretraining objective: masking, the three views and their losses (SSAVSV, after CAV-MAE and AVSiam).

`PretrainingObjective` owns everything that is not architecture: the masking and loss sections of
the recipe, the contrastive projection heads and the learned temperature (training-only parameters,
never released), and the order in which the views are drawn. It runs on an encoder (`AVViTModel`:
`embeddings`, `forward_tokens`, `patch_mean`) and a decoder (`AVViTDecoder`) that it is handed,
in the style of MAE's `forward_encoder / forward_decoder / forward_loss`:

- `forward_contrastive`: each modality encoded alone (joint attention would let one side read the other
  and trivialize the pairing), lightly masked, pooled; symmetric InfoNCE across ranks.
- `forward_segments`: each modality alone, its first and second half in time as two samples of one pass;
  each half must find its other half among the batch's halves.
- `forward_reconstruction`: both modalities in one sequence, heavily masked; the decoder predicts the
  masked patches.

Distributed training is explicit: the caller passes the data-parallel `process_group` (None: one
process); the contrastive losses gather across it (losses.py, the open_clip pattern). Nothing here
reads global distributed state.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .config import LossConfig, MaskingConfig
from .inputs import AVInputs
from .losses import contrastive_loss, masked_patch_loss
from .masking import ModalityMask, audio_halves, mask_audio, mask_video, video_halves, visible_counts

if TYPE_CHECKING:
    from .modeling import AVViTDecoder, AVViTModel


def masked_batch_norm(x: torch.Tensor, valid: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """[B, C] -> [B, C] standardized per channel with the mean and (biased) variance of the valid
    rows [B] bool; every row is mapped, invalid ones with those statistics. Fewer than two valid
    rows leave x as it is (chosen on the device: no host sync in the training step). No running
    statistics: it serves a training-only head."""
    w = valid.to(x.dtype)[:, None]  # (B, 1)
    n = w.sum().clamp(min=1.0)
    mean = (x * w).sum(dim=0) / n  # (C,)
    var = ((x - mean).pow(2) * w).sum(dim=0) / n  # (C,)
    return torch.where(n >= 2, (x - mean) * torch.rsqrt(var + eps), x)


class ContrastiveProjection(nn.Module):
    """Projection head of the contrastive view (SimCLR, MoCo v3): pooled [B, D] -> [B, P].

    Linear -> batch norm -> GELU -> Linear -> batch norm without affine. Batch statistics come from
    the rows that hold the modality, on each rank (the negatives' rows on other ranks are normalized
    by their own rank). Pretraining only: a release keeps the backbone, not this head."""

    def __init__(self, dim: int, proj_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.norm_weight = nn.Parameter(torch.ones(dim))
        self.norm_bias = nn.Parameter(torch.zeros(dim))
        self.fc2 = nn.Linear(dim, proj_dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = masked_batch_norm(self.fc1(x), valid) * self.norm_weight + self.norm_bias  # (B, D)
        return masked_batch_norm(self.fc2(F.gelu(h)), valid)  # (B, P)


@dataclass
class AVViTForPretrainingOutput(ModelOutput):
    """All scalars are 0-d tensors (no host sync); reduce/log them on log steps only.

    loss: w_rec * loss_reconstruction + w_con * loss_contrastive + w_seg * loss_segment (what to
    backpropagate).
    loss_reconstruction: w_a * loss_rec_audio + w_v * loss_rec_video.
    loss_rec_audio, loss_rec_video: MSE on masked patches of samples having the modality.
    loss_contrastive: symmetric InfoNCE (per-rank scaled: its mean over ranks is the global mean).
    contrastive_accuracy: global top-1 audio<->video retrieval accuracy of the batch.
    loss_segment: segment contrast (first vs second half of each clip), mean over the modalities run.
    segment_accuracy: its global top-1 half<->half retrieval accuracy, mean over those modalities.
    temperature: 1 / logit scale in use. n_pairs: global number of audio-visual pairs.
    audio_embeds, video_embeds: [B, D] pooled embeddings of the contrastive view (None if skipped).
    pred_audio, pred_video: [B, L, P] reconstructions; audio_mask, video_mask: [B, L] bool, True =
    masked in the reconstruction view.
    """

    loss: torch.Tensor | None = None
    loss_reconstruction: torch.Tensor | None = None
    loss_rec_audio: torch.Tensor | None = None
    loss_rec_video: torch.Tensor | None = None
    loss_contrastive: torch.Tensor | None = None
    contrastive_accuracy: torch.Tensor | None = None
    loss_segment: torch.Tensor | None = None
    segment_accuracy: torch.Tensor | None = None
    temperature: torch.Tensor | None = None
    n_pairs: torch.Tensor | None = None
    audio_embeds: torch.Tensor | None = None
    video_embeds: torch.Tensor | None = None
    pred_audio: torch.Tensor | None = None
    pred_video: torch.Tensor | None = None
    audio_mask: torch.Tensor | None = None
    video_mask: torch.Tensor | None = None


@dataclass
class _Embedded:
    """The inputs embedded once ([B, L, D] tokens and their patch grids), shared by every view."""

    inputs: AVInputs
    audio_tokens: torch.Tensor | None
    video_tokens: torch.Tensor | None
    audio_grid: tuple[int, int] | None
    video_grid: tuple[int, int, int] | None


class PretrainingObjective(nn.Module):
    """Masking, views and losses of pretraining; its parameters (projection heads, learned
    temperature) are training-only.

    forward(encoder, decoder, inputs, process_group=None) -> AVViTForPretrainingOutput
    """

    def __init__(self, hidden_size: int, masking: MaskingConfig | None = None, loss: LossConfig | None = None):
        super().__init__()
        self.masking = masking or MaskingConfig()
        self.loss = loss or LossConfig()
        if self.loss.projection == "mlp":
            proj = self.loss.projection_dim
            self.audio_projection = ContrastiveProjection(hidden_size, proj)
            self.video_projection = ContrastiveProjection(hidden_size, proj)
            if self.loss.segment_weight > 0:
                self.audio_segment_projection = ContrastiveProjection(hidden_size, proj)
                self.video_segment_projection = ContrastiveProjection(hidden_size, proj)
        if self.loss.learn_temperature:
            # log(1 / temperature), as CLIP; clamped at max_logit_scale when used.
            self.logit_scale = nn.Parameter(torch.zeros(()))

    def contrastive_logit_scale(self) -> torch.Tensor | float:
        """1 / temperature: a clamped learned scalar, or the fixed value."""
        if self.loss.learn_temperature:
            return self.logit_scale.exp().clamp(max=self.loss.max_logit_scale)
        return 1.0 / self.loss.temperature

    def forward(
        self, encoder: AVViTModel, decoder: AVViTDecoder, inputs: AVInputs, process_group: Any = None
    ) -> AVViTForPretrainingOutput:
        emb = encoder.embeddings
        audio, video = inputs.audio, inputs.video
        x = _Embedded(
            inputs,
            emb.embed_audio(audio) if audio is not None else None,  # (B, La, D)
            emb.embed_video(video) if video is not None else None,  # (B, Lv, D)
            emb.audio_grid(audio) if audio is not None else None,
            emb.video_grid(video) if video is not None else None,
        )
        anchor = x.audio_tokens if x.audio_tokens is not None else x.video_tokens
        zero = anchor.new_zeros((), dtype=torch.float32)
        out = AVViTForPretrainingOutput()
        # The views draw their masks in this order (contrastive, segment, reconstruction): with one
        # seed, a run's masks, and so its losses, are reproducible.
        loss_con, accuracy, n_pairs = self.forward_contrastive(encoder, x, out, zero, process_group)
        loss_seg, seg_accuracy = self.forward_segments(encoder, x, zero, process_group)
        loss_rec_audio, loss_rec_video = self.forward_reconstruction(encoder, decoder, x, out, zero)

        w = self.loss
        loss_rec = w.audio_reconstruction_weight * loss_rec_audio + w.video_reconstruction_weight * loss_rec_video
        out.loss = w.reconstruction_weight * loss_rec + w.contrastive_weight * loss_con + w.segment_weight * loss_seg
        out.loss_reconstruction = loss_rec
        out.loss_rec_audio = loss_rec_audio
        out.loss_rec_video = loss_rec_video
        out.loss_contrastive = loss_con
        out.contrastive_accuracy = accuracy
        out.loss_segment = loss_seg
        out.segment_accuracy = seg_accuracy
        out.n_pairs = n_pairs
        scale = self.contrastive_logit_scale()
        out.temperature = (1.0 / scale).detach() if torch.is_tensor(scale) else zero + 1.0 / scale
        return out

    def forward_contrastive(
        self, encoder: AVViTModel, x: _Embedded, out: AVViTForPretrainingOutput, zero: torch.Tensor, process_group: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Audio-visual InfoNCE of the lightly masked, separately encoded modalities -> (loss, accuracy,
        pairs); fills `out.audio_embeds` / `out.video_embeds` ([B, D])."""
        if self.loss.contrastive_weight <= 0 or x.audio_tokens is None or x.video_tokens is None:
            return zero, zero, zero
        batch, device = x.inputs.batch_size, x.inputs.device
        masking, view = self.masking, self.masking.contrastive
        a_mask = mask_audio(batch, x.audio_grid, view.audio_ratios, view.audio_mode, masking.audio_block_size, device=device)
        v_mask = mask_video(batch, x.video_grid, view.video_ratios, view.video_mode, device=device)
        # Rows lacking the modality are encoded anyway (fixed shapes) and left out of the pairs.
        out.audio_embeds = self._pooled_view(encoder, "audio", x.audio_tokens, a_mask, view.audio_ratios)
        out.video_embeds = self._pooled_view(encoder, "video", x.video_tokens, v_mask, view.video_ratios)
        pairs = x.inputs.has_audio & x.inputs.has_video  # (B,)
        a_con, v_con = out.audio_embeds, out.video_embeds
        if self.loss.projection == "mlp":
            a_con, v_con = self.audio_projection(a_con, pairs), self.video_projection(v_con, pairs)  # (B, P)
        con = contrastive_loss(a_con, v_con, pairs, self.contrastive_logit_scale(), process_group,
                               self.loss.hard_negative_beta)
        return con.loss, con.accuracy, con.n_pairs

    def _pooled_view(
        self, encoder: AVViTModel, modality: str, tokens: torch.Tensor, mask: ModalityMask, ratios: list[float]
    ) -> torch.Tensor:
        """[B, L, D] tokens of one modality, its view's mask -> [B, D] pooled embeddings. Packed: each run
        of samples with one visible count (masking.ratios_per_sample assigns ratios to contiguous
        sub-batches) is encoded at that length, without padding slots; the pooled rows are the same,
        since in this view every sample attends only to its own tokens."""
        key = f"{modality}_embeds"
        if not self.masking.pack_contrastive or mask.keep_valid is None:
            return encoder.forward_tokens(**{f"{modality}_tokens": tokens, f"{modality}_mask": mask})[key]
        counts = visible_counts(tokens.shape[0], mask.num_tokens, ratios)  # on the host: no device sync
        pooled, start = [], 0
        for count, run in itertools.groupby(counts):
            rows = slice(start, start + len(list(run)))
            start = rows.stop
            part = ModalityMask(ids_keep=mask.ids_keep[rows, :count], keep_valid=None, mask=mask.mask[rows])
            pooled.append(encoder.forward_tokens(**{f"{modality}_tokens": tokens[rows], f"{modality}_mask": part})[key])
        return torch.cat(pooled, dim=0)  # (B, D)

    def forward_segments(
        self, encoder: AVViTModel, x: _Embedded, zero: torch.Tensor, process_group: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment contrast, mean over the modalities given -> (loss, accuracy). The halves are
        pooled as the mean of their patch outputs, never a CLS output (`AVViTModel.patch_mean`): the
        CLS output stays the AV contrast's (and the release's) embedding."""
        if self.loss.segment_weight <= 0:
            return zero, zero
        batch, device = x.inputs.batch_size, x.inputs.device
        parts = []  # (pooled [2B, D], presence [B], modality)
        if x.audio_tokens is not None:
            mask = audio_halves(batch, x.audio_grid, device=device)
            halves = encoder.forward_tokens(audio_tokens=x.audio_tokens.repeat(2, 1, 1), audio_mask=mask)
            parts.append((encoder.patch_mean(halves, "audio"), x.inputs.has_audio, "audio"))
        if x.video_tokens is not None:
            mask = video_halves(batch, x.video_grid, device=device)
            halves = encoder.forward_tokens(video_tokens=x.video_tokens.repeat(2, 1, 1), video_mask=mask)
            parts.append((encoder.patch_mean(halves, "video"), x.inputs.has_video, "video"))
        loss, accuracy = zero, zero
        for pooled, present, name in parts:
            if self.loss.projection == "mlp":
                pooled = getattr(self, f"{name}_segment_projection")(pooled, present.repeat(2))
            first, second = pooled[:batch], pooled[batch:]  # (B, P) each
            seg = contrastive_loss(first, second, present, 1.0 / self.loss.segment_temperature, process_group,
                                   self.loss.hard_negative_beta)
            loss = loss + seg.loss / len(parts)
            accuracy = accuracy + seg.accuracy / len(parts)
        return loss, accuracy

    def forward_reconstruction(
        self, encoder: AVViTModel, decoder: AVViTDecoder, x: _Embedded, out: AVViTForPretrainingOutput,
        zero: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked data modeling on the joint sequence -> (audio loss, video loss); fills
        `out.pred_*` ([B, L, P]) and `out.*_mask` ([B, L] bool, True = masked)."""
        if self.loss.reconstruction_weight <= 0:
            return zero, zero
        inputs, batch, device = x.inputs, x.inputs.batch_size, x.inputs.device
        masking, view = self.masking, self.masking.reconstruction
        a_mask = v_mask = None
        if x.audio_tokens is not None:
            a_mask = mask_audio(batch, x.audio_grid, view.audio_ratios, view.audio_mode, masking.audio_block_size, device=device)
        if x.video_tokens is not None:
            v_mask = mask_video(batch, x.video_grid, view.video_ratios, view.video_mode, device=device)
        enc = encoder.forward_tokens(
            audio_tokens=x.audio_tokens,
            video_tokens=x.video_tokens,
            has_audio=inputs.has_audio if x.audio_tokens is not None else None,
            has_video=inputs.has_video if x.video_tokens is not None else None,
            audio_mask=a_mask,
            video_mask=v_mask,
        )
        skip = 1 if encoder.config.use_cls_token else 0  # the decoder sees patch latents only
        pred_audio, pred_video = decoder(
            audio_latent=enc.audio_last_hidden_state[:, skip:] if x.audio_tokens is not None else None,
            audio_mask=a_mask,
            audio_grid=x.audio_grid,
            video_latent=enc.video_last_hidden_state[:, skip:] if x.video_tokens is not None else None,
            video_mask=v_mask,
            video_grid=x.video_grid,
            has_audio=inputs.has_audio,
            has_video=inputs.has_video,
        )
        loss_audio = loss_video = zero
        emb = encoder.embeddings
        if inputs.audio is not None:
            target = emb.patchify_audio(inputs.audio)  # (B, La, p*p)
            loss_audio = masked_patch_loss(pred_audio, target, a_mask.mask & inputs.has_audio[:, None],
                                           self.loss.audio_norm_pix_loss)
            out.pred_audio, out.audio_mask = pred_audio, a_mask.mask
        if inputs.video is not None:
            target = emb.patchify_video(inputs.video)  # (B, Lv, 3*p*p)
            loss_video = masked_patch_loss(pred_video, target, v_mask.mask & inputs.has_video[:, None],
                                           self.loss.norm_pix_loss)
            out.pred_video, out.video_mask = pred_video, v_mask.mask
        return loss_audio, loss_video


__all__ = [
    "AVInputs",
    "AVViTForPretrainingOutput",
    "ContrastiveProjection",
    "PretrainingObjective",
    "masked_batch_norm",
]
