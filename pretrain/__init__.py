"""avssl.pretrain: the shared audio-visual ViT (AVViT), its masking, objectives and run-config sections.

Importing this package registers the "avvit" model type with transformers' Auto classes, so a released
checkpoint directory loads with `AutoModel.from_pretrained(dir)` (the encoder, `AVViTModel`) or
`AutoModelForPreTraining.from_pretrained(dir)` (encoder + decoder + objectives).

Trainer entry points: `build_model(ModelConfig, MaskingConfig, LossConfig) -> AVViTForPretraining`,
`param_groups_lrd(model, weight_decay, layer_decay)`.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from .config import LossConfig, MaskingConfig, ModelConfig, ViewMaskingConfig, build_model
from .configuration import AVViTConfig
from .lr_decay import param_groups_lrd
from .modeling import (
    AVViTForPretraining,
    AVViTForPretrainingOutput,
    AVViTModel,
    AVViTModelOutput,
    AVViTPreTrainedModel,
    eager_attention_forward,
)
from .registry import (
    ARCHITECTURES,
    avvit_base_patch16,
    avvit_config,
    avvit_large_patch16,
    avvit_small_patch16,
    avvit_tiny_patch16,
)

AutoConfig.register(AVViTConfig.model_type, AVViTConfig, exist_ok=True)
AutoModel.register(AVViTConfig, AVViTModel, exist_ok=True)
AutoModelForPreTraining.register(AVViTConfig, AVViTForPretraining, exist_ok=True)

__all__ = [
    "ARCHITECTURES",
    "AVViTConfig",
    "AVViTForPretraining",
    "AVViTForPretrainingOutput",
    "AVViTModel",
    "AVViTModelOutput",
    "AVViTPreTrainedModel",
    "LossConfig",
    "MaskingConfig",
    "ModelConfig",
    "ViewMaskingConfig",
    "avvit_base_patch16",
    "avvit_config",
    "avvit_large_patch16",
    "avvit_small_patch16",
    "avvit_tiny_patch16",
    "build_model",
    "eager_attention_forward",
    "param_groups_lrd",
]
