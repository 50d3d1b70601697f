"""The driver of a pretraining run: Ray cluster, storage checks, MLflow run, TorchTrainer, release.

`run_pretraining(recipe)` is what `avssl pretrain` and a submitted Ray job execute. With no
address it starts a local Ray instance; with `address` (or RAY_ADDRESS) it joins a cluster.
Re-running with the same `trainer.name` and `trainer.storage_path` resumes from the newest
checkpoint (Ray Train V2 finds it) and continues the same MLflow run.

SIGTERM or SIGINT (Ctrl-C) to this process or to its whole process group (a terminal, a batch
system; preemption of the job's entry point, `avssl jobs stop`) writes the run's STOP file: the
workers checkpoint at their next log step and exit; re-running resumes. A second Ctrl-C stops at
once, without that checkpoint.

Restarts after a worker failure (`trainer.max_failures`) are made here, not by Ray Train, so a
failure that no restart can fix (a NoRestartError in a worker: a full disk, a rank whose shards
cannot be read) stops the run at once with its message, and so does any failure after a stop was
asked for.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avssl import AvsslError, NoRestartError
from avssl.cluster.config import PretrainRecipe, derive
from avssl.cluster.checkpoint import (STATE_FILE, StorageFullError, complete_checkpoints, describe_refusal,
                                     refused_write, remove_partial_checkpoints)
from avssl.cluster.console import install_output_filter
from avssl.cluster.export import RUN_CONFIG, export_release
from avssl.cluster.runlock import LOCK_FILE, RunLock
from avssl.cluster.train import train_func
from avssl.cluster.tracking import (MlflowLogger, find_run, mlflow_ui_command, open_run, public_recipe, redact_uri,
                                   resolve_tracking_uri)
from avssl.config import flatten, save_resolved, to_yaml

log = logging.getLogger("avssl.launch")

LOCAL_RAY_OPTIONS = {"_node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1"}
# Ray Train settings for a run on the local instance (a user's own value of each wins). Ray Train
# hands them from the driver to its controller.
LOCAL_TRAIN_ENV = {
    # The controller polls its workers at this interval, and each state change of a run (started,
    # finished, stopped) waits for a poll. Ray's 2 s default is sized for clusters; on one machine a
    # poll is a local call, and a quarter second has a run's end seen at once: about 4 s less a run.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # The preemption watcher (an actor of its own, per run) polls Ray for nodes being drained,
    # which a cluster's autoscaler or a cloud's spot notice does. The local instance is one node,
    # the driver's own, with no autoscaler: there is nothing to watch.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "hdfs://", "az://")


@dataclass
class RunResult:
    status: str  # FINISHED or PREEMPTED
    run_dir: Path
    checkpoint: Path | None
    release: Path | None
    mlflow_run_id: str | None
    tracking_uri: str
    metrics: dict[str, Any]
    stop_signal: int | None = None  # PREEMPTED by SIGINT or SIGTERM (None: a STOP file, `avssl jobs stop`)


def init_ray(address: str | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    level = logging.INFO if os.environ.get("AVSSL_VERBOSE") == "1" else logging.WARNING
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=level)
    else:  # the embedded default: a private local instance, reachable from this machine only
        # (a Ray node runs any code it is sent). The dashboard hosts the state API Ray Train polls.
        # address="local": without it Ray attaches to whatever cluster `ray start` last recorded
        # in /tmp/ray, which may be another user's or another job's.
        for name, value in LOCAL_TRAIN_ENV.items():
            os.environ.setdefault(name, value)
        with _loopback_node(), _known_address(), _sigterm_blocked():
            ray.init(address="local", log_to_driver=True, logging_level=level, **LOCAL_RAY_OPTIONS)
        _end_without_grace()
    install_output_filter()  # progress drawn in place on a terminal, Ray's false alarms dropped


@contextlib.contextmanager
def _sigterm_blocked():
    """SIGTERM blocked in this thread while the local instance starts. A terminal or a batch system
    may signal the driver's whole process group, and the instance's processes (GCS, raylet,
    dashboard) are in it; started under the block they keep it, as they keep the SIGINT block Ray
    gives them, so SIGTERM reaches the driver alone, which checkpoints the run and then ends them
    (Ray's shutdown sends SIGTERM, waits a second, then SIGKILL). Ray's workers have process groups
    of their own."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _end_without_grace() -> None:
    """The local instance's processes keep SIGTERM blocked (`_sigterm_blocked`), so the grace Ray's
    shutdown gives each (SIGTERM, a second's wait, then SIGKILL) is a wait for nothing: about 4 s at
    the end of every run. Ending this instance, Ray is told to go straight to SIGKILL, what each
    process got after its second anyway (the driver has disconnected by then), and the raylet's own
    children (its agents and workers) are ended with it: otherwise an agent that finds its raylet
    gone spends two seconds making sure, then waits on the GCS, already ended, to report it."""
    import psutil
    from ray._private import ray_constants, worker

    node = worker._global_node
    if node is None:
        return
    kill = node.kill_all_processes

    def end_all(check_alive: bool = True, allow_graceful: bool = False, wait: bool = False) -> None:
        children = []
        for info in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, []):
            with contextlib.suppress(psutil.Error):
                children += psutil.Process(info.process.pid).children(recursive=True)
        kill(check_alive=check_alive, allow_graceful=False, wait=wait)
        for child in children:  # SIGKILL: gone at once, whenever their zombies are reaped
            with contextlib.suppress(psutil.Error):
                child.kill()

    node.kill_all_processes = end_all


