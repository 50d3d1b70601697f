"""The one place where a model is wrapped into a DeepSpeed engine.

The DeepSpeed JSON is generated from the typed config (never kept by hand beside it): ZeRO
stage, bf16 on GPU / fp32 on CPU, gradient accumulation and clipping. The optimizer is torch's
AdamW with MAE's parameter groups (no weight decay on norms, biases, embeddings), and the
schedule a linear warmup then cosine decay as a LambdaLR: DeepSpeed steps it with the engine and
saves/restores its state in every checkpoint, so resume is exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from avssl.cluster.config import DeepSpeedConfig, OptimConfig


def resolve_precision(ds: DeepSpeedConfig, device: torch.device) -> str:
    if ds.precision != "auto":
        return ds.precision
    return "bf16" if device.type == "cuda" else "fp32"


def deepspeed_config(ds: DeepSpeedConfig, optim: OptimConfig, micro_batch: int, world_size: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON for this run."""
    precision = resolve_precision(ds, device)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": micro_batch * ds.grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # progress is ours (MLflow + logs), not DeepSpeed's prints
        "wall_clock_breakdown": False,
    }
    if ds.zero_stage == 3:
        cfg["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": True})
    if ds.activation_checkpointing:
        cfg["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False}
    return cfg


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """MAE's rule: 1-D parameters (norms, biases) and embeddings/tokens get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "token" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """lr multiplier of optimizer step k (0-based): (k + 1) / warmup_steps over the warmup, reaching 1 on
    its last step, then cosine 1 -> min_ratio at total_steps, and min_ratio after."""
    # Written out: no transformers schedule gives these multipliers. get_cosine_with_min_lr_schedule_with_warmup
    # warms up from 0 (k / warmup), get_wsd_schedule from min_ratio, and the _lr_rate variant, whose warmup
    # is this one, starts the cosine a step late ((k - warmup + 1) / (total - warmup)).

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_engine(model: torch.nn.Module, ds: DeepSpeedConfig, optim: OptimConfig, *, micro_batch: int, world_size: int,
                 absolute_lr: float, total_steps: int, device: torch.device, groups: list[dict[str, Any]] | None = None):
    """-> (engine, optimizer, scheduler, ds_config). Call inside the Ray train function, after
    Ray has created the process group (gloo on CPU, nccl on GPU)."""
    import deepspeed

    if device.type == "cpu":
        skip_shm_allreduce_build()
    cfg = deepspeed_config(ds, optim, micro_batch, world_size, device)
    groups = groups if groups is not None else param_groups(model, optim.weight_decay)
    for group in groups:  # layer-wise decay and head scaling: scale the peak lr per group
        group["lr"] = absolute_lr * group.get("lr_scale", 1.0)
    opt = torch.optim.AdamW(
        groups, lr=absolute_lr, betas=tuple(optim.betas), eps=optim.eps, fused=device.type == "cuda"
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(optim.warmup_steps, total_steps, optim.min_lr_ratio))
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    return engine, opt, sched, cfg


def skip_shm_allreduce_build() -> None:
    """DeepSpeed's communication backend on a CPU compiles its shared-memory all-reduce with the
    system's C++ compiler when it starts (torch's JIT extension build: about 20 s on 2 cores, and
    again for every virtual environment, as the build file holds its path). Only its
    `inference_all_reduce` uses it, which training never calls: gradients go through
    torch.distributed (gloo). Marking the op incompatible in DeepSpeed's per-process table (built
    once and kept, for edits like this one) skips the build, and with it the need for a compiler."""
    import deepspeed.ops

    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(ops, dict):
        ops["deepspeed_shm_comm"] = False
