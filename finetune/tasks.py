"""Finetuning tasks: what a head predicts from pooled features, what its loss is taken on, how late
fusion averages its predictions, and the scores evaluation reads.

- `ClassificationTask` (emotion): `ClassificationHead` (dropout, linear) -> class logits; late
  fusion averages log-probabilities; scores = class probabilities.
- `SpoofTask`: a two-class classification. Its labels are the loader's `is_spoof` (1 = spoof,
  0 = bona fide), converted to the class index BONA_FIDE = 1 / SPOOF = 0, so that the
  countermeasure score `softmax(logits)[..., BONA_FIDE]` is higher for bona fide speech (the
  ASVspoof convention).
- `SpeakerTask`: `SpeakerHead` (dropout, linear) -> speaker embedding, scored by AAM-softmax
  (`AAMSoftmax`, margin warm-up in the head). Logits are the cosine logits scale * cos (no margin);
  the loss is taken on the margin logits. Late fusion averages the cosine logits (and, for the loss,
  the margin logits) and the unit embeddings; scores = the L2-normalized embedding.

A task holds no parameters: `build_head` makes the head modules, which the task model owns.
`build_task(cfg)` makes the task a `HeadConfig` names (registry `TASKS`).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .fusion import present_mean

if TYPE_CHECKING:
    from .config import HeadConfig

# Spoof head class indices: the score is the bona fide probability (higher = bona fide).
SPOOF, BONA_FIDE = 0, 1


# ---------------------------------------------------------------------------------------------
# Losses


def masked_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy over the rows with a target >= 0 (and `valid`, [B] bool): logits [B, C],
    targets [B] int -> scalar. With class weights it is the weighted mean sum(w_y l) / sum(w_y) (as
    torch's "mean"). No row kept -> 0, still a function of the logits (no NaN, no host sync)."""
    keep = targets >= 0
    if valid is not None:
        keep = keep & valid.to(torch.bool)
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    losses = F.cross_entropy(logits.float(), safe, weight=weight, reduction="none", label_smoothing=label_smoothing)
    row_weight = keep.to(losses.dtype)
    if weight is not None:
        row_weight = row_weight * weight.to(losses.dtype)[safe]
    return (losses * keep).sum() / row_weight.sum().clamp(min=1e-12)


class AAMSoftmax(nn.Module):
    """Additive angular margin softmax (ArcFace; WeSpeaker's `ArcMarginProduct`).

    cosine = normalize(embedding) . normalize(W_c) [B, C]; the target class logit becomes
    scale * cos(theta + m), the others scale * cos(theta). Past theta = pi - m, where cos(theta + m)
    would rise again, the target logit is continued as cos(theta) - (1 + cos(pi - m)) (WeSpeaker's
    non-easy margin; `easy_margin` keeps cos(theta) where cos(theta) <= 0 instead). The cosine is
    clamped to [-1 + 1e-7, 1 - 1e-7] inside the sine so its gradient stays finite.
    """

    def __init__(
        self, embedding_dim: int, num_classes: int, margin: float = 0.2, scale: float = 30.0, easy_margin: bool = False
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale = float(scale)
        self.easy_margin = easy_margin
        self.set_margin(margin)

    def set_margin(self, margin: float) -> None:
        """Change the margin (radians), e.g. during margin warm-up."""
        self.margin = float(margin)
        self.cos_m = math.cos(self.margin)
        self.sin_m = math.sin(self.margin)
        self.th = math.cos(math.pi - self.margin)
        self.mmm = 1.0 + math.cos(math.pi - self.margin)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, E] -> cosine to every class centre [B, C] (float32)."""
        return F.linear(F.normalize(embeddings.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))

    def margin_logits(self, cosine: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """cosine [B, C], targets [B] (-1 = none) -> scale * (cos(theta + m) at the target, cos(theta) elsewhere)."""
        safe = cosine.clamp(-1.0 + 1e-7, 1.0 - 1e-7)
        sine = (1.0 - safe * safe).sqrt()
        phi = cosine * self.cos_m - sine * self.sin_m  # cos(theta + m)
        if self.easy_margin:
            phi = torch.where(cosine > 0, phi, cosine)
        else:
            phi = torch.where(cosine > self.th, phi, cosine - self.mmm)
        classes = torch.arange(cosine.shape[-1], device=cosine.device)
        is_target = (classes[None, :] == targets[:, None]) & (targets[:, None] >= 0)  # (B, C)
        return self.scale * torch.where(is_target, phi, cosine)

    def forward(
        self,
        embeddings: torch.Tensor,
        targets: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """embeddings [B, E], targets [B] -> (loss on the margin logits or None, cosine logits
        scale * cosine [B, C], the logits to score / rank classes with)."""
        cosine = self.cosine(embeddings)
        loss = None
        if targets is not None:
            loss = masked_cross_entropy(self.margin_logits(cosine, targets), targets, None, weight, label_smoothing)
        return loss, self.scale * cosine


def margin_at(step: int, margin: float, warmup_steps: int) -> float:
    """AAM margin at `step`: linear from 0 at step 0 to `margin` at `warmup_steps`, then constant."""
    if warmup_steps <= 0:
        return margin
    return margin * min(max(step, 0) / warmup_steps, 1.0)


# ---------------------------------------------------------------------------------------------
# Heads: pooled features [B, P] -> the task's outputs; `set_step` / `margin` follow the training step.


class ClassificationHead(nn.Module):
    """Pooled features [B, P] -> dropout -> linear -> logits [B, C]."""

    margin = 0.0  # no angular margin

    def __init__(self, in_dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_dim, num_classes)

    def set_step(self, step: int) -> None:
        """Nothing follows the training step."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(features))


