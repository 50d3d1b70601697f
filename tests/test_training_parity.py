"""A few real training steps of the tiny backbone on the synthetic corpus, SDPA vs the Triton kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avssl.config import load_config
from avssl.data.corpus import CorpusRecipe, synthesize_corpus
from avssl.data.loader import DataConfig, StreamingLoader
from avssl.pretrain.config import build_model

REPO = Path(__file__).resolve().parents[1]
STEPS = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    recipe = load_config(CorpusRecipe, REPO / "configs/data/tiny.yaml")
    return synthesize_corpus(recipe, tmp_path_factory.mktemp("parity") / "tiny").root


@pytest.fixture(scope="module")
def batches(corpus) -> list[dict]:
    recipe = load_config(CorpusRecipe, REPO / "configs/data/tiny.yaml")
    data = DataConfig(corpus=str(corpus), batch_size=4, num_workers=0, clip_seconds=1.0, steps_per_epoch=3, shuffle_buffer=0)
    return list(StreamingLoader(data, recipe.features))


def train_losses(batches: list[dict], attn: str) -> list[float]:
    from avssl.cluster.config import PretrainRecipe

    recipe = load_config(PretrainRecipe, REPO / "configs/pretrain/tiny.yaml", [f"model.attn_implementation={attn}"])
    torch.manual_seed(0)
    model = build_model(recipe.model, recipe.masking, recipe.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(STEPS):
        b = batches[step % len(batches)]
        torch.manual_seed(1000 + step)  # identical masks for both attention implementations
        out = model(audio=b["audio"], video=b["video"], has_audio=b["has_audio"], has_video=b["has_video"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


def test_loss_decreases_and_triton_matches_sdpa(batches):
    """Training on synthetic-corpus batches lowers the loss, and the Triton kernel reproduces SDPA's loss curve."""
    sdpa = train_losses(batches, "sdpa")
    assert sum(sdpa[-3:]) / 3 < 0.8 * sum(sdpa[:3]) / 3, sdpa
    triton = train_losses(batches, "triton")
    for step, (a, b) in enumerate(zip(sdpa, triton)):
        assert b == pytest.approx(a, rel=2e-3, abs=1e-4), f"step {step}: sdpa {a} vs triton {b}"


def test_bench_train_measures_both_feeds(corpus):
    """`avssl bench train` times the step fed by the pipeline and by synthetic tensors, with FLOPs and MFU."""
    from avssl.cluster.bench import bench_train
    from avssl.cluster.config import PretrainRecipe

    recipe = load_config(PretrainRecipe, REPO / "configs/pretrain/tiny.yaml", [f"data.corpus={corpus}", "data.num_workers=0"])
    rows, info = bench_train(recipe, steps=2, device=torch.device("cpu"))
    assert [r.feed for r in rows] == ["data pipeline", "synthetic tensors"]
    assert all(r.samples_per_s > 0 and 0 < r.mfu < 5 for r in rows)
    assert info["tokens_per_sample"] == 4 * 7 + 2 * 2 * 2 and info["gflop_per_sample_fwd_bwd"] > 0