@contextlib.contextmanager
def _known_address():
    """The local instance's GCS on a free loopback port chosen here, and RAY_ADDRESS naming it in
    the environment its processes inherit. Ray Train's PlacementGroupCleaner asks the state API
    whether the run's controller is alive without an address; with none in its environment Ray
    guesses, and with several instances on the machine (two runs, parallel tests) it picks the one
    `ray start` last recorded: an error every run, or, were that instance alive, "no such actor" and
    the healthy run's placement group removed. The driver's own environment is restored after."""
    import socket

    from ray._private import ray_constants

    with socket.socket() as s:  # a port the kernel has just found free; the GCS takes it at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    names = (ray_constants.GCS_PORT_ENVIRONMENT_VARIABLE, ray_constants.RAY_ADDRESS_ENVIRONMENT_VARIABLE)
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict(zip(names, (str(port), f"127.0.0.1:{port}"))))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _loopback_node():
    """On Linux Ray replaces a node address of 127.0.0.1 by the machine's network address, and its
    servers then listen on every interface, unless Ray's single-machine mode (the one it uses on
    macOS and Windows) is on. Switch it on while the local instance starts: its processes inherit
    the variable and bind to the loopback address only."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved_env


def check_shared_storage(storage: Path) -> None:
    """On a multi-node cluster every node must see the same storage_path: write a marker here
    and look for it from a task pinned to each node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) <= 1 or str(storage).startswith(REMOTE_SCHEMES):
        return
    marker = storage / f".avssl-shared-{uuid.uuid4().hex}"
    marker.write_text("shared storage check")

    @ray.remote(num_cpus=0)
    def sees(path: str) -> tuple[str, bool]:
        return ray.get_runtime_context().get_node_id(), Path(path).exists()

    try:
        checks = ray.get([
            sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
            for n in nodes
        ], timeout=120)
    finally:
        marker.unlink(missing_ok=True)
    blind = [node for node, ok in checks if not ok]
    if blind:
        raise AvsslError(
            f"trainer.storage_path={storage} is not shared: {len(blind)} of {len(nodes)} nodes cannot see it. "
            "Multi-node checkpoints need shared storage: mount the same NFS path on every node or use "
            "an object store URI (s3://bucket/runs)."
        )
    log.info("storage %s is shared by all %d nodes", storage, len(nodes))


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def environment_params() -> dict[str, str]:
    import importlib.metadata as md

    import torch

    versions = {}
    for dist in ("avssl", "torch", "deepspeed", "ray", "transformers", "triton", "webdataset", "mlflow"):
        try:
            versions[f"version.{dist}"] = md.version(dist)
        except md.PackageNotFoundError:
            versions[f"version.{dist}"] = "absent"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {**versions, "git_commit": _git_commit(), "driver_device": device, "python": platform.python_version()}


