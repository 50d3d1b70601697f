"""Benchmark of one pretraining step (forward + backward of `AVViTForPretraining`) per architecture
and attention implementation: time, tokens/s, analytic FLOPs, achieved FLOP/s.

FLOP formula (a multiply-add = 2 FLOPs; norms, softmax, GELU and losses neglected), per sample:
- transformer layer on N tokens of width D with MLP width I, forward:
      qkv 6*N*D^2 + output projection 2*N*D^2 + MLP 4*N*D*I + scores Q.K^T 2*N^2*D + weights.V 2*N^2*D
    = 8*N*D^2 + 4*N*D*I + 4*N^2*D          (= 24*N*D^2 + 4*N^2*D with I = 4D)
- patch embeddings (all patches, once): 2*La*(p*p)*D + 2*Lv*(3*q*q)*D
- encoder: three passes of `num_hidden_layers` layers: contrastive audio (Na_c tokens), contrastive
  video (Nv_c), reconstruction (Na_r + Nv_r); N is the executed (padded) visible count: with several
  ratios in a batch every sample runs at the largest visible count of the batch.
- decoder: embed 2*(Na_r + Nv_r)*D*Dd + layers on La + Lv tokens at width Dd + heads 2*(La*p*p + Lv*3*q*q)*Dd
- forward + backward = 3 x forward (backward = 2 x forward; an upper bound for the patch
  embeddings, whose input needs no gradient).
Run as a script or through `avssl bench model`; `print_table(rows)` renders the rows with rich.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from .config import LossConfig, MaskingConfig, ModelConfig, build_model
from .configuration import AVViTConfig
from .masking import visible_counts


def layer_flops(tokens: int, dim: int, mlp_dim: int) -> float:
    """Forward FLOPs of one transformer layer on `tokens` tokens (see the module docstring)."""
    return 8.0 * tokens * dim**2 + 4.0 * tokens * dim * mlp_dim + 4.0 * tokens**2 * dim


def pretraining_flops(
    config: AVViTConfig,
    masking: MaskingConfig,
    loss: LossConfig,
    batch_size: int,
    audio_frames: int,
    video_frames: int,
    image_size: int,
) -> dict[str, float]:
    """Executed forward FLOPs per sample by component, plus `total_fwd_bwd` (= 3 x forward)."""
    n_audio = config.num_audio_patches(audio_frames)
    h, w = config.video_grid(image_size)
    n_video = video_frames * h * w
    cls = 1 if config.use_cls_token else 0
    dim, mlp, depth = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    p2, q2 = config.audio_patch_size**2, 3 * config.video_patch_size**2
    out: dict[str, float] = {"patch_embed": 2.0 * n_audio * p2 * dim + 2.0 * n_video * q2 * dim}
    if loss.contrastive_weight > 0:
        view = masking.contrastive
        na = max(visible_counts(batch_size, n_audio, view.audio_ratios)) + cls
        nv = max(visible_counts(batch_size, n_video, view.video_ratios)) + cls
        out["encoder_contrastive"] = depth * (layer_flops(na, dim, mlp) + layer_flops(nv, dim, mlp))
    if loss.reconstruction_weight > 0:
        view = masking.reconstruction
        na = max(visible_counts(batch_size, n_audio, view.audio_ratios))
        nv = max(visible_counts(batch_size, n_video, view.video_ratios))
        out["encoder_reconstruction"] = depth * layer_flops(na + nv + 2 * cls, dim, mlp)
        dd = config.decoder_hidden_size
        out["decoder"] = (
            2.0 * (na + nv) * dim * dd
            + config.decoder_num_hidden_layers * layer_flops(n_audio + n_video, dd, config.decoder_intermediate_size)
            + 2.0 * (n_audio * p2 + n_video * q2) * dd
        )
    out["total_fwd"] = sum(out.values())
    out["total_fwd_bwd"] = 3.0 * out["total_fwd"]
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_setup(
    arch: str,
    attn: str,
    batch_size: int,
    audio_frames: int,
    video_frames: int,
    image_size: int,
    device: torch.device,
    seed: int = 0,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The benchmarked model (default masking and losses, seed `seed`, train mode, on `device`) and
    one random batch for it: audio [B, T, F], video [B, V, 3, H, W], has_audio / has_video [B]."""
    model_cfg = ModelConfig(
        arch=arch,
        attn_implementation=attn,
        audio_num_frames=audio_frames,
        video_num_frames=video_frames,
        video_image_size=image_size,
    )
    torch.manual_seed(seed)
    model = build_model(model_cfg, MaskingConfig(), LossConfig()).to(device).train()
    gen = torch.Generator().manual_seed(seed)
    mel_bins = model.config.audio_num_mel_bins
    audio = torch.randn(batch_size, audio_frames, mel_bins, generator=gen).to(device)
    video = torch.randn(batch_size, video_frames, 3, image_size, image_size, generator=gen).to(device)
    has = torch.ones(batch_size, dtype=torch.bool, device=device)
    return model, {"audio": audio, "video": video, "has_audio": has, "has_video": has}


