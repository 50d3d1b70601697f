"""Benchmark of one pretraining step (forward + backward of `AVViTForPretraining`) per architecture
and attention implementation: time, tokens/s, analytic FLOPs, achieved FLOP/s.

FLOP formula (a multiply-add = 2 FLOPs; norms, softmax, GELU and losses neglected), per sample:
- transformer layer on N tokens of width D with MLP width I, forward:
      qkv 6*N*D^2 + output projection 2*N*D^2 + MLP 4*N*D*I + scores Q.K^T 2*N^2*D + weights.V 2*N^2*D
    = 8*N*D^2 + 4*N*D*I + 4*N^2*D          (= 24*N*D^2 + 4*N^2*D with I = 4D)
- patch embeddings (all patches, once): 2*La*(p*p)*D + 2*Lv*(3*q*q)*D
- encoder: three passes of `num_hidden_layers` layers: contrastive audio (Na_c tokens), contrastive
  video (Nv_c), reconstruction (Na_r + Nv_r); N is the executed visible count: a packed contrastive
  view (masking.pack_contrastive) runs each sample at its own count, a padded one runs every sample
  at the largest visible count of the batch.
- decoder: embed 2*(Na_r + Nv_r)*D*Dd + layers on La + Lv tokens at width Dd + heads 2*(La*p*p + Lv*3*q*q)*Dd
- forward + backward = 3 x forward (backward = 2 x forward; an upper bound for the patch
  embeddings, whose input needs no gradient).
The FLOPs are the model's, whatever runs them: a compiled step (`compile_layers`: every block
under torch.compile, optionally replaying CUDA graphs) executes the same count faster.
Run as a script or through `avssl bench model`; `print_table(rows)` renders the rows with rich.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .config import LossConfig, MaskingConfig, ModelConfig, build_model
from .configuration import AVViTConfig
from .masking import visible_counts
from .modeling import AVViTLayer

logger = logging.getLogger(__name__)


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
        per_sample = 0.0
        for n, ratios in ((n_audio, view.audio_ratios), (n_video, view.video_ratios)):
            counts = visible_counts(batch_size, n, ratios)
            executed = counts if masking.pack_contrastive else [max(counts)] * batch_size
            per_sample += sum(layer_flops(c + cls, dim, mlp) for c in executed) / batch_size
        out["encoder_contrastive"] = depth * per_sample
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
    masking: MaskingConfig | None = None,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The benchmarked model (`masking`, default: the default; default losses, seed `seed`, train mode, on `device`) and
    one random batch for it: audio [B, T, F], video [B, V, 3, H, W], has_audio / has_video [B]."""
    model_cfg = ModelConfig(
        arch=arch,
        attn_implementation=attn,
        audio_num_frames=audio_frames,
        video_num_frames=video_frames,
        video_image_size=image_size,
    )
    torch.manual_seed(seed)
    model = build_model(model_cfg, masking or MaskingConfig(), LossConfig()).to(device).train()
    gen = torch.Generator().manual_seed(seed)
    mel_bins = model.config.audio_num_mel_bins
    audio = torch.randn(batch_size, audio_frames, mel_bins, generator=gen).to(device)
    video = torch.randn(batch_size, video_frames, 3, image_size, image_size, generator=gen).to(device)
    has = torch.ones(batch_size, dtype=torch.bool, device=device)
    return model, {"audio": audio, "video": video, "has_audio": has, "has_video": has}


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
# Modes whose compiled blocks replay CUDA graphs (torch._inductor.list_mode_options: triton.cudagraphs).
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_layers(model: torch.nn.Module, mode: str) -> int:
    """Compile every transformer block (each `AVViTLayer`, encoder and decoder) with
    `torch.compile(mode=mode, dynamic=False)`; returns how many. Blocks, not the whole step: the
    step's host-side masking and packing stay eager, and each block sees a few static shapes
    (packed: one per contrastive ratio and modality, plus the reconstruction and decoder
    sequences), each compiled once and shared by all blocks of that width."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {COMPILE_MODES}")
    layers = [m for m in model.modules() if isinstance(m, AVViTLayer)]
    for layer in layers:
        layer.compile(mode=mode, dynamic=False)
    return len(layers)


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Set `vs_padded` on packed rows (the padded row of the same arch, attention, batch and compile
    mode over this one's step time) and `vs_baseline` on every row (the eager padded row of the
    same arch, attention and batch over this one's), where those rows are among `rows`: the rows of
    one `bench_model` run, or of several runs merged."""
    timed = [r for r in rows if r.get("step_ms")]
    padded = {(r["arch"], r["attn"], r["batch_size"], r.get("compile")): r["step_ms"] for r in timed if not r["packed"]}
    baseline = {(r["arch"], r["attn"], r["batch_size"]): r["step_ms"] for r in timed
                if not r["packed"] and r.get("compile") is None}
    for r in timed:
        key = (r["arch"], r["attn"], r["batch_size"])
        if r["packed"] and (*key, r.get("compile")) in padded:
            r["vs_padded"] = padded[(*key, r.get("compile"))] / r["step_ms"]
        if key in baseline:
            r["vs_baseline"] = baseline[key] / r["step_ms"]