class StopOnSignal:
    """While active, SIGTERM and SIGINT (Ctrl-C) write the STOP file instead of killing the driver,
    and `received` keeps the first of them (the exit status is 128 + its number). A second SIGINT
    raises KeyboardInterrupt: stop at once, without the checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, stop_file: Path) -> None:
        self.stop_file = stop_file
        self.previous: dict[int, Any] = {}
        self.received: int | None = None

    def __enter__(self) -> "StopOnSignal":
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # driver not in the main thread (tests calling from threads)
                pass
        return self

    def _handler(self, signum, frame) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = signum
        again = "; Ctrl-C again stops at once, without it" if signum == signal.SIGINT else ""
        log.warning("%s: asking the workers to checkpoint at their next log step and stop (%s)%s",
                    signal.Signals(signum).name, self.stop_file, again)
        self.stop_file.write_text(str(time.time()))

    def __exit__(self, *exc) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)


def worker_errors(exc: BaseException) -> list[BaseException]:
    """What the train function raised on each failed rank, by rank, from Ray Train's failure: Ray
    hands each over as a UserExceptionWithTraceback keeping the original in `_base_exc`; a worker
    that died comes as Ray's own error."""
    failures = getattr(exc, "worker_failures", None) or {}
    return [getattr(failures[rank], "_base_exc", failures[rank]) for rank in sorted(failures)]


def message_of(exc: BaseException) -> str:
    """An exception's message on one line. Errors that crossed a process carry a traceback as
    their text (Ray's wrapper; torch's DataLoader re-raises a loader worker's error that way):
    its last line is `module.Class: message`."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    last = lines[-1].strip() if lines else type(exc).__name__
    for prefix in (f"{type(exc).__module__}.{type(exc).__qualname__}: ", f"{type(exc).__qualname__}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


def no_restart_error(exc: BaseException) -> NoRestartError | None:
    """The failure among the ranks' errors that no restart can fix: a NoRestartError, or a write
    the storage refused (disk full, quota, file size limit) wherever it happened."""
    for err in worker_errors(exc):
        if isinstance(err, NoRestartError):
            return err
        refused = refused_write(err)
        if refused is not None:
            return StorageFullError(f"cannot write {describe_refusal(refused, 'a file')}")
    return None


def failure_summary(exc: BaseException) -> str:
    """`rank 1: ValueError: ...` for each failed rank, on one line."""
    failures = getattr(exc, "worker_failures", None)
    if not failures:
        return message_of(exc)
    return "; ".join(f"rank {rank}: {message_of(failures[rank])}" for rank in sorted(failures))


def stop_message(err: NoRestartError, run_name: str, run_dir: Path) -> NoRestartError:
    """The run's last line for a failure no restart can fix. After a refused write: the partial
    checkpoint it left is removed (it would hold space a re-run needs) and the checkpoint a re-run
    resumes from is named."""
    text = f"run {run_name} stopped: {message_of(err)}"
    if isinstance(err, StorageFullError):
        removed = remove_partial_checkpoints(run_dir)
        good = complete_checkpoints(run_dir, warn=False)
        resume = (f"resume from step {int(good[-1].name.rsplit('_', 1)[1])} ({good[-1].name}, intact)" if good
                  else "start from step 0 (no checkpoint was saved)")
        text += (". A restart cannot fix a full disk, so there was none: free space there, then re-run the same "
                 f"command to {resume}")
        if removed:
            text += f"; removed the partial {', '.join(removed)}"
    return type(err)(text)


def end_ray_output() -> None:
    """Before a stopped or failed run's last line: disconnect from Ray (ending a local instance this
    driver started). Ray forwards its processes' output asynchronously, and a late line (an actor's
    warning about the stop) would otherwise come after it."""
    import ray

    ray.shutdown()


def plot_loss_curves(uri: str, run_id: str, out: Path) -> Path | None:
    """Loss components against step from the run's MLflow history, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    plotted = False
    for key in ("loss", "loss_reconstruction", "loss_contrastive", "loss_segment"):
        hist = sorted({m.step: m.value for m in client.get_metric_history(run_id, key)}.items())
        if hist and any(v > 0 for _, v in hist):  # an objective switched off logs 0: no line on a log axis
            ax.plot(*zip(*hist), label=key, marker=".")
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def objectives_off(recipe: Any, modalities: dict[str, int]) -> list[str]:
    """The pretraining objectives that a corpus of these modalities cannot train (weight > 0 but
    no sample to compute them on), each with the reason."""
    loss = recipe.loss
    audio = modalities.get("audio+video", 0) + modalities.get("audio", 0)
    video = modalities.get("audio+video", 0) + modalities.get("video", 0)
    off = []
    if loss.contrastive_weight > 0 and not modalities.get("audio+video"):
        off.append("loss_contrastive (the audio-visual contrast needs clips with both audio and video)")
    rec = loss.reconstruction_weight > 0
    if rec and loss.audio_reconstruction_weight > 0 and not audio:
        off.append("loss_rec_audio (no clip has audio)")
    if rec and loss.video_reconstruction_weight > 0 and not video:
        off.append("loss_rec_video (no clip has video)")
    return off


