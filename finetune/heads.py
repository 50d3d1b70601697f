"""The finetuning model: AVViT backbone + pooling + an injected fusion + a task's head(s).

`TaskModel(backbone, HeadConfig, fusion=None)` wraps an `AVViTModel` (`build_model(...).avvit`). Its
parts, each in its own place:
- reading the backbone's features (here): which hidden states the heads read, the pooling of each
  branch, the backbone's own embedding (`concat_embedding`), segment consistency, feature norm;
- the fusion (`fusion.py`: joint tokens, late fusion, DCA), which says how a mode's features come
  from the backbone and whether "av" combines the "a" and "v" predictions; `build_fusion(cfg)` by
  default, any `fusion.Fusion` when given;
- the task (`tasks.py`: classification, spoof, speaker embedding), which makes the head(s) and says
  what they predict, what the loss is taken on and what evaluation scores;
- the optimizer groups (`optim.task_param_groups`), which `param_groups` returns.

Modes. A mode is the input a prediction is made from: "av" (both modalities), "a" (audio only) or
"v" (video only). The fused mode is "av" when the config uses both modalities, else the single one.
Tokens. The pooling reads the backbone's last hidden state, or with `layer_weights: learned` a
softmax-weighted sum of every hidden state (embedding output and each layer), each layer-normalized
(SUPERB's probe), with one weight vector per pooling branch. With `segment_consistency` the
features of every mode also hold, per listed modality, |first - last| and cos(first, last) of its
first and last `segment_fraction` of time steps, each encoded alone (partial spoofs).

Training. Co-learning (config `co_learning`, both modalities): loss = L_AV + L_A + L_V, each term a
mean over the labelled samples that have the mode's input (L_V skips audio-only samples, ...).
Modality dropout (config `modality_dropout`, training only) removes one modality of an audio-visual
sample, never both, by clearing its presence flag: every path respects presence, so the dropped
modality's tokens are never read.

Labels (`labels` of `forward`): emotion = class index (-1 = unlabelled, ignored); speaker = speaker
index (-1 ignored); spoof = the loader's `is_spoof`, converted inside to BONA_FIDE = 1 / SPOOF = 0
(`tasks.SpoofTask`).

State dict. Head keys: `pools.*`, `heads.*`, `layer_logits.*`, `norms.*` and the fusion's own
parameters under `fusion.` (`fusion.dca.*`, `fusion.late_logits`). Heads saved with the fusion's
parameters at the top level (`dca.*`, `late_logits`) load too (`_load_from_state_dict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from avssl.config import ConfigError
from avssl.pretrain.inputs import AVInputs
from avssl.pretrain.masking import end_segments
from avssl.pretrain.modeling import AVViTModel, masked_mean

from .config import HeadConfig
from .fusion import (
    FUSIONS,
    MODALITY_OF_MODE,
    MODE_OF_MODALITY,
    MODES,
    DCAFusion,
    DCAOutput,
    Encoded,
    Fusion,
    build_fusion,
    present_mean,
)
from .optim import task_param_groups
from .tasks import (
    BONA_FIDE,
    SPOOF,
    AAMSoftmax,
    ClassificationHead,
    Prediction,
    SpeakerHead,
    build_task,
    margin_at,
    masked_cross_entropy,
)


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
# The task model


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


def pooling_branches(fusion: str) -> tuple[str, ...]:
    """The pooling branches (and layer mixes) of a fusion: one per modality when each modality is
    encoded alone (late, dca), one shared otherwise (joint)."""
    return FUSIONS[fusion].pool_branches


# Keys of heads saved with the fusion's parameters at the top level -> their place under `fusion.`.
_MOVED_KEYS = (("dca.", "fusion.dca."), ("late_logits", "fusion.late_logits"))


def _current_key(key: str) -> str:
    for old, new in _MOVED_KEYS:
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old):]
    return key


class _Batch:
    """One call's inputs as the fusion reads them (`fusion.BatchEncoding`); each modality is encoded
    alone at most once (and its end segments once), whichever modes need it."""

    def __init__(self, model: TaskModel, inputs: AVInputs):
        self.model = model
        self.inputs = inputs
        self.cache: dict[Any, Any] = {}

    def available(self, mode: str) -> list[str]:
        modalities = ("audio", "video") if mode == "av" else (MODALITY_OF_MODE[mode],)
        return [m for m in modalities if self.inputs.tensor(m) is not None]

    def present(self, modality: str) -> torch.Tensor:
        return self.inputs.present(modality)

    def alone(self, modality: str) -> Encoded:
        if modality not in self.cache:
            x, present = self.inputs.tensor(modality), self.inputs.present(modality)
            out = self.model._backbone(**{modality: x, f"has_{modality}": present})
            branch = modality if modality in self.model.pools else "shared"
            tokens = self.model._tokens(out, branch)
            self.cache[modality] = Encoded(tokens, out[f"{modality}_token_mask"], out[f"{modality}_embeds"])
        return self.cache[modality]

    def joint(self) -> Encoded:
        x = self.inputs
        out = self.model._backbone(
            audio=x.audio, video=x.video,
            has_audio=x.has_audio if x.audio is not None else None,
            has_video=x.has_video if x.video is not None else None,
        )
        mask = torch.cat([out[f"{m}_token_mask"] for m in self.available("av")], dim=1)  # (B, N)
        return Encoded(self.model._tokens(out, "shared"), mask, out.fused_embeds)

    def pool(
        self, branch: str, tokens: torch.Tensor, mask: torch.Tensor, embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        pooled = self.model.pools[branch](tokens, mask)
        if not self.model.cfg.concat_embedding:
            return pooled
        if embedding is None:
            embedding = self.model.backbone.pool_segment(tokens, mask)
        return torch.cat([pooled, embedding.to(pooled.dtype)], dim=-1)

    def segments(self, modality: str) -> torch.Tensor:
        """`TaskModel.end_segment_features` of the modality's input, computed once."""
        key = ("segments", modality)
        if key not in self.cache:
            x, present = self.inputs.tensor(modality), self.inputs.present(modality)
            self.cache[key] = self.model.end_segment_features(modality, x, present)
        return self.cache[key]