class SpeakerHead(nn.Module):
    """Pooled features [B, P] -> dropout -> linear -> speaker embedding [B, E]; `aam` scores classes.
    The AAM margin follows the training step (`set_step`): linear from 0 to `margin` over
    `margin_warmup_steps` (`margin_at`), full from the start when 0."""

    def __init__(
        self,
        in_dim: int,
        embedding_dim: int,
        num_classes: int,
        margin: float,
        scale: float,
        dropout: float,
        margin_warmup_steps: int = 0,
    ):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.embedding = nn.Linear(in_dim, embedding_dim)
        self.aam = AAMSoftmax(embedding_dim, num_classes, margin, scale)
        self.full_margin, self.margin_warmup_steps = float(margin), int(margin_warmup_steps)

    @property
    def margin(self) -> float:
        """The AAM margin now (radians)."""
        return self.aam.margin

    def set_step(self, step: int) -> None:
        self.aam.set_margin(margin_at(step, self.full_margin, self.margin_warmup_steps))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.dropout(features))


# ---------------------------------------------------------------------------------------------
# Tasks


@dataclass
class Prediction:
    """One mode's prediction: pooled features [B, P], presence [B] bool, embedding [B, E] (speaker:
    unnormalized except for late "av"; other tasks: the features), logits [B, C], and
    `loss_logits(targets [B]) -> [B, C]`, the logits the loss is taken on (speaker: with the AAM
    margin on the target; other tasks: `logits`)."""

    features: torch.Tensor
    present: torch.Tensor
    embedding: torch.Tensor
    logits: torch.Tensor
    loss_logits: Callable[[torch.Tensor], torch.Tensor]


class Task(abc.ABC):
    """A task's behaviour on pooled features; its heads are made by `build_head` and owned by the model."""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg: HeadConfig) -> Task:
        raise NotImplementedError

    @abc.abstractmethod
    def build_head(self, in_dim: int) -> nn.Module:
        raise NotImplementedError

    @abc.abstractmethod
    def predict(self, head: nn.Module, features: torch.Tensor, present: torch.Tensor) -> Prediction:
        """`head` on pooled features [B, P] of samples `present` [B]."""
        raise NotImplementedError

    @abc.abstractmethod
    def fuse(self, parts: Sequence[Prediction], weights: torch.Tensor | None) -> Prediction:
        """Late fusion: the mean of `parts` (one per modality) over the ones each sample has,
        weighted by `weights` [len(parts)] (None = equal). The features are averaged unweighted."""
        raise NotImplementedError

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Loader labels -> the class indices `logits` are over (-1 kept as "no label")."""
        return labels.long()

    @abc.abstractmethod
    def embeddings(self, pred: Prediction) -> torch.Tensor:
        """`TaskOutput.embeddings` of a prediction."""
        raise NotImplementedError

    @abc.abstractmethod
    def per_modality(self, pred: Prediction) -> torch.Tensor:
        """`TaskOutput.per_modality` entry of a prediction."""
        raise NotImplementedError

    @abc.abstractmethod
    def scores(self, pred: Prediction) -> torch.Tensor:
        """Evaluation scores of a prediction."""
        raise NotImplementedError


class ClassificationTask(Task):
    """Class logits from the pooled features; late fusion averages log-probabilities."""

    def __init__(self, num_classes: int, dropout: float):
        self.num_classes, self.dropout = num_classes, dropout

    @classmethod
    def from_config(cls, cfg: HeadConfig) -> ClassificationTask:
        return cls(cfg.num_classes, cfg.dropout)

    def build_head(self, in_dim: int) -> ClassificationHead:
        return ClassificationHead(in_dim, self.num_classes, self.dropout)

    def predict(self, head: nn.Module, features: torch.Tensor, present: torch.Tensor) -> Prediction:
        logits = head(features)
        return Prediction(features, present, features, logits, lambda targets: logits)

    def fuse(self, parts: Sequence[Prediction], weights: torch.Tensor | None) -> Prediction:
        presents = [p.present for p in parts]
        features = present_mean([p.features for p in parts], presents)
        log_probs = [F.log_softmax(p.logits.float(), dim=-1) for p in parts]
        logits = present_mean(log_probs, presents, weights)
        return Prediction(features, _any(presents), features, logits, lambda targets: logits)

    def embeddings(self, pred: Prediction) -> torch.Tensor:
        return pred.features

    def per_modality(self, pred: Prediction) -> torch.Tensor:
        return pred.logits

    def scores(self, pred: Prediction) -> torch.Tensor:
        """Class probabilities [B, C]."""
        return torch.softmax(pred.logits.float(), dim=-1)


class SpoofTask(ClassificationTask):
    """Bona fide vs spoof; labels are the loader's is_spoof, scores the bona fide probability."""

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """is_spoof (1 = spoof) -> BONA_FIDE (1) / SPOOF (0); -1 kept."""
        labels = labels.long()
        return torch.where(labels < 0, labels, BONA_FIDE - labels)

    def scores(self, pred: Prediction) -> torch.Tensor:
        """Bona fide probability [B] (higher = bona fide)."""
        return super().scores(pred)[..., BONA_FIDE]