def check_corpus(recipe: Any) -> Any:
    """Fail before starting any worker if the corpus or its statistics are missing, and pass
    workers an absolute path (Ray workers run in their own working directory)."""
    from avssl.data.features import load_stats
    from avssl.data.shards import CorpusIndex

    corpus = Path(recipe.data.corpus).resolve()
    CorpusIndex.load(corpus).count(recipe.data.split)
    load_stats(corpus).check_matches(recipe.features, str(corpus / "stats.json"))
    check_readable(corpus, recipe.data.split)
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"corpus": str(corpus)})})


def check_readable(corpus: Path, split: str) -> None:
    """Fail at once when no shard of the split can be read (missing, not a tar, empty): every
    restart of the workers would fail the same way. Reads up to the first readable sample, which
    on a sound corpus is in the first shard."""
    from avssl.data.shards import CorpusIndex, ReadReport, iter_checked_samples

    report = ReadReport()
    samples = iter_checked_samples(CorpusIndex.load(corpus).shards(split), report)
    first = next(samples, None)
    samples.close()
    if first is None:
        raise AvsslError(
            f"corpus {corpus}: no readable shard in split {split!r}"
            f"{f' ({report.describe(limit=1)})' if report else ''}, so training cannot start. "
            f"`avssl data inspect {corpus} --split {split}` names every damaged shard; restore them or write the "
            "corpus again (avssl data prepare, avssl data synth), then re-run")


# Sections that fix what a checkpoint holds (parameter shapes, what the features mean): a run
# resumes only under the same values. Steps, learning rate, data and logging may change, and so
# may the loss weights, but not the loss keys that add parameters (a learned temperature, the
# contrastive projection heads, the segment contrast's heads: only whether its weight is above 0).
SHAPE_SECTIONS = ("model", "head", "features")
SHAPE_KEYS = ("loss.learn_temperature", "loss.projection", "loss.projection_dim")


def _shape_keys(tree: dict[str, Any]) -> dict[str, Any]:
    flat = flatten(tree)
    keys = {k: v for k, v in flat.items() if k.split(".", 1)[0] in SHAPE_SECTIONS or k in SHAPE_KEYS}
    if any(k.startswith("loss.") for k in flat):  # a pretraining recipe; saved before the key existed: 0
        keys["loss.segment_contrast"] = flat.get("loss.segment_weight", 0.0) > 0.0
    return keys


