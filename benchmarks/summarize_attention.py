"""Markdown summary of bench_attention.py JSON records: TFLOP/s per provider for one mode, our
kernel's ratio to the fastest SDPA backend measured in the same run, and errors.

Usage: python benchmarks/summarize_attention.py benchmarks/results/attention_h200_d64.json [--mode fwd+bwd]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SDPA = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn")
SHOWN = ("triton", *SDPA, "flex", "eager")


def summarize(records: list[dict], mode: str) -> str:
    rows = [r for rec in records for r in rec["results"] if r["mode"] == mode]
    cases = sorted({(r["kind"], r["N"], r["D"]) for r in rows},
                   key=lambda c: (c[2], ("dense", "padded", "varlen").index(c[0]), c[1]))
    present = [p for p in SHOWN if any(r["provider"] == p for r in rows)]
    head = ["case", "N", "D", *present, "ours / best SDPA", "our max err (eager bf16's)"]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for kind, n, d in cases:
        by = {r["provider"]: r for r in rows if (r["kind"], r["N"], r["D"]) == (kind, n, d)}

        def tflops(p):
            r = by.get(p)
            return r.get("tflops") if r and not r.get("error") else None

        cells = [f"{tflops(p):.0f}" if tflops(p) else "-" for p in present]
        sdpa = [(tflops(p), p) for p in SDPA if tflops(p)]
        best = max(sdpa) if sdpa else None
        ours = tflops("triton")
        ratio = f"{ours / best[0]:.2f} ({best[1].removeprefix('sdpa_')})" if ours and best else "-"
        err = by.get("triton", {}).get("max_abs_err")
        eager = by.get("eager", {}).get("max_abs_err")
        errs = f"{err:.1e} ({eager:.1e})" if err is not None and eager is not None else "-"
        out.append(f"| {kind} | {n} | {d} | " + " | ".join(cells) + f" | {ratio} | {errs} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--mode", default="fwd+bwd", choices=["fwd", "bwd", "fwd+bwd"])
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    records = [json.loads(f.read_text()) for f in args.files]
    print(f"{records[0]['device']}, torch {records[0]['torch']}, triton {records[0]['triton']}, "
          f"CUDA {records[0]['cuda']}, {records[0]['dtype']}, {args.mode}, TFLOP/s\n")
    print(summarize(records, args.mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
