"""`avssl data`: synthesize, prepare, inspect, describe and extract corpora (avssl.data)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table
from rich.text import Text

from avssl.cli.common import add_config_args, console, err_console


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


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from avssl.data.prepare import prepare_dataset

    from avssl.data.faces import FaceConfig

    faces = FaceConfig(mode=args.faces, crop_size=args.face_size) if args.faces else None
    summary = prepare_dataset(args.dataset, Path(args.root), Path(args.out), limit=args.limit, video=not args.no_video,
                              faces=faces, workers=args.workers, address=args.address,
                              labels=Path(args.labels) if args.labels else None, test_speakers=args.test_speakers)
    console.print(summary.describe(), highlight=False)


def register(top: argparse._SubParsersAction) -> None:
    data = top.add_parser("data", help="create, prepare and inspect corpora").add_subparsers(
        dest="data_command", required=True, metavar="SUBCOMMAND"
    )
    p = data.add_parser("synth", help="generate the synthetic audio-visual corpus as shards")
    add_config_args(p, "configs/data/demo.yaml")
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
    add_config_args(p, None)
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
