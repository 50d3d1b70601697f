"""Reconstruction-target baselines: what a masked-data-modeling loss of X means on a corpus.

A diagnostic script, not a test. For each modality and each target form of the reconstruction loss
(per-patch normalized, MAE's norm_pix_loss, or raw), the mean per-patch squared error of three
predictors that need no training, over every patch of a split's clips (the loss itself averages
over the masked patches, a random subset, so the numbers are comparable):

  zero        predict 0: what a model that learned nothing scores (normalized targets: about 1)
  time nbr    copy the patch next to it in time (audio: the next time column of the same frequency
              row; video: the same position in the next frame)
  row nbr     copy the patch next to it in the other direction (audio: the next frequency row at the
              same time; video: the next position to the right in the same frame)
  clip mean   the mean of the clip's patches in the same row (audio: the frequency row over all
              times; video: the position over all frames), patch included: an oracle that knows the
              clip's stationary content at that row (speaker, channel, emotional level) and nothing
              about the moment

Read a run's loss_rec_audio / loss_rec_video (MLflow) against them: near "zero" the objective has
taught the encoder nothing about that modality; the gap from "zero" to "clip mean" is what knowing
a clip's stationary content is worth; below "clip mean" needs the patch's own moment (content,
timing). Why it exists: on the demo corpus the normalized audio targets sit at zero 1.00, clip mean
0.88 and time nbr 2.2 (neighbours in time are no more alike than unrelated patches), and the demo's audio
loss stays at 0.94-0.95, so its audio encoder has almost nothing to learn from them
(docs/pretraining-experiments.md, 2026-11-21).

Usage:
  python benchmarks/target_baselines.py --release runs/demo/avssl/release --data data/demo
  python benchmarks/target_baselines.py --release R --data data/demo --split test --clips 128 --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from avssl.finetune.evaluate import eval_loader
from avssl.pretrain.losses import normalize_patches
from avssl.pretrain.modeling import AVViTModel

PREDICTORS = ("zero", "time nbr", "row nbr", "clip mean")


def baselines(grid: torch.Tensor, row_pairs: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """grid [B, R, T, P]: patches by row (a frequency row or a frame position), then time; row_pairs:
    the indices (i, j) of neighbouring rows -> the mean per-patch squared error of each predictor."""
    i, j = row_pairs
    per_patch = {
        "zero": grid.pow(2).mean(-1),
        "time nbr": (grid[:, :, 1:] - grid[:, :, :-1]).pow(2).mean(-1),
        "row nbr": (grid[:, j] - grid[:, i]).pow(2).mean(-1),
        "clip mean": (grid - grid.mean(2, keepdim=True)).pow(2).mean(-1),
    }
    return {name: round(float(v.mean()), 4) for name, v in per_patch.items()}


def patch_grids(model: AVViTModel, batch: dict) -> dict[str, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
    """{"audio": [B, F, T, p*p] by frequency row and time, "video": [B, h*w, V, 3*q*q] by position and
    frame}, each with its neighbouring row pairs (audio: adjacent frequency rows; video: horizontally
    adjacent positions)."""
    emb, config = model.embeddings, model.config
    audio = emb.patchify_audio(batch["audio"].float())  # (B, F*T, p*p), frequency-major
    n_freq, n_time = config.audio_grid(batch["audio"].shape[1])
    rows = torch.arange(n_freq - 1)
    grids = {"audio": (audio.reshape(audio.shape[0], n_freq, n_time, -1), (rows, rows + 1))}
    if batch.get("video") is not None:
        video = emb.patchify_video(batch["video"].float())  # (B, V*h*w, 3*q*q), frame-major
        frames = batch["video"].shape[1]
        h, w = config.video_grid(batch["video"].shape[-2:])
        left = torch.arange(h * w).view(h, w)[:, :-1].flatten()
        grids["video"] = (video.reshape(video.shape[0], frames, h * w, -1).transpose(1, 2), (left, left + 1))
    return grids


def measure(release: Path, corpus: Path, split: str, clips: int) -> dict[str, dict[str, dict[str, float]]]:
    """{modality: {"normalized" | "raw": {predictor: loss}}}, averaged over the first `clips` clips
    (batch-weighted: every clip counts once)."""
    model = AVViTModel.from_pretrained(release).eval()
    features = json.loads((release / "avssl_features.json").read_text())
    loader = eval_loader(corpus, split, features, 32, ["audio", "video"])
    sums: dict[str, dict[str, dict[str, float]]] = {}
    seen = 0
    with torch.no_grad():
        for batch in loader:
            n = len(batch["meta"])
            for modality, (grid, row_pairs) in patch_grids(model, batch).items():
                for form, target in (("normalized", normalize_patches(grid)), ("raw", grid)):
                    row = sums.setdefault(modality, {}).setdefault(form, dict.fromkeys(PREDICTORS, 0.0))
                    for name, value in baselines(target, row_pairs).items():
                        row[name] += value * n
            seen += n
            if seen >= clips:
                break
    if not seen:
        raise SystemExit(f"{corpus}: split {split!r} has no clips")
    return {m: {f: {k: round(v / seen, 4) for k, v in row.items()} for f, row in forms.items()} for m, forms in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, required=True, help="a released backbone: its patch geometry and features")
    parser.add_argument("--data", type=Path, required=True, help="a corpus")
    parser.add_argument("--split", default="train", help="the split to measure (pretraining reads train)")
    parser.add_argument("--clips", type=int, default=256, help="clips to measure, from the start of the split")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = measure(args.release, args.data, args.split, args.clips)
    print("| modality | targets | " + " | ".join(PREDICTORS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in PREDICTORS) + " |")
    for modality, forms in results.items():
        for form, row in forms.items():
            print(f"| {modality} | {form} | " + " | ".join(f"{row[k]:.3f}" for k in PREDICTORS) + " |")
    if args.json:
        args.json.write_text(json.dumps({"release": str(args.release), "data": str(args.data), "split": args.split,
                                         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
