"""What the console shows of a run: rank 0's progress line, and Ray's forwarded output.

Rank 0 logs one progress line per log step (`progress_line`): step/total, the losses,
samples/s, distinct skipped samples, elapsed time and ETA. Ray forwards every worker's output
to the driver line by line (log_to_driver); `install_output_filter` sits on that stream:

- On a terminal (and unless AVSSL_PROGRESS=0) the progress lines are drawn in place by one rich
  Progress per run instead of scrolling; in logs (no terminal: a Ray job, CI, a pipe) every
  progress line is printed as it comes, so a log carries elapsed time and ETA at every log step.
- Ray Core lines known to be false alarms about Ray's own actors are dropped unless
  `avssl -v` (AVSSL_VERBOSE=1). They stay in Ray's log files (/tmp/ray/session_*/logs).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
from typing import Any, Callable

log = logging.getLogger(__name__)

PROGRESS = re.compile(r"\bstep (\d+)/(\d+) \| (.* \| ETA \S+)\s*$")

# On a cluster Ray Train (Ray 2.60) starts a `PreemptionWatcher` actor per worker group (it watches
# for node drains; the local instance has none to watch and starts none) with max_restarts=-1 and
# the workers' actor handles as constructor arguments. Ray Core's CreateActor logs at ERROR, from
# the TrainController's process on every run, that an actor whose arguments are references and which
# may restart could fail to restart if those objects were lost. Here they cannot be: the arguments
# are handles of the workers, owned by the controller for as long as the watcher lives. The
# alternatives hide more than this line: on a cluster RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 turns
# off Ray Train's handling of node drains (a grace window before the restart), and
# RAY_BACKEND_LOG_LEVEL would silence every C++ error of the process. So exactly this message, for
# this class only, is dropped from the console.
RAY_FALSE_ALARMS = (
    re.compile(r"Actor with class name: 'PreemptionWatcher' .*has constructor arguments in the object store "
               r"and max_restarts > 0"),
)


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, total: int, losses: dict[str, float], samples_per_s: float, skipped: int,
                  elapsed_s: float, steps_done: int) -> str:
    """`step 8/24 | loss 2.6969 ... | 13.3 samples/s | skipped 0 | elapsed 0:00:41 | ETA 0:01:22`.
    ETA from this attempt's pace: `steps_done` steps in `elapsed_s` (a resumed run counts from
    its restart, so the pace is not diluted by the time it was away)."""
    eta = _clock(elapsed_s / steps_done * (total - step)) if steps_done > 0 else "?"
    parts = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
    return (f"step {step}/{total} | {parts} | {samples_per_s:.1f} samples/s | skipped {skipped} | "
            f"elapsed {_clock(elapsed_s)} | ETA {eta}")


class _LiveProgress:
    """One rich Progress bar per run, fed by forwarded progress lines; a new bar when the step
    count restarts (another run in the same driver) and closed when a run reaches its total."""

    def __init__(self) -> None:
        self.progress = None
        self.task = None
        self.last: tuple[int, int] | None = None

    def update(self, step: int, total: int, text: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        losses, *rest = text.split(" | ")
        # On one terminal line: the total loss only (every component stays in logs and MLflow).
        text = " | ".join([" ".join(losses.split()[:2]), *rest])
        if self.progress is None or self.last is None or total != self.last[1] or step < self.last[0]:
            self.close()
            self.progress = Progress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(bar_width=16),
                                     TextColumn("{task.fields[text]}"), console=Console(stderr=True))
            self.task = self.progress.add_task("train", total=total, completed=step, text=text)
            self.progress.start()
            atexit.register(self.close)
        else:
            self.progress.update(self.task, completed=step, text=text)
        self.last = (step, total)
        if step >= total:
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class ForwardedOutput:
    """Wraps Ray's handler of forwarded worker output (`print_to_stdstream`): drops the false
    alarms, draws progress lines in place when `live`, passes everything else on unchanged."""

    def __init__(self, inner: Callable[[dict[str, Any]], None], verbose: bool, live: bool) -> None:
        self.inner, self.verbose = inner, verbose
        self.live = _LiveProgress() if live else None

    def __call__(self, data: dict[str, Any]) -> None:
        lines = data.get("lines") or []
        kept = []
        for line in lines:
            if not self.verbose and any(p.search(line) for p in RAY_FALSE_ALARMS):
                continue
            match = PROGRESS.search(line) if self.live is not None else None
            if match:
                self.live.update(int(match[1]), int(match[2]), match[3])
                continue
            kept.append(line)
        if kept or not lines:
            self.inner({**data, "lines": kept} if len(kept) != len(lines) else data)


def install_output_filter() -> None:
    """Put `ForwardedOutput` in front of Ray's printing of forwarded output (after ray.init with
    log_to_driver). Reaches into Ray's dispatcher (`ray._private`): if a Ray version moves it,
    the console shows Ray's raw output again, and nothing else changes."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        log.debug("Ray's output dispatcher moved: forwarded output is printed unfiltered")
        return
    verbose = os.environ.get("AVSSL_VERBOSE") == "1"
    live = os.environ.get("AVSSL_PROGRESS", "1") != "0" and sys.stderr.isatty()
    for name, handler in list(getattr(dispatcher, "handlers", [])):
        if name == "ray_print_logs" and not isinstance(handler, ForwardedOutput):
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, ForwardedOutput(handler, verbose, live))
