"""`configs/finetune/*.yaml`: a finetuning run on the same runner as pretraining.

The recipe shares the data, features, optim, deepspeed, trainer and mlflow sections with
pretraining, and adds the task head, where the backbone comes from (`init`) and evaluation.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from avssl.cluster.config import DeepSpeedConfig, MlflowConfig, OptimConfig, TrainerConfig, model_inputs_from_data
from avssl.config import Section
from avssl.data.features import FeatureConfig
from avssl.data.loader import DataConfig
from avssl.finetune.config import HeadConfig
from avssl.finetune.labels import LabelConfig
from avssl.pretrain.config import ModelConfig


class InitConfig(Section):
    """Where the backbone comes from (`avssl finetune --init SOURCE` sets `source`)."""

    source: str | None = Field(
        None,
        description="a released checkpoint directory, a pretraining run directory (its latest checkpoint), "
        "or an MLflow model URI models:/NAME/VERSION; null: random initialization of `model` (the baseline)",
    )


class EvalConfig(Section):
    """Evaluation after training (and by `avssl evaluate`)."""

    split: str = Field("test", description="split the model is evaluated on")
    trials: str | None = Field(None, description="speaker task: VoxCeleb-format trial list, relative to the corpus")
    batch_size: int = Field(16, ge=1, description="clips per evaluation batch")
    modes: list[str] = Field(default_factory=lambda: ["av", "a", "v"], description="modalities to report: av, a, v")
    as_norm_cohort: int = Field(0, ge=0, description="speaker task: AS-Norm top-N cohort size (0: off)")


class FinetuneRecipe(Section):
    """`configs/finetune/*.yaml`: everything one finetuning run needs, on the pretraining runner."""

    data: DataConfig = Field(default_factory=DataConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    head: HeadConfig
    init: InitConfig = Field(default_factory=InitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(base_lr=5e-4, warmup_steps=20))
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = Field(default_factory=lambda: TrainerConfig(name="finetune", total_steps=100))
    mlflow: MlflowConfig = Field(default_factory=lambda: MlflowConfig(experiment="avssl-finetune"))
    eval: EvalConfig = Field(default_factory=EvalConfig)
    labels: LabelConfig = Field(default_factory=LabelConfig)

    @model_validator(mode="before")
    @classmethod
    def _classes_follow_labels(cls, data: Any) -> Any:
        """An emotion head without an explicit num_classes gets one class per labels.names entry."""
        if not isinstance(data, dict):
            return data
        head, labels = data.get("head"), data.get("labels")
        if (isinstance(head, dict) and head.get("task") == "emotion" and head.get("num_classes") is None
                and isinstance(labels, dict) and isinstance(labels.get("names"), list)):
            data = {**data, "head": {**head, "num_classes": len(labels["names"])}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _model_inputs_from_data(cls, raw: Any) -> Any:
        return model_inputs_from_data(raw)

    @model_validator(mode="after")
    def _inputs_match_model(self) -> "FinetuneRecipe":
        f, m = self.features, self.model
        pairs = [
            ("model.audio_num_mel_bins", m.audio_num_mel_bins, "features.num_mel_bins", f.num_mel_bins),
            ("model.video_image_size", m.video_image_size, "features.image_size", f.image_size),
            ("model.video_num_frames", m.video_num_frames, "features.num_frames", f.num_frames),
        ]
        for key, got, source, want in pairs:
            if got != want:
                raise ValueError(f"{key}={got} does not match {source}={want}; set {key}={want}")
        if self.head.task != "emotion" and not self.labels.is_default():
            raise ValueError(f"labels sets emotion classes, but head.task is {self.head.task!r}: remove the labels section")
        if self.head.task == "emotion" and self.head.num_classes != len(self.labels.class_names()):
            raise ValueError(f"head.num_classes={self.head.num_classes} but labels.names has {len(self.labels.class_names())} "
                             "classes; leave head.num_classes out (it follows labels.names) or make them agree")
        for modality in self.head.modalities:
            if modality not in self.data.modalities:
                raise ValueError(f"head.modalities uses {modality} but data.modalities={self.data.modalities} does not load it")
        return self
