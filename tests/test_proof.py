"""The proof's verdicts: per-sample score files and the paired speaker bootstrap of the gain."""

from __future__ import annotations

import numpy as np
import pytest

from avssl import AvsslError
from avssl.config import load_config
from avssl.finetune import metrics as M
from avssl.finetune.evaluate import read_scores, write_scores
from avssl.finetune.proof import REPO_CONFIGS, comparison, paired_gain, recipe_tag
from avssl.finetune.recipe import FinetuneRecipe


def _spoof_raw(scores: np.ndarray, order: np.ndarray | None = None) -> dict:
    """Eight speakers x (6 bona fide + 2 spoofs); `order` permutes the rows (files need not align)."""
    n = scores.size
    labels = np.tile([1, 1, 1, 1, 1, 1, 0, 0], n // 8)
    keys = [f"spk{i // 8:02d}/utt{i % 8:02d}" for i in range(n)]
    order = np.arange(n) if order is None else order
    return {"a": {"scores": scores[order], "labels": labels[order], "keys": [keys[i] for i in order],
                  "speakers": [k.split("/")[0] for k in np.array(keys)[order]],
                  "groups": np.where(labels[order] == 1, "bonafide", "A01")}}


def test_score_files_round_trip_and_reject_other_files(tmp_path):
    raw = _spoof_raw(np.linspace(-1, 1, 16))
    (path,) = write_scores(raw, tmp_path)
    assert path.name == "scores_a.tsv" and path.read_text().splitlines()[0] == "key\tspeaker\tlabel\tgroup\tscore"
    got = read_scores(path)
    assert got["key"] == raw["a"]["keys"] and got["label"][6:8] == ["0", "0"] and got["group"][7] == "A01"
    np.testing.assert_allclose(np.array(got["score"], dtype=float), raw["a"]["scores"], rtol=1e-6)
    (tmp_path / "other.tsv").write_text("utt\tscore\nx\t1\n")
    with pytest.raises(AvsslError, match="other.tsv: not a score file"):
        read_scores(tmp_path / "other.tsv")
    (tmp_path / "short.tsv").write_text("key\tspeaker\tlabel\tprediction\nx\tspk\tHAP\n")
    with pytest.raises(AvsslError, match="short.tsv:2: 3 fields"):
        read_scores(tmp_path / "short.tsv")


def test_paired_gain_aligns_by_key_and_matches_a_direct_bootstrap(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.tile([1, 1, 1, 1, 1, 1, 0, 0], 8)
    good = labels * 2.0 + rng.normal(0, 1, 64)  # pretrained: separates the classes
    noise = rng.normal(0, 1, 64)  # random: chance
    for d, raw in (("p", _spoof_raw(good)), ("q", _spoof_raw(noise, order=rng.permutation(64)))):
        (tmp_path / d).mkdir()
        write_scores(raw, tmp_path / d)
    r = paired_gain(tmp_path / "p" / "scores_a.tsv", tmp_path / "q" / "scores_a.tsv", resamples=300)
    assert r.difference == pytest.approx(M.eer(noise, labels).eer - M.eer(good, labels).eer, abs=1e-6)
    speakers = np.repeat(np.arange(8), 8)
    direct = M.paired_bootstrap(lambda i: M.eer(noise[i], labels[i]).eer - M.eer(good[i], labels[i]).eer, speakers,
                                resamples=300)
    assert r.standard_error == pytest.approx(direct.standard_error, rel=1e-5) and r.clusters == 8
    rows = [{"task": "spoof", "mode": "a", "init": init, "metric": "eer", "value": M.eer(s, labels).eer, "n": 16,
             "scores": str(tmp_path / d / "scores_a.tsv")} for init, s, d in (("pretrained", good, "p"), ("random", noise, "q"))]
    (row,) = comparison(rows, resamples=300)
    assert row["clearly_better"] and row["clear_margin"] == pytest.approx(200 * r.standard_error)
    assert row["interval"][0] > 0 and row["speakers"] == 8


def test_paired_gain_of_emotion_predictions_and_mismatched_files(tmp_path):
    names = ["ANG", "HAP", "SAD"]
    truth = [names[i % 3] for i in range(24)]
    raw = lambda pred: {"av": {"keys": [f"spk{i // 6}/u{i}" for i in range(24)], "speakers": [f"spk{i // 6}" for i in range(24)],  # noqa: E731
                               "labels": truth, "predictions": pred}}
    for d, pred in (("p", truth), ("q", ["ANG"] * 24)):
        (tmp_path / d).mkdir()
        write_scores(raw(pred), tmp_path / d)
    r = paired_gain(tmp_path / "p" / "scores_av.tsv", tmp_path / "q" / "scores_av.tsv", resamples=200)
    assert r.difference == pytest.approx(1 - 1 / 3) and r.standard_error == pytest.approx(0.0, abs=1e-12)
    (tmp_path / "q" / "scores_av.tsv").write_text("key\tspeaker\tlabel\tprediction\nother\tspk0\tANG\tANG\n")
    with pytest.raises(AvsslError, match="score different samples"):
        paired_gain(tmp_path / "p" / "scores_av.tsv", tmp_path / "q" / "scores_av.tsv")


def test_recipe_tag_follows_corpus_content_not_paths(tmp_path):
    """A moved checkout (corpus and storage elsewhere, same content) resumes its proof runs; a
    different corpus or a different budget gets runs of its own."""
    def tag(corpus, storage, *extra):
        recipe = load_config(FinetuneRecipe, REPO_CONFIGS / "spoof.yaml",
                             [f"data.corpus={corpus}", f"trainer.storage_path={storage}", "trainer.name=x", *extra])
        return recipe_tag(recipe)

    for name, index in (("a", "{}"), ("moved", "{}"), ("other", '{"seed": 1}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "index.json").write_text(index)
    base = tag(tmp_path / "a", tmp_path / "runs")
    assert tag(tmp_path / "moved", tmp_path / "elsewhere") == base
    assert tag(tmp_path / "a", tmp_path / "runs", "trainer.name=y") == base
    assert tag(tmp_path / "other", tmp_path / "runs") != base
    assert tag(tmp_path / "a", tmp_path / "runs", "trainer.total_steps=7") != base
