"""The Ray Train worker: one rank of a DeepSpeed pretraining run.

`train_func(config)` runs in every Ray Train worker. It reads only its config argument (never
module globals): the validated recipe as plain data plus the run's shared facts (MLflow URI and
run id, resolved by the driver). Ray has already created the process group (gloo on CPU, nccl
on GPU); DeepSpeed is initialized here.

Checkpoints: every `checkpoint_every` steps (and at the end, and on a stop) all ranks write
their DeepSpeed shards into a fresh local directory and call `ray.train.report` with it. Ray
merges the ranks' directories into one in `storage_path/name/checkpoint_<step>`, registers it
only after every rank has uploaded, and keeps the last K: a crash mid-save leaves the previous
checkpoint registered and intact. Resume restores model, optimizer, LR schedule, step counter
and data position (epoch and batches consumed, replayed exactly by the loader); masking
randomness is re-seeded from (seed, rank, step) every step, so it needs no saved RNG state.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import resource
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist

from avssl.cluster.checkpoint import (DS_TAG, STATE_FILE, StorageFullError, describe_refusal, load_engine_checkpoint,
                                     refused_write, save_engine_checkpoint)
from avssl.cluster.config import PretrainRecipe, derive
from avssl.cluster.console import progress_line
from avssl.cluster.engine import build_engine
from avssl.cluster.tracking import make_logger

log = logging.getLogger("avssl.train")


@dataclass
class TrainState:
    """Everything besides the engine that resume needs (saved by rank 0 in each checkpoint)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` consumed on each rank
    samples_seen: int = 0  # global
    skipped_samples: int = 0  # global: distinct corrupt or unreadable samples and shards
    # Their names (`shard:key`, or `shard` for a shard that cannot be read), in the order met: a
    # damaged shard is read again every epoch, on resampled draws and after a restart, and
    # counts once. (A state saved before names were kept resumes its count and adds to it.)
    bad_samples: list[str] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for key, value in d.items():
            setattr(self, key, [str(v) for v in value] if key == "bad_samples" else int(value))

    def add_skipped(self, names: Iterable[str]) -> list[str]:
        """Record bad samples met anywhere in the run; returns the ones not known before."""
        known = set(self.bad_samples)
        new = [n for n in dict.fromkeys(names) if n not in known]
        self.bad_samples += new
        self.skipped_samples += len(new)
        return new


class Preemption:
    """A stop request: the run's STOP file (written by the driver when it receives SIGTERM or
    SIGINT, or by `avssl jobs stop`), or SIGTERM to this process where a handler can be
    installed. Ray Train V2 runs the train function in a worker thread, where Python cannot
    install signal handlers, so the file is the path that always works. The loop checks on log
    steps and all ranks agree (one all-reduce they do anyway), checkpoint at the same step, then
    exit."""

    def __init__(self, stop_file: Path | None) -> None:
        self.stop_file = stop_file
        self.signalled = False
        try:
            signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread: the stop file covers it
            pass

    def _handler(self, signum, frame) -> None:
        self.signalled = True

    @property
    def requested(self) -> bool:
        return self.signalled or (self.stop_file is not None and self.stop_file.exists())


def _seed(*parts: Any) -> int:
    import zlib

    return zlib.crc32(repr(parts).encode())


def batch_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = {k: batch[k].to(device, non_blocking=True) for k in ("audio", "has_audio", "has_video")}
    out["video"] = batch["video"].to(device, non_blocking=True) if batch["video"] is not None else None
    return out


def tokens_per_sample(config: Any, batch: dict[str, Any]) -> int:
    """Patch tokens one sample carries (audio grid + frames x video grid), from the model config."""
    fa, ta = config.audio_grid(batch["audio"].shape[1])
    tokens = fa * ta
    if batch["video"] is not None:
        v = batch["video"]
        gh, gw = config.video_grid((v.shape[-2], v.shape[-1]))
        tokens += v.shape[1] * gh * gw
    return tokens


class Workload(abc.ABC):
    """What differs between pretraining and finetuning inside the one training loop: how the
    model is built, how a batch becomes its inputs, and which outputs are logged."""

    keys: tuple[str, ...] = ("loss",)
    recipe: Any  # the run's recipe: data, features, optim, deepspeed, trainer, mlflow sections

    @abc.abstractmethod
    def build(self, world: int) -> tuple[torch.nn.Module, list[dict[str, Any]] | None]:
        """The model for this rank and its optimizer parameter groups (None: engine's default)."""

    def inputs(self, batch: dict[str, Any], device: torch.device, step: int) -> dict[str, Any]:
        return batch_inputs(batch, device)

    def values(self, out: Any) -> list[torch.Tensor | None]:
        return [getattr(out, k, None) for k in self.keys]

    def tokens(self, model: torch.nn.Module, batch: dict[str, Any]) -> int:
        return tokens_per_sample(model.config, batch)


class PretrainWorkload(Workload):
    keys = ("loss", "loss_reconstruction", "loss_rec_audio", "loss_rec_video", "loss_contrastive", "contrastive_accuracy",
            "loss_segment", "segment_accuracy")

    def __init__(self, recipe: PretrainRecipe) -> None:
        self.recipe = recipe

    def build(self, world: int):
        from avssl.pretrain.config import build_model
        from avssl.pretrain.modeling import enable_activation_checkpointing

        r = self.recipe
        model = build_model(r.model, r.masking, r.loss)
        if r.deepspeed.activation_checkpointing:
            enable_activation_checkpointing(model)
        return model, None

    def inputs(self, batch: dict[str, Any], device: torch.device, step: int) -> dict[str, Any]:
        # The objective's contrastive losses gather across the data-parallel group it is handed.
        group = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
        return {**batch_inputs(batch, device), "process_group": group}


    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PretrainWorkload:
        return cls(PretrainRecipe.model_validate(config["recipe"]))


def make_workload(config: dict[str, Any]) -> Workload:
    """The workload named by its import path, "module:Class" (default: pretraining), built from the
    worker config. The loop imports no task package: finetuning plugs in from avssl.finetune
    without cluster/ depending on it."""
    import importlib

    module, _, name = config.get("workload", "avssl.cluster.train:PretrainWorkload").partition(":")
    return getattr(importlib.import_module(module), name).from_config(config)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class MetricWindow:
    """Loss components accumulated as tensors between log steps (no host sync per step)."""

    def __init__(self, device: torch.device, keys: tuple[str, ...]) -> None:
        self.device = device
        self.KEYS = keys
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.KEYS), device=self.device, dtype=torch.float64)
        self.micro = 0
        self.samples = 0
        self.tokens = 0
        self.skipped = 0
        self.skipped_keys: list[str] = []  # names of bad samples this rank's loader met first in the window
        self.data_s = 0.0
        self.t0 = time.perf_counter()

    def add(self, vals: list[torch.Tensor | None], samples: int, tokens: int, skipped: int, data_s: float,
            skipped_keys: list[str] = ()) -> None:
        self.sums += torch.stack([(v if v is not None else torch.zeros((), device=self.device)).detach().double() for v in vals])
        self.micro += 1
        self.samples += samples
        self.tokens += tokens
        self.skipped += skipped
        self.skipped_keys += skipped_keys
        self.data_s += data_s

    def reduce(self, world: int) -> dict[str, float]:
        """Average losses over micro-steps and ranks; sum throughput counters over ranks."""
        elapsed = time.perf_counter() - self.t0
        counters = torch.tensor([self.samples, self.tokens, self.skipped, len(self.skipped_keys),
                                 self.data_s / max(elapsed, 1e-9)], device=self.device, dtype=torch.float64)
        packed = torch.cat([self.sums / max(1, self.micro), counters])
        if world > 1:
            dist.all_reduce(packed)
        n = len(self.KEYS)
        means = (packed[:n] / world).tolist()
        samples, tokens, skipped, named, wait = packed[n:].tolist()
        metrics = dict(zip(self.KEYS, means))
        metrics.update({
            "samples": samples,
            "samples_per_s": samples / elapsed,
            "tokens_per_s": tokens / elapsed,
            "skipped_reads": skipped,  # bad samples met in the window, re-reads included
            "skipped_names": named,  # > 0: some rank has names to merge (see `gather_names`)
            "data_wait_fraction": wait / world,
        })
        return metrics


def gather_names(names: list[str], world: int) -> list[str]:
    """Every rank's names, rank 0's first: all ranks get the same list. Called by all ranks, on
    log steps where some rank has one (a bad sample is rare, an object all-gather is not free)."""
    if world == 1:
        return list(names)
    parts: list[list[str] | None] = [None] * world
    dist.all_gather_object(parts, list(names))
    return [n for part in parts for n in part or ()]


SKIPPED_TAG_NAMES = 20  # bad samples named in the run's avssl.skipped_samples tag


def skipped_tag(names: list[str]) -> str:
    more = f"\n... and {len(names) - SKIPPED_TAG_NAMES} more" if len(names) > SKIPPED_TAG_NAMES else ""
    return "\n".join(names[:SKIPPED_TAG_NAMES]) + more


def _any_rank(flag: bool, device: torch.device, world: int) -> bool:
    t = torch.tensor([int(flag)], device=device)
    if world > 1:
        dist.all_reduce(t)  # int32 sums are supported by every backend, unlike bool
    return bool(t.item())


def save_checkpoint(engine, state: TrainState, metrics: dict[str, float], rank: int,
                    run_dir: str | None = None) -> None:
    """All ranks: DeepSpeed shards into a fresh local dir, then report it to Ray (a barrier), which
    copies it into `run_dir`. A write the storage refuses (disk full, quota, file size limit), here
    or in Ray's copy, raises StorageFullError: the driver stops without restarts."""
    import ray.train

    name = f"checkpoint_{state.step:09d}"
    with tempfile.TemporaryDirectory(prefix="avssl-ckpt-") as tmp:
        where = tmp
        try:
            save_engine_checkpoint(engine, tmp, tag=DS_TAG)
            if rank == 0:
                Path(tmp, STATE_FILE).write_text(json.dumps(state.state_dict()))
            where = f"{run_dir}/{name}" if run_dir else name
            ray.train.report(
                {**metrics, "step": state.step},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=name,
            )
        except Exception as exc:
            refused = refused_write(exc)
            if refused is None:
                raise
            raise StorageFullError(f"checkpoint at step {state.step} not saved: cannot write "
                                   f"{describe_refusal(refused, where)}") from exc


def restore_checkpoint(engine, state: TrainState) -> bool:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return False
    with ckpt.as_directory() as d:
        load_engine_checkpoint(engine, d, tag=DS_TAG)  # weights-only: never unpickles
        state.load_state_dict(json.loads(Path(d, STATE_FILE).read_text()))
        if dist.is_initialized():
            dist.barrier()  # keep the directory alive until every rank has read it
    return True


def quiet_frameworks() -> None:
    """Ray Train's per-checkpoint reports and DeepSpeed's set-up messages at INFO drown avssl's own
    lines: keep their warnings only, unless `avssl -v` (AVSSL_VERBOSE=1) asks for everything."""
    if os.environ.get("AVSSL_VERBOSE") == "1":
        return
    prefixes = ("ray.train", "ray.tune", "ray.data", "DeepSpeed", "deepspeed")
    # Some of Ray Train's loggers are named by their file path (logging.getLogger(__file__)).
    names = [n for n in list(logging.root.manager.loggerDict) if n.startswith(prefixes) or "/ray/train/" in n]
    for name in (*prefixes, *names):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_func(config: dict[str, Any]) -> None:
    """Ray Train entry point for one rank."""
    import ray
    import ray.train

    from avssl.data.loader import StreamingLoader

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_frameworks()
    workload = make_workload(config)
    recipe = workload.recipe
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t = recipe.trainer
    device = torch.device("cuda", ctx.get_local_rank()) if t.gpus_per_worker > 0 else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    torch.manual_seed(t.seed)  # identical initialization on every rank
    model, groups = workload.build(world)
    derived = derive(recipe, world)
    engine, _, scheduler, _ = build_engine(
        model, recipe.deepspeed, recipe.optim, micro_batch=recipe.data.batch_size, world_size=world,
        absolute_lr=derived["absolute_lr"], total_steps=t.total_steps, device=device, groups=groups,
    )
    state = TrainState()
    resumed = restore_checkpoint(engine, state)
    loader = StreamingLoader(recipe.data, recipe.features, rank=rank, world_size=world)
    logger = make_logger(rank, config.get("tracking_uri"), config.get("run_id"), recipe.mlflow)
    if rank == 0:
        log.info("%s at step %d/%d (world %d, effective batch %d, lr %.3g)", "resumed" if resumed else "starting",
                 state.step, t.total_steps, world, derived["effective_batch"], derived["absolute_lr"])
    if config.get("placement_dir"):  # where each rank ran: for users, and checked by the multi-node test
        import socket

        Path(config["placement_dir"]).mkdir(parents=True, exist_ok=True)
        Path(config["placement_dir"], f"rank_{rank}.json").write_text(json.dumps(
            {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
             "hostname": socket.gethostname(), "pid": os.getpid(), "device": str(device),
             "start_step": state.step, "resumed": resumed}))
    preemption = Preemption(Path(config["stop_file"]) if config.get("stop_file") else None)
    window = MetricWindow(device, workload.keys)
    grad_accum = recipe.deepspeed.grad_accum
    loader.set_epoch(state.epoch, state.batches_in_epoch, state.bad_samples)
    batches = iter(loader)
    status = "FINISHED"
    started, start_step = time.perf_counter(), state.step  # this attempt's pace, for the ETA
    try:
        while state.step < t.total_steps:
            for _ in range(grad_accum):
                t_data = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:  # epoch boundary: same number of batches on every rank
                    state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                    loader.set_epoch(state.epoch, known_bad=state.bad_samples)
                    batches = iter(loader)
                    batch = next(batches)
                data_s = time.perf_counter() - t_data
                state.batches_in_epoch += 1
                torch.manual_seed(_seed(t.seed, rank, state.step, state.batches_in_epoch))  # masks
                out = engine(**workload.inputs(batch, device, state.step))
                engine.backward(out.loss)
                engine.step()
                n = len(batch["meta"])
                window.add(workload.values(out), n, n * workload.tokens(model, batch), batch["skipped"], data_s,
                           batch["skipped_keys"])
            state.step += 1
            last = state.step == t.total_steps
            if state.step % t.log_every == 0 or last or state.step % t.checkpoint_every == 0:
                metrics = window.reduce(world)
                state.samples_seen += int(metrics.pop("samples"))
                if metrics.pop("skipped_names") and state.add_skipped(gather_names(window.skipped_keys, world)):
                    logger.set_tags({"avssl.skipped_samples": skipped_tag(state.bad_samples)})
                metrics.update({
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                    "memory_mb": _memory_mb(device),
                    "epoch": state.epoch,
                    "samples_seen": state.samples_seen,
                    "skipped_samples": state.skipped_samples,  # distinct, over the whole run
                })
                logger.log_metrics(metrics, step=state.step)
                if rank == 0:
                    log.info("%s", progress_line(state.step, t.total_steps, {k: metrics[k] for k in workload.keys},
                                                 metrics["samples_per_s"], state.skipped_samples,
                                                 time.perf_counter() - started, state.step - start_step))
                window.reset()
                stop = _any_rank(preemption.requested, device, world)
                if state.step % t.checkpoint_every == 0 or last or stop:
                    save_checkpoint(engine, state, metrics, rank, config.get("run_dir"))
                if stop:
                    status = "KILLED"
                    log.warning("rank %d: stop requested: checkpointed at step %d, exiting", rank, state.step)
                    break
    finally:
        # Flush only: the driver closes the MLflow run when the whole job ends, so a restarted
        # worker group (fault tolerance) keeps logging into the same run.
        logger.finish(status=None, timeout_s=30)
    if status == "KILLED" and rank == 0:
        Path(config["stop_file"]).with_name("PREEMPTED").write_text(str(state.step))
