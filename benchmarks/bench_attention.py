"""Benchmark: avssl's Triton attention against PyTorch's attention providers at ViT shapes.

A script, not a test. Needs a CUDA GPU (written for an H100); `--smoke` instead runs one tiny
shape on the CPU under TRITON_INTERPRET=1 (kernel vs eager only) to check the script itself.

Providers (each skipped with its reason recorded when it cannot run a case):
  triton          avssl.kernels.flash_attention / flash_attention_varlen (autotuned)
  sdpa_flash      torch SDPA, SDPBackend.FLASH_ATTENTION (no attn_mask support)
  sdpa_efficient  torch SDPA, SDPBackend.EFFICIENT_ATTENTION
  sdpa_cudnn      torch SDPA, SDPBackend.CUDNN_ATTENTION
  flex            torch.nn.attention.flex_attention under torch.compile (block masks for
                  padding and packed documents)
  eager           avssl.kernels.attention_reference(upcast=False): matmul, softmax, matmul
Cases: dense [B, H, N, D] for N in --lengths (64 .. 2048, incl. 197); "padded": the same
shape with a key padding mask whose per-sample lengths mix N/4, N/2 and N (audio-only,
video-only, audio-visual); "varlen": those same lengths packed without padding.
Modes: fwd, bwd (backward only, graph retained), fwd+bwd.

FLOPs (non-causal attention, multiply-add = 2 FLOPs):
  forward  = 4 * B * H * N^2 * D    (Q K^T: 2 B H N^2 D, P V: 2 B H N^2 D)
  backward = 2.5 * forward          (dV, dP, dQ, dK: 4 matmuls, plus recomputing Q K^T)
  fwd+bwd  = 3.5 * forward
  dense and padded cases count the full N x N work (what a padded kernel computes); varlen
  counts sum over sequences of 4 * H * n_i^2 * D.
Error: max |output - fp32 reference| (and for bwd modes max over dq, dk, dv) next to speed.
Memory: peak allocated during one call, minus what was allocated before it.

Output: a table on stdout and raw JSON (device, torch, triton, CUDA and cuDNN versions,
timestamp, every measurement) at --out, default benchmarks/results/attention_<device>.json.

Usage (the full sweep compiles flex once per shape and autotunes the kernel once per length
bucket: expect tens of minutes; narrow it with --lengths / --head-dims / --providers):
  python benchmarks/bench_attention.py                         # full sweep on the GPU
  python benchmarks/bench_attention.py --lengths 197 1024 --head-dims 64 --modes fwd+bwd
  TRITON_INTERPRET=1 python benchmarks/bench_attention.py --smoke --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

if "--smoke" in sys.argv and not os.environ.get("TRITON_INTERPRET"):
    # Must precede the first `triton.jit` (importing avssl.kernels) to take effect.
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass

import torch
import torch.nn.functional as F

from avssl.kernels.attention import flash_attention, flash_attention_varlen
from avssl.kernels.reference import attention_reference, attention_varlen_reference

MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("triton", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flex", "eager")
DEFAULT_LENGTHS = (64, 128, 197, 256, 512, 1024, 2048)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BWD_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


# ------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------


def mixed_lengths(batch: int, n: int, seed: int = 0) -> list[int]:
    """Per-sample real lengths mixing N/4, N/2 and N (at least one full-length sample)."""
    gen = torch.Generator().manual_seed(seed)
    choices = [max(1, n // 4), max(1, n // 2), n]
    picks = torch.randint(0, 3, (batch,), generator=gen).tolist()
    lengths = [choices[i] for i in picks]
    lengths[0] = n
    return lengths


def make_case(kind: str, batch: int, heads: int, n: int, d: int, dtype, device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(1234 + n + d)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    case = {"kind": kind, "B": batch, "H": heads, "N": n, "D": d, "mask": None, "cu": None}
    if kind == "varlen":
        lengths = mixed_lengths(batch, n)
        total = sum(lengths)
        case["lengths"] = lengths
        case["cu"] = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(),
                                  dtype=torch.int32, device=device)
        case["q"], case["k"], case["v"] = (rnd(total, heads, d) for _ in range(3))
        case["do"] = rnd(total, heads, d)
        case["flops_fwd"] = sum(4 * heads * length * length * d for length in lengths)
        return case
    case["q"], case["k"], case["v"] = (rnd(batch, heads, n, d) for _ in range(3))
    case["do"] = rnd(batch, heads, n, d)
    case["flops_fwd"] = 4 * batch * heads * n * n * d
    if kind == "padded":
        lengths = mixed_lengths(batch, n)
        case["lengths"] = lengths
        mask = torch.zeros(batch, n, dtype=torch.bool)
        for i, length in enumerate(lengths):
            mask[i, :length] = True
        case["mask"] = mask.to(device)
    return case


# ------------------------------------------------------------------------------------------
# Providers: each returns a callable (q, k, v) -> out, or raises to be recorded as skipped
# ------------------------------------------------------------------------------------------


class Skip(Exception):
    """A provider that does not support a case (recorded, not an error of the script)."""


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    }[name]


def build_provider(name: str, case: dict):
    kind, mask, cu = case["kind"], case["mask"], case["cu"]
    if name == "triton":
        if kind == "varlen":
            max_len = max(case["lengths"])
            return lambda q, k, v: flash_attention_varlen(q, k, v, cu, max_len)
        return lambda q, k, v: flash_attention(q, k, v, key_padding_mask=mask)
    if name == "eager":
        if kind == "varlen":
            return lambda q, k, v: attention_varlen_reference(q, k, v, cu, upcast=False)
        return lambda q, k, v: attention_reference(q, k, v, key_padding_mask=mask, upcast=False)
    if name.startswith("sdpa_"):
        from torch.nn.attention import sdpa_kernel

        backend = _sdpa_backend(name)
        if kind == "varlen":
            offsets = cu.long()

            def run_nested(q, k, v):
                # Jagged nested tensors: (T, H, D) -> (B, j, H, D) -> (B, H, j, D).
                nq, nk, nv = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2)
                              for t in (q, k, v))
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(nq, nk, nv)
                return out.transpose(1, 2).values()  # (T, H, D)

            return run_nested
        attn_mask = None if mask is None else mask[:, None, None, :]
        if name == "sdpa_flash" and attn_mask is not None:
            raise Skip("SDPBackend.FLASH_ATTENTION does not take an attn_mask")

        def run_sdpa(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

        return run_sdpa
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        import torch._functorch.config as functorch_config

        # The "bwd" mode replays backward on a retained graph, which compiled backwards with
        # donated buffers refuse (seen on an H200: "compiled with non-empty donated buffers").
        functorch_config.donated_buffer = False
        compiled = torch.compile(flex_attention, dynamic=False)
        device = case["q"].device
        if kind == "dense":
            return lambda q, k, v: compiled(q, k, v)
        if kind == "padded":
            lengths = torch.tensor(case["lengths"], device=device)

            def pad_mod(b, h, q_idx, kv_idx):
                return kv_idx < lengths[b]

            n = case["N"]
            block_mask = create_block_mask(pad_mod, case["B"], None, n, n, device=device)
            return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
        # varlen: one packed row of T tokens with a document (block-diagonal) mask.
        lengths = torch.tensor(case["lengths"], device=device)
        doc = torch.repeat_interleave(torch.arange(len(case["lengths"]), device=device), lengths)
        total = int(doc.numel())

        def doc_mod(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        block_mask = create_block_mask(doc_mod, 1, None, total, total, device=device)

        def run_flex_varlen(q, k, v):
            # (T, H, D) -> (1, H, T, D) and back
            q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            return compiled(q4, k4, v4, block_mask=block_mask)[0].transpose(0, 1)

        return run_flex_varlen
    raise ValueError(f"unknown provider {name}")


# ------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------


def bench_ms(fn, grad_to_none, smoke: bool) -> float:
    """Median milliseconds per call: triton.testing.do_bench on a GPU, a wall clock on CPU."""
    if torch.cuda.is_available() and not smoke:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                              return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(2):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_mib(fn) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def reference(case: dict) -> list[torch.Tensor]:
    """fp32 output and gradients of the case (computed once, shared by all providers)."""
    q, k, v = (case[n].detach().float().requires_grad_() for n in ("q", "k", "v"))
    if case["kind"] == "varlen":
        out = attention_varlen_reference(q, k, v, case["cu"])
    else:
        out = attention_reference(q, k, v, key_padding_mask=case["mask"])
    out.backward(case["do"].float())
    return [out.detach(), q.grad, k.grad, v.grad]


def run_case(case: dict, providers, modes, smoke: bool) -> list[dict]:
    rows = []
    ref = None
    meta = {k: case[k] for k in ("kind", "B", "H", "N", "D")}
    for name in providers:
        base = dict(meta, provider=name)
        q, k, v = (case[n].detach().clone().requires_grad_() for n in ("q", "k", "v"))
        do = case["do"]
        try:
            fn = build_provider(name, case)
            # Correctness first (also the compile / autotune warm-up).
            out = fn(q, k, v)
            out.backward(do)
            if ref is None:
                ref = reference(case)
            fwd_err = (out.detach().float() - ref[0]).abs().max().item()
            grad_err = max((t.grad.float() - r).abs().max().item()
                           for t, r in zip((q, k, v), ref[1:]))
        except Skip as exc:
            rows += [dict(base, mode=m, error=f"skipped: {exc}") for m in modes]
            continue
        except Exception as exc:  # noqa: BLE001 - record and go on with the other providers
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            rows += [dict(base, mode=m, error=reason) for m in modes]
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        for mode in modes:
            row = dict(base, mode=mode, error=None,
                       max_abs_err=fwd_err if mode == "fwd" else max(fwd_err, grad_err))
            try:
                for t in (q, k, v):
                    t.grad = None
                if mode == "fwd":
                    def call():
                        with torch.no_grad():
                            fn(q, k, v)
                elif mode == "bwd":
                    out = fn(q, k, v)

                    def call(out=out):
                        out.backward(do, retain_graph=True)
                else:
                    def call():
                        fn(q, k, v).backward(do)
                ms = bench_ms(call, [q, k, v], smoke)
                flops = case["flops_fwd"] * BWD_FACTOR[mode]
                row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12,
                           peak_mem_mib=peak_mib(call))
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            rows.append(row)
            out = None
        del q, k, v
    return rows


# ------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}"


def print_table(rows: list[dict]) -> None:
    header = (f"{'case':<7} {'mode':<8} {'B':>4} {'H':>3} {'N':>5} {'D':>4} {'provider':<15} "
              f"{'ms':>9} {'TFLOP/s':>8} {'peak MiB':>9} {'max err':>9}  note")
    print(header)
    print("-" * len(header))
    for r in rows:
        def fmt(key, spec):
            val = r.get(key)
            return format(val, spec) if isinstance(val, (int, float)) else "-"

        print(f"{r['kind']:<7} {r['mode']:<8} {r['B']:>4} {r['H']:>3} {r['N']:>5} {r['D']:>4} "
              f"{r['provider']:<15} {fmt('ms', '9.3f')} {fmt('tflops', '8.1f')} "
              f"{fmt('peak_mem_mib', '9.1f')} {fmt('max_abs_err', '9.2e')}  "
              f"{(r.get('error') or '')[:80]}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/attention_<device>.json)")
    p.add_argument("--smoke", action="store_true",
                   help="one tiny shape, kernel vs eager, runs on CPU under TRITON_INTERPRET=1")
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--cases", nargs="+", default=["dense", "padded", "varlen"],
                   choices=["dense", "padded", "varlen"])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--tokens", type=int, default=32768,
                   help="B * N per case, so that B x H fills the GPU at every length")
    p.add_argument("--prewarm-workers", type=int, default=min(8, max(0, (os.cpu_count() or 1) - 1)),
                   help="processes that compile the kernel's autotuning candidates in parallel "
                        "before the sweep (0: compile while tuning, one at a time)")
    return p.parse_args(argv)


def _raise_recompile_limits() -> None:
    """flex is compiled once per shape; past dynamo's recompile limit (8 by default) it would
    silently run uncompiled and the table would time the wrong thing."""
    import torch._dynamo

    for name, value in (("recompile_limit", 1024), ("cache_size_limit", 1024),
                        ("accumulated_recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 4096)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), value))


def _prewarm_plan(plan: list[tuple], dtype_name: str) -> None:
    """Run our kernel's forward and backward once per case (compiles what autotuning will try;
    see triton_prewarm.py)."""
    for kind, batch, heads, n, d in plan:
        case = make_case(kind, batch, heads, n, d, DTYPES[dtype_name], "cuda")
        q, k, v = (case[name].detach().requires_grad_() for name in ("q", "k", "v"))
        build_provider("triton", case)(q, k, v).backward(case["do"])
        del case, q, k, v
        torch.cuda.empty_cache()


def heads_for(d: int) -> int:
    """ViT-like widths: 12 heads of 64 (ViT-B, 768), 8 heads of 128 (1024)."""
    return max(1, (768 if d <= 64 else 1024) // d)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dtype = DTYPES[args.dtype]
    if args.smoke:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and not os.environ.get("TRITON_INTERPRET"):
            print("--smoke on CPU needs TRITON_INTERPRET=1 set before Python starts",
                  file=sys.stderr)
            return 2
        plan = [("dense", 2, 2, 37, 32), ("padded", 2, 2, 37, 32), ("varlen", 2, 2, 37, 32)]
        providers, modes = ["triton", "eager"], list(MODES)
    else:
        if not torch.cuda.is_available():
            print("the benchmark needs a CUDA GPU (use --smoke for a CPU check)", file=sys.stderr)
            return 2
        device = "cuda"
        _raise_recompile_limits()
        plan = [(kind, max(1, args.tokens // n), heads_for(d), n, d)
                for d in args.head_dims for n in args.lengths for kind in args.cases]
        providers, modes = args.providers, args.modes

    if device == "cuda" and "triton" in providers and args.prewarm_workers > 0:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from triton_prewarm import prewarm

        seconds = prewarm(_prewarm_plan, (plan, args.dtype), args.prewarm_workers)
        print(f"prewarm: compiled the autotuning candidates in {seconds:.1f} s "
              f"({args.prewarm_workers} processes)", flush=True)

    import triton

    name = device_name()
    out = args.out
    if out is None:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ("_smoke" if args.smoke else "")
        out = Path(__file__).resolve().parent / "results" / f"attention_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
        "dtype": args.dtype,
        "smoke": args.smoke,
        "flops": {
            "fwd": "4 * B * H * N^2 * D (varlen: sum_i 4 * H * n_i^2 * D)",
            "bwd": "2.5 * fwd",
            "fwd+bwd": "3.5 * fwd",
        },
        "results": [],
    }
    rows: list[dict] = record["results"]
    for i, (kind, batch, heads, n, d) in enumerate(plan, 1):
        start = time.perf_counter()
        case = make_case(kind, batch, heads, n, d, dtype, device)
        rows += run_case(case, providers, modes, args.smoke)
        del case
        if device == "cuda":
            torch.cuda.empty_cache()
        # Written after every case, so a sweep cut short by a time limit keeps what it measured.
        out.write_text(json.dumps(record, indent=1, default=str))
        print(f"[{i}/{len(plan)}] {kind} N={n} D={d} B={batch} H={heads}: "
              f"{time.perf_counter() - start:.1f} s", flush=True)

    print_table(rows)
    print(f"\nwrote {out}")
    # Other providers may legitimately skip a case; the script fails only if ours does.
    failed = [r for r in rows if r["provider"] == "triton"
              and (r.get("error") or not math.isfinite(r.get("max_abs_err", math.nan)))]
    if failed:
        print(f"{len(failed)} triton measurements failed or were not finite", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