class SpeakerTask(Task):
    """Speaker embeddings scored by AAM-softmax: logits = scale * cosine, loss on the margin logits."""

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        margin: float,
        scale: float,
        margin_warmup_steps: int,
        dropout: float,
    ):
        self.embedding_dim, self.num_classes, self.dropout = embedding_dim, num_classes, dropout
        self.margin, self.scale, self.margin_warmup_steps = margin, scale, margin_warmup_steps

    @classmethod
    def from_config(cls, cfg: HeadConfig) -> SpeakerTask:
        return cls(
            cfg.embedding_dim, cfg.num_classes, cfg.aam_margin, cfg.aam_scale, cfg.margin_warmup_steps, cfg.dropout
        )

    def build_head(self, in_dim: int) -> SpeakerHead:
        return SpeakerHead(
            in_dim, self.embedding_dim, self.num_classes, self.margin, self.scale, self.dropout,
            margin_warmup_steps=self.margin_warmup_steps,
        )

    def predict(self, head: nn.Module, features: torch.Tensor, present: torch.Tensor) -> Prediction:
        embedding = head(features)
        cosine = head.aam.cosine(embedding)
        logits = head.aam.scale * cosine
        return Prediction(features, present, embedding, logits, lambda targets: head.aam.margin_logits(cosine, targets))

    def fuse(self, parts: Sequence[Prediction], weights: torch.Tensor | None) -> Prediction:
        """Unit embeddings, cosine logits and margin logits averaged; the embedding renormalized."""
        presents = [p.present for p in parts]
        features = present_mean([p.features for p in parts], presents)
        units = [F.normalize(p.embedding.float(), dim=-1) for p in parts]
        embedding = F.normalize(present_mean(units, presents, weights), dim=-1)
        logits = present_mean([p.logits for p in parts], presents, weights)

        def loss_logits(targets: torch.Tensor) -> torch.Tensor:
            return present_mean([p.loss_logits(targets) for p in parts], presents, weights)

        return Prediction(features, _any(presents), embedding, logits, loss_logits)

    def embeddings(self, pred: Prediction) -> torch.Tensor:
        return F.normalize(pred.embedding.float(), dim=-1)

    # Per mode and as scores too: the normalized embedding (cosine scoring for verification).
    per_modality = scores = embeddings


def _any(presents: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B] bool: a sample has at least one of the entries."""
    present = presents[0]
    for other in presents[1:]:
        present = present | other
    return present


TASKS: dict[str, type[Task]] = {"emotion": ClassificationTask, "speaker": SpeakerTask, "spoof": SpoofTask}


def build_task(cfg: HeadConfig) -> Task:
    """The task `cfg.task` names."""
    return TASKS[cfg.task].from_config(cfg)


__all__ = [
    "AAMSoftmax",
    "BONA_FIDE",
    "ClassificationHead",
    "ClassificationTask",
    "Prediction",
    "SPOOF",
    "SpeakerHead",
    "SpeakerTask",
    "SpoofTask",
    "TASKS",
    "Task",
    "build_task",
    "margin_at",
    "masked_cross_entropy",
]
