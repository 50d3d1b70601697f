"""The `avssl` command: one parser, its subcommands registered by the modules of this package
(`data`, `training`, `inference`, `bench`), each calling into the component it runs.

Errors caused by input (a config key, a file, a line) are printed as one clear message with
exit status 2, never as a traceback; AVSSL_DEBUG=1 shows the traceback too.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import gc
import logging
import os
import shlex
import sys

from rich.text import Text

from avssl import AvsslError, __version__
from avssl.cli import bench, data, inference, training
from avssl.cli.common import err_console


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avssl",
        description="Self-supervised audio-visual pretraining of a shared ViT backbone for speech.",
    )
    parser.add_argument("--version", action="version", version=f"avssl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and Ray's and DeepSpeed's messages")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (data, training, inference, bench):  # the order of `avssl --help`
        module.register(top)
    return parser


@functools.cache
def _no_collection_at_exit() -> None:
    """At exit the interpreter collects garbage over every object that torch, Ray, DeepSpeed and
    MLflow hold: about 2 s of CPU after a training run, for memory the system takes back at once
    anyway. gc.freeze() as the last exit handler (the first registered runs last: after Ray's
    shutdown and MLflow's flush) leaves those objects out of it. Reference counting still closes
    files and runs finalizers as the modules are torn down; the command's files are written
    atomically and closed by then."""
    atexit.register(gc.freeze)


def main(argv: list[str] | None = None) -> int:
    _no_collection_at_exit()
    args = build_parser().parse_args(argv)
    args.command_line = "avssl " + shlex.join(sys.argv[1:] if argv is None else argv)  # what re-runs it
    if args.verbose:
        os.environ["AVSSL_VERBOSE"] = "1"  # Ray and DeepSpeed workers log at INFO too (cluster.train.quiet_frameworks)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        args.func(args)
    except AvsslError as exc:
        if os.environ.get("AVSSL_DEBUG"):
            raise
        # soft_wrap: one line however long, for logs and grep (a terminal wraps it for the eye)
        err_console.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        return 130
    return 0

