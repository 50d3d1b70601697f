"""Task heads on the AVViT backbone: emotion classification, speaker embedding (AAM-softmax), spoof detection.

Architecture only (no optimizer loop, no engine). `TaskModel(backbone, HeadConfig)` wraps an
`AVViTModel` (`build_model(...).avvit`) and adds pooling, an optional fusion head and a task head.

Modes. A mode is the input a prediction is made from: "av" (both modalities), "a" (audio only) or
"v" (video only). The fused mode is "av" when the config uses both modalities, else the single one.
- fusion "joint": "av" runs the backbone on one sequence [audio tokens][video tokens] (joint
  attention; the backbone's key-padding mask hides a modality a sample lacks) and pools all real
  tokens; "a" / "v" run the backbone on one modality. One head serves all modes.
- fusion "late": each modality is encoded alone and has its own pooling and head; "av" averages,
  over the modalities a sample has, the log-probabilities (classification) or the scaled cosine
  logits (speaker, with the margin during training). The fused speaker embedding is the normalized
  mean of the unit embeddings of the present modalities. With `late_weights: learned` the mean is
  weighted by softmax(one logit per modality), renormalized over the present modalities; the
  logits are trained by the AV loss term.
- fusion "dca": each modality is encoded alone; `DCAFusion` (gated dynamic cross-attention) runs on
  the token sequences of the present modalities, each output is pooled by its modality's pooling and
  the pooled features are averaged over the modalities a sample has. "a" / "v" run the same head on
  one sequence (its cross-attention then sees only that modality). One task head serves all modes.
Tokens. The pooling reads the backbone's last hidden state, or with `layer_weights: learned` a
softmax-weighted sum of every hidden state (embedding output and each layer), each layer-normalized
(SUPERB's probe), with one weight vector per pooling branch. With `segment_consistency` the
features of every mode also hold, per listed modality, |first - last| and cos(first, last) of its
first and last `segment_fraction` of time steps, each encoded alone (partial spoofs).
In every fusion a sample that has only one modality gets, in mode "av", the prediction of that
modality's path (joint: up to float rounding, through the padding mask).

Training. Co-learning (config `co_learning`, both modalities): loss = L_AV + L_A + L_V, each term a
mean over the labelled samples that have the mode's input (L_V skips audio-only samples, ...).
Modality dropout (config `modality_dropout`, training only) removes one modality of an audio-visual
sample, never both, by clearing its presence flag: every path respects presence, so the dropped
modality's tokens are never read.

Labels (`labels` of `forward`): emotion = class index (-1 = unlabelled, ignored); speaker = speaker
index (-1 ignored); spoof = the loader's `is_spoof` (1 = spoof, 0 = bona fide), converted inside to
the class index BONA_FIDE = 1 / SPOOF = 0, so that the countermeasure score
`softmax(logits)[..., BONA_FIDE]` is higher for bona fide speech (the ASVspoof convention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from avssl.config import ConfigError
from avssl.pretrain.lr_decay import param_groups_lrd
from avssl.pretrain.masking import end_segments
from avssl.pretrain.modeling import masked_mean
from avssl.pretrain.modeling import AVViTModel

from .config import HeadConfig

MODES = ("av", "a", "v")
MODE_OF_MODALITY = {"audio": "a", "video": "v"}
MODALITY_OF_MODE = {"a": "audio", "v": "video"}
# Spoof head class indices: the score is the bona fide probability (higher = bona fide).
SPOOF, BONA_FIDE = 0, 1


# ---------------------------------------------------------------------------------------------
# Pooling


class MeanPooling(nn.Module):
    """Mean of the real tokens: x [B, N, D], mask bool [B, N] (True = real) -> [B, D]; 0 without any."""

    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(x, mask)


class AttentiveStatsPooling(nn.Module):
    """Attentive statistics pooling with channel-wise attention (ECAPA-TDNN, without its global context).

    x [B, N, D], mask bool [B, N] (True = real) -> [B, 2D] = [mean, std] of the tokens weighted by
    w = softmax over real tokens of `attention(x)` (per channel), std = sqrt(max(E_w[x^2] - mean^2, eps)).
    Statistics are computed in float32. A sample without any real token gets zeros.
    """

    def __init__(self, dim: int, bottleneck: int = 128, eps: float = 1e-5):
        super().__init__()
        self.attention = nn.Sequential(nn.Linear(dim, bottleneck), nn.Tanh(), nn.Linear(bottleneck, dim))
        self.eps = eps
        self.out_dim = 2 * dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        real = mask.to(torch.bool)[..., None]  # (B, N, 1)
        scores = self.attention(x).float()  # (B, N, D)
        scores = scores.masked_fill(~real, torch.finfo(scores.dtype).min)
        # A row without real tokens softmaxes to uniform weights; the mask then zeroes them (no NaN).
        weights = torch.softmax(scores, dim=1) * real  # (B, N, D)
        xf = x.float()
        mean = (weights * xf).sum(dim=1)  # (B, D)
        var = (weights * xf * xf).sum(dim=1) - mean * mean
        std = var.clamp(min=self.eps).sqrt()
        out = torch.cat([mean, std], dim=-1) * mask.any(dim=1, keepdim=True)  # (B, 2D)
        return out.to(x.dtype)


class MaskedBatchNorm(nn.Module):
    """BatchNorm1d without affine over the rows of a batch that are present: pooled features [B, P]
    and presence [B] -> standardized [B, P] (absent rows are passed through as zeros). Training uses
    the statistics of the present rows (at least 2) and updates the running ones; eval uses the
    running statistics. One instance per mode, so audio-only features never shift the AV statistics."""

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        rows = xf[present]
        if self.training and rows.shape[0] >= 2:
            mean, var = rows.mean(0), rows.var(0, unbiased=False)
            with torch.no_grad():
                unbiased = var * rows.shape[0] / (rows.shape[0] - 1)
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(unbiased.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        out = (xf - mean) * torch.rsqrt(var + self.eps)
        return torch.where(present[:, None], out, torch.zeros_like(out)).to(x.dtype)


def build_pooling(kind: str, dim: int, bottleneck: int) -> nn.Module:
    if kind == "asp":
        return AttentiveStatsPooling(dim, bottleneck)
    return MeanPooling(dim)


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
# Task heads


class ClassificationHead(nn.Module):
    """Pooled features [B, P] -> dropout -> linear -> logits [B, C]."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(features))


