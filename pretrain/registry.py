"""Model sizes by architecture name, and config factories named by architecture.

`avvit_<size>_patch16(**overrides) -> AVViTConfig`; build a model with `AVViTModel(cfg)` (encoder,
features for heads) or `AVViTForPretraining(cfg)` (encoder + decoder + objectives). The run-config
path (`avssl.pretrain.config.build_model`) resolves `model.arch` through `ARCHITECTURES`.

Decoder sizes: CAV-MAE's 512-d x 8 layers for base and large; proportionally lighter for small/tiny.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .configuration import AVViTConfig


@dataclass(frozen=True)
class ArchSpec:
    """The shape of one architecture: encoder width/depth/heads, patch size, decoder width/depth/heads."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    decoder_hidden_size: int
    decoder_num_hidden_layers: int
    decoder_num_attention_heads: int

    def config_kwargs(self) -> dict[str, Any]:
        spec = asdict(self)
        patch = spec.pop("patch_size")
        return {
            **spec,
            "intermediate_size": 4 * self.hidden_size,
            "decoder_intermediate_size": 4 * self.decoder_hidden_size,
            "audio_patch_size": patch,
            "audio_freq_stride": patch,
            "audio_time_stride": patch,
            "video_patch_size": patch,
        }


ARCHITECTURES: dict[str, ArchSpec] = {
    # Trains on 2 CPU cores in minutes (demo, tests).
    "avvit_tiny_patch16": ArchSpec(192, 4, 3, 16, 128, 2, 4),
    "avvit_small_patch16": ArchSpec(384, 12, 6, 16, 256, 4, 8),
    # ViT-B/16: the size AVSiam / CAV-MAE report.
    "avvit_base_patch16": ArchSpec(768, 12, 12, 16, 512, 8, 16),
    "avvit_large_patch16": ArchSpec(1024, 24, 16, 16, 512, 8, 16),
}


def avvit_config(arch: str, **overrides: Any) -> AVViTConfig:
    """`AVViTConfig` of a registered architecture; `overrides` replace any field (e.g. `audio_num_frames=100`)."""
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {arch!r}; registered: {', '.join(ARCHITECTURES)}")
    kwargs = ARCHITECTURES[arch].config_kwargs()
    kwargs.update(overrides)
    return AVViTConfig(**kwargs)


def avvit_tiny_patch16(**overrides: Any) -> AVViTConfig:
    """192-d, 4 layers, 3 heads; decoder 128-d x 2."""
    return avvit_config("avvit_tiny_patch16", **overrides)


def avvit_small_patch16(**overrides: Any) -> AVViTConfig:
    """384-d, 12 layers, 6 heads (ViT-S/16); decoder 256-d x 4."""
    return avvit_config("avvit_small_patch16", **overrides)


def avvit_base_patch16(**overrides: Any) -> AVViTConfig:
    """768-d, 12 layers, 12 heads (ViT-B/16); decoder 512-d x 8 (CAV-MAE)."""
    return avvit_config("avvit_base_patch16", **overrides)


def avvit_large_patch16(**overrides: Any) -> AVViTConfig:
    """1024-d, 24 layers, 16 heads (ViT-L/16); decoder 512-d x 8."""
    return avvit_config("avvit_large_patch16", **overrides)


FACTORIES: dict[str, Callable[..., AVViTConfig]] = {
    "avvit_tiny_patch16": avvit_tiny_patch16,
    "avvit_small_patch16": avvit_small_patch16,
    "avvit_base_patch16": avvit_base_patch16,
    "avvit_large_patch16": avvit_large_patch16,
}

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "FACTORIES",
    "avvit_base_patch16",
    "avvit_config",
    "avvit_large_patch16",
    "avvit_small_patch16",
    "avvit_tiny_patch16",
]
