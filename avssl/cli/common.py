"""What the `avssl` commands share: the consoles, the recipe arguments, the device default, and the
endings of a stopped run, of skipped inputs and of an evaluation report."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

console = Console(stderr=False)
err_console = Console(stderr=True)


def add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", default=default, help=f"YAML recipe (default: {default})")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one config value, e.g. --set synth.num_speakers=8 (repeatable)",
    )



def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def exit_if_stopped(result, args: argparse.Namespace) -> None:
    """A run stopped on request (Ctrl-C, SIGTERM, `avssl jobs stop`) ends with one line and the
    shell's status for the signal that asked: 130 for SIGINT, 143 for SIGTERM or a STOP file."""
    if result.status != "PREEMPTED":
        return
    import signal

    how = signal.Signals(result.stop_signal).name if result.stop_signal else "request"
    where = f" ({result.checkpoint})" if result.checkpoint else ""
    err_console.print(f"stopped at step {result.metrics.get('step')} on {how}; checkpoint saved{where}; "
                      f"resume with: {args.command_line}", highlight=False, markup=False, soft_wrap=True)
    raise SystemExit(128 + (result.stop_signal or signal.SIGTERM))  # a STOP file stands for SIGTERM


def print_skipped(skipped: list[dict], total: int) -> None:
    """Files a long job skipped: one line each on stderr (they are in its JSON output too)."""
    if skipped:
        err_console.print(Text.assemble(("skipped ", "yellow"), f"{len(skipped)} of {total} inputs:"), highlight=False)
        for s in skipped:
            err_console.print(f"  {s['file']}: {s['reason']}", highlight=False, markup=False, soft_wrap=True)


def print_report(report: dict) -> None:
    from avssl.finetune.evaluate import summary_table

    title = f"{report['task']}{' (zero-shot)' if report.get('zero_shot') else ''} on {report['corpus']} [{report['split']}]"
    header, rows = summary_table(report)
    table = Table(title=escape(title))  # '[test]' is the split, not rich markup
    for col in header:
        first = col == "modality"
        table.add_column(col, justify="left" if first else "right", min_width=len(col) if first else None)
    for row in rows:
        table.add_row(*row)
    console.print(table)
