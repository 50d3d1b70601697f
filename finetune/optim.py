"""Optimizer parameter groups of a finetuning model (`heads.TaskModel`), from its `HeadConfig`.

In order: the backbone's layer-decayed groups (`pretrain.lr_decay.param_groups_lrd`: lr_scale
layer_decay ** (L + 1 - layer id); none when the backbone is frozen), then the head's (pooling,
fusion, task heads) at `head_lr_scale`, matrices decayed and vectors (biases, norms) not, then late
fusion's modality logits at `head_lr_scale * late_weights_lr_scale` and the layer-mix logits at
`head_lr_scale * layer_weights_lr_scale`, both without decay. Every trainable parameter appears
exactly once; each group has `params`, `weight_decay` and `lr_scale`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from avssl.pretrain.lr_decay import param_groups_lrd

if TYPE_CHECKING:
    from .heads import TaskModel


def task_param_groups(model: TaskModel, weight_decay: float) -> list[dict[str, Any]]:
    """The optimizer groups of `model` (see the module docstring)."""
    cfg = model.cfg
    groups = [] if cfg.freeze_backbone else param_groups_lrd(model.backbone, weight_decay, cfg.layer_decay)
    late = [] if model.late_logits is None else [model.late_logits]
    mixing = [] if model.layer_logits is None else list(model.layer_logits.values())
    own_group = {id(p) for p in [*late, *mixing]}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if name.startswith("backbone.") or not param.requires_grad or id(param) in own_group:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if params:
            groups.append({"params": params, "weight_decay": wd, "lr_scale": cfg.head_lr_scale})
    for params, scale in ((late, cfg.late_weights_lr_scale), (mixing, cfg.layer_weights_lr_scale)):
        if params:
            groups.append({"params": params, "weight_decay": 0.0, "lr_scale": cfg.head_lr_scale * scale})
    return groups


__all__ = ["task_param_groups"]