class SpeakerHead(nn.Module):
    """Pooled features [B, P] -> dropout -> linear -> speaker embedding [B, E]; `aam` scores classes."""

    def __init__(self, in_dim: int, embedding_dim: int, num_classes: int, margin: float, scale: float, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.embedding = nn.Linear(in_dim, embedding_dim)
        self.aam = AAMSoftmax(embedding_dim, num_classes, margin, scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.dropout(features))


@dataclass
class TaskOutput:
    """Outputs of `TaskModel.forward`.

    loss: scalar, sum of `loss_parts` (when labels were given).
    logits: [B, C] of the fused mode: class logits (emotion, spoof: class 1 = bona fide); for late
        fusion the averaged log-probabilities; speaker: AAM cosine logits scale * cos (no margin).
    embeddings: [B, E] of the fused mode: speaker = L2-normalized embedding; other tasks = pooled
        features before the classifier [B, P].
    per_modality: mode ("av", "a", "v") -> logits [B, C] (emotion, spoof) or normalized embeddings
        [B, E] (speaker), for every mode computed.
    loss_parts: mode -> its loss term (co-learning: "av", "a", "v"; else the fused mode only).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    per_modality: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_parts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _ModeResult:
    """One mode: pooled features [B, P], presence [B] bool, embedding [B, E] (speaker, unnormalized
    except for late "av") or the features, logits [B, C], cosine [B, C] (speaker, not late "av")."""

    features: torch.Tensor
    present: torch.Tensor
    embedding: torch.Tensor
    logits: torch.Tensor
    cosine: torch.Tensor | None = None


def pooling_branches(fusion: str) -> tuple[str, ...]:
    """The pooling branches (and layer mixes) of a fusion: one per modality when each modality is
    encoded alone (late, dca), one shared otherwise (joint)."""
    return ("audio", "video") if fusion in ("late", "dca") else ("shared",)


def _present_mean(
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


class TaskModel(nn.Module):
    """AVViT backbone + pooling + fusion + task head (see the module docstring).

    TaskModel(backbone: AVViTModel, cfg: HeadConfig). With `cfg.freeze_backbone` the backbone's
    parameters are set to requires_grad=False here (linear probe) and the backbone stays in eval mode.

    forward(audio, video, has_audio, has_video, labels=None, step=None) -> TaskOutput
      audio [B, T, F] | None, video [B, V, 3, H, W] | None, has_* [B] bool (None = all present when
      the tensor is given). labels [B] int (spoof: the loader's is_spoof). step: sets the AAM margin
      warm-up (`set_step`).
    """

    def __init__(self, backbone: AVViTModel, cfg: HeadConfig):
        super().__init__()
        if not isinstance(backbone, AVViTModel):
            raise TypeError(
                f"TaskModel needs the AVViTModel encoder, got {type(backbone).__name__} "
                "(pass build_model(...).avvit or AutoModel.from_pretrained(dir))"
            )
        if cfg.num_classes is None:
            raise ConfigError(
                f"head.num_classes: the {cfg.task} task needs its class count before the model is built "
                "(speaker: the number of training speakers, set by the runner from the training list)"
            )
        if cfg.class_weights is not None and len(cfg.class_weights) != cfg.num_classes:
            raise ConfigError(f"head.class_weights: {len(cfg.class_weights)} values for num_classes={cfg.num_classes}")
        self.cfg = cfg
        self.backbone = backbone
        self.both = cfg.both_modalities
        self.fused_mode = "av" if self.both else MODE_OF_MODALITY[cfg.modalities[0]]
        dim = backbone.config.hidden_size

        branches = pooling_branches(cfg.fusion)
        self.pools = nn.ModuleDict({b: build_pooling(cfg.pooling, dim, cfg.asp_bottleneck) for b in branches})
        # Width of the features a head reads: the pooling's, plus D with concat_embedding, plus D + 1
        # per segment-consistency modality.
        self.segment_dim = dim + 1
        self.token_dim = next(iter(self.pools.values())).out_dim + (dim if cfg.concat_embedding else 0)
        self.pooled_dim = pooled_dim = self.token_dim + self.segment_dim * len(cfg.segment_consistency)
        self.dca = DCAFusion(dim, cfg.dca_temperature) if cfg.fusion == "dca" else None
        head_branches = ("audio", "video") if cfg.fusion == "late" else ("shared",)
        self.heads = nn.ModuleDict({b: self._build_head(pooled_dim) for b in head_branches})
        # Late fusion's modality weights: logits of (audio, video); softmax -> weights (zeros = equal).
        self.late_logits = nn.Parameter(torch.zeros(2)) if cfg.late_weights == "learned" else None
        # SUPERB layer mix: logits over (embedding output, layer 1..L) per branch; zeros = plain mean.
        num_states = backbone.config.num_hidden_layers + 1
        self.layer_logits = (
            nn.ParameterDict({b: nn.Parameter(torch.zeros(num_states)) for b in branches})
            if cfg.layer_weights == "learned" else None
        )
        self.norms = nn.ModuleDict(
            {m: MaskedBatchNorm(pooled_dim) for m in MODES} if cfg.feature_norm == "batchnorm" else {}
        )
        weights = torch.tensor(cfg.class_weights, dtype=torch.float32) if cfg.class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)

        if cfg.freeze_backbone:
            for param in self.backbone.parameters():
                param.requires_grad_(False)
            self.backbone.eval()
        self.step = 0
        self.set_step(0)

    def _build_head(self, pooled_dim: int) -> nn.Module:
        cfg = self.cfg
        if cfg.task == "speaker":
            return SpeakerHead(
                pooled_dim, cfg.embedding_dim, cfg.num_classes, cfg.aam_margin, cfg.aam_scale, cfg.dropout
            )
        return ClassificationHead(pooled_dim, cfg.num_classes, cfg.dropout)

    # ---- state ----

    def train(self, mode: bool = True) -> TaskModel:
        """As nn.Module.train, but a frozen backbone stays in eval mode (no dropout / drop-path in a probe)."""
        super().train(mode)
        if self.cfg.freeze_backbone:
            self.backbone.eval()
        return self

    def set_step(self, step: int) -> None:
        """Set the training step: the AAM margin follows the warm-up schedule (`margin_at`)."""
        self.step = int(step)
        if self.cfg.task == "speaker":
            margin = margin_at(self.step, self.cfg.aam_margin, self.cfg.margin_warmup_steps)
            for head in self.heads.values():
                head.aam.set_margin(margin)

    @property
    def margin(self) -> float:
        """Current AAM margin (speaker task; 0 for the others)."""
        head = next(iter(self.heads.values()))
        return head.aam.margin if isinstance(head, SpeakerHead) else 0.0

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups, each with `params`, `weight_decay`, `lr_scale`: the backbone's layer-decayed
        groups (`param_groups_lrd`, none when frozen), then the head's (matrices decayed, vectors not)
        at `head_lr_scale`, then the late-fusion logits (if learned) at `head_lr_scale *
        late_weights_lr_scale`, then the layer-mix logits (if learned) at `head_lr_scale *
        layer_weights_lr_scale`. Every trainable parameter appears exactly once."""
        groups = [] if self.cfg.freeze_backbone else param_groups_lrd(self.backbone, weight_decay, self.cfg.layer_decay)
        mixing = [] if self.layer_logits is None else list(self.layer_logits.values())
        own_group = {id(p) for p in [self.late_logits, *mixing] if p is not None}
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if name.startswith("backbone.") or not param.requires_grad or id(param) in own_group:
                continue
            (decay if param.ndim >= 2 else no_decay).append(param)
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "weight_decay": wd, "lr_scale": self.cfg.head_lr_scale})
        if self.late_logits is not None:
            scale = self.cfg.head_lr_scale * self.cfg.late_weights_lr_scale
            groups.append({"params": [self.late_logits], "weight_decay": 0.0, "lr_scale": scale})
        if mixing:
            scale = self.cfg.head_lr_scale * self.cfg.layer_weights_lr_scale
            groups.append({"params": mixing, "weight_decay": 0.0, "lr_scale": scale})
        return groups

    # ---- inputs ----

    def _inputs(self, audio, video, has_audio, has_video):
        """Drop unused modalities; presence flags [B] bool, False wherever the tensor is missing."""
        if "audio" not in self.cfg.modalities:
            audio = None
        if "video" not in self.cfg.modalities:
            video = None
        ref = audio if audio is not None else video
        if ref is None:
            raise ValueError(f"TaskModel uses {self.cfg.modalities} but got none of them")
        batch, device = ref.shape[0], ref.device

        def flags(x, given):
            if x is None:
                return torch.zeros(batch, dtype=torch.bool, device=device)
            if given is None:
                return torch.ones(batch, dtype=torch.bool, device=device)
            return given.to(device=device, dtype=torch.bool)

        return audio, video, flags(audio, has_audio), flags(video, has_video)

    def drop_modalities(self, has_audio: torch.Tensor, has_video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Train-time modality dropout: each sample with both modalities loses one (audio or video,
        50/50) with probability `modality_dropout`; never both. Identity in eval mode."""
        p = self.cfg.modality_dropout
        if not self.training or p <= 0.0 or not self.both:
            return has_audio, has_video
        drop = (torch.rand(has_audio.shape, device=has_audio.device) < p) & has_audio & has_video
        drop_audio = torch.rand(has_audio.shape, device=has_audio.device) < 0.5
        return has_audio & ~(drop & drop_audio), has_video & ~(drop & ~drop_audio)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Loader labels -> the class indices `logits` are over (-1 kept as "no label"); spoof: the
        loader's is_spoof (1 = spoof) -> BONA_FIDE (1) / SPOOF (0). Compare `logits.argmax(-1)` with this."""
        labels = labels.long()
        if self.cfg.task == "spoof":
            return torch.where(labels < 0, labels, BONA_FIDE - labels)
        return labels

    # ---- encoding ----

    def _backbone(self, **inputs) -> Any:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_backbone):
            return self.backbone(**inputs, output_hidden_states=self.layer_logits is not None)

    def _tokens(self, out: Any, branch: str) -> torch.Tensor:
        """The token states the head reads, [B, N, D]: the last hidden state, or with `layer_weights:
        learned` the branch's softmax-weighted sum of every hidden state (embedding output and each
        layer), each layer-normalized without affine (SUPERB)."""
        if self.layer_logits is None:
            return out.last_hidden_state
        weights = self.layer_weights(branch)
        states = out.hidden_states
        mixed = sum(w * F.layer_norm(h.float(), h.shape[-1:]) for w, h in zip(weights, states, strict=True))
        return mixed.to(states[-1].dtype)

    def layer_weights(self, branch: str) -> torch.Tensor | None:
        """The layer mix of `branch` ("audio", "video" or "shared"): [num_layers + 1] summing to 1,
        index 0 = embedding output; None when the head reads the last layer."""
        return None if self.layer_logits is None else torch.softmax(self.layer_logits[branch].float(), dim=0)

    def _features(
        self, mode: str, audio, video, has_audio, has_video, alone: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features [B, P] and presence [B] of `mode` ("av" not for late fusion), the segment
        consistency of each `segment_consistency` modality appended. `alone` caches each modality's
        unimodal encoding (tokens the head reads [B, L, D], mask [B, L], the backbone's embedding
        [B, D]) and its segment consistency across modes."""
        inputs = {"audio": (audio, has_audio), "video": (video, has_video)}
        pooled, present = self._pooled(mode, inputs, alone)
        if not self.cfg.segment_consistency:
            return pooled, present
        in_mode = ("audio", "video") if mode == "av" else (MODALITY_OF_MODE[mode],)
        parts = [pooled]
        for modality in self.cfg.segment_consistency:
            x, has = inputs[modality]
            if modality not in in_mode or x is None:
                parts.append(pooled.new_zeros(pooled.shape[0], self.segment_dim))
                continue
            key = ("segments", modality)
            if key not in alone:
                alone[key] = self.end_segment_features(modality, x, has)
            parts.append(alone[key].to(pooled.dtype))
        return torch.cat(parts, dim=-1), present

    def end_segment_features(self, modality: str, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """[B, D + 1]: |first - last| and cos(first, last), where first / last are the means of the patch
        outputs of the modality's first and last `segment_fraction` of time steps, each encoded alone
        in one backbone pass of 2B rows (`masking.end_segments`); zeros for a sample without it."""
        embeddings = self.backbone.embeddings
        grid = embeddings.audio_grid(x) if modality == "audio" else embeddings.video_grid(x)
        batch = x.shape[0]
        views = end_segments(modality, batch, grid, self.cfg.segment_fraction, device=x.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_backbone):
            out = self.backbone(
                **{modality: x.repeat(2, *([1] * (x.ndim - 1))), f"has_{modality}": present.repeat(2),
                   f"{modality}_mask": views}
            )
        means = self.backbone.patch_mean(out, modality)  # (2B, D)
        first, last = means[:batch].float(), means[batch:].float()
        cosine = F.cosine_similarity(first, last, dim=-1, eps=1e-6)  # (B,)
        features = torch.cat([(first - last).abs(), cosine[:, None]], dim=-1) * present[:, None]
        return features.to(means.dtype)

    def _pooled(self, mode: str, inputs: dict, alone: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled features [B, P'] of `mode` before segment consistency, and presence [B]; zeros when
        the mode has none of its inputs."""
        (audio, has_audio), (video, has_video) = inputs["audio"], inputs["video"]

        def encode_alone(modality: str):
            if modality not in alone:
                x, present = inputs[modality]
                if x is None:
                    alone[modality] = None
                else:
                    out = self._backbone(**{modality: x, f"has_{modality}": present})
                    branch = modality if modality in self.pools else "shared"
                    alone[modality] = (self._tokens(out, branch), out[f"{modality}_token_mask"], out[f"{modality}_embeds"])
            return alone[modality]

        ref = audio if audio is not None else video
        modalities = ("audio", "video") if mode == "av" else (MODALITY_OF_MODE[mode],)
        present = has_audio | has_video if mode == "av" else inputs[modalities[0]][1]
        available = [m for m in modalities if inputs[m][0] is not None]
        if not available:
            return ref.new_zeros(ref.shape[0], self.token_dim, dtype=torch.float32), present

        def pool(branch: str, tokens: torch.Tensor, mask: torch.Tensor, embedding=None) -> torch.Tensor:
            """The branch's pooling of one token sequence, with the backbone's embedding appended
            (`concat_embedding`; computed from the sequence when not given)."""
            pooled = self.pools[branch](tokens, mask)
            if not self.cfg.concat_embedding:
                return pooled
            if embedding is None:
                embedding = self.backbone.pool_segment(tokens, mask)
            return torch.cat([pooled, embedding.to(pooled.dtype)], dim=-1)

        if self.cfg.fusion == "joint":
            if mode == "av":
                out = self._backbone(
                    audio=audio, video=video,
                    has_audio=has_audio if audio is not None else None,
                    has_video=has_video if video is not None else None,
                )
                mask = torch.cat([out[f"{m}_token_mask"] for m in available], dim=1)  # (B, N)
                return pool("shared", self._tokens(out, "shared"), mask, out.fused_embeds), present
            tokens, mask, embedding = encode_alone(available[0])
            return pool("shared", tokens, mask, embedding), present

        encoded = {m: encode_alone(m) for m in available}
        if self.cfg.fusion == "late":
            (m,) = available
            tokens, mask, embedding = encoded[m]
            return pool(m, tokens, mask, embedding), present
        # dca
        fused = self.dca({m: t for m, (t, _, _) in encoded.items()}, {m: k for m, (_, k, _) in encoded.items()})
        pooled = [pool(m, fused.tokens[m], encoded[m][1]) for m in available]
        return _present_mean(pooled, [inputs[m][1] for m in available]), present

    def _head(self, mode: str) -> nn.Module:
        if self.cfg.fusion == "late":
            return self.heads[MODALITY_OF_MODE[mode]]
        return self.heads["shared"]

    def _compute(self, audio, video, has_audio, has_video, modes: Sequence[str]) -> dict[str, _ModeResult]:
        """Features, embeddings and logits of each mode in `modes` (late "av" also computes "a", "v")."""
        need = set(modes)
        if self.cfg.fusion == "late" and "av" in need:
            need |= {"a", "v"}
        alone: dict = {}
        results: dict[str, _ModeResult] = {}
        for mode in ("a", "v", "av"):  # unimodal first: late "av" combines them
            if mode not in need:
                continue
            if self.cfg.fusion == "late" and mode == "av":
                results[mode] = self._late_fusion(results["a"], results["v"])
                continue
            features, present = self._features(mode, audio, video, has_audio, has_video, alone)
            if mode in self.norms:
                features = self.norms[mode](features, present)
            head = self._head(mode)
            if self.cfg.task == "speaker":
                embedding = head(features)
                cosine = head.aam.cosine(embedding)
                results[mode] = _ModeResult(features, present, embedding, head.aam.scale * cosine, cosine)
            else:
                results[mode] = _ModeResult(features, present, features, head(features))
        return results

    def late_weights(self) -> torch.Tensor | None:
        """Late fusion's (audio, video) weights, summing to 1; None = equal (the plain mean)."""
        return None if self.late_logits is None else torch.softmax(self.late_logits.float(), dim=0)

    def _late_fusion(self, a: _ModeResult, v: _ModeResult) -> _ModeResult:
        """(Weighted) mean over present modalities: log-probs (classification); cosine logits, unit
        embeddings (speaker)."""
        presents = [a.present, v.present]
        present = a.present | v.present
        weights = self.late_weights()
        features = _present_mean([a.features, v.features], presents)
        if self.cfg.task == "speaker":
            units = [F.normalize(r.embedding.float(), dim=-1) for r in (a, v)]
            embedding = F.normalize(_present_mean(units, presents, weights), dim=-1)
            return _ModeResult(features, present, embedding, _present_mean([a.logits, v.logits], presents, weights))
        log_probs = [F.log_softmax(r.logits.float(), dim=-1) for r in (a, v)]
        return _ModeResult(features, present, features, _present_mean(log_probs, presents, weights))

    def _loss_logits(self, mode: str, results: dict[str, _ModeResult], targets: torch.Tensor) -> torch.Tensor:
        """The logits the loss of `mode` is taken on (speaker: with the AAM margin on the target)."""
        if self.cfg.task != "speaker":
            return results[mode].logits
        if self.cfg.fusion == "late" and mode == "av":
            parts = [self._loss_logits(m, results, targets) for m in ("a", "v")]
            return _present_mean(parts, [results["a"].present, results["v"].present], self.late_weights())
        return self._head(mode).aam.margin_logits(results[mode].cosine, targets)

    def _resolve_mode(self, mode: str) -> str:
        """A mode this model can run: "av" ("everything the model uses") is the fused mode, which for a
        single-modality model is that modality's mode; "a" / "v" need their modality."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "av":
            return self.fused_mode
        if MODALITY_OF_MODE[mode] not in self.cfg.modalities:
            raise ValueError(f"mode {mode!r} needs {MODALITY_OF_MODE[mode]}; this model uses {self.cfg.modalities}")
        return mode

    # ---- public API ----

    def forward(
        self,
        audio: torch.Tensor | None = None,
        video: torch.Tensor | None = None,
        has_audio: torch.Tensor | None = None,
        has_video: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        step: int | None = None,
    ) -> TaskOutput:
        if step is not None:
            self.set_step(step)
        audio, video, has_audio, has_video = self._inputs(audio, video, has_audio, has_video)
        has_audio, has_video = self.drop_modalities(has_audio, has_video)
        co_learn = self.cfg.co_learning and self.both
        unimodal = self.both and (self.cfg.fusion == "late" or (co_learn and (self.training or labels is not None)))
        modes = ("av", "a", "v") if unimodal else (self.fused_mode,)
        results = self._compute(audio, video, has_audio, has_video, modes)

        fused = results[self.fused_mode]
        speaker = self.cfg.task == "speaker"
        out = TaskOutput(
            logits=fused.logits,
            embeddings=F.normalize(fused.embedding.float(), dim=-1) if speaker else fused.features,
            per_modality={
                mode: F.normalize(r.embedding.float(), dim=-1) if speaker else r.logits for mode, r in results.items()
            },
        )
        if labels is not None:
            targets = self.targets(labels.to(fused.logits.device))
            loss_modes = ("av", "a", "v") if co_learn else (self.fused_mode,)
            for mode in loss_modes:
                out.loss_parts[mode] = masked_cross_entropy(
                    self._loss_logits(mode, results, targets),
                    targets,
                    results[mode].present,
                    self.class_weights,
                    self.cfg.label_smoothing,
                )
            out.loss = sum(out.loss_parts.values())
        return out

    @torch.no_grad()
    def embed(
        self,
        audio: torch.Tensor | None = None,
        video: torch.Tensor | None = None,
        has_audio: torch.Tensor | None = None,
        has_video: torch.Tensor | None = None,
        mode: str = "av",
    ) -> torch.Tensor:
        """L2-normalized embeddings [B, E] of `mode` ("av", "a", "v"): speaker = the speaker embedding
        (cosine scoring for verification); other tasks = the pooled features before the classifier [B, P].
        "av" on a single-modality model is its one modality. No modality dropout; call `.eval()` first.
        A sample lacking the mode's inputs gets zeros."""
        mode = self._resolve_mode(mode)
        audio, video, has_audio, has_video = self._inputs(audio, video, has_audio, has_video)
        result = self._compute(audio, video, has_audio, has_video, (mode,))[mode]
        vectors = result.embedding if self.cfg.task == "speaker" else result.features
        return F.normalize(vectors.float(), dim=-1)

    @torch.no_grad()
    def scores(
        self,
        audio: torch.Tensor | None = None,
        video: torch.Tensor | None = None,
        has_audio: torch.Tensor | None = None,
        has_video: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Evaluation scores of the fused mode: emotion -> class probabilities [B, C]; spoof -> bona fide
        probability [B] (higher = bona fide); speaker -> normalized embeddings [B, E] (`embed`)."""
        if self.cfg.task == "speaker":
            return self.embed(audio, video, has_audio, has_video, mode=self.fused_mode)
        audio, video, has_audio, has_video = self._inputs(audio, video, has_audio, has_video)
        logits = self._compute(audio, video, has_audio, has_video, (self.fused_mode,))[self.fused_mode].logits
        probs = torch.softmax(logits.float(), dim=-1)
        return probs[..., BONA_FIDE] if self.cfg.task == "spoof" else probs


@torch.no_grad()
def zero_shot_embeddings(
    backbone: AVViTModel,
    audio: torch.Tensor | None,
    video: torch.Tensor | None = None,
    has_audio: torch.Tensor | None = None,
    has_video: torch.Tensor | None = None,
    mode: str = "av",
    joint: bool = False,
) -> torch.Tensor:
    """Self-supervised baseline, no head: L2-normalized mean-pooled backbone embeddings [B, D].

    mode "a" / "v": the modality encoded alone (`audio_embeds` / `video_embeds`). mode "av": by
    default each modality encoded alone, as the contrastive objective trained them, normalized and
    averaged over the modalities a sample has, then renormalized (cosine of the result ~ averaged
    per-modality cosine scores); `joint=True` uses the joint sequence's `fused_embeds` instead; a
    missing tensor (None) counts as that modality absent. A sample lacking the mode's inputs gets zeros."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "av" and (audio is None or video is None):
        mode = "a" if video is None else "v"
    if mode == "a":
        if audio is None:
            raise ValueError("mode 'a' needs an audio tensor")
        return F.normalize(backbone(audio=audio, has_audio=has_audio).audio_embeds.float(), dim=-1)
    if mode == "v":
        if video is None:
            raise ValueError("mode 'v' needs a video tensor")
        return F.normalize(backbone(video=video, has_video=has_video).video_embeds.float(), dim=-1)
    batch, device = audio.shape[0], audio.device
    all_present = torch.ones(batch, dtype=torch.bool, device=device)
    has_audio = all_present if has_audio is None else has_audio.to(device, torch.bool)
    has_video = all_present if has_video is None else has_video.to(device, torch.bool)
    if joint:
        fused = backbone(audio=audio, video=video, has_audio=has_audio, has_video=has_video).fused_embeds
        return F.normalize(fused.float(), dim=-1)
    units = [
        F.normalize(backbone(audio=audio, has_audio=has_audio).audio_embeds.float(), dim=-1),
        F.normalize(backbone(video=video, has_video=has_video).video_embeds.float(), dim=-1),
    ]
    return F.normalize(_present_mean(units, [has_audio, has_video]), dim=-1)


__all__ = [
    "AAMSoftmax",
    "AttentiveStatsPooling",
    "BONA_FIDE",
    "ClassificationHead",
    "DCAFusion",
    "DCAOutput",
    "MaskedBatchNorm",
    "MeanPooling",
    "SPOOF",
    "SpeakerHead",
    "TaskModel",
    "TaskOutput",
    "margin_at",
    "masked_cross_entropy",
    "zero_shot_embeddings",
]
