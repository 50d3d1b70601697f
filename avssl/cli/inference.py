"""`avssl evaluate`, `embed`, `verify`, `predict` and `prove`: releases applied to corpora and media
files (avssl.finetune.evaluate, .inference, .proof)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from avssl import AvsslError
from avssl.cli.common import console, cuda_available, print_report, print_skipped


def cmd_evaluate(args: argparse.Namespace) -> None:
    from avssl.cluster.config import MlflowConfig
    from avssl.cluster.tracking import open_run, resolve_tracking_uri
    from avssl.finetune.evaluate import evaluate, log_report

    checkpoint = Path(args.checkpoint)
    out = Path(args.out or checkpoint.parent / f"eval-{checkpoint.name}-{args.task}{'-zeroshot' if args.zero_shot else ''}")
    report = evaluate(checkpoint, Path(args.data), out, task=args.task, split=args.split,
                      trials=Path(args.trials) if args.trials else None, modes=args.modes, zero_shot=args.zero_shot,
                      batch_size=args.batch_size, as_norm_cohort=args.as_norm,
                      asv_scores=Path(args.asv_scores) if args.asv_scores else None,
                      labels_csv=Path(args.labels_csv) if args.labels_csv else None,
                      calibration=Path(args.calibration) if args.calibration else None)
    print_report(report)
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
    print_skipped(result.skipped, len(files) + len(skipped))
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
    print_skipped(skipped + bad, len(files) + len(skipped))
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
                   args.overrides, tuple(args.seeds), Path(args.recipes) if args.recipes else None)
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
                  f"MLflow run {result['mlflow_run_id']} (experiment avssl-proof)", highlight=False, soft_wrap=True)


def register(top: argparse._SubParsersAction) -> None:
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
        p.add_argument("--device", default="cuda" if cuda_available() else "cpu")

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
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
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
                        "verdict (e.g. --seeds 0 1 2, which make proof uses)")
    p.add_argument("--storage", default="runs/prove", help="where the finetuning runs go")
    p.add_argument("--out", default="runs/prove/report")
    p.add_argument("--recipes", help="folder of the finetuning recipes <task>.yaml (default: those shipped with avssl)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override every finetuning recipe, e.g. --set head.freeze_backbone=true (linear probe)")
    p.set_defaults(func=cmd_prove)
