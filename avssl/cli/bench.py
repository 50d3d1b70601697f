"""`avssl bench`: benchmarks that print ratios against a baseline measured in the same run."""

from __future__ import annotations

import argparse
from pathlib import Path

from avssl.cli.common import add_config_args, console, cuda_available


def cmd_bench_data(args: argparse.Namespace) -> None:
    from avssl.data.bench import bench_data, print_bench

    rows = bench_data(Path(args.corpus), args.workers, args.batches, args.batch_size, args.clip_seconds)
    print_bench(rows, console)


def cmd_bench_train(args: argparse.Namespace) -> None:
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
    import torch

    from avssl.pretrain.bench import bench_model, print_table

    packing = {"on": (True,), "off": (False,), "both": (False, True)}[args.pack]
    modes = [None if m == "none" else m for m in args.compile]
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    save = None
    if args.json:
        from avssl.cluster.launch import environment_params
        from avssl.io import write_json

        info = {"command": args.command_line, "archs": args.arch, "attn": args.attn, "batch_sizes": args.batch_size,
                "packing": list(packing), "compile_modes": modes, "steps": args.steps, "device": args.device,
                "dtype": args.dtype, "audio_frames": args.audio_frames, "video_frames": args.video_frames,
                "image_size": args.image_size}
        environment = environment_params()

        def save(rows: list[dict]) -> None:  # after every row: a sweep cut short keeps what it measured
            write_json(Path(args.json), {"info": info, "rows": rows, "environment": environment})

    rows = bench_model(archs=args.arch, attn=args.attn, batch_size=args.batch_size, steps=args.steps, device=args.device,
                       audio_frames=args.audio_frames, video_frames=args.video_frames, image_size=args.image_size,
                       dtype=dtype, packing=packing, compile_modes=modes, on_row=save)
    print_table(rows, console)
    if args.json:
        console.print(f"raw results: {args.json}")


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


def register(top: argparse._SubParsersAction) -> None:
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
    add_config_args(p, "configs/pretrain/demo.yaml")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    p.add_argument("--json", default=None, help="also write raw results as JSON (e.g. benchmarks/results/train_<gpu>.json)")
    p.set_defaults(func=cmd_bench_train)

    p = bench.add_parser("model", help="forward+backward time, tokens/s and FLOPs per sample by size and attention")
    p.add_argument("--arch", nargs="+", default=["avvit_tiny_patch16", "avvit_base_patch16"])
    p.add_argument("--attn", nargs="+", default=["eager", "sdpa"])
    p.add_argument("--batch-size", type=int, nargs="+", default=[2], help="one or several (a sweep in the same run)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    p.add_argument("--audio-frames", type=int, default=200, help="fbank frames per clip (198 = 2 s)")
    p.add_argument("--video-frames", type=int, default=1, help="face frames per clip")
    p.add_argument("--image-size", type=int, default=224, help="face frame side in pixels")
    p.add_argument("--pack", choices=["on", "off", "both"], default="on",
                   help="the contrastive view packed by masking ratio (on), padded to the longest (off), or both, "
                        "with the speed-up of packing measured in the same run")
    # The modes of avssl.pretrain.bench.COMPILE_MODES (not imported here: it needs torch).
    p.add_argument("--compile", nargs="+", default=["none"], metavar="MODE",
                   choices=["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"],
                   help="none (eager blocks) and/or torch.compile modes of every transformer block, e.g. "
                        "--compile none default reduce-overhead (reduce-overhead and max-autotune replay CUDA graphs; "
                        "CUDA only); compile time is reported apart, ratios against the eager padded step in 'x baseline'")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype of the step")
    p.add_argument("--json", default=None, help="also write the rows as JSON, with environment info (rewritten after each row)")
    p.set_defaults(func=cmd_bench_model)

    p = bench.add_parser("embed", help="avssl embed files/s on real files: batched whole-file windows vs the "
                         "one-file-at-a-time centre-window baseline, and start-up apart")
    p.add_argument("--checkpoint", default="runs/demo/avssl/release", help="a pretrained or finetuned release")
    p.add_argument("--files", nargs="+", default=None, help="media files (default: the wav files under ../shared/realdata)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward of the batched paths")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per path; the fastest counts")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core; on a shared machine 1 can be much faster)")
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    p.add_argument("--json", default=None, help="also write raw results as JSON")
    p.set_defaults(func=cmd_bench_embed)