def bench_model(
    archs: Sequence[str] = ("avvit_tiny_patch16", "avvit_base_patch16"),
    attn: Sequence[str] = ("eager", "sdpa"),
    batch_size: int | Sequence[int] = 2,
    steps: int = 2,
    warmup: int = 2,
    device: str = "cpu",
    audio_frames: int = 200,
    video_frames: int = 1,
    image_size: int = 224,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    packing: Sequence[bool] = (True,),
    compile_modes: Sequence[str | None] = (None,),
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Time `steps` pretraining steps (forward + backward, no optimizer) after `warmup` steps for every
    (compile mode, arch, attention, batch size, packing of the contrastive view) on random inputs;
    one row each. `dtype` (e.g. torch.bfloat16) runs the step under autocast on that device.

    `batch_size`: one or several (a sweep). `compile_modes`: None runs the blocks eagerly; a mode of
    COMPILE_MODES compiles them (`compile_layers`). A compiled row warms up at least 3 steps (the
    first compiles, the next ones record the CUDA graphs of the cudagraph modes), reports that
    warm-up's excess over its steady steps as `compile_s` and the graphs it compiled as `graphs`,
    and fails if a timed step compiles again; a compiled row that fails carries `error` and no
    times, and the sweep goes on. Rows run mode by mode in the order given: None first keeps the
    eager rows of a sweep cut short.

    Ratios (where the rows they need ran): `vs_padded` on packed rows, the step time of the padded
    view (same arch, attention, batch and mode) over this one's; `vs_baseline` on every row, the
    step time of the eager padded row of the same arch, attention and batch over this one's.
    `on_row(rows)` is called after each row with all rows so far (e.g. to save them as they come)."""
    unknown = [m for m in compile_modes if m is not None and m not in COMPILE_MODES]
    if unknown:
        raise ValueError(f"unknown compile modes {unknown}; choose None or among {COMPILE_MODES}")
    dev = torch.device(device)
    loss = LossConfig()
    batch_sizes = [batch_size] if isinstance(batch_size, int) else list(batch_size)
    rows: list[dict[str, Any]] = []
    grid = ((m, a, i, b, p) for m in compile_modes for a in archs for i in attn for b in batch_sizes for p in packing)
    for mode, arch, impl, batch, pack in grid:
        masking = MaskingConfig(pack_contrastive=pack)
        row: dict[str, Any] = {"arch": arch, "attn": impl, "packed": pack, "device": str(dev), "batch_size": batch}
        try:
            row.update(_bench_one(arch, impl, batch, pack, mode, masking, loss, steps, warmup, dev,
                                  audio_frames, video_frames, image_size, dtype, seed))
        except Exception as exc:  # noqa: BLE001 - a compile failure is a measured result; eager errors propagate
            if mode is None:
                raise
            logger.warning("%s %s batch %d packed=%s, compile mode %s failed", arch, impl, batch, pack, mode, exc_info=True)
            row.update({"step_ms": None, "tokens_per_s": None, "tflop_per_s": None, "peak_mem_mb": None,
                        "compile": mode, "compile_s": None, "graphs": None,
                        "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"})
        finally:
            if mode is not None:
                torch._dynamo.reset()  # each compiled row compiles (and records its CUDA graphs) afresh
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        add_ratios(rows)
        if on_row is not None:
            on_row(rows)
    return rows


def _bench_one(
    arch: str, impl: str, batch: int, pack: bool, mode: str | None, masking: MaskingConfig, loss: LossConfig,
    steps: int, warmup: int, dev: torch.device, audio_frames: int, video_frames: int, image_size: int,
    dtype: torch.dtype | None, seed: int,
) -> dict[str, Any]:
    """One `bench_model` row without its identifying keys."""
    model, inputs = bench_setup(arch, impl, batch, audio_frames, video_frames, image_size, dev, seed, masking)
    config = model.config
    cudagraphs = mode in CUDAGRAPH_MODES
    if mode is not None:
        compile_layers(model, mode)
        warmup = max(warmup, 3)

    def step() -> None:
        if cudagraphs:
            # One step = one CUDA graph tree iteration: outputs of the previous step may be reused.
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            out = model(**inputs)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    # Each distinct block shape compiles once: more than dynamo's default limit of 8 graphs per code
    # object in a packed step. Past the limit dynamo would run the block eagerly: fail instead.
    limits = (torch._dynamo.config.patch(recompile_limit=256, fail_on_recompile_limit_hit=True) if mode is not None
              else contextlib.nullcontext())
    with limits:
        graphs0 = _compiled_graphs() if mode is not None else 0
        _sync(dev)
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        _sync(dev)
        warmup_s = time.perf_counter() - start
        graphs = _compiled_graphs() - graphs0 if mode is not None else 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        _sync(dev)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(dev)
        seconds = (time.perf_counter() - start) / max(steps, 1)
        if mode is not None and _compiled_graphs() - graphs0 != graphs:
            raise RuntimeError(f"{_compiled_graphs() - graphs0 - graphs} graphs compiled during the timed steps")
    flops = pretraining_flops(config, masking, loss, batch, audio_frames, video_frames, image_size)
    tokens = config.num_audio_patches(audio_frames) + video_frames * math.prod(config.video_grid(image_size))
    row = {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "tokens_per_sample": tokens,
        "step_ms": seconds * 1e3,
        "tokens_per_s": batch * tokens / seconds,
        "gflop_per_sample": flops["total_fwd_bwd"] / 1e9,
        "tflop_per_s": flops["total_fwd_bwd"] * batch / seconds / 1e12,
        "peak_mem_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
        "compile": mode,
        "compile_s": max(warmup_s - warmup * seconds, 0.0) if mode is not None else None,
        "graphs": graphs if mode is not None else None,
    }
    del model
    return row


def print_table(rows: list[dict[str, Any]], console=None) -> None:
    """Render `bench_model` rows side by side with rich; failed compiled rows' errors below the table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="AVViT pretraining step (forward + backward)")
    columns = [
        ("arch", "arch", "{}"),
        ("attn", "attn", "{}"),
        ("packed", "packed", "{}"),
        ("device", "device", "{}"),
        ("batch", "batch_size", "{}"),
        ("params (M)", "params_m", "{:.1f}"),
        ("tokens/sample", "tokens_per_sample", "{}"),
        ("ms/step", "step_ms", "{:.1f}"),
        ("tokens/s", "tokens_per_s", "{:.0f}"),
        ("GFLOP/sample", "gflop_per_sample", "{:.2f}"),
        ("TFLOP/s", "tflop_per_s", "{:.3f}"),
        ("peak MB", "peak_mem_mb", "{:.0f}"),
        ("x padded", "vs_padded", "{:.2f}"),
        ("compile", "compile", "{}"),
        ("compile s", "compile_s", "{:.1f}"),
        ("x baseline", "vs_baseline", "{:.2f}"),
    ]
    left = ("arch", "attn", "packed", "device", "compile")
    for title, _, _ in columns:
        table.add_column(title, justify="left" if title in left else "right")
    for row in rows:
        cells = {key: "-" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in columns}
        if row.get("compile") is None:
            cells["compile"] = "eager"
        table.add_row(*cells.values())
    console = console or Console()
    console.print(table)
    for row in rows:
        if row.get("error"):
            console.print(f"{row['arch']} {row['attn']} batch {row['batch_size']} packed={row['packed']} "
                          f"compile {row['compile']}: {row['error']}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    print_table(bench_model())
