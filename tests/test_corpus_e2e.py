"""End to end through the real entry points: synthesize a corpus, inspect it, stream it, bench it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from avssl.cli import main
from avssl.config import load_config
from avssl.data.bench import bench_data
from avssl.data.corpus import CorpusRecipe, summarize
from avssl.data.loader import DataConfig, StreamingLoader

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/data/tiny.yaml"


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "corpus"
    assert main(["data", "synth", "--config", str(TINY), "--out", str(out)]) == 0
    return out


def test_synth_writes_a_complete_corpus(tiny_corpus):
    """`avssl data synth` writes shards, index, stats, trials and the resolved recipe; splits hold out speakers."""
    for name in ("index.json", "stats.json", "recipe.yaml", "trials/synth_test.txt"):
        assert (tiny_corpus / name).is_file(), name
    assert load_config(CorpusRecipe, tiny_corpus / "recipe.yaml") == load_config(CorpusRecipe, TINY)
    index = json.loads((tiny_corpus / "index.json").read_text())
    assert index["generator"] == "avssl.data.synth" and index["seed"] == 1  # extra fields survive closing
    s = summarize(tiny_corpus)["splits"]
    assert s["test"]["speakers"] == 2 and s["train"]["speakers"] == 4
    assert set(s["train"]["spoof"]) >= {"bonafide", "A01"}
    trial_speakers = {p.split("/")[0] for line in (tiny_corpus / "trials/synth_test.txt").read_text().splitlines() for p in line.split()[1:]}
    assert len(trial_speakers) == 2


def test_synth_refuses_to_overwrite(tiny_corpus, capsys):
    """Running synth into an existing corpus is a clear error, never a silent overwrite."""
    assert main(["data", "synth", "--config", str(TINY), "--out", str(tiny_corpus)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_inspect_draws_a_sample(tiny_corpus, tmp_path):
    """`avssl data inspect` prints the summary and writes a PNG of one sample."""
    png = tmp_path / "sample.png"
    assert main(["data", "inspect", str(tiny_corpus), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_batches_from_synth_corpus(tiny_corpus):
    """The loader streams finite, normalized AV batches from the synthesized corpus with 2 workers."""
    recipe = load_config(CorpusRecipe, TINY)
    data = DataConfig(corpus=str(tiny_corpus), batch_size=4, num_workers=2, clip_seconds=1.0, steps_per_epoch=3)
    batches = list(StreamingLoader(data, recipe.features))
    assert len(batches) == 3
    b = batches[0]
    assert b["audio"].shape == (4, recipe.features.num_audio_frames(1.0), 64) and b["video"].shape == (4, 2, 3, 32, 32)
    assert b["has_audio"].all() and b["has_video"].all() and sum(x["skipped"] for x in batches) == 0
    audio = torch.cat([x["audio"] for x in batches])
    assert abs(float(audio.mean())) < 0.5 and 0.2 < float(audio.std()) < 1.0  # normalized with /2std


def test_bench_data_reports_both_sides(tiny_corpus):
    """`avssl bench data` measures shards and the loose-file baseline for each worker count."""
    rows = bench_data(tiny_corpus, [0, 1], batches=2, batch_size=2, clip_seconds=1.0)
    assert [r.workers for r in rows] == [0, 1] and all(r.shards_sps > 0 and r.loose_sps > 0 for r in rows)
