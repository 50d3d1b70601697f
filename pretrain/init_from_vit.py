"""Initialize the shared AVViT backbone from an image ViT checkpoint in Hugging Face format.

Accepted: a directory (or hub id, where a hub is reachable) of `ViTModel`, `ViTForImageClassification`,
`ViTMAEModel` or `ViTMAEForPreTraining` (model_type "vit" or "vit_mae"). It is read with
`AutoModel.from_pretrained`, so legacy key names (`encoder.layer.N.attention.attention.query`) are
converted by transformers itself. Mapping (AVSiam / CAV-MAE / AST):
- blocks: q/k/v -> fused qkv (concatenated), o -> proj, fc1/fc2, layernorm_before/after -> norm1/norm2
  (copied into every per-modality norm), final layernorm -> final norm(s);
- video patch embedding <- RGB patch embedding; audio patch embedding <- the RGB kernel averaged over
  the three channels, same bias;
- positional embedding (without the CLS position) resized with 2-D bicubic interpolation to the
  audio grid (frequency x time) and to the video spatial grid; the frame embedding is zeroed so that
  a single face frame sees exactly the image model's positions;
- CLS token (+ its position) -> both modality CLS tokens when `use_cls_token`.
Modality embeddings and the decoder keep their own initialization. The image model's LayerNorm
epsilon (1e-12 for ViT, 1e-6 for MAE) is not copied: AVViT keeps its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .modeling import AVViTModel, resize_position_embedding

SUPPORTED_MODEL_TYPES = ("vit", "vit_mae")


@dataclass
class VitInitReport:
    """What was copied: our parameter names that received image-ViT weights, and those left as initialized."""

    source: str
    loaded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def _check_compatible(model: AVViTModel, vit_config) -> None:
    cfg = model.config
    problems = []
    for ours, theirs in (
        ("hidden_size", "hidden_size"),
        ("num_hidden_layers", "num_hidden_layers"),
        ("num_attention_heads", "num_attention_heads"),
        ("intermediate_size", "intermediate_size"),
        ("hidden_act", "hidden_act"),
    ):
        if getattr(cfg, ours) != getattr(vit_config, theirs):
            problems.append(f"{ours}: AVViT {getattr(cfg, ours)} vs ViT {getattr(vit_config, theirs)}")
    patch = vit_config.patch_size if isinstance(vit_config.patch_size, int) else vit_config.patch_size[0]
    if cfg.audio_patch_size != patch or cfg.video_patch_size != patch:
        problems.append(f"patch size: AVViT audio {cfg.audio_patch_size} / video {cfg.video_patch_size} vs ViT {patch}")
    if getattr(vit_config, "num_channels", 3) != 3:
        problems.append(f"ViT num_channels {vit_config.num_channels} (RGB expected)")
    if problems:
        raise ValueError("image ViT checkpoint does not match the AVViT architecture: " + "; ".join(problems))


@torch.no_grad()
def load_vit_weights(model: AVViTModel, path: str | Path) -> VitInitReport:
    """Copy an image ViT's weights into `model` (in place); see the module docstring for the mapping."""
    from transformers import AutoConfig, AutoModel

    vit_config = AutoConfig.from_pretrained(str(path))
    if vit_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: model_type {vit_config.model_type!r} is not an image ViT ({SUPPORTED_MODEL_TYPES})")
    _check_compatible(model, vit_config)
    extra = {"add_pooling_layer": False} if vit_config.model_type == "vit" else {}  # the pooler is not used
    vit = AutoModel.from_pretrained(str(path), dtype=torch.float32, **extra)
    src = vit.state_dict()
    cfg = model.config
    dim = cfg.hidden_size
    norm_names = ("audio", "video") if cfg.separate_modality_norms else ("shared",)
    new: dict[str, torch.Tensor] = {}

    for i in range(cfg.num_hidden_layers):
        s, d = f"layers.{i}.", f"layers.{i}."
        q, k, v = (src[f"{s}attention.{n}_proj.weight"] for n in ("q", "k", "v"))
        new[f"{d}attention.qkv.weight"] = torch.cat([q, k, v], dim=0)  # (3D, D)
        if cfg.qkv_bias:
            biases = [src.get(f"{s}attention.{n}_proj.bias", torch.zeros(dim)) for n in ("q", "k", "v")]
            new[f"{d}attention.qkv.bias"] = torch.cat(biases, dim=0)  # (3D,)
        new[f"{d}attention.proj.weight"] = src[f"{s}attention.o_proj.weight"]
        new[f"{d}attention.proj.bias"] = src[f"{s}attention.o_proj.bias"]
        for name in ("fc1", "fc2"):
            new[f"{d}mlp.{name}.weight"] = src[f"{s}mlp.{name}.weight"]
            new[f"{d}mlp.{name}.bias"] = src[f"{s}mlp.{name}.bias"]
        for ours, theirs in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            for n in norm_names:
                new[f"{d}{ours}.{n}.weight"] = src[f"{s}{theirs}.weight"]
                new[f"{d}{ours}.{n}.bias"] = src[f"{s}{theirs}.bias"]
    for n in norm_names:
        new[f"norm.{n}.weight"] = src["layernorm.weight"]
        new[f"norm.{n}.bias"] = src["layernorm.bias"]

    rgb = src["embeddings.patch_embeddings.projection.weight"]  # (D, 3, p, p)
    bias = src["embeddings.patch_embeddings.projection.bias"]
    new["embeddings.video_patch_embed.weight"] = rgb
    new["embeddings.video_patch_embed.bias"] = bias
    new["embeddings.audio_patch_embed.weight"] = rgb.mean(dim=1, keepdim=True)  # (D, 1, p, p)
    new["embeddings.audio_patch_embed.bias"] = bias

    pos = src["embeddings.position_embeddings"]  # (1, 1 + g*g, D)
    side = int(round((pos.shape[1] - 1) ** 0.5))
    if side * side != pos.shape[1] - 1:
        raise ValueError(f"{path}: position embedding of {pos.shape[1] - 1} patches is not a square grid")
    patch_pos = pos[:, 1:]
    new["embeddings.positions.audio.weight"] = resize_position_embedding(patch_pos, (side, side), cfg.audio_grid())
    new["embeddings.positions.video_spatial.weight"] = resize_position_embedding(patch_pos, (side, side), cfg.video_grid())
    new["embeddings.positions.video_frame.weight"] = torch.zeros_like(model.embeddings.positions.video_frame.weight)
    if cfg.use_cls_token:
        cls = src["embeddings.cls_token"] + pos[:, :1]  # (1, 1, D)
        new["embeddings.audio_cls_token"] = cls
        new["embeddings.video_cls_token"] = cls

    own = model.state_dict()
    unexpected = sorted(set(new) - set(own))
    if unexpected:
        raise KeyError(f"init_from_vit produced keys the model does not have: {unexpected[:5]}")
    for name, value in new.items():
        if own[name].shape != value.shape:
            raise ValueError(f"{name}: ViT gives {tuple(value.shape)}, AVViT expects {tuple(own[name].shape)}")
        own[name].copy_(value.to(own[name].dtype))
    return VitInitReport(source=str(path), loaded=sorted(new), kept=sorted(set(own) - set(new)))


__all__ = ["SUPPORTED_MODEL_TYPES", "VitInitReport", "load_vit_weights"]
