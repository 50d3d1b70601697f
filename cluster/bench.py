"""`avssl bench train`: is the training step bound by data or by compute?

Times the pretraining step of a recipe's model in one process, twice in the same run: fed by
the real data pipeline (StreamingLoader, decode + features in workers) and fed by synthetic
tensors of the same shapes (compute only). Reports samples/s, tokens/s, achieved TFLOP/s from
the architecture's FLOP count (pretrain/bench.py: executed forward FLOPs x 3 for fwd+bwd) and
model FLOPs utilization against the device's dense peak (bf16 for known GPUs; on CPU the peak
is measured with a large fp32 matmul in the same run). The ratio pipeline / synthetic near 1
means compute-bound; well below 1, the data pipeline is the bottleneck.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from avssl.cluster.config import PretrainRecipe

# Dense bf16 tensor-core peaks, TFLOP/s (vendor datasheets, SXM parts).
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def device_peak_tflops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peak, f"{name} bf16 datasheet"
        return float("nan"), f"{name} (unknown peak)"
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12, f"CPU fp32 matmul measured ({torch.get_num_threads()} threads)"


@dataclass
class TrainBenchRow:
    feed: str
    samples_per_s: float
    tokens_per_s: float
    tflops: float
    mfu: float


def _step_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        "audio": batch["audio"].to(device),
        "video": batch["video"].to(device) if batch["video"] is not None else None,
        "has_audio": batch["has_audio"].to(device),
        "has_video": batch["has_video"].to(device),
    }


def bench_train(recipe: PretrainRecipe, steps: int, device: torch.device) -> tuple[list[TrainBenchRow], dict[str, Any]]:
    from avssl.data.loader import StreamingLoader
    from avssl.pretrain.bench import pretraining_flops
    from avssl.pretrain.config import build_model

    torch.manual_seed(0)
    model = build_model(recipe.model, recipe.masking, recipe.loss).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    bf16 = device.type == "cuda" and recipe.deepspeed.precision != "fp32"
    cfg, f, d = model.config, recipe.features, recipe.data
    frames = f.num_audio_frames(d.clip_seconds)
    flops = pretraining_flops(cfg, recipe.masking, recipe.loss, d.batch_size, frames, f.num_frames, f.image_size)
    tokens = cfg.num_audio_patches(frames) + f.num_frames * cfg.video_grid(f.image_size)[0] * cfg.video_grid(f.image_size)[1]
    peak, peak_source = device_peak_tflops(device)

    def step(batch: dict[str, Any]) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**_step_inputs(batch, device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    def timed(batches) -> float:
        it = iter(batches)
        step(next(it))  # warm-up: allocator, kernels, worker start
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step(next(it))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return steps * d.batch_size / (time.perf_counter() - t0)

    data = d.model_copy(update={"steps_per_epoch": steps + 1})
    pipeline_sps = timed(StreamingLoader(data, f))
    b = d.batch_size
    synthetic = {
        "audio": torch.randn(b, frames, f.num_mel_bins),
        "video": torch.randn(b, f.num_frames, 3, f.image_size, f.image_size) if "video" in d.modalities else None,
        "has_audio": torch.ones(b, dtype=torch.bool),
        "has_video": torch.ones(b, dtype=torch.bool),
    }
    synthetic_sps = timed(iter([synthetic] * (steps + 1)))
    rows = []
    for feed, sps in (("data pipeline", pipeline_sps), ("synthetic tensors", synthetic_sps)):
        tflops = sps * flops["total_fwd_bwd"] / 1e12
        rows.append(TrainBenchRow(feed, sps, sps * tokens, tflops, tflops / peak))
    info = {"arch": recipe.model.arch, "batch_size": b, "tokens_per_sample": tokens, "device": str(device),
            "gflop_per_sample_fwd_bwd": flops["total_fwd_bwd"] / 1e9, "peak_tflops": peak, "peak_source": peak_source,
            "precision": "bf16" if bf16 else "fp32", "steps": steps}
    return rows, info


def print_train_bench(rows: list[TrainBenchRow], info: dict[str, Any], console) -> None:
    from rich.table import Table

    table = Table(title=f"training step: {info['arch']} batch {info['batch_size']} on {info['device']} ({info['precision']})")
    for col in ("feed", "samples/s", "tokens/s", "TFLOP/s", "MFU"):
        table.add_column(col, justify="right" if col != "feed" else "left")
    for r in rows:
        table.add_row(r.feed, f"{r.samples_per_s:.1f}", f"{r.tokens_per_s:.0f}", f"{r.tflops:.3f}", f"{100 * r.mfu:.1f}%")
    console.print(table)
    ratio = rows[0].samples_per_s / rows[1].samples_per_s
    verdict = "compute-bound" if ratio > 0.9 else "data-bound: add loader workers or CPU per worker"
    console.print(f"pipeline / synthetic = {ratio:.2f} ({verdict}); {info['gflop_per_sample_fwd_bwd']:.2f} GFLOP per sample "
                  f"(fwd+bwd), peak {info['peak_tflops']:.3g} TFLOP/s ({info['peak_source']})")