def bench_model(
    archs: Sequence[str] = ("avvit_tiny_patch16", "avvit_base_patch16"),
    attn: Sequence[str] = ("eager", "sdpa"),
    batch_size: int = 2,
    steps: int = 2,
    warmup: int = 2,
    device: str = "cpu",
    audio_frames: int = 200,
    video_frames: int = 1,
    image_size: int = 224,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time `steps` pretraining steps (forward + backward, no optimizer) after `warmup` steps for every
    (arch, attention) pair on random inputs; one row per pair. `dtype` (e.g. torch.bfloat16) runs
    the step under autocast on that device."""
    dev = torch.device(device)
    masking, loss = MaskingConfig(), LossConfig()
    rows: list[dict[str, Any]] = []
    for arch in archs:
        for impl in attn:
            model, inputs = bench_setup(arch, impl, batch_size, audio_frames, video_frames, image_size, dev, seed)
            config = model.config

            def step() -> None:
                with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                    out = model(**inputs)
                out.loss.backward()
                model.zero_grad(set_to_none=True)

            for _ in range(warmup):
                step()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            _sync(dev)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(dev)
            seconds = (time.perf_counter() - start) / max(steps, 1)
            flops = pretraining_flops(config, masking, loss, batch_size, audio_frames, video_frames, image_size)
            tokens = config.num_audio_patches(audio_frames) + video_frames * math.prod(config.video_grid(image_size))
            rows.append(
                {
                    "arch": arch,
                    "attn": impl,
                    "device": str(dev),
                    "batch_size": batch_size,
                    "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                    "tokens_per_sample": tokens,
                    "step_ms": seconds * 1e3,
                    "tokens_per_s": batch_size * tokens / seconds,
                    "gflop_per_sample": flops["total_fwd_bwd"] / 1e9,
                    "tflop_per_s": flops["total_fwd_bwd"] * batch_size / seconds / 1e12,
                    "peak_mem_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
                }
            )
            del model
    return rows


def print_table(rows: list[dict[str, Any]], console=None) -> None:
    """Render `bench_model` rows side by side with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="AVViT pretraining step (forward + backward)")
    columns = [
        ("arch", "arch", "{}"),
        ("attn", "attn", "{}"),
        ("device", "device", "{}"),
        ("batch", "batch_size", "{}"),
        ("params (M)", "params_m", "{:.1f}"),
        ("tokens/sample", "tokens_per_sample", "{}"),
        ("ms/step", "step_ms", "{:.1f}"),
        ("tokens/s", "tokens_per_s", "{:.0f}"),
        ("GFLOP/sample", "gflop_per_sample", "{:.2f}"),
        ("TFLOP/s", "tflop_per_s", "{:.3f}"),
        ("peak MB", "peak_mem_mb", "{:.0f}"),
    ]
    for title, _, _ in columns:
        table.add_column(title, justify="right" if title not in ("arch", "attn", "device") else "left")
    for row in rows:
        table.add_row(*("-" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in columns))
    (console or Console()).print(table)


if __name__ == "__main__":
    print_table(bench_model())