def check_resumable(recipe: Any, run_dir: Path) -> None:
    """Refuse to resume a run whose checkpoints were written under a different model, head or
    feature config, or with other parameter-adding loss keys: DeepSpeed would fail deep inside
    the workers after every restart."""
    import yaml

    saved = run_dir / "avssl" / RUN_CONFIG
    if not saved.is_file() or not any(run_dir.glob("checkpoint_*")):
        return
    tree = yaml.safe_load(saved.read_text()) or {}
    try:  # a recipe saved before a key existed gets the key's default, as it ran (no false refusal)
        tree = type(recipe).model_validate(tree).model_dump(mode="json")
    except ValueError:  # not loadable any more (a key since removed): compare what it holds
        pass
    before = _shape_keys(tree)
    now = _shape_keys(recipe.model_dump(mode="json"))
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        diff = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        raise AvsslError(
            f"{run_dir} holds checkpoints of a different model ({diff}{'; ...' if len(changed) > 6 else ''}), "
            f"so it cannot resume under this recipe. Pick a new run name (--set trainer.name=...) or delete "
            f"{run_dir} to start over.")


def finished_run(recipe: Any, run_dir: Path, storage: str, exports: bool) -> RunResult | None:
    """The run as it stands when it has already reached trainer.total_steps under this very recipe
    (its saved config.yaml reads the same) and written its release: re-running its command returns
    it without starting Ray, exporting again or registering a second model version. Any change to
    the recipe (more steps, another learning rate) goes on training instead; so does a run whose
    checkpoints are in an object store (not read from here). None when the run is not finished."""
    t = recipe.trainer
    control = run_dir / "avssl"
    saved = control / RUN_CONFIG
    if storage.startswith(REMOTE_SCHEMES) or not saved.is_file() or (control / "PREEMPTED").exists():
        return None
    checkpoints = complete_checkpoints(run_dir, warn=False)
    release = control / "release"  # written atomically (export.atomic_directory): there means complete
    if not checkpoints or (t.export and exports and not release.is_dir()):
        return None
    try:
        step = int(json.loads((checkpoints[-1] / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None
    if step < t.total_steps or saved.read_text() != to_yaml(public_recipe(recipe)):
        return None
    uri = resolve_tracking_uri(recipe.mlflow, storage)
    run_id, metrics = find_run(recipe.mlflow, uri, t.name)
    log.warning("run %s finished at step %d earlier under this recipe: kept as it is (change the recipe or "
                "trainer.name to train again)", t.name, step)
    return RunResult("FINISHED", run_dir, checkpoints[-1], release if release.is_dir() else None, run_id, uri,
                     {**metrics, "step": step})


def run_pretraining(recipe: PretrainRecipe, address: str | None = None) -> RunResult:
    """Pretraining: the shared runner with the pretraining workload and a backbone release."""
    return run_training(recipe, address, kind="pretrain",
                        export=lambda ckpt, out, metrics: export_release(ckpt, out, recipe, metrics))


def storage_location(trainer: Any) -> str:
    """trainer.storage_path as Ray gets it: an object store URI as is, a local path absolute."""
    p = trainer.storage_path
    return p if p.startswith(REMOTE_SCHEMES) else str(Path(p).resolve())


def run_training(recipe: Any, address: str | None, *, kind: str, export=None,
                 extra: dict[str, Any] | None = None, prepare=None) -> RunResult:
    """The one driver for pretraining and finetuning (their recipes share the data, features,
    optim, deepspeed, trainer and mlflow sections). `prepare(run_dir)` runs after Ray is up and
    may return extra worker config; `export(checkpoint, out, metrics)` writes the release.
    Holds the run's lock (cluster/runlock.py) throughout: a second driver of the same run refuses."""
    lock = Path(storage_location(recipe.trainer)) / recipe.trainer.name / "avssl" / LOCK_FILE
    with RunLock(lock):
        return _run_training(recipe, address, kind=kind, export=export, extra=extra, prepare=prepare)


def _run_training(recipe: Any, address: str | None, *, kind: str, export=None,
                  extra: dict[str, Any] | None = None, prepare=None) -> RunResult:
    import ray.train
    from ray.train.torch import TorchTrainer

    recipe = check_corpus(recipe)
    off = []
    if kind == "pretrain":
        from avssl.data.shards import CorpusIndex

        modalities = CorpusIndex.load(recipe.data.corpus).modalities(recipe.data.split)
        off = objectives_off(recipe, modalities)
        if off:
            log.warning("corpus %s (%s): these objectives are off and log 0: %s", recipe.data.corpus,
                        ", ".join(f"{k} {v}" for k, v in modalities.items()), "; ".join(off))
    t = recipe.trainer
    storage = storage_location(t)
    if not storage.startswith(REMOTE_SCHEMES):
        Path(storage).mkdir(parents=True, exist_ok=True)
    done = finished_run(recipe, Path(storage) / t.name, storage, export is not None)
    if done is not None:
        return done
    init_ray(address)
    if not storage.startswith(REMOTE_SCHEMES):
        check_shared_storage(Path(storage))
    run_dir = Path(storage) / t.name
    control = run_dir / "avssl"
    control.mkdir(parents=True, exist_ok=True)
    for marker in ("STOP", "PREEMPTED"):
        (control / marker).unlink(missing_ok=True)
    check_resumable(recipe, run_dir)
    complete_checkpoints(run_dir)  # names any partial checkpoint; Ray resumes from its registered one
    save_resolved(public_recipe(recipe), control / RUN_CONFIG)  # written down and logged: no credentials
    extra = {**(extra or {}), **((prepare(run_dir) if prepare else None) or {})}

    uri = resolve_tracking_uri(recipe.mlflow, storage)
    run_id = None
    for attempt in range(recipe.mlflow.retries + 1):
        try:
            run_id = open_run(recipe.mlflow, uri, t.name, storage)
            break
        except Exception as exc:
            log.warning("MLflow at %s unavailable (%s)%s", redact_uri(uri), exc, "; retrying" if attempt < recipe.mlflow.retries else
                        "; this run goes on untracked")
            time.sleep(min(10, 2**attempt))
    tracker = MlflowLogger(uri, run_id, recipe.mlflow) if run_id else None
    world = t.num_workers
    derived = derive(recipe, world)
    if tracker and off:
        tracker.set_tags({"avssl.objectives_off": "; ".join(off)})
    if tracker:
        tracker.log_params({**flatten(public_recipe(recipe)), **{f"derived.{k}": v for k, v in derived.items()}, **environment_params()})
        tracker.log_artifact(control / RUN_CONFIG)
    log.info("run %s: %d workers, effective batch %d, absolute lr %.4g, MLflow %s (run %s)",
             t.name, world, derived["effective_batch"], derived["absolute_lr"], redact_uri(uri), run_id)

    scaling = ray.train.ScalingConfig(
        num_workers=(t.min_workers, t.num_workers) if t.min_workers else t.num_workers,
        use_gpu=t.gpus_per_worker > 0,
        resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.gpus_per_worker else {})},
    )
    run_config = ray.train.RunConfig(
        name=t.name,
        storage_path=storage,
        failure_config=ray.train.FailureConfig(max_failures=0),  # restarts are made below, where errors are told apart
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
    )
    make_trainer = functools.partial(
        TorchTrainer,
        train_func,
        train_loop_config={
            "kind": kind,
            **extra,
            "recipe": recipe.model_dump(mode="json"),
            "tracking_uri": uri if run_id else None,
            "run_id": run_id,
            "stop_file": str(control / "STOP"),
            "placement_dir": str(control / "placement"),
            "run_dir": str(run_dir),  # where Ray copies the checkpoints (named when a copy fails)
        },
        scaling_config=scaling,
        run_config=run_config,
    )
    restarts = 0
    with StopOnSignal(control / "STOP") as stop:
        while True:
            trainer = make_trainer()
            # During fit() Ray Train would replace the SIGINT handler by its own, which aborts the
            # run at once without a checkpoint: StopOnSignal's stays.
            trainer._register_sigint_handler = lambda controller: None
            try:
                result = trainer.fit()
                break
            except KeyboardInterrupt:  # a second Ctrl-C
                if tracker:
                    tracker.finish(status="KILLED", timeout_s=10)
                raise
            except Exception as exc:
                fatal = no_restart_error(exc)
                if fatal is None and stop.received is None and (t.max_failures < 0 or restarts < t.max_failures):
                    restarts += 1
                    log.warning("run %s: %s; restart %d of %s from the newest checkpoint", t.name, failure_summary(exc),
                                restarts, t.max_failures if t.max_failures >= 0 else "unlimited")
                    continue
                if tracker:
                    tracker.finish(status="FAILED")
                end_ray_output()
                if fatal is not None:
                    raise stop_message(fatal, t.name, run_dir) from None
                raise AvsslError(f"training run {t.name} failed after {restarts} restarts: {failure_summary(exc)} "
                                 "(the workers' tracebacks are above)") from exc

    metrics = dict(result.metrics or {})
    checkpoint = Path(result.checkpoint.path) if result.checkpoint else None
    if (control / "PREEMPTED").exists():
        log.warning("run %s stopped at step %s on request; re-run the same command to resume", t.name, metrics.get("step"))
        if tracker:
            tracker.set_tags({"avssl.preempted_at_step": str(metrics.get("step"))})
            tracker.finish(status="KILLED")
        end_ray_output()
        return RunResult("PREEMPTED", run_dir, checkpoint, None, run_id, uri, metrics, stop_signal=stop.received)

    release = None
    if t.export and checkpoint is not None and export is not None:
        release = export(checkpoint, control / "release", metrics)
        log.info("released checkpoint: %s", release)
    if tracker:
        plot = plot_loss_curves(uri, run_id, control / "loss_curves.png") if run_id else None
        if plot:
            tracker.log_artifact(plot)
        if release:
            tracker.log_artifact(release, "release")
            if recipe.mlflow.register_model:
                tracker.register(release, recipe.mlflow.register_model)
        tracker.finish(status="FINISHED", timeout_s=120)
    return RunResult("FINISHED", run_dir, checkpoint, release, run_id, uri, metrics)


def result_summary(result: RunResult) -> str:
    lines = [f"status: {result.status}", f"run directory: {result.run_dir}"]
    if result.checkpoint:
        lines.append(f"latest checkpoint: {result.checkpoint}")
    if result.release:
        lines.append(f"released checkpoint: {result.release}")
    lines.append(f"MLflow: {redact_uri(result.tracking_uri)} run {result.mlflow_run_id}")
    if result.tracking_uri:
        lines.append(f"MLflow UI: {mlflow_ui_command(result.tracking_uri)}")
    if result.metrics:
        lines.append("final metrics: " + json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in result.metrics.items()}))
    skipped = skipped_summary(result.checkpoint)
    if skipped:
        lines.append(skipped)
    return "\n".join(lines)


def skipped_summary(checkpoint: Path | None, shown: int = 5) -> str | None:
    """The run's distinct corrupt or unreadable samples, from its latest checkpoint's train state
    (None where that cannot be read: no checkpoint, or one in an object store)."""
    try:
        state = json.loads((Path(checkpoint) / STATE_FILE).read_text())
    except (TypeError, OSError, ValueError):
        return None
    count, names = int(state.get("skipped_samples", 0)), list(state.get("bad_samples", []))
    if not count:
        return "skipped samples: 0"
    more = f", and {len(names) - shown} more in {Path(checkpoint) / STATE_FILE}" if len(names) > shown else ""
    return f"skipped samples: {count} distinct, corrupt or unreadable ({', '.join(names[:shown])}{more})"