class TaskModel(nn.Module):
    """AVViT backbone + pooling + fusion + task head (see the module docstring).

    TaskModel(backbone: AVViTModel, cfg: HeadConfig, fusion: Fusion | None = None): `fusion`
    defaults to `build_fusion(cfg, width)`; a given one decides the pooling and head branches. With
    `cfg.freeze_backbone` the backbone's parameters are set to requires_grad=False here (linear
    probe) and the backbone stays in eval mode.

    forward(audio, video, has_audio, has_video, labels=None, step=None) -> TaskOutput
      audio [B, T, F] | None, video [B, V, 3, H, W] | None, has_* [B] bool (None = all present when
      the tensor is given). labels [B] int (spoof: the loader's is_spoof). step: sets the AAM margin
      warm-up (`set_step`).
    """

    def __init__(self, backbone: AVViTModel, cfg: HeadConfig, fusion: Fusion | None = None):
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
        self.task = build_task(cfg)
        dim = backbone.config.hidden_size

        branches = fusion.pool_branches if fusion is not None else pooling_branches(cfg.fusion)
        self.pools = nn.ModuleDict({b: build_pooling(cfg.pooling, dim, cfg.asp_bottleneck) for b in branches})
        # Width of the features a head reads: the pooling's, plus D with concat_embedding, plus D + 1
        # per segment-consistency modality.
        self.segment_dim = dim + 1
        self.token_dim = next(iter(self.pools.values())).out_dim + (dim if cfg.concat_embedding else 0)
        self.pooled_dim = pooled_dim = self.token_dim + self.segment_dim * len(cfg.segment_consistency)
        # Built after the poolings and before the heads: the order a seed's random draws initialize
        # them in (tests/test_task_model.py pins the numbers that follow from it).
        self.fusion = fusion if fusion is not None else build_fusion(cfg, dim)
        self.heads = nn.ModuleDict({b: self.task.build_head(pooled_dim) for b in self.fusion.head_branches})
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

    # ---- state ----

    def train(self, mode: bool = True) -> TaskModel:
        """As nn.Module.train, but a frozen backbone stays in eval mode (no dropout / drop-path in a probe)."""
        super().train(mode)
        if self.cfg.freeze_backbone:
            self.backbone.eval()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Loads heads saved with the fusion's parameters at the top level too (`_MOVED_KEYS`)."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            current = _current_key(key[len(prefix):])
            if prefix + current != key:
                state_dict[prefix + current] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_step(self, step: int) -> None:
        """Set the training step: the heads follow it (speaker: the AAM margin warm-up, `margin_at`)."""
        self.step = int(step)
        for head in self.heads.values():
            head.set_step(self.step)

    @property
    def margin(self) -> float:
        """Current AAM margin (speaker task; 0 for the others)."""
        return next(iter(self.heads.values())).margin

    @property
    def late_logits(self) -> nn.Parameter | None:
        """Late fusion's learned (audio, video) weight logits; None for equal weights or another fusion."""
        return getattr(self.fusion, "late_logits", None)

    def late_weights(self) -> torch.Tensor | None:
        """Late fusion's (audio, video) weights, summing to 1; None = equal (the plain mean)."""
        return self.fusion.weights()

    def layer_weights(self, branch: str) -> torch.Tensor | None:
        """The layer mix of `branch` ("audio", "video" or "shared"): [num_layers + 1] summing to 1,
        index 0 = embedding output; None when the head reads the last layer."""
        return None if self.layer_logits is None else torch.softmax(self.layer_logits[branch].float(), dim=0)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups (`optim.task_param_groups`)."""
        return task_param_groups(self, weight_decay)

    # ---- inputs ----

    def _inputs(self, audio, video, has_audio, has_video) -> AVInputs:
        """The modalities this model uses as one `AVInputs`; presence False wherever a tensor is missing."""
        audio = audio if "audio" in self.cfg.modalities else None
        video = video if "video" in self.cfg.modalities else None
        if audio is None and video is None:
            raise ValueError(f"TaskModel uses {self.cfg.modalities} but got none of them")
        return AVInputs.of(audio, video, has_audio, has_video)

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
        return self.task.targets(labels)

    # ---- reading the backbone ----

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

    def _features(self, mode: str, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features [B, P] and presence [B] of `mode` (a feature mode of the fusion): the
        fusion's pooled features (zeros when the mode has none of its inputs), then the segment
        consistency of each `segment_consistency` modality (zeros where the mode or sample lacks it)."""
        available = batch.available(mode)
        if mode == "av":
            present = batch.present("audio") | batch.present("video")
        else:
            present = batch.present(MODALITY_OF_MODE[mode])
        if available:
            pooled = self.fusion(mode, batch)
        else:
            ref = next(x for x in (batch.inputs.audio, batch.inputs.video) if x is not None)
            pooled = ref.new_zeros(ref.shape[0], self.token_dim, dtype=torch.float32)
        if not self.cfg.segment_consistency:
            return pooled, present
        in_mode = ("audio", "video") if mode == "av" else (MODALITY_OF_MODE[mode],)
        parts = [pooled]
        for modality in self.cfg.segment_consistency:
            if modality not in in_mode or batch.inputs.tensor(modality) is None:
                parts.append(pooled.new_zeros(pooled.shape[0], self.segment_dim))
            else:
                parts.append(batch.segments(modality).to(pooled.dtype))
        return torch.cat(parts, dim=-1), present

    def _compute(self, inputs: AVInputs, modes: Sequence[str]) -> dict[str, Prediction]:
        """The prediction of each mode in `modes` (a fusion that combines predictions also computes
        "a" and "v" for "av")."""
        combines = self.fusion.combines_predictions
        need = set(modes) | ({"a", "v"} if combines and "av" in modes else set())
        batch = _Batch(self, inputs)
        results: dict[str, Prediction] = {}
        for mode in ("a", "v", "av"):  # unimodal first: a combined "av" is made of them
            if mode not in need:
                continue
            if combines and mode == "av":
                results[mode] = self.fusion.combine(self.task, results["a"], results["v"])
                continue
            features, present = self._features(mode, batch)
            if mode in self.norms:
                features = self.norms[mode](features, present)
            results[mode] = self.task.predict(self.heads[self.fusion.head_branch(mode)], features, present)
        return results

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
        inputs = self._inputs(audio, video, has_audio, has_video)
        inputs = inputs.with_presence(*self.drop_modalities(inputs.has_audio, inputs.has_video))
        co_learn = self.cfg.co_learning and self.both
        labelled = self.training or labels is not None
        unimodal = self.both and (self.fusion.combines_predictions or (co_learn and labelled))
        modes = ("av", "a", "v") if unimodal else (self.fused_mode,)
        results = self._compute(inputs, modes)

        fused = results[self.fused_mode]
        out = TaskOutput(
            logits=fused.logits,
            embeddings=self.task.embeddings(fused),
            per_modality={mode: self.task.per_modality(r) for mode, r in results.items()},
        )
        if labels is not None:
            targets = self.targets(labels.to(fused.logits.device))
            for mode in ("av", "a", "v") if co_learn else (self.fused_mode,):
                result = results[mode]
                out.loss_parts[mode] = masked_cross_entropy(
                    result.loss_logits(targets), targets, result.present, self.class_weights, self.cfg.label_smoothing
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
        result = self._compute(self._inputs(audio, video, has_audio, has_video), (mode,))[mode]
        return F.normalize(result.embedding.float(), dim=-1)

    @torch.no_grad()
    def scores(
        self,
        audio: torch.Tensor | None = None,
        video: torch.Tensor | None = None,
        has_audio: torch.Tensor | None = None,
        has_video: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Evaluation scores of the fused mode: emotion -> class probabilities [B, C]; spoof -> bona fide
        probability [B] (higher = bona fide); speaker -> normalized embeddings [B, E] (as `embed`)."""
        inputs = self._inputs(audio, video, has_audio, has_video)
        return self.task.scores(self._compute(inputs, (self.fused_mode,))[self.fused_mode])


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
    return F.normalize(present_mean(units, [has_audio, has_video]), dim=-1)


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
    "pooling_branches",
    "zero_shot_embeddings",
]
