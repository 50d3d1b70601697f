"""Fusion of the audio and video paths of a finetuning model: one module interface, three strategies.

A mode is the input a prediction is made from: "av" (both modalities), "a" (audio only) or "v"
(video only). A fusion decides how a mode's pooled features come from the backbone, which pooling
branches (and layer mixes) and task heads exist, and whether "av" is a feature or a combination of
the "a" and "v" predictions:
- `JointFusion` ("joint"): "av" runs the backbone on one sequence [audio tokens][video tokens]
  (joint attention; the key-padding mask hides a modality a sample lacks) and pools all real
  tokens; "a" / "v" run the backbone on one modality. One pooling, one head for all modes.
- `LateFusion` ("late"): each modality is encoded alone and has its own pooling and head; "av"
  averages, over the modalities a sample has, the "a" and "v" predictions (what is averaged is the
  task's: `tasks.Task.fuse`). With learned weights the mean is weighted by softmax(one logit per
  modality), renormalized over the present modalities; the logits are trained by the AV loss term.
- `CrossAttentionFusion` ("dca"): each modality is encoded alone; `DCAFusion` (gated dynamic
  cross-attention) runs on the token sequences of the present modalities, each output is pooled by
  its modality's pooling and the pooled features are averaged over the modalities a sample has.
  "a" / "v" run the same block on one sequence (its cross-attention then sees only that modality).
  One head for all modes.
In every fusion a sample that has only one modality gets, in mode "av", the prediction of that
modality's path (joint: up to float rounding, through the padding mask).

A fusion reads the backbone only through a `BatchEncoding` (`heads.TaskModel` makes one per call),
so it never runs the backbone or pools by itself. `build_fusion(cfg, dim)` makes the one a
`HeadConfig` names (registry `FUSIONS`); `TaskModel(backbone, cfg, fusion=...)` takes any.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .config import HeadConfig
    from .tasks import Prediction, Task

MODES = ("av", "a", "v")
MODE_OF_MODALITY = {"audio": "a", "video": "v"}
MODALITY_OF_MODE = {"a": "audio", "v": "video"}


def present_mean(
    values: Sequence[torch.Tensor], presents: Sequence[torch.Tensor], weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the entries each sample has: values [B, ...], presents [B] bool -> [B, ...].
    weights [len(values)] (positive): a weighted mean, renormalized over each sample's entries."""
    total = torch.zeros_like(values[0])
    count = torch.zeros(values[0].shape[0], device=values[0].device, dtype=values[0].dtype)
    for i, (value, present) in enumerate(zip(values, presents, strict=True)):
        p = present.to(value.dtype)
        if weights is not None:
            p = p * weights[i].to(value.dtype)
        total = total + value * p.view(-1, *([1] * (value.ndim - 1)))
        count = count + p
    # A sample with no entry has total 0: any positive floor keeps it 0 (not 1: weights are below 1).
    return total / count.clamp(min=1e-12).view(-1, *([1] * (values[0].ndim - 1)))


# ---------------------------------------------------------------------------------------------
# Gated dynamic cross-attention


@dataclass
class DCAOutput:
    """tokens / attended / gates: modality -> [B, L_m, D] output, [B, L_m, D] X_att, [B, L_m, 2] gate."""

    tokens: dict[str, torch.Tensor]
    attended: dict[str, torch.Tensor]
    gates: dict[str, torch.Tensor]


