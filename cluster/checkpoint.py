"""Checkpoints on disk: which ones are complete, and loading them without unpickling.

A run directory (`storage_path/name`) holds `checkpoint_<step>` folders. Ray Train writes each
rank's files into the folder and registers it in `checkpoint_manager_snapshot.json` only after
every rank has uploaded; a crash or a full disk mid-save leaves an unregistered, partial folder.
So "the latest checkpoint" is the newest registered one that holds its files, never simply the
newest folder, and every partial one passed over is named in a warning.

Loading never unpickles: a `.pt` file is read with `torch.load(weights_only=True)`, which builds
tensors and plain containers only and refuses any other Python object. DeepSpeed's optimizer
files hold three small DeepSpeed types besides tensors (the ZeRO stage enum, the loss scaler,
the fragment address tuple); exactly those are allowed. DeepSpeed itself calls
`torch.load(weights_only=False)` (its checkpoint engine on resume, `zero_to_fp32` when
consolidating): `weights_only_deepspeed()` and `load_engine_checkpoint()` route those calls
through the same weights-only load. Non-tensor training state is JSON (`train_state.json`).

A full storage (disk full, quota, file size limit) is told apart from other save errors
(`refused_write`) and raised as a StorageFullError, which no restart can fix: the run stops with
the refused path, its partial checkpoint is removed, and the previous one stays for the re-run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from avssl import AvsslError, NoRestartError

log = logging.getLogger("avssl.checkpoint")

DS_TAG = "ds"
STATE_FILE = "train_state.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of registered checkpoints
MODEL_STATES = "mp_rank_00_model_states.pt"


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed writes into its checkpoint files (plain data, no code)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_tensors(path: str | Path, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """`torch.load` that never unpickles: tensors, plain containers and DeepSpeed's few data
    types only. A file that holds anything else is refused with an AvsslError naming it."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise AvsslError(
            f"{path}: refused to load: the file holds Python objects besides tensors"
            f"{f' ({detail})' if detail else ''}, and loading it would run code. avssl loads checkpoints "
            "without unpickling; use a checkpoint written by an avssl run you trust, or re-create it."
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:  # truncated or not a torch file at all
        raise AvsslError(f"{path}: not a readable checkpoint file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                         "the save was probably cut short: use an earlier checkpoint") from None


class _WeightsOnlyTorch:
    """The `torch` module as seen by DeepSpeed's `zero_to_fp32`: the same, except that `load`
    is the weights-only `load_tensors`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, map_location: Any = None, **kwargs: Any) -> Any:
        return load_tensors(f, map_location=map_location or "cpu", **kwargs)


@contextlib.contextmanager
def weights_only_deepspeed() -> Iterator[None]:
    """While active, DeepSpeed's `zero_to_fp32` consolidation loads without unpickling."""
    from deepspeed.utils import zero_to_fp32

    previous = zero_to_fp32.torch
    zero_to_fp32.torch = _WeightsOnlyTorch()
    try:
        yield
    finally:
        zero_to_fp32.torch = previous


def load_engine_checkpoint(engine: Any, directory: str | Path, tag: str = DS_TAG) -> None:
    """`engine.load_checkpoint` (model, optimizer, LR schedule) with every file read weights-only."""
    checkpoint_engine = engine.checkpoint_engine
    original = checkpoint_engine.load
    checkpoint_engine.load = lambda path, map_location=None: load_tensors(path, map_location=map_location or "cpu")
    try:
        engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        checkpoint_engine.load = original


# ----------------------------------------------------------------------------- a storage that refuses writes

# The errors of a write the storage refuses: disk full, quota exceeded, file size limit.
STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class StorageFullError(NoRestartError):
    """A checkpoint could not be written because its storage refuses writes. A restart would fill
    it again, so the run stops at once; the CLI exits 1 (the environment failed, not the input)."""

    exit_code = 1


def refused_write(exc: BaseException | None) -> OSError | None:
    """The OSError in `exc` or its causes that says the storage refused a write, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def describe_refusal(err: OSError, where: str | Path) -> str:
    """`PATH: No space left on device (ENOSPC)`: the refused file where the error names one."""
    return f"{err.filename or where}: {os.strerror(err.errno)} ({errno.errorcode.get(err.errno, err.errno)})"


def save_engine_checkpoint(engine: Any, directory: str | Path, tag: str = DS_TAG) -> None:
    """`engine.save_checkpoint` with each file written through a Python file object: torch's own
    file writer reports a refused write only as "file write failed", while with a file object its
    zip writer (DeepSpeed's default format) writes through Python, whose OSError keeps the errno;
    that error is raised again with the file's path."""
    checkpoint_engine = engine.checkpoint_engine
    original = checkpoint_engine.save
    zipfile = getattr(checkpoint_engine, "zipfile_serialization", True)

    def save(state_dict: Any, path: str) -> None:
        try:
            with open(path, "wb") as f:
                torch.save(state_dict, f, _use_new_zipfile_serialization=zipfile)
        except Exception as exc:
            refused = refused_write(exc)
            if refused is None:
                raise
            raise OSError(refused.errno, os.strerror(refused.errno), str(path)) from exc

    checkpoint_engine.save = save
    try:
        engine.save_checkpoint(str(directory), tag=tag)
    finally:
        checkpoint_engine.save = original


# ----------------------------------------------------------------------------- which checkpoints are complete


def registered_checkpoints(run_dir: Path) -> list[str] | None:
    """Names of the checkpoint folders Ray Train registered for a run, oldest first; None when the
    run directory has no readable snapshot (a checkpoint folder copied on its own)."""
    try:
        snapshot = json.loads((Path(run_dir) / RAY_SNAPSHOT).read_text())
    except (OSError, ValueError):
        return None
    names = [c.get("checkpoint_dir_name") for c in snapshot.get("checkpoint_results", []) if isinstance(c, dict)]
    return [n for n in names if n]


def missing_files(checkpoint: Path, tag: str = DS_TAG) -> list[str]:
    """What a complete checkpoint holds and this one lacks (empty: looks complete)."""
    tag_dir = checkpoint / tag
    if not tag_dir.is_dir():
        return [f"{tag}/"]
    missing = [] if (checkpoint / STATE_FILE).is_file() else [STATE_FILE]
    if not (tag_dir / MODEL_STATES).is_file() and not any(tag_dir.glob("zero_pp_rank_*_model_states.pt")):
        missing.append(f"{tag}/{MODEL_STATES}")
    return missing


def is_complete(checkpoint: Path) -> tuple[bool, str]:
    """(complete?, why not). Registered by Ray (when its run has a snapshot) and holding its files."""
    checkpoint = Path(checkpoint)
    registered = registered_checkpoints(checkpoint.parent)
    if registered is not None and checkpoint.name not in registered:
        return False, "not registered by Ray Train (a save that did not finish)"
    missing = missing_files(checkpoint)
    if missing:
        return False, f"missing {', '.join(missing)}"
    return True, ""


def complete_checkpoints(run_dir: Path, warn: bool = True) -> list[Path]:
    """The run's complete checkpoint folders, oldest first; partial ones are named in a warning."""
    run_dir = Path(run_dir)
    good, partial = [], []
    for folder in sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir()):
        ok, why = is_complete(folder)
        (good if ok else partial).append(folder if ok else f"{folder.name} ({why})")
    if partial and warn:
        log.warning("%s: ignoring partial checkpoint(s): %s", run_dir, "; ".join(partial))
    return good


def remove_partial_checkpoints(run_dir: Path) -> list[str]:
    """Delete the partial checkpoint folders newer than the newest complete one (saves cut short,
    never resumed from; on a full disk they hold the space a re-run needs). Returns their names."""
    run_dir = Path(run_dir)
    good = complete_checkpoints(run_dir, warn=False)
    newest = good[-1].name if good else ""
    removed = []
    for folder in sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir() and p.name > newest):
        if not is_complete(folder)[0]:
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder.name)
    return removed


def latest_checkpoint(run_or_checkpoint: Path) -> Path:
    """A run directory's newest complete checkpoint, or a checkpoint directory itself (checked)."""
    p = Path(run_or_checkpoint)
    if (p / DS_TAG).is_dir() or p.name.startswith("checkpoint_"):
        ok, why = is_complete(p)
        if not ok:
            raise AvsslError(f"{p}: a partial checkpoint ({why}); pass the run directory {p.parent} to use its "
                             "newest complete checkpoint")
        return p
    found = complete_checkpoints(p)
    if not found:
        if any(p.glob("checkpoint_*")):
            raise AvsslError(f"{p}: no complete checkpoint (every checkpoint_* folder is partial); resume the run "
                             "to write one")
        raise AvsslError(f"{p}: neither a run directory with checkpoint_* folders nor a checkpoint")
    return found[-1]
