"""The `avssl` command. Each subcommand lives with its component and is registered here.

Errors caused by input (a config key, a file, a line) are printed as one clear message with
exit status 2, never as a traceback; AVSSL_DEBUG=1 shows the traceback too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from avssl import AvsslError, __version__

console = Console(stderr=False)
err_console = Console(stderr=True)


def _add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", default=default, help=f"YAML recipe (default: {default})")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one config value, e.g. --set synth.num_speakers=8 (repeatable)",
    )


# ----------------------------------------------------------------------------- data


def cmd_data_synth(args: argparse.Namespace) -> None:
    from avssl.config import load_config
    from avssl.data.corpus import CorpusRecipe, summarize, synthesize_corpus

    recipe = load_config(CorpusRecipe, args.config, args.overrides)
    index = synthesize_corpus(recipe, Path(args.out))
    console.print(f"[green]wrote corpus[/green] {index.root} ({sum(index.count(s) for s in index.splits)} samples)")
    _print_summary(summarize(index.root))


def cmd_data_stats(args: argparse.Namespace) -> None:
    from avssl.config import load_config
    from avssl.data.corpus import CorpusRecipe, compute_stats

    from avssl.data.shards import ReadReport

    recipe = load_config(CorpusRecipe, args.config, args.overrides)
    report = ReadReport()
    stats = compute_stats(Path(args.corpus), recipe.features, args.split, args.max_clips, report=report)
    console.print(f"[green]wrote[/green] {Path(args.corpus) / 'stats.json'}: mean={stats.mean:.4f} std={stats.std:.4f} over {stats.num_clips} clips")
    if report:
        console.print(Text.assemble(("skipped ", "yellow"), report.describe(limit=20)), highlight=False)


def _print_summary(summary: dict) -> None:
    splits = summary["splits"]
    table = Table(title=f"corpus: {summary['dataset']}")
    for col in ("split", "samples", "shards", "MB", "speakers", "minutes", "modalities"):
        table.add_column(col, justify="left" if col in ("split", "modalities") else "right")
    for split, s in splits.items():
        mods = " ".join(f"{k}:{v}" for k, v in s["modalities"].items())
        table.add_row(split, str(s["samples"]), str(s["shards"]), f"{s['bytes'] / 2**20:.1f}", str(s["speakers"]), f"{60 * s['hours']:.1f}", mods)
    console.print(table)
    labels = Table(title="labels per split")
    emotions = sorted({e for s in splits.values() for e in s["emotions"]})
    spoof = sorted({a for s in splits.values() for a in s["spoof"]}, key=lambda a: (a != "bonafide", a))
    for col in ["split", *emotions, *spoof]:
        labels.add_column(col, justify="left" if col == "split" else "right")
    for split, s in splits.items():
        labels.add_row(split, *(str(s["emotions"].get(e, 0)) for e in emotions), *(str(s["spoof"].get(a, 0)) for a in spoof))
    console.print(labels)
    stats = summary.get("stats")
    console.print(
        f"fbank stats: mean={stats['mean']:.3f} std={stats['std']:.3f} ({stats['num_mel_bins']} bins, /{stats['norm_std_scale']:g}std)"
        if stats
        else "[yellow]no stats.json[/yellow]: run `avssl data stats CORPUS`"
    )
    if summary.get("trials"):
        console.print("trial lists: " + ", ".join(summary["trials"]))


def cmd_data_inspect(args: argparse.Namespace) -> None:
    from avssl.data.corpus import face_sheet, first_clip, plot_clip, summarize
    from avssl.data.features import FeatureConfig
    from avssl.data.shards import ReadReport

    corpus = Path(args.corpus)
    summary = summarize(corpus)
    _print_summary(summary)
    problems, undecodable = ReadReport(**summary["problems"]), ReadReport()
    clip = first_clip(corpus, args.split, undecodable)  # its shard problems are in the summary already
    problems.bad_samples += [s for s in undecodable.bad_samples if s not in problems.bad_samples]
    num_mel_bins = (summary.get("stats") or {}).get("num_mel_bins", 128)
    path = plot_clip(clip, FeatureConfig(num_mel_bins=num_mel_bins), Path(args.plot or corpus / "inspect.png"))
    console.print(f"sample picture: {path}")
    sheet = face_sheet(corpus, args.split, Path(args.plot or corpus / "inspect.png").with_name("faces.png"))
    if sheet:
        console.print(f"face crops: {sheet}")
    if problems:  # a damaged corpus: say what is damaged, and exit 1 so that scripts notice
        unread = {s: v["samples"] - v["read"] for s, v in summary["splits"].items() if v["read"] < v["samples"]}
        lost = ", ".join(f"{s}: {n} of {summary['splits'][s]['samples']}" for s, n in unread.items())
        err_console.print(Text.assemble(("damaged corpus: ", "bold red"), problems.describe(limit=20),
                                        f" (samples not read per split: {lost})" if lost else ""), highlight=False)
        raise SystemExit(1)


def cmd_data_extract(args: argparse.Namespace) -> None:
    from avssl.data.corpus import extract_clips

    paths = extract_clips(Path(args.corpus), Path(args.out), args.split, args.speakers, args.per_speaker)
    console.print(f"wrote {len(paths)} files to {args.out}: " + ", ".join(p.name for p in paths), highlight=False)


# ----------------------------------------------------------------------------- pretrain


def cmd_pretrain(args: argparse.Namespace) -> None:
    from avssl.cluster.config import PretrainRecipe
    from avssl.cluster.launch import result_summary, run_pretraining
    from avssl.config import load_config

    recipe = load_config(PretrainRecipe, args.config, args.overrides)
    result = run_pretraining(recipe, address=args.address)
    console.print(result_summary(result), highlight=False)
    if result.status == "PREEMPTED":
        raise SystemExit(143)


def cmd_export(args: argparse.Namespace) -> None:
    from avssl.cluster.export import export_release, latest_checkpoint, run_recipe

    checkpoint = latest_checkpoint(Path(args.run))
    out = export_release(checkpoint, Path(args.out), run_recipe(checkpoint))
    console.print(f"[green]released[/green] {checkpoint} -> {out}")


# ----------------------------------------------------------------------------- finetune and evaluate


def _print_report(report: dict) -> None:
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


def log_report(report: dict, out: Path, uri: str, run_id: str) -> None:
    """Evaluation metrics (eval.<mode>.<metric>), report.json and plots into an MLflow run."""
    from avssl.cluster.config import MlflowConfig
    from avssl.cluster.tracking import MlflowLogger

    metrics = {}
    for mode, r in report["results"].items():
        for key, value in r.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"eval.{mode}.{key}".replace("@", "_")] = float(value)
    logger = MlflowLogger(uri, run_id, MlflowConfig())
    logger.log_metrics(metrics, step=0)
    logger.log_artifact(out, "evaluation")
    logger.finish(status=None, timeout_s=60)


def cmd_finetune(args: argparse.Namespace) -> None:
    from avssl.config import load_config
    from avssl.cluster.launch import result_summary
    from avssl.finetune.evaluate import evaluate
    from avssl.finetune.recipe import FinetuneRecipe
    from avssl.finetune.runner import run_finetuning

    overrides = list(args.overrides) + ([f"init.source={args.init}"] if args.init else [])
    recipe = load_config(FinetuneRecipe, args.config, overrides)
    result = run_finetuning(recipe, address=args.address)
    console.print(result_summary(result), highlight=False)
    if result.status == "PREEMPTED":
        raise SystemExit(143)
    if result.release is None:
        return
    corpus = Path(recipe.data.corpus)
    out = result.run_dir / "avssl" / "eval"
    report = evaluate(result.release, corpus, out, split=recipe.eval.split,
                      trials=corpus / recipe.eval.trials if recipe.eval.trials else None, modes=recipe.eval.modes,
                      batch_size=recipe.eval.batch_size, as_norm_cohort=recipe.eval.as_norm_cohort)
    _print_report(report)
    if result.mlflow_run_id:
        log_report(report, out, result.tracking_uri, result.mlflow_run_id)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from avssl.cluster.config import MlflowConfig
    from avssl.cluster.tracking import open_run, resolve_tracking_uri
    from avssl.finetune.evaluate import evaluate

    checkpoint = Path(args.checkpoint)
    out = Path(args.out or checkpoint.parent / f"eval-{checkpoint.name}-{args.task}{'-zeroshot' if args.zero_shot else ''}")
    report = evaluate(checkpoint, Path(args.data), out, task=args.task, split=args.split,
                      trials=Path(args.trials) if args.trials else None, modes=args.modes, zero_shot=args.zero_shot,
                      batch_size=args.batch_size, as_norm_cohort=args.as_norm,
                      asv_scores=Path(args.asv_scores) if args.asv_scores else None,
                      labels_csv=Path(args.labels_csv) if args.labels_csv else None,
                      calibration=Path(args.calibration) if args.calibration else None)
    _print_report(report)
    console.print(f"report: {out / 'report.json'}")
    if report.get("calibration"):
        console.print(f"calibration for `avssl verify`: {report['calibration']}", highlight=False)
    if not args.no_mlflow:
        cfg = MlflowConfig(experiment=args.experiment)
        uri = resolve_tracking_uri(cfg, "runs")
        run_id = open_run(cfg, uri, f"eval:{checkpoint.resolve()}:{args.task}:{args.split}{':zs' if args.zero_shot else ''}", "runs")
        log_report(report, out, uri, run_id)
        from avssl.cluster.tracking import MlflowLogger

        MlflowLogger(uri, run_id, cfg).finish(status="FINISHED")
        from avssl.cluster.tracking import redact_uri

        console.print(f"MLflow: {redact_uri(uri)} run {run_id}")


def _print_skipped(skipped: list[dict], total: int) -> None:
    """Files a long job skipped: one line each on stderr (they are in its JSON output too)."""
    if skipped:
        err_console.print(Text.assemble(("skipped ", "yellow"), f"{len(skipped)} of {total} inputs:"), highlight=False)
        for s in skipped:
            err_console.print(f"  {s['file']}: {s['reason']}", highlight=False, markup=False, soft_wrap=True)


def _gather_files(args: argparse.Namespace) -> tuple[list[Path], list[dict]]:
    from avssl.finetune.inference import collect_files

    files, skipped = collect_files(args.files, args.files_from)
    if not files:
        where = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped)
        raise AvsslError(f"no media files to read{': ' + where if where else ''}; give files, folders, @LIST or "
                         "--files-from LIST")
    if skipped and args.strict:
        raise AvsslError(f"{skipped[0]['file']}: {skipped[0]['reason']} (--strict)")
    return files, skipped


def cmd_embed(args: argparse.Namespace) -> None:
    from avssl.finetune.inference import Release, embed_with, write_embeddings

    files, skipped = _gather_files(args)
    release = Release.load(Path(args.checkpoint), args.device)
    result = embed_with(release, files, args.batch_size, args.modality, args.hop, args.center, args.strict, skipped)
    _print_skipped(result.skipped, len(files) + len(skipped))
    if not result.rows:
        raise AvsslError(f"none of the {len(files)} files could be read (reasons above); nothing written to {args.out}")
    npy, record = write_embeddings(result, Path(args.out))
    modes = ", ".join(f"{m}: {sum(r['modality'] == m for r in result.rows)}" for m in ("av", "a", "v")
                      if any(r["modality"] == m for r in result.rows))
    windows = sum(r["windows"] for r in result.rows)
    console.print(f"{len(result.rows)} embeddings of size {result.vectors.shape[1]} ({modes}; {windows} windows) -> {npy} "
                  f"(files, modality and windows per row in {record})", highlight=False)


def cmd_verify(args: argparse.Namespace) -> None:
    from avssl.finetune.inference import verify

    r = verify(Path(args.checkpoint), Path(args.a), Path(args.b), args.threshold, args.device,
               Path(args.calibration) if args.calibration else None)
    verdict = "same speaker" if r["same_speaker"] else "different speakers"
    norm = f" (AS-Norm of cosine {r['raw_cosine']:.4f})" if "as_norm_top" in r else ""
    how = (f"centred {r['window_seconds']:g} s of each file, as the calibration was made" if r["center"]
           else f"whole files: {r['windows'][0]} and {r['windows'][1]} windows")
    console.print(f"score {r['score']:.4f}{norm} ({r['mode'].upper()}; {how}) threshold {r['threshold']:.4f}: "
                  f"[bold]{verdict}[/bold]", highlight=False)


def cmd_predict(args: argparse.Namespace) -> None:
    from avssl.finetune.inference import Release, check_task, predict_files

    files, skipped = _gather_files(args)
    release = Release.load(Path(args.checkpoint), args.device)
    task = check_task(release, args.task)
    rows, bad = predict_files(release, files, args.batch_size, task=task, modality=args.modality, strict=args.strict)
    _print_skipped(skipped + bad, len(files) + len(skipped))
    if not rows:
        raise AvsslError(f"none of the {len(files)} files could be read (reasons above)")
    table = Table(title=f"{task} predictions ({release.path})")
    table.add_column("file", overflow="fold")
    table.add_column("modality")
    table.add_column("windows", justify="right")
    table.add_column("label")
    table.add_column("probabilities")
    for r in rows:
        probs = r.get("probabilities") or {"bonafide": r["p_bonafide"]}
        table.add_row(escape(r["file"]), r["modality"], str(r["windows"]), r["label"],
                      " ".join(f"{k}:{v:.2f}" for k, v in probs.items()))
    console.print(table)


def cmd_prove(args: argparse.Namespace) -> None:
    from avssl.finetune.proof import attack_cells, prove, seed_gains_text

    result = prove(Path(args.pretrained), Path(args.data), Path(args.out), args.steps, Path(args.storage), tuple(args.tasks),
                   args.overrides, tuple(args.seeds))
    pooled = len(set(args.seeds)) > 1
    title = f"pretrained vs random backbone: same head, data and {args.steps} finetuning steps"
    table = Table(title=title + (f", scores pooled over head seeds {' '.join(map(str, args.seeds))}" if pooled else ""))
    for col in ("task", "modality", "metric", "pretrained", "random", "gain (2 s.e.)", "clearly better") + (("per seed",) if pooled else ()):
        table.add_column(col)
    for t in result["table"]:
        verdict = ("[green]yes[/green]" if t["clearly_better"]
                   else "[yellow]within noise[/yellow]" if t["pretrained_better"] else "[red]no[/red]")
        table.add_row(t["task"], t["mode"], t["metric"], f"{t['pretrained']:.1f}", f"{t['random']:.1f}",
                      f"{t['gain']:+.1f} (±{t['clear_margin']:.1f})", verdict,
                      *((seed_gains_text(t),) if pooled else ()))
    console.print(table)
    names, cells = attack_cells(result["attacks"])
    if names:
        attacks = Table(title="spoof EER % per attack (its spoofs against all bona fide clips), pretrained / random")
        for col in ("modality", *names):
            attacks.add_column(col)
        for row in cells:
            attacks.add_row(*row)
        console.print(attacks)
    console.print(f"written: {Path(args.out) / 'proof.md'}, {Path(args.out) / 'proof.json'}; "
                  f"MLflow run {result['mlflow_run_id']} (experiment avssl-proof)")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from avssl.data.prepare import prepare_dataset

    from avssl.data.faces import FaceConfig

    faces = FaceConfig(mode=args.faces, crop_size=args.face_size) if args.faces else None
    summary = prepare_dataset(args.dataset, Path(args.root), Path(args.out), limit=args.limit, video=not args.no_video,
                              faces=faces, workers=args.workers, address=args.address,
                              labels=Path(args.labels) if args.labels else None, test_speakers=args.test_speakers)
    console.print(summary.describe(), highlight=False)


# ----------------------------------------------------------------------------- cluster jobs


def _warn_token_flag(args: argparse.Namespace) -> None:
    if args.token:
        err_console.print("[yellow]warning:[/yellow] --token shows the secret to anyone who can run `ps` here and keeps "
                          "it in your shell history; use --token-file FILE or RAY_AUTH_TOKEN_PATH instead", highlight=False)


def cmd_submit(args: argparse.Namespace) -> None:
    from avssl.cluster import submit as jobs

    _warn_token_flag(args)
    job_id = jobs.submit(args.address, args.command_name, Path(args.config), args.overrides, token=args.token,
                         token_file=args.token_file, pip=args.pip)
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


# ----------------------------------------------------------------------------- bench


def cmd_bench_data(args: argparse.Namespace) -> None:
    from avssl.data.bench import bench_data, print_bench

    rows = bench_data(Path(args.corpus), args.workers, args.batches, args.batch_size, args.clip_seconds)
    print_bench(rows, console)


def cmd_bench_train(args: argparse.Namespace) -> None:
    import json

    import torch

    from avssl.cluster.bench import bench_train, print_train_bench
    from avssl.cluster.config import PretrainRecipe
    from avssl.cluster.launch import check_corpus
    from avssl.config import load_config

    recipe = check_corpus(load_config(PretrainRecipe, args.config, args.overrides))
    rows, info = bench_train(recipe, args.steps, torch.device(args.device))
    print_train_bench(rows, info, console)
    if args.json:
        from dataclasses import asdict

        from avssl.cluster.launch import environment_params
        from avssl.io import write_json

        write_json(Path(args.json), {"info": info, "rows": [asdict(r) for r in rows], "environment": environment_params()})
        console.print(f"raw results: {args.json}")


def cmd_bench_model(args: argparse.Namespace) -> None:
    from avssl.pretrain.bench import bench_model, print_table

    rows = bench_model(archs=args.arch, attn=args.attn, batch_size=args.batch_size, steps=args.steps, device=args.device)
    print_table(rows)


def cmd_bench_embed(args: argparse.Namespace) -> None:
    from avssl.finetune.bench import as_json, bench_embed, default_files, print_embed_bench

    files = [Path(f) for f in args.files] if args.files else default_files()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows, info = bench_embed(Path(args.checkpoint), files, args.batch_size, args.device, args.repeats)
    print_embed_bench(rows, info, console)
    if args.json:
        from avssl.io import write_json

        write_json(Path(args.json), as_json(rows, info))
        console.print(f"raw results: {args.json}")


# ----------------------------------------------------------------------------- parser

Command = Callable[[argparse.Namespace], None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avssl",
        description="Self-supervised audio-visual pretraining of a shared ViT backbone for speech.",
    )
    parser.add_argument("--version", action="version", version=f"avssl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and Ray's and DeepSpeed's messages")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = top.add_parser("data", help="create, prepare and inspect corpora").add_subparsers(
        dest="data_command", required=True, metavar="SUBCOMMAND"
    )
    p = data.add_parser("synth", help="generate the synthetic audio-visual corpus as shards")
    _add_config_args(p, "configs/data/demo.yaml")
    p.add_argument("--out", default="data/demo", help="corpus directory to create (default: data/demo)")
    p.set_defaults(func=cmd_data_synth)

    p = data.add_parser("prepare", help="convert your own folder of media, or a named dataset (VoxCeleb, CREMA-D, "
                        "RAVDESS, ASVspoof, In-the-Wild), to shards")
    p.add_argument("dataset", help="folder (any tree of media files), voxceleb1, voxceleb2, cremad, ravdess, "
                   "asvspoof2019_la, asvspoof2021_la, asvspoof2021_df, in_the_wild")
    p.add_argument("--root", required=True, help="the folder or dataset as downloaded")
    p.add_argument("--out", required=True, help="corpus directory to write")
    p.add_argument("--limit", type=int, default=None, help="at most this many utterances (smoke runs)")
    p.add_argument("--no-video", action="store_true", help="audio only, even where the dataset has video")
    p.add_argument("--faces", choices=("auto", "on", "off"), default=None,
                   help="crop video to the talking face: auto (default; passes already-cropped video through), on, off "
                   "(VoxCeleb2 defaults to off: its videos are face crops)")
    p.add_argument("--face-size", type=int, default=112, help="side of the square face crops in pixels (default 112)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes on this machine (default: every core)")
    p.add_argument("--address", default=None, help="decode as Ray tasks on this cluster instead ('local' starts one here); "
                   "the media must be at the same path on every node")
    p.add_argument("--labels", default=None, help="folder only: CSV with a path or id column and any of speaker, emotion, "
                   "spoof, attack, split")
    p.add_argument("--test-speakers", type=int, default=0, help="folder only: the last N speakers become the test split, "
                   "with verification trials")
    p.set_defaults(func=cmd_data_prepare)

    p = data.add_parser("stats", help="compute fbank normalization statistics of a corpus (writes stats.json)")
    p.add_argument("corpus", help="corpus directory")
    p.add_argument("--split", default="train")
    p.add_argument("--max-clips", type=int, default=None, help="use at most this many clips")
    _add_config_args(p, None)
    p.set_defaults(func=cmd_data_stats)

    p = data.add_parser("inspect", help="summarize a corpus, draw one sample and a contact sheet of face crops, name damaged shards and samples (exit 1)")
    p.add_argument("corpus", help="corpus directory")
    p.add_argument("--split", default="train")
    p.add_argument("--plot", default=None, help="where to write the sample picture (default: CORPUS/inspect.png)")
    p.set_defaults(func=cmd_data_inspect)

    p = data.add_parser("extract", help="write a few bona fide clips of a corpus back to media files (flac, mp4)")
    p.add_argument("corpus", help="corpus directory")
    p.add_argument("--out", required=True, help="directory to write the files to")
    p.add_argument("--split", default="test")
    p.add_argument("--speakers", type=int, default=2, help="how many speakers (default 2)")
    p.add_argument("--per-speaker", type=int, default=2, help="clips of each speaker (default 2)")
    p.set_defaults(func=cmd_data_extract)

    p = top.add_parser("pretrain", help="self-supervised pretraining on Ray + DeepSpeed (local Ray by default)")
    _add_config_args(p, "configs/pretrain/demo.yaml")
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
    _add_config_args(p, "configs/pretrain/demo.yaml")
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
    _add_config_args(p, "configs/finetune/emotion.yaml")
    p.add_argument("--init", default=None, metavar="SOURCE",
                   help="release directory, pretraining run directory, or models:/NAME/VERSION (default: random init)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    p.set_defaults(func=cmd_finetune)

    p = top.add_parser("evaluate", help="evaluate a release on a corpus: JSON report, plots, MLflow")
    p.add_argument("--checkpoint", required=True, help="a finetuned release (or a pretrained one with --zero-shot)")
    p.add_argument("--task", required=True, choices=["emotion", "speaker", "spoof"])
    p.add_argument("--data", required=True, help="corpus directory")
    p.add_argument("--split", default="test")
    p.add_argument("--trials", default=None, help="speaker: VoxCeleb-format trial list (default: the corpus's first)")
    p.add_argument("--modes", nargs="+", default=["av", "a", "v"], choices=["av", "a", "v"])
    p.add_argument("--zero-shot", action="store_true", help="speaker: score a pretrained backbone without finetuning")
    p.add_argument("--as-norm", type=int, default=0, metavar="N", help="speaker: AS-Norm with a top-N train cohort")
    p.add_argument("--asv-scores", default=None, metavar="FILE",
                   help="spoof: ASV scores ('CM_KEY ASV_KEY SCORE', ASVspoof 2019 format) for min t-DCF 2019 and 2021")
    p.add_argument("--labels-csv", default=None, metavar="FILE",
                   help="emotion: 'utterance,label' CSV with this corpus's labels (default: the release's label source)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="report folder (default: beside the checkpoint)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="speaker: where to write the thresholds `avssl verify` uses (default: CHECKPOINT/calibration.json)")
    p.add_argument("--experiment", default="avssl-eval", help="MLflow experiment for the evaluation run")
    p.add_argument("--no-mlflow", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    def _inputs_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("files", nargs="*", metavar="FILE",
                       help="media files, folders (searched recursively for media files) or @LIST (one path per line)")
        p.add_argument("--files-from", default=None, metavar="LIST", help="a text file naming one media path per line")
        p.add_argument("--modality", choices=["auto", "av", "a", "v"], default="auto",
                       help="auto (default): audio and video where a file has both (and a face), else what it has; "
                       "av, a, v: that setting for every file (a file without it is skipped)")
        p.add_argument("--strict", action="store_true", help="stop at the first unreadable file instead of skipping it")
        p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass, across files (default 16)")
        p.add_argument("--device", default="cuda" if _cuda() else "cpu")

    p = top.add_parser("embed", help="write embeddings of media files: OUT.npy and OUT.json (file, modality, windows)")
    _inputs_args(p)
    p.add_argument("--checkpoint", required=True, help="a pretrained or finetuned release")
    p.add_argument("--out", default="embeddings.npy", help="embeddings file; its .json beside says which row is which file")
    p.add_argument("--center", action="store_true",
                   help="embed only the centred window of each file (default: windows covering the whole file)")
    p.add_argument("--hop", type=float, default=None, metavar="SECONDS",
                   help="start-to-start distance of the windows (default: the window length, the release's clip_seconds)")
    p.set_defaults(func=cmd_embed)

    p = top.add_parser("verify", help="speaker verification of two files at the calibrated threshold")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--checkpoint", required=True, help="a finetuned speaker release or a pretrained release")
    p.add_argument("--threshold", type=float, default=None, help="raw cosine threshold (default: the calibration's)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="calibration written by `avssl evaluate --task speaker` (default: CHECKPOINT/calibration.json)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.set_defaults(func=cmd_verify)

    p = top.add_parser("predict", help="emotion or spoof labels and probabilities for media files")
    _inputs_args(p)
    p.add_argument("--task", required=True, choices=["emotion", "spoof"], help="the task of the release's head")
    p.add_argument("--checkpoint", required=True, help="a release finetuned for --task")
    p.set_defaults(func=cmd_predict)

    p = top.add_parser("prove", help="pretrained vs random backbone on every task and modality (the proof it learns)")
    p.add_argument("--pretrained", default="runs/demo/avssl/release", help="the pretrained release to test")
    p.add_argument("--data", default="data/demo")
    p.add_argument("--steps", type=int, default=100, help="finetuning steps per run")
    p.add_argument("--tasks", nargs="+", default=["speaker", "emotion", "spoof"], choices=["speaker", "emotion", "spoof"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                   help="head seeds: one head per seed and backbone, each clip's scores averaged over them before the "
                        "verdict (e.g. --seeds 0 1 2, which make demo uses)")
    p.add_argument("--storage", default="runs/prove", help="where the finetuning runs go")
    p.add_argument("--out", default="runs/prove/report")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override every finetuning recipe, e.g. --set head.freeze_backbone=true (linear probe)")
    p.set_defaults(func=cmd_prove)

    bench = top.add_parser("bench", help="benchmarks that print ratios against a baseline run alongside").add_subparsers(
        dest="bench_command", required=True, metavar="SUBCOMMAND"
    )
    p = bench.add_parser("data", help="data pipeline samples/s vs loose files with a plain Dataset")
    p.add_argument("--corpus", default="data/demo")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=12, help="timed batches per setting")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clip-seconds", type=float, default=2.0)
    p.set_defaults(func=cmd_bench_data)

    p = bench.add_parser("train", help="training-step samples/s, tokens/s and MFU with the data pipeline vs synthetic tensors")
    _add_config_args(p, "configs/pretrain/demo.yaml")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--json", default=None, help="also write raw results as JSON (e.g. benchmarks/results/train_<gpu>.json)")
    p.set_defaults(func=cmd_bench_train)

    p = bench.add_parser("model", help="forward+backward time, tokens/s and FLOPs per sample by size and attention")
    p.add_argument("--arch", nargs="+", default=["avvit_tiny_patch16", "avvit_base_patch16"])
    p.add_argument("--attn", nargs="+", default=["eager", "sdpa"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.set_defaults(func=cmd_bench_model)

    p = bench.add_parser("embed", help="avssl embed files/s on real files: batched whole-file windows vs the "
                         "one-file-at-a-time centre-window baseline, and start-up apart")
    p.add_argument("--checkpoint", default="runs/demo/avssl/release", help="a pretrained or finetuned release")
    p.add_argument("--files", nargs="+", default=None, help="media files (default: the wav files under ../shared/realdata)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward of the batched paths")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per path; the fastest counts")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core; on a shared machine 1 can be much faster)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--json", default=None, help="also write raw results as JSON")
    p.set_defaults(func=cmd_bench_embed)
    return parser


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        err_console.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False)
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
