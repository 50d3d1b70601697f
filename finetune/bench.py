"""`avssl bench embed`: files/s of `avssl embed` on real files, against a baseline run alongside.

Three paths over the same files with the same loaded release, each timed end to end (decode,
features, forward, pooling), after one untimed warm-up pass over a few files:

- baseline: what `avssl embed` did before whole-file windows: the centred `clip_seconds`
  window of each file, one file per forward pass (`embed_with(..., batch_size=1, center=True)`);
- batched, centre: the same single window per file, windows of `batch_size` files per forward;
- batched, whole file: the default of `avssl embed`: windows covering each file, `batch_size`
  windows (of several files) per forward. It does more work per file (every window, not one),
  so its audio seconds/s is printed beside its files/s.

Start-up (loading the release: weights, feature settings) is measured apart, once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"


def default_files() -> list[Path]:
    """The wav files under ../shared/realdata (real recordings at 16, 22.05 and 48 kHz)."""
    return sorted(REALDATA.rglob("*.wav")) if REALDATA.is_dir() else []


@dataclass
class EmbedBenchRow:
    path: str
    what: str
    batch_size: int
    files: int
    windows: int
    audio_seconds: float
    seconds: float

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds

    @property
    def windows_per_s(self) -> float:
        return self.windows / self.seconds


PATHS = (
    ("baseline", "centre window, one file per forward (embed before whole-file windows)", 1, True),
    ("batched, centre", "centre window, windows of several files per forward", None, True),
    ("batched, whole file", "windows covering each file, several files per forward (embed's default)", None, False),
)


def bench_embed(release: Path, files: list[Path], batch_size: int = 16, device: str = "cpu", repeats: int = 2
                ) -> tuple[list[EmbedBenchRow], dict[str, Any]]:
    """Time each path of the module docstring `repeats` times (interleaved; the fastest run counts)."""
    import torch

    from avssl import AvsslError
    from avssl.finetune.inference import Release, embed_with

    if not files:
        raise AvsslError(f"no files to benchmark: {REALDATA} is missing; pass --files FILE...")
    t0 = time.perf_counter()
    rel = Release.load(Path(release), device)
    startup = time.perf_counter() - t0
    embed_with(rel, files[:4], batch_size, center=False)  # warm-up: first-call allocations, lazy imports
    best: dict[str, EmbedBenchRow] = {}
    for _ in range(max(1, repeats)):
        for name, what, bs, center in PATHS:
            bs = bs or batch_size
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = embed_with(rel, files, bs, center=center)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            covered = sum(min(r["duration"], rel.seconds) if center else r["duration"] for r in out.rows)
            row = EmbedBenchRow(name, what, bs, len(out.rows), sum(r["windows"] for r in out.rows), covered, dt)
            if name not in best or dt < best[name].seconds:
                best[name] = row
    info = {"release": str(release), "device": device, "startup_s": startup, "torch_threads": torch.get_num_threads(),
            "window_seconds": rel.seconds, "files_given": len(files), "repeats": repeats}
    return [best[name] for name, *_ in PATHS], info


def print_embed_bench(rows: list[EmbedBenchRow], info: dict[str, Any], console) -> None:
    from rich.table import Table

    base = rows[0].files_per_s
    table = Table(title=f"avssl embed on {rows[0].files} real files, {info['device']}, {info['torch_threads']} threads "
                        f"(window {info['window_seconds']} s; fastest of {info['repeats']})")
    for col in ("path", "batch", "files/s", "x baseline", "windows/s", "audio s/s", "what"):
        table.add_column(col, justify="left" if col in ("path", "what") else "right")
    for r in rows:
        table.add_row(r.path, str(r.batch_size), f"{r.files_per_s:.1f}", f"{r.files_per_s / base:.2f}",
                      f"{r.windows_per_s:.1f}", f"{r.audio_seconds / r.seconds:.1f}", r.what)
    console.print(table)
    console.print(f"start-up (loading {info['release']}): {info['startup_s']:.2f} s, not in the figures above",
                  highlight=False)


def as_json(rows: list[EmbedBenchRow], info: dict[str, Any]) -> dict[str, Any]:
    return {"info": info, "rows": [{**asdict(r), "files_per_s": r.files_per_s, "windows_per_s": r.windows_per_s}
                                   for r in rows]}
