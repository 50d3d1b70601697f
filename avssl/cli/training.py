"""`avssl pretrain`, `export`, `finetune` (which evaluates its release), and `submit` / `jobs` for
Ray clusters: the runs of avssl.cluster and avssl.finetune.runner."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.table import Table

from avssl import AvsslError
from avssl.cli.common import add_config_args, console, err_console, exit_if_stopped, print_report


def cmd_pretrain(args: argparse.Namespace) -> None:
    from avssl.cluster.config import PretrainRecipe
    from avssl.cluster.launch import result_summary, run_pretraining
    from avssl.config import load_config

    recipe = load_config(PretrainRecipe, args.config, args.overrides)
    result = run_pretraining(recipe, address=args.address)
    exit_if_stopped(result, args)
    console.print(result_summary(result), highlight=False)


def cmd_export(args: argparse.Namespace) -> None:
    from avssl.cluster.export import export_release, latest_checkpoint, run_recipe

    checkpoint = latest_checkpoint(Path(args.run))
    out = export_release(checkpoint, Path(args.out), run_recipe(checkpoint))
    console.print(f"[green]released[/green] {checkpoint} -> {out}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from avssl.config import load_config
    from avssl.cluster.launch import result_summary
    from avssl.finetune.evaluate import evaluate_recipe, log_report
    from avssl.finetune.recipe import FinetuneRecipe
    from avssl.finetune.runner import run_finetuning

    overrides = list(args.overrides) + ([f"init.source={args.init}"] if args.init else [])
    recipe = load_config(FinetuneRecipe, args.config, overrides)
    result = run_finetuning(recipe, address=args.address)
    exit_if_stopped(result, args)
    console.print(result_summary(result), highlight=False)
    if result.release is None:
        return
    out = result.run_dir / "avssl" / "eval"
    report = evaluate_recipe(result.release, recipe, out)
    print_report(report)
    if result.mlflow_run_id:
        log_report(report, out, result.tracking_uri, result.mlflow_run_id)


def _warn_token_flag(args: argparse.Namespace) -> None:
    if args.token:
        err_console.print("[yellow]warning:[/yellow] --token shows the secret to anyone who can run `ps` here and keeps "
                          "it in your shell history; use --token-file FILE or RAY_AUTH_TOKEN_PATH instead", highlight=False)


def cmd_submit(args: argparse.Namespace) -> None:
    from avssl.cluster import submit as jobs

    _warn_token_flag(args)
    if args.command_name == "pretrain":
        from avssl.cluster.config import PretrainRecipe as recipe_cls
    else:
        from avssl.finetune.recipe import FinetuneRecipe as recipe_cls
    job_id = jobs.submit(args.address, args.command_name, Path(args.config), args.overrides, recipe_cls=recipe_cls,
                         token=args.token, token_file=args.token_file, pip=args.pip)
    console.print(f"submitted job [bold]{job_id}[/bold] to {args.address}")
    print(job_id)
    if args.wait:
        status = jobs.wait(args.address, job_id, token=args.token, token_file=args.token_file, echo=lambda text: console.out(text, end="", highlight=False))
        console.print(f"job {job_id}: {status}")
        if status != "SUCCEEDED":
            raise SystemExit(1)


def cmd_jobs(args: argparse.Namespace) -> None:
    from avssl.cluster import submit as jobs

    _warn_token_flag(args)
    if args.action == "list":
        table = Table(title=f"jobs on {args.address}")
        for col in ("job id", "status", "entrypoint"):
            table.add_column(col)
        for row in jobs.list_jobs(args.address, args.token, args.token_file):
            table.add_row(row["job_id"], row["status"], row["entrypoint"])
        console.print(table)
        return
    if not args.job_id:
        raise AvsslError(f"`avssl jobs {args.action}` needs a JOB_ID (see `avssl jobs list`)")
    if args.action == "status":
        print(jobs.job_status(args.address, args.job_id, args.token, args.token_file))
    elif args.action == "logs":
        console.out(jobs.job_logs(args.address, args.job_id, args.token, args.token_file), highlight=False)
    elif args.action == "stop":
        stopped = jobs.stop_job(args.address, args.job_id, args.token, args.token_file)
        console.print(f"job {args.job_id}: {'stop requested' if stopped else 'already finished'}")


def register(top: argparse._SubParsersAction) -> None:
    p = top.add_parser("pretrain", help="self-supervised pretraining on Ray + DeepSpeed (local Ray by default)")
    add_config_args(p, "configs/pretrain/demo.yaml")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    p.set_defaults(func=cmd_pretrain)

    p = top.add_parser("export", help="consolidate a run's checkpoint into a Hugging Face-format release")
    p.add_argument("run", help="run directory (storage_path/name) or one checkpoint_* directory in it")
    p.add_argument("--out", required=True, help="release directory to write")
    p.set_defaults(func=cmd_export)

    def _ray_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or "http://127.0.0.1:8265",
                       help="Ray dashboard address of the cluster (default: http://127.0.0.1:8265)")
        p.add_argument("--token-file", default=None, metavar="FILE",
                       help="file holding the Ray auth token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
        p.add_argument("--token", default=None, help="the Ray auth token itself (visible in `ps` and shell history: prefer --token-file)")

    p = top.add_parser("submit", help="submit pretraining or finetuning to a Ray cluster as a job")
    p.add_argument("command_name", nargs="?", default="pretrain", choices=["pretrain", "finetune"], metavar="COMMAND",
                   help="pretrain (default) or finetune")
    add_config_args(p, "configs/pretrain/demo.yaml")
    _ray_args(p)
    p.add_argument("--pip", action="append", default=[], help="extra pip requirement for the job's environment")
    p.add_argument("--wait", action="store_true", help="follow the logs until the job ends")
    p.set_defaults(func=cmd_submit)

    p = top.add_parser("jobs", help="list, inspect and stop submitted jobs")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?", default=None)
    _ray_args(p)
    p.set_defaults(func=cmd_jobs)

    p = top.add_parser("finetune", help="finetune a task head on the Ray + DeepSpeed runner, then evaluate it")
    add_config_args(p, "configs/finetune/emotion.yaml")
    p.add_argument("--init", default=None, metavar="SOURCE",
                   help="release directory, pretraining run directory, or models:/NAME/VERSION (default: random init)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    p.set_defaults(func=cmd_finetune)
