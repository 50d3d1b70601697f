"""Compile the attention kernels' autotuning candidates in parallel, before a benchmark tunes.

Triton 3.6 compiles autotuning candidates one after another inside the tuning loop
(triton-lang/triton#4806), about a second each: the attention kernels have 8 candidates for each
of 3 kernels, per head dim, mask / varlen flag and integer specialisation, so a sweep spends
minutes compiling on one core while the GPU idles. `prewarm(target, args, workers)` runs
`target(*args)` in `workers` spawned processes, each restricted to its share of every kernel's
candidates (candidate i goes to worker i % workers). Each compile lands in Triton's on-disk
cache, so the benchmark process that tunes afterwards loads binaries instead of compiling them,
and then times every candidate itself, alone on the GPU (the workers' timings are thrown away).

The cache key is the same in both processes because the launches are the same: the same
kernels, shapes, strides (integer specialisation), constexprs and launch options.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from collections.abc import Callable
from typing import Any

KERNELS = ("fwd", "dkdv", "dq")


def _restrict_candidates(index: int, workers: int) -> None:
    """Make this process's autotuners keep only candidates i with i % workers == index (among
    those the kernel's own pruner keeps; if none of them survives, the first survivor, so the
    launch still runs and the kernels after it are reached)."""
    from avssl.kernels import attention as A

    for kind in KERNELS:
        tuner = A._autotuned(kind)
        mine = [c for i, c in enumerate(tuner.configs) if i % workers == index]
        original = tuner.early_config_prune

        def prune(configs, named_args, _original=original, _mine=mine, **kwargs):
            kept = _original(configs, named_args, **kwargs) if _original else list(configs)
            share = [c for c in kept if any(c is m for m in _mine)]
            return share or kept[:1]

        tuner.early_config_prune = prune


def _worker(index: int, workers: int, target: Callable[..., Any], args: tuple) -> str:
    _restrict_candidates(index, workers)
    try:
        target(*args)
    except Exception:  # noqa: BLE001 - a prewarm failure only costs compile time later
        return f"worker {index}: {traceback.format_exc(limit=3)}"
    return ""


def prewarm(target: Callable[..., Any], args: tuple = (), workers: int = 8) -> float:
    """Run `target(*args)` in `workers` processes that split the autotuning candidates; returns
    the seconds it took. `target` must be importable by name (a module-level function)."""
    start = time.perf_counter()
    if workers <= 0:
        return 0.0
    ctx = mp.get_context("spawn")  # CUDA cannot be re-initialised in a forked child
    with ctx.Pool(workers) as pool:
        problems = pool.starmap(_worker, [(i, workers, target, args) for i in range(workers)])
    for problem in filter(None, problems):
        print(f"prewarm: {problem}")
    return time.perf_counter() - start