class DCAFusion(nn.Module):
    """Gated dynamic cross-attention (Praveen & Alam, arXiv:2403.04661) over per-modality token sequences.

    For each modality m given: joint cross-attention of X_m [B, L_m, D] to J = concat of all given
    sequences [B, N, D] (single head, per-modality projections, keys restricted to real tokens):
        X_att_m = softmax(q_m(X_m) k_m(J)^T / sqrt(D)) v_m(J)
    then a per-token gate choosing between the unattended and the attended features:
        G = softmax(gate_m(X_att_m) / T, dim=-1)  [B, L_m, 2]
        out_m = ReLU(G[..., 0] * X_m + G[..., 1] * X_att_m)
    A query with no real key (its sample lacks every given modality) gets X_att = 0. Outputs at
    padding positions are meaningless: pool them with the same mask.
    """

    def __init__(self, dim: int, temperature: float = 0.1, modalities: Sequence[str] = ("audio", "video")):
        super().__init__()
        self.temperature = float(temperature)
        self.scaling = dim**-0.5
        self.query = nn.ModuleDict({m: nn.Linear(dim, dim) for m in modalities})
        self.key = nn.ModuleDict({m: nn.Linear(dim, dim) for m in modalities})
        self.value = nn.ModuleDict({m: nn.Linear(dim, dim) for m in modalities})
        self.gate = nn.ModuleDict({m: nn.Linear(dim, 2) for m in modalities})

    def forward(self, tokens: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> DCAOutput:
        """tokens: modality -> [B, L_m, D]; masks: modality -> bool [B, L_m] (True = real)."""
        names = [m for m in self.query if m in tokens]
        if not names:
            raise ValueError(f"DCAFusion needs tokens of at least one of {list(self.query)}")
        joint = torch.cat([tokens[m] for m in names], dim=1)  # (B, N, D)
        joint_mask = torch.cat([masks[m].to(torch.bool) for m in names], dim=1)[:, None, :]  # (B, 1, N)
        out = DCAOutput({}, {}, {})
        for m in names:
            x = tokens[m]  # (B, Lm, D)
            scores = torch.matmul(self.query[m](x), self.key[m](joint).transpose(1, 2)) * self.scaling  # (B, Lm, N)
            scores = scores.float().masked_fill(~joint_mask, torch.finfo(torch.float32).min)
            attn = (torch.softmax(scores, dim=-1) * joint_mask).to(x.dtype)  # keyless rows -> 0
            attended = torch.matmul(attn, self.value[m](joint))  # (B, Lm, D)
            gate = torch.softmax(self.gate[m](attended).float() / self.temperature, dim=-1).to(x.dtype)  # (B, Lm, 2)
            out.tokens[m] = F.relu(gate[..., :1] * x + gate[..., 1:] * attended)
            out.attended[m] = attended
            out.gates[m] = gate
        return out


# ---------------------------------------------------------------------------------------------
# Fusion strategies


class Encoded(NamedTuple):
    """One backbone pass as a head reads it: tokens [B, L, D], mask bool [B, L] (True = real) and the
    backbone's own pooled embedding [B, D]."""

    tokens: torch.Tensor
    mask: torch.Tensor
    embedding: torch.Tensor


class BatchEncoding(Protocol):
    """One batch read through the backbone, as the task model offers it to its fusion."""

    def available(self, mode: str) -> list[str]:
        """The modalities of `mode` whose tensors were given ("audio" before "video")."""

    def present(self, modality: str) -> torch.Tensor:
        """Presence [B] bool of `modality`."""

    def alone(self, modality: str) -> Encoded:
        """`modality` encoded alone, its tokens read for its pooling branch (the same pass for every mode)."""

    def joint(self) -> Encoded:
        """The given modalities encoded as one sequence, read for the shared branch."""

    def pool(
        self, branch: str, tokens: torch.Tensor, mask: torch.Tensor, embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`branch`'s pooling of tokens [B, L, D] -> [B, P'] (the backbone's embedding appended when
        the head reads it; computed from the tokens when not given)."""


class Fusion(nn.Module, abc.ABC):
    """How the pooled features of a mode come from the backbone (`forward`), and the branches it needs.

    pool_branches: one pooling (and layer mix) per branch; head_branches: one task head per branch,
    `head_branch(mode)` the one serving a mode. `combines_predictions`: "av" is not a feature but
    `combine` of the "a" and "v" predictions (late fusion)."""

    pool_branches: tuple[str, ...] = ("shared",)
    head_branches: tuple[str, ...] = ("shared",)
    combines_predictions: bool = False

    @classmethod
    def from_config(cls, cfg: HeadConfig, dim: int) -> Fusion:
        return cls()

    def head_branch(self, mode: str) -> str:
        return "shared"

    def weights(self) -> torch.Tensor | None:
        """Weights of the modalities (audio, video) in a combined prediction, summing to 1; None = equal."""
        return None

    @abc.abstractmethod
    def forward(self, mode: str, batch: BatchEncoding) -> torch.Tensor:
        """Pooled features [B, P'] of `mode` from the modalities `batch.available(mode)` (at least one)."""
        raise NotImplementedError


class JointFusion(Fusion):
    """"av" = one joint sequence through the backbone, pooled over all its real tokens."""

    def forward(self, mode: str, batch: BatchEncoding) -> torch.Tensor:
        if mode == "av":
            tokens, mask, embedding = batch.joint()
        else:
            tokens, mask, embedding = batch.alone(batch.available(mode)[0])
        return batch.pool("shared", tokens, mask, embedding)


class LateFusion(Fusion):
    """Each modality alone with its own pooling and head; "av" = the (weighted) mean of their predictions.

    late_logits [2] (learned weights only): logits of (audio, video); softmax -> weights (zeros = equal)."""

    pool_branches = ("audio", "video")
    head_branches = ("audio", "video")
    combines_predictions = True

    def __init__(self, learned_weights: bool = False):
        super().__init__()
        self.late_logits = nn.Parameter(torch.zeros(2)) if learned_weights else None

    @classmethod
    def from_config(cls, cfg: HeadConfig, dim: int) -> LateFusion:
        return cls(learned_weights=cfg.late_weights == "learned")

    def head_branch(self, mode: str) -> str:
        return MODALITY_OF_MODE[mode]

    def weights(self) -> torch.Tensor | None:
        return None if self.late_logits is None else torch.softmax(self.late_logits.float(), dim=0)

    def forward(self, mode: str, batch: BatchEncoding) -> torch.Tensor:
        if mode == "av":
            raise ValueError("late fusion has no 'av' features: 'av' combines the 'a' and 'v' predictions")
        (modality,) = batch.available(mode)
        tokens, mask, embedding = batch.alone(modality)
        return batch.pool(modality, tokens, mask, embedding)

    def combine(self, task: Task, a: Prediction, v: Prediction) -> Prediction:
        """The "av" prediction: the task's mean of the "a" and "v" predictions over the present modalities."""
        return task.fuse([a, v], self.weights())


class CrossAttentionFusion(Fusion):
    """Each modality alone, then `DCAFusion` over the present ones; pooled per modality and averaged."""

    pool_branches = ("audio", "video")

    def __init__(self, dim: int, temperature: float = 0.1):
        super().__init__()
        self.dca = DCAFusion(dim, temperature)

    @classmethod
    def from_config(cls, cfg: HeadConfig, dim: int) -> CrossAttentionFusion:
        return cls(dim, cfg.dca_temperature)

    def forward(self, mode: str, batch: BatchEncoding) -> torch.Tensor:
        available = batch.available(mode)
        encoded = {m: batch.alone(m) for m in available}
        fused = self.dca({m: e.tokens for m, e in encoded.items()}, {m: e.mask for m, e in encoded.items()})
        pooled = [batch.pool(m, fused.tokens[m], encoded[m].mask) for m in available]
        return present_mean(pooled, [batch.present(m) for m in available])


FUSIONS: dict[str, type[Fusion]] = {"joint": JointFusion, "late": LateFusion, "dca": CrossAttentionFusion}


def build_fusion(cfg: HeadConfig, dim: int) -> Fusion:
    """The fusion `cfg.fusion` names, for a backbone of width `dim`."""
    return FUSIONS[cfg.fusion].from_config(cfg, dim)


__all__ = [
    "BatchEncoding",
    "CrossAttentionFusion",
    "DCAFusion",
    "DCAOutput",
    "Encoded",
    "FUSIONS",
    "Fusion",
    "JointFusion",
    "LateFusion",
    "MODES",
    "build_fusion",
    "present_mean",
]
