"""Config sections owned by the cluster layer: optimizer, DeepSpeed, Ray trainer, MLflow.

`PretrainRecipe` composes them with the data, feature and model sections into one run recipe
(`configs/pretrain/*.yaml`). Values derived from several sections (world size, effective batch,
absolute learning rate) are computed once in `derive()` and logged with the run.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from avssl.config import Section
from avssl.data.features import FeatureConfig
from avssl.data.loader import DataConfig
from avssl.pretrain.config import LossConfig, MaskingConfig, ModelConfig


class OptimConfig(Section):
    """AdamW with linear warmup and cosine decay (MAE's recipe)."""

    base_lr: float = Field(1.5e-4, gt=0, description="learning rate per 256 samples; absolute lr = base_lr x batch / 256")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay; norms, biases, positions and tokens get none (MAE)")
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.95], min_length=2, max_length=2, description="AdamW (beta1, beta2)")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    warmup_steps: int = Field(100, ge=0, description="steps of linear warmup to the peak lr, before the cosine decay")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of the peak lr")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm (0: off)")


class DeepSpeedConfig(Section):
    """Engine settings; the DeepSpeed JSON is generated from these (cluster/engine.py)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        1, description="ZeRO stage: 0 off; 1 shards optimizer states, 2 also gradients, 3 also parameters"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    activation_checkpointing: bool = Field(False, description="recompute layer activations in backward to save memory")


class TrainerConfig(Section):
    """Ray Train workers, the step loop, checkpoints."""

    name: str = Field("demo", min_length=1, description="run name: the same name resumes the run")
    storage_path: str = Field("runs", description="checkpoints and run state (shared storage on multi-node clusters)")
    num_workers: int = Field(2, ge=1, description="training workers (ranks), or the maximum when elastic")
    min_workers: int | None = Field(None, ge=1, description="set for elastic training: (min_workers, num_workers)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per worker")
    gpus_per_worker: float = Field(0.0, ge=0, description="0: CPU training with gloo")
    max_failures: int = Field(3, ge=-1, description="worker-group restarts from the last checkpoint (-1: forever)")
    total_steps: int = Field(200, ge=1, description="optimizer steps of the whole run (a resumed run continues to it)")
    log_every: int = Field(10, ge=1, description="steps between metric reductions and logging")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(3, ge=1, description="most recent checkpoints kept in storage")
    seed: int = Field(0, description="seed of the model initialization and of the masks")
    export: bool = Field(True, description="write a released checkpoint directory at the end")

    @model_validator(mode="after")
    def _elastic(self) -> "TrainerConfig":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must be <= num_workers ({self.num_workers})")
        return self


class MlflowConfig(Section):
    """Tracking: MLFLOW_TRACKING_URI or tracking_uri; default a SQLite store next to the runs."""

    tracking_uri: str | None = Field(
        None, description="null: MLFLOW_TRACKING_URI, else sqlite:///<trainer.storage_path>/mlflow.db"
    )
    experiment: str = Field("avssl-pretrain", description="MLflow experiment name")
    run_name: str | None = Field(None, description="default: trainer.name")
    tags: dict[str, str] = Field(default_factory=dict, description="extra tags set on the MLflow run")
    register_model: str | None = Field(None, description="register the released checkpoint under this name")
    retries: int = Field(3, ge=0, description="attempts per call before a metric batch is dropped")
    timeout_s: float = Field(10.0, gt=0, description="HTTP timeout per tracking call")


# The model's input sizes and the data section that sets each of them.
MODEL_INPUTS = {
    "audio_num_mel_bins": "features.num_mel_bins",
    "video_image_size": "features.image_size",
    "video_num_frames": "features.num_frames",
    "audio_num_frames": "data.clip_seconds",
}


def model_inputs_from_data(raw: Any, keys: tuple[str, ...] = tuple(MODEL_INPUTS)) -> Any:
    """A recipe's `model` input sizes have one source, what the data pipeline produces: each of `keys`
    absent from `model` is filled from `features` (and `data.clip_seconds` for the fbank frames). A
    value the recipe does set is kept, and the recipe's check names it if it disagrees. Sections that
    do not validate are left alone: their own validation reports them."""
    if not isinstance(raw, dict):
        return raw
    model = raw.get("model") or {}
    if not isinstance(model, dict) or all(k in model for k in keys):
        return raw
    try:
        f = FeatureConfig.model_validate(raw.get("features") or {})
        data = DataConfig.model_validate(raw.get("data") or {})
    except (ValueError, TypeError):
        return raw
    derived = {
        "audio_num_mel_bins": f.num_mel_bins,
        "video_image_size": f.image_size,
        "video_num_frames": f.num_frames,
        "audio_num_frames": f.num_audio_frames(data.clip_seconds),
    }
    return {**raw, "model": {**{k: derived[k] for k in keys if k not in model}, **model}}


class PretrainRecipe(Section):
    """`configs/pretrain/*.yaml`: everything one pretraining run needs."""

    data: DataConfig = Field(default_factory=DataConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @model_validator(mode="before")
    @classmethod
    def _model_inputs_from_data(cls, raw: Any) -> Any:
        return model_inputs_from_data(raw)

    @model_validator(mode="after")
    def _inputs_match_model(self) -> "PretrainRecipe":
        """The model's input geometry must be what the data pipeline produces."""
        f, m = self.features, self.model
        frames = f.num_audio_frames(self.data.clip_seconds)
        pairs = [
            ("model.audio_num_mel_bins", m.audio_num_mel_bins, "features.num_mel_bins", f.num_mel_bins),
            ("model.video_image_size", m.video_image_size, "features.image_size", f.image_size),
            ("model.video_num_frames", m.video_num_frames, "features.num_frames", f.num_frames),
            ("model.audio_num_frames", m.audio_num_frames, f"frames in data.clip_seconds={self.data.clip_seconds}", frames),
        ]
        for key, got, source, want in pairs:
            if got != want:
                raise ValueError(f"{key}={got} does not match {source}={want}; set {key}={want}")
        if self.loss.segment_weight > 0 and "video" in self.data.modalities and m.video_num_frames < 2:
            raise ValueError(f"loss.segment_weight={self.loss.segment_weight} splits each clip's frames in two halves, "
                             f"but model.video_num_frames={m.video_num_frames}; set it (and features.num_frames) to 2 or "
                             "more, or loss.segment_weight=0")
        return self


def derive(recipe: PretrainRecipe, world_size: int) -> dict[str, Any]:
    """Values computed from several sections, once (MAE's main_pretrain.py): log them with the run."""
    micro = recipe.data.batch_size
    effective = micro * recipe.deepspeed.grad_accum * world_size
    return {
        "world_size": world_size,
        "micro_batch_per_rank": micro,
        "effective_batch": effective,
        "absolute_lr": recipe.optim.base_lr * effective / 256,
        "steps_per_epoch": recipe.data.steps_per_epoch,
    }
