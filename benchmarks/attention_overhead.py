"""Host (CPU) cost of one attention call: where the launch path spends its time.

A script, not a test. Needs a CUDA GPU. On a shape too small to keep the GPU busy
(B=2, H=2, N=64, D=64, bf16) the time per call is the host's: Python, autograd and the kernel
launches. It reports microseconds per call for our kernel (autotuned and with fixed tiles) and for
SDPA's backends, forward only (no_grad) and forward + backward, then profiles our forward +
backward with cProfile (top functions by own time), so a slow spot in the launch path shows by
name. Why it exists: on an H200 the ViT-B pretraining step, which is host-bound at the base
recipe's short sequences, ran slower with this kernel than with SDPA although the kernel's GPU
time was lower (benchmarks/results/train_step_h200*.{json,txt}).

Usage:  python benchmarks/attention_overhead.py --out overhead.json --profile-text overhead.txt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from avssl.kernels.attention import flash_attention


def per_call_us(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def _prewarm() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 2, 64, 64, generator=gen).to("cuda", torch.bfloat16)
                   .requires_grad_() for _ in range(4))
    mask = torch.ones(2, 64, dtype=torch.bool, device="cuda")
    mask[1, 40:] = False
    for keep in (None, mask):
        flash_attention(q, k, v, key_padding_mask=keep).backward(do.detach())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--profile-text", type=Path, required=True)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(0)
    shape = (2, 2, 64, 64)
    q, k, v, do = (torch.randn(*shape, generator=gen).to("cuda", torch.bfloat16) for _ in range(4))
    mask = torch.ones(shape[0], shape[2], dtype=torch.bool, device="cuda")
    mask[1, 40:] = False
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def ours(autotune, key_padding_mask=None):
        def fwd():
            with torch.no_grad():
                flash_attention(q, k, v, key_padding_mask=key_padding_mask, autotune=autotune)

        def fwd_bwd():
            flash_attention(qg, kg, vg, key_padding_mask=key_padding_mask,
                            autotune=autotune).backward(do)

        return fwd, fwd_bwd

    def sdpa(backend, attn_mask=None):
        def fwd():
            with torch.no_grad(), sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

        def fwd_bwd():
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(qg, kg, vg, attn_mask=attn_mask).backward(do)

        return fwd, fwd_bwd

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from triton_prewarm import prewarm

    print(f"prewarm {prewarm(_prewarm, (), 8):.1f} s", flush=True)
    providers = {
        "triton autotuned": ours(True),
        "triton fixed tiles": ours(False),
        "triton autotuned, key padding": ours(True, mask),
        "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa efficient, key padding": sdpa(SDPBackend.EFFICIENT_ATTENTION, mask[:, None, None, :]),
    }
    rows = []
    for name, (fwd, fwd_bwd) in providers.items():
        row = {"provider": name}
        for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            try:
                row[f"{mode}_us_per_call"] = per_call_us(fn, args.calls)
            except Exception as exc:  # noqa: BLE001 - a backend may not take this case
                row[f"{mode}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(f"{name:<32} fwd {row.get('fwd_us_per_call', float('nan')):8.1f} us   "
              f"fwd+bwd {row.get('fwd+bwd_us_per_call', float('nan')):8.1f} us", flush=True)

    texts = []
    for name in ("triton autotuned", "triton fixed tiles"):
        fn = providers[name][1]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn()
        torch.cuda.synchronize()
        prof.disable()
        for order in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(30)
            texts.append(f"== {name}, fwd+bwd x {args.calls}, by {order} ==\n{buf.getvalue()}")
    # CUDA runtime / driver calls made by our forward + backward: a host synchronisation or a
    # device-to-host copy would show here by name.
    from torch.profiler import ProfilerActivity, profile

    fn = providers["triton autotuned"][1]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
    api = [e for e in prof.key_averages() if e.key.startswith(("cuda", "cu"))]
    lines = [f"{e.key:<40} calls {e.count:6d}  cpu total {e.cpu_time_total / 1e3:9.3f} ms"
             for e in sorted(api, key=lambda e: e.cpu_time_total, reverse=True)]
    texts.insert(0, "== CUDA API calls in 50 x triton fwd+bwd ==\n" + "\n".join(lines) + "\n")
    args.profile_text.write_text("\n".join(texts))
    import triton

    args.out.write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "shape_BHND": shape,
        "dtype": "bf16", "calls": args.calls, "results": rows}, indent=1))
    print(texts[0])
    print(texts[1][:5000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
