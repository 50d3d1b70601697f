"""Run-config section of the fine-tuning heads: `HeadConfig` (owned by `avssl.finetune.heads.TaskModel`).

Defaults and where they come from:
- task defaults: emotion = 6 classes (CREMA-D: ANG DIS FEA HAP NEU SAD), mean pooling; spoof = 2 classes
  (class 1 = bona fide, class 0 = spoof, see heads.py), mean pooling; speaker = AAM-softmax (margin 0.2,
  scale 30) on a 192-d embedding over attentive statistics pooling (WeSpeaker / ECAPA practice). The
  speaker count is not known to the recipe: the runner sets `num_classes` from the training list.
- fusion: "joint" (one audio-visual sequence through the shared backbone, as pretraining's
  reconstruction view); "late" (each modality encoded alone with its own head, scores averaged);
  "dca" (gated dynamic cross-attention, arXiv:2403.04661, temperature 0.1).
- co-learning (L_AV + L_A + L_V) on whenever both modalities are used, so each modality alone keeps
  working (the seed paper's interactive co-learning).
- optimization: layer-wise LR decay 0.75 (MAE / BEiT fine-tuning), head at the full rate.

A value left out of a recipe takes the task's default (`num_classes`, `pooling`) or follows
`modalities` (`co_learning` is off by default for a single modality); a value set explicitly is checked.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from avssl.config import Section

Task = Literal["emotion", "speaker", "spoof"]
Modality = Literal["audio", "video"]
Fusion = Literal["joint", "late", "dca"]
Pooling = Literal["mean", "asp"]

# Fixed class counts of the tasks whose label set is known in advance (speaker: set by the runner).
DEFAULT_NUM_CLASSES: dict[str, int | None] = {"emotion": 6, "speaker": None, "spoof": 2}
DEFAULT_POOLING: dict[str, str] = {"emotion": "mean", "speaker": "asp", "spoof": "mean"}

Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class HeadConfig(Section):
    """A task head on the AVViT backbone: task, inputs, fusion, pooling, loss and optimizer scales."""

    task: Task = Field(description="emotion, speaker or spoof")
    num_classes: Annotated[int, Field(ge=2)] | None = Field(
        None,
        description="output classes; null: the task's (emotion: one per labels.names, spoof: 2 with 1 = bona fide, "
        "speaker: the training speakers, set by the runner)",
    )
    modalities: list[Modality] = Field(
        default_factory=lambda: ["audio", "video"], min_length=1, max_length=2, description="inputs the model uses"
    )
    fusion: Fusion = Field(
        "joint",
        description="joint: audio and video tokens in one backbone sequence, pooled; late: each modality encoded "
        "alone with its own head, log-probs or cosine scores averaged over the modalities a sample has; dca: each "
        "encoded alone, then gated dynamic cross-attention over both token sequences, pooled features averaged",
    )
    # Why learned: one modality far more reliable than the other (the demo's video speaker EER
    # 2-5 % against audio's 40 %) is then not pulled towards the other.
    late_weights: Literal["equal", "learned"] = Field(
        "equal",
        description="late fusion's modality weights: equal (mean over the modalities a sample has) or learned "
        "(softmax of one logit per modality, trained by the AV loss, renormalized over the present modalities)",
    )
    # Adam moves a parameter by about its LR per step, so at the demo probe's absolute LR (2.5e-3)
    # 100 steps move a logit by 0.25 at most and the weights cannot leave 0.44-0.56 (measured: 0.55
    # for video); x100 lets them settle within a short finetuning run.
    late_weights_lr_scale: Annotated[float, Field(gt=0.0)] = Field(
        100.0, description="learning rate of the late-fusion logits relative to the head's"
    )
    # Lower layers keep local detail (colour, texture) that the last one may abstract away.
    layer_weights: Literal["last", "learned"] = Field(
        "last",
        description="layers the head reads: last (the final, normed output) or learned (SUPERB's probe: a "
        "softmax-weighted sum of the embedding output and every layer's layer-normalized output, one weight "
        "vector per branch)",
    )
    layer_weights_lr_scale: Annotated[float, Field(gt=0.0)] = Field(
        100.0, description="learning rate of the layer weights relative to the head's"
    )
    pooling: Pooling = Field(
        "mean", description="token pooling: mean of the real tokens, or asp (attentive statistics: mean and std, "
        "ECAPA); left out of a recipe: asp for speaker, mean otherwise"
    )
    # The pretraining contrast puts identity into the CLS output, which a short probe on token
    # statistics alone may not find (demo: zero-shot audio EER 30 % against 41 % for the head).
    concat_embedding: bool = Field(
        False,
        description="append the backbone's own pooled embedding of each modality (the CLS output, else the token "
        "mean: what zero-shot verification reads) to the pooled features, as DINOv2's linear probe does",
    )
    # A clip whose voice (or face) changes part-way differs between its ends, which a pooling over
    # the whole clip averages away (PartialSpoof).
    segment_consistency: list[Modality] = Field(
        default_factory=list,
        max_length=2,
        description="modalities whose first and last segment_fraction of time steps are also encoded, each alone; "
        "the head reads |first - last| and their cosine beside the pooled tokens (D + 1 features per modality)",
    )
    # 1/3: a splice anywhere in the middle third leaves the first third wholly before and the last
    # wholly after it.
    segment_fraction: Annotated[float, Field(gt=0.0, le=0.5)] = Field(
        1 / 3, description="share of the time steps in each compared end (at most 0.5: the two never overlap)"
    )
    asp_bottleneck: Annotated[int, Field(ge=1)] = Field(
        128, description="channels of the attention bottleneck of attentive statistics pooling (ECAPA-TDNN: 128)"
    )
    embedding_dim: Annotated[int, Field(ge=1)] = Field(192, description="speaker embedding size (ECAPA, WeSpeaker: 192)")
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.1, description="dropout on the pooled features before the classifier or embedding layer"
    )
    dca_temperature: Annotated[float, Field(gt=0.0)] = Field(
        0.1, description="gate temperature of the DCA head (arXiv:2403.04661: 0.1; lower: a harder choice per token)"
    )
    aam_margin: Annotated[float, Field(ge=0.0, lt=math.pi / 2)] = Field(
        0.2, description="speaker: additive angular margin in radians (WeSpeaker: 0.2)"
    )
    aam_scale: Annotated[float, Field(gt=0.0)] = Field(30.0, description="speaker: AAM-softmax scale (WeSpeaker: 32)")
    margin_warmup_steps: Annotated[int, Field(ge=0)] = Field(
        0, description="speaker: steps over which the margin rises linearly from 0 to aam_margin; 0: full from the start"
    )
    class_weights: list[Annotated[float, Field(gt=0.0)]] | None = Field(
        None, description="loss weight per class (e.g. inverse class frequency); null: unweighted"
    )
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(0.0, description="label smoothing of the cross-entropy")
    modality_dropout: Probability = Field(
        0.0,
        description="training: probability that an audio-visual sample loses one of its modalities (either, "
        "50/50; never both). AV-HuBERT pretrains with 0.5",
    )
    co_learning: bool = Field(
        True,
        description="loss = L_AV + L_A + L_V, so each modality alone keeps working; needs both modalities "
        "(off by default for one)",
    )
    freeze_backbone: bool = Field(False, description="linear probe: backbone weights frozen and kept in eval mode")
    # Frozen features have per-dimension offsets and scales far apart, which plain SGD on a linear
    # layer handles badly (MAE's linear-probe practice).
    feature_norm: Literal["batchnorm", "none"] = Field(
        "batchnorm",
        description="batchnorm: BatchNorm without affine over the samples that have the mode's input, one per mode "
        "(AV, A, V), before the task head; none: pooled features as they are",
    )
    layer_decay: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.75, description="layer-wise learning-rate decay of the backbone in full finetuning (1.0: none)"
    )
    head_lr_scale: Annotated[float, Field(gt=0.0)] = Field(1.0, description="learning rate of the head relative to optim.base_lr")

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """Fill what a recipe left out from the task and the modalities (at construction only)."""
        if not isinstance(data, dict):
            return data
        task = data.get("task")
        data = dict(data)
        if data.get("num_classes") is None and task in DEFAULT_NUM_CLASSES:
            data["num_classes"] = DEFAULT_NUM_CLASSES[task]
        if "pooling" not in data and task in DEFAULT_POOLING:
            data["pooling"] = DEFAULT_POOLING[task]
        modalities = data.get("modalities")
        if "co_learning" not in data and isinstance(modalities, list) and len(set(modalities)) < 2:
            data["co_learning"] = False
        return data

    @model_validator(mode="after")
    def _consistent(self) -> HeadConfig:
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities {self.modalities} lists a modality twice")
        both = self.both_modalities
        if self.fusion in ("late", "dca") and not both:
            raise ValueError(
                f"fusion {self.fusion!r} combines two modalities but modalities is {self.modalities}: "
                "use modalities: [audio, video] or fusion: joint"
            )
        if self.late_weights == "learned" and self.fusion != "late":
            raise ValueError(
                f"late_weights: 'learned' weights late fusion's modality scores, but fusion is {self.fusion!r}: "
                "set fusion: late or late_weights: equal"
            )
        unused = sorted(set(self.segment_consistency) - set(self.modalities))
        if unused or len(set(self.segment_consistency)) != len(self.segment_consistency):
            raise ValueError(
                f"segment_consistency {self.segment_consistency} must list each of the used modalities "
                f"{self.modalities} at most once"
            )
        if self.co_learning and not both:
            raise ValueError(
                f"co_learning trains L_AV + L_A + L_V and needs both modalities (got {self.modalities}): "
                "set co_learning: false"
            )
        if self.modality_dropout > 0 and not both:
            raise ValueError(f"modality_dropout drops one of two modalities (got {self.modalities}): set it to 0")
        if self.task == "emotion" and self.num_classes is None:
            raise ValueError("num_classes: the emotion task needs a class count (CREMA-D: 6)")
        if self.task == "spoof" and self.num_classes != 2:
            raise ValueError(f"num_classes: the spoof task has 2 classes (bona fide, spoof), not {self.num_classes}")
        weights = self.class_weights
        if weights is not None and self.num_classes is not None and len(weights) != self.num_classes:
            raise ValueError(f"class_weights: {len(weights)} values for num_classes={self.num_classes}, need one per class")
        return self

    @property
    def both_modalities(self) -> bool:
        return set(self.modalities) == {"audio", "video"}


__all__ = ["DEFAULT_NUM_CLASSES", "DEFAULT_POOLING", "HeadConfig"]
