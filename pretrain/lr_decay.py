"""Parameter groups for layer-wise learning-rate decay (MAE's `lr_decay.py`, BEiT's recipe).

Layer ids of the AVViT encoder found in `model` (a bare `AVViTModel`, `AVViTForPretraining`, or a
fine-tuning head that holds one): 0 = embeddings (patch embeddings, positions, modality and CLS
tokens), i + 1 = block i, num_layers + 1 = everything after the blocks (final norms, decoder, heads,
temperature). Group lr_scale = layer_decay ** (num_layers + 1 - layer_id): the head trains at the full
rate, the embeddings at layer_decay ** (num_layers + 1).

Weight decay applies to the weight matrices of Linear and Conv layers only; norms, biases,
positional/modality/CLS/mask tokens and the temperature get none (MAE: ndim == 1 or the
`no_weight_decay` token list). Frozen parameters (e.g. fixed sin-cos positions) are left out.
The trainer's scheduler sets `group["lr"] = lr * group["lr_scale"]`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .modeling import AVViTModel


def _find_encoder(model: nn.Module) -> tuple[str, AVViTModel]:
    for name, module in model.named_modules():
        if isinstance(module, AVViTModel):
            return (name + ".") if name else "", module
    raise ValueError(f"{type(model).__name__} holds no AVViTModel: layer-wise decay needs the encoder's depth")


def _decayed_parameter_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def layer_id(name: str, prefix: str, num_layers: int) -> int:
    """Layer id of a parameter name (see module docstring)."""
    if name.startswith(prefix + "embeddings."):
        return 0
    if name.startswith(prefix + "layers."):
        return int(name[len(prefix) + len("layers.") :].split(".", 1)[0]) + 1
    return num_layers + 1


def param_groups_lrd(
    model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.75
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: one per (layer id, decay / no decay), each with `params`,
    `weight_decay` and `lr_scale`. Every trainable parameter appears in exactly one group."""
    prefix, encoder = _find_encoder(model)
    num_layers = len(encoder.layers)
    decayed = _decayed_parameter_names(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid = layer_id(name, prefix, num_layers)
        decay = name in decayed
        key = (lid, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (num_layers + 1 - lid),
            }
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


__all__ = ["layer_id", "param_groups_lrd"]
