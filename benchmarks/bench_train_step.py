"""Benchmark: the pretraining step of a backbone with avssl's Triton attention against SDPA.

A script, not a test. Needs a CUDA GPU. Both attention implementations run the same model
(`AVViTForPretraining`, random weights, seed 0) on the same random batch, in one process, one after
the other: forward + backward + AdamW step under bf16 autocast (avssl.pretrain.bench.bench_model
times forward + backward; the optimizer is added here because a real step has one). It reports
ms/step, samples/s, tokens/s and achieved TFLOP/s from the architecture's FLOP count
(pretrain/bench.py: executed forward FLOPs x 3), the ratio triton / sdpa, and, with --profile,
the step's top CUDA ops by self time for each implementation (what "beyond attention" kernels
would have to beat), both in the JSON and as a text table.

Shapes default to configs/pretrain/base_vox2.yaml: ViT-B/16, 2 s of audio (198 frames x 128 mel
bins: 96 patches), one 224 x 224 face frame (196 patches), 64 samples per GPU, the default
asymmetric masking (contrastive ratios 0 .. 0.8 in sub-batches, reconstruction 0.75 / 0.9).

Usage:
  python benchmarks/bench_train_step.py --out benchmarks/results/train_step_<gpu>.json --profile
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from avssl.pretrain.bench import bench_setup, pretraining_flops  # noqa: E402
from avssl.pretrain.config import LossConfig, MaskingConfig  # noqa: E402


def make_step(arch: str, attn: str, batch: int, audio_frames: int, video_frames: int,
              image_size: int, device: str = "cuda"):
    """(model, step function) for one attention implementation; the same seed and batch for all."""
    model, inputs = bench_setup(arch, attn, batch, audio_frames, video_frames, image_size,
                                torch.device(device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**inputs)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return out.loss.detach()

    return model, step


def _prewarm_step(arch, batch, audio_frames, video_frames, image_size) -> None:
    """One Triton step (compiles what autotuning will try; see triton_prewarm.py). The batch
    size only sets the kernels' grids, not their compiled specialisation, so 8 workers run a
    smaller batch each (kept a multiple of the 5 contrastive ratios: same sequence lengths)."""
    _, step = make_step(arch, "triton", min(batch, 10), audio_frames, video_frames, image_size)
    step()
    torch.cuda.synchronize()


def time_steps(step, steps: int, warmup: int) -> tuple[float, list[float]]:
    losses = [float(step()) for _ in range(warmup)]
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps, losses


def profile_step(step, steps: int = 3, top: int = 25) -> tuple[list[dict], str]:
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()

    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))

    # Kernels appear twice: as their own events and as the "self" device time of the op that
    # launched them; the total counts the kernel events only (as the profiler's table does).
    from torch.autograd import DeviceType

    total = sum(device_us(e) for e in events if e.device_type == DeviceType.CUDA) or 1.0
    ranked = sorted(events, key=device_us, reverse=True)[:top]
    rows = [{"op": e.key, "self_cuda_ms_per_step": device_us(e) / 1e3 / steps,
             "share": device_us(e) / total, "calls_per_step": e.count / steps} for e in ranked]
    table = events.table(sort_by="self_device_time_total", row_limit=top)
    return rows, table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="avvit_base_patch16")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--audio-frames", type=int, default=198)
    p.add_argument("--video-frames", type=int, default=1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--attn", nargs="+", default=["sdpa", "triton"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="also profile each implementation's step")
    p.add_argument("--prewarm-workers", type=int, default=min(8, max(0, (os.cpu_count() or 1) - 1)))
    p.add_argument("--out", type=Path, required=True, help="JSON path")
    p.add_argument("--profile-text", type=Path, default=None, help="profiler tables as text")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("the benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    shape = (args.arch, args.batch_size, args.audio_frames, args.video_frames, args.image_size)
    prewarm_s = 0.0
    if "triton" in args.attn and args.prewarm_workers > 0:
        from triton_prewarm import prewarm

        prewarm_s = prewarm(_prewarm_step, shape, args.prewarm_workers)
        print(f"prewarm: {prewarm_s:.1f} s", flush=True)

    rows, texts = [], []
    for attn in args.attn:
        t0 = time.perf_counter()
        model, step = make_step(*shape[:1], attn, *shape[1:])
        ms, losses = time_steps(step, args.steps, args.warmup)
        config = model.config
        flops = pretraining_flops(config, MaskingConfig(), LossConfig(), args.batch_size, args.audio_frames,
                                  args.video_frames, args.image_size)
        tokens = config.num_audio_patches(args.audio_frames) \
            + args.video_frames * math.prod(config.video_grid(args.image_size))
        row = {"attn": attn, "ms_per_step": ms, "samples_per_s": args.batch_size / ms * 1e3,
               "tokens_per_s": args.batch_size * tokens / ms * 1e3,
               "tflop_per_s": flops["total_fwd_bwd"] * args.batch_size / (ms * 1e-3) / 1e12,
               "gflop_per_sample_fwd_bwd": flops["total_fwd_bwd"] / 1e9,
               "first_losses": losses, "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20,
               "setup_and_warmup_s": time.perf_counter() - t0 - ms * args.steps / 1e3}
        if args.profile:
            row["profile_top"], table = profile_step(step)
            texts.append(f"== {attn} ==\n{table}")
        rows.append(row)
        print(f"{attn:<7} {ms:8.2f} ms/step  {row['samples_per_s']:8.1f} samples/s  "
              f"{row['tflop_per_s']:6.1f} TFLOP/s  first losses {[round(x, 4) for x in losses]}",
              flush=True)
        del model, step
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    import triton

    by = {r["attn"]: r for r in rows}
    record = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
        "arch": args.arch, "batch_size": args.batch_size, "audio_frames": args.audio_frames,
        "video_frames": args.video_frames, "image_size": args.image_size, "precision": "bf16 autocast",
        "steps": args.steps, "warmup": args.warmup, "prewarm_s": prewarm_s,
        "step": "forward + backward + fused AdamW",
        "flops": "pretrain/bench.py pretraining_flops: executed forward FLOPs x 3",
        "results": rows,
    }
    if "sdpa" in by and "triton" in by:
        record["triton_over_sdpa_speed"] = by["sdpa"]["ms_per_step"] / by["triton"]["ms_per_step"]
        print(f"speed triton / sdpa = {record['triton_over_sdpa_speed']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str))
    if args.profile_text and texts:
        args.profile_text.write_text("\n\n".join(texts))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
