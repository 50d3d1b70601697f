"""Pretraining objectives, functional: contrastive (InfoNCE across ranks) and masked patch regression.

Contrastive loss, distributed semantics (the open_clip pattern):
- every rank L2-normalizes its local pooled embeddings, all-gathers both sides WITH gradient
  (`torch.distributed.nn.functional.all_gather`, whose backward sums the gradients of all ranks into
  the local rows) and computes the loss only for its local rows against all global columns; the
  label of local row i is its global index `rank * B + i`.
- rows whose sample lacks a modality are not pairs: they are excluded as rows (weight 0) and as
  negatives (their columns get -inf). Validity is gathered as a mask, so ranks may hold different
  numbers of pairs (including zero); the local batch size B itself must be equal on all ranks (the
  fixed-size batches of the loader), because all_gather needs equal shapes.
- the returned loss on rank r is `world * sum_{i in r} l_i / N`, with `N` the global pair count and
  `l_i = (CE(a_i -> b) + CE(b_i -> a)) / 2`. Hence (1) the mean of the returned loss over ranks is the
  global mean `sum_i l_i / N`, exactly what one process computes on the full batch, and (2) after the
  usual data-parallel gradient averaging (DDP / DeepSpeed divide the summed gradients by the world
  size) the parameter gradients equal those of the single-process global mean.
- with zero pairs anywhere the loss is 0 but still a function of the embeddings and of the logit
  scale (0 * finite terms), so every parameter stays in the graph and DDP / DeepSpeed see no unused
  parameters.
torch.distributed is used only when it is initialized and the group has more than one rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ContrastiveOutput:
    """loss: scalar (see the module docstring for its distributed scaling); accuracy: global top-1
    retrieval accuracy averaged over both directions (no gradient); n_pairs: global pair count (float)."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    n_pairs: torch.Tensor


def _world(group) -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    return 1, 0


def gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """[B, ...] on each rank -> [world * B, ...] in rank order; gradients flow back to every rank."""
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x.contiguous(), group=group), dim=0)


def _gather_no_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def contrastive_loss(
    embeds_a: torch.Tensor,
    embeds_b: torch.Tensor,
    pair_valid: torch.Tensor,
    logit_scale: torch.Tensor | float,
    process_group=None,
    hard_negative_beta: float = 0.0,
) -> ContrastiveOutput:
    """Symmetric InfoNCE between two views of the same samples (e.g. pooled audio and pooled video).

    embeds_a, embeds_b: [B, D] local rows (normalized here, in float32); pair_valid: [B] bool, True
    where both sides exist; logit_scale: 1 / temperature (scalar tensor when learned).
    hard_negative_beta: > 0 reweights each row's negatives by exp(beta * cosine), normalized to mean 1
    over the row's negatives (Robinson et al., "Contrastive Learning with Hard Negative Samples",
    ICLR 2021, without the debiasing term): the negatives most like the anchor count most. The
    weights are constants (no gradient of their own); 0 is plain InfoNCE.
    """
    world, rank = _world(process_group)
    a = F.normalize(embeds_a.float(), dim=-1)  # (B, D)
    b = F.normalize(embeds_b.float(), dim=-1)  # (B, D)
    valid = pair_valid.to(device=a.device, dtype=torch.bool)  # (B,)
    batch = a.shape[0]
    if world > 1:
        a_all = gather_with_grad(a, process_group)  # (W*B, D)
        b_all = gather_with_grad(b, process_group)  # (W*B, D)
        # uint8, not bool: bool collectives are not supported by every backend.
        valid_all = _gather_no_grad(valid.to(torch.uint8), process_group).bool()  # (W*B,)
    else:
        a_all, b_all, valid_all = a, b, valid
    labels = torch.arange(batch, device=a.device) + rank * batch  # (B,) global column of each row

    def directed(x: torch.Tensor, others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cosine = x @ others.T  # (B, W*B)
        logits = (logit_scale * cosine).masked_fill(~valid_all[None, :], float("-inf"))  # absent: no negatives
        # Rows without a pair would be all -inf past their own (masked) label: zero them, weight them 0.
        logits = torch.where(valid[:, None], logits, torch.zeros_like(logits))
        correct = (logits.argmax(dim=1) == labels) & valid  # (B,): retrieval, whatever the weights
        if hard_negative_beta > 0:
            # Finite everywhere, so rows without a pair stay finite; their loss is weighted 0 below.
            logits = logits + _hard_negative_log_weights(cosine.detach(), valid_all, labels, hard_negative_beta)
        ce = F.cross_entropy(logits, labels, reduction="none")  # (B,)
        return ce, correct

    ce_ab, correct_ab = directed(a, b_all)
    ce_ba, correct_ba = directed(b, a_all)
    loss_sum = ((ce_ab + ce_ba) * 0.5 * valid).sum()
    # One reduction for the three counts (float64 keeps integer counts exact).
    counts = torch.stack([valid.sum(), correct_ab.sum(), correct_ba.sum()]).to(torch.float64)  # (3,)
    if world > 1:
        torch.distributed.all_reduce(counts, group=process_group)
    n_pairs = counts[0].float()
    denom = n_pairs.clamp(min=1.0)
    loss = loss_sum * world / denom
    accuracy = (counts[1] + counts[2]).float() * 0.5 / denom
    return ContrastiveOutput(loss=loss, accuracy=accuracy.detach(), n_pairs=n_pairs.detach())


def _hard_negative_log_weights(
    cosine: torch.Tensor, valid_columns: torch.Tensor, labels: torch.Tensor, beta: float
) -> torch.Tensor:
    """[B, C] cosines, [C] columns that are samples, [B] positive columns -> [B, C] log importance
    weights of the negatives: beta * cosine - log(mean over the row's negatives of exp(beta * cosine)).
    0 on the positive column and on columns that are no samples (their logits are -inf anyway)."""
    negative = valid_columns[None, :] & ~F.one_hot(labels, cosine.shape[1]).bool()  # (B, C)
    scaled = (beta * cosine).masked_fill(~negative, float("-inf"))  # (B, C)
    count = negative.sum(dim=1, keepdim=True)  # (B, 1)
    log_mean = torch.logsumexp(scaled, dim=1, keepdim=True) - count.clamp(min=1).log()  # (B, 1)
    return torch.where(negative, scaled - log_mean, torch.zeros_like(scaled))


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalization of targets [B, L, P] (MAE's norm_pix_loss: unbiased variance, eps 1e-6)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_patch_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    norm_pix_loss: bool = True,
) -> torch.Tensor:
    """Mean squared error over the patches where `weight` is True (masked patches of present samples).

    pred, target: [B, L, P]; weight: [B, L] bool. Returns a scalar: sum over weighted patches of the
    per-patch MSE / number of weighted patches; 0 (still attached to `pred`) when no patch is weighted.
    """
    # Targets outside the weighted set are replaced before use, not multiplied by 0 afterwards, so
    # that nothing non-finite there (e.g. a zero-variance or corrupt absent sample) reaches a gradient.
    target = torch.where(weight[..., None], target.float(), torch.zeros((), device=target.device))
    if norm_pix_loss:
        target = normalize_patches(target)
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, L)
    w = weight.to(per_patch.dtype)
    return (per_patch * w).sum() / w.sum().clamp(min=1.0)


__all__ = ["ContrastiveOutput", "contrastive_loss", "gather_with_grad", "masked_patch_loss", "normalize_patches"]
