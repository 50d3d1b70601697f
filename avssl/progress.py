"""Progress bars for long work (rich), quiet when output is not a terminal and in tests."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[_Bar]:
    """`with progress_bar("synthesizing", n) as bar: ... bar.advance()`. AVSSL_PROGRESS=0 hides it;
    in a non-terminal (CI logs) rich prints a final line instead of redrawing."""
    if os.environ.get("AVSSL_PROGRESS", "1") == "0":
        yield _Bar(None, None)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, transient=not sys.stderr.isatty()) as progress:
        yield _Bar(progress, progress.add_task(description, total=total))
