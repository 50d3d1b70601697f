"""The proof's verdicts: per-sample score files and the paired speaker bootstrap of the gain."""

from __future__ import annotations

import numpy as np
import pytest

from avssl import AvsslError
from avssl.config import load_config
from avssl.finetune import metrics as M
from avssl.finetune.evaluate import headline, pool_scores, read_scores, write_scores
from avssl.finetune.proof import (attack_table, comparison, markdown, packaged_recipes, paired_gain, recipe_tag,
                                  release_tag)
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
        recipe = load_config(FinetuneRecipe, packaged_recipes() / "spoof.yaml",
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


def test_release_tag_hashes_weights_config_and_features_only(tmp_path):
    """Runs are keyed by what changes a backbone's output: its weights, its model config (some
    fields change the forward pass, not the weights) and its feature settings; nothing else."""
    release = tmp_path / "release"
    release.mkdir()
    files = {"model.safetensors": b"weights", "config.json": b'{"hidden_act": "gelu"}',
             "avssl_features.json": b'{"fbank_stats": {"mean": -6.6}}'}
    for name, data in files.items():
        (release / name).write_bytes(data)
    tag = release_tag(release)
    (release / "README.md").write_text("a model card")
    assert release_tag(release) == tag
    for name, data in files.items():
        (release / name).write_bytes(data + b" ")
        assert release_tag(release) != tag, name
        (release / name).write_bytes(data)
    assert release_tag(release) == tag


def test_pooling_averages_each_samples_scores_across_files_in_any_order(tmp_path):
    """Spoof (binary) files: the pooled score of a clip is the mean of its scores, matched by key;
    the headline of the pooled file is the EER of those means."""
    rng = np.random.default_rng(1)
    labels = np.tile([1, 1, 1, 1, 1, 1, 0, 0], 4)
    runs = [labels * 1.0 + rng.normal(0, 1.5, 32) for _ in range(3)]
    paths = []
    for k, s in enumerate(runs):
        (tmp_path / f"s{k}").mkdir()
        paths += write_scores(_spoof_raw(s, order=rng.permutation(32)), tmp_path / f"s{k}")
    pooled = pool_scores(paths, tmp_path / "pooled.tsv")
    got = read_scores(pooled)
    by_key = dict(zip(got["key"], np.array(got["score"], dtype=float)))
    keys = [f"spk{i // 8:02d}/utt{i % 8:02d}" for i in range(32)]
    np.testing.assert_allclose([by_key[k] for k in keys], np.mean(runs, axis=0), rtol=1e-6)
    assert headline(pooled) == pytest.approx(M.eer(np.mean(runs, axis=0), labels).eer)
    assert headline(paths[0]) == pytest.approx(M.eer(runs[0], labels).eer)
    (tmp_path / "other").mkdir()
    (path,) = write_scores(_spoof_raw(runs[0][:24]), tmp_path / "other")
    with pytest.raises(AvsslError, match="score different samples"):
        pool_scores([paths[0], path], tmp_path / "bad.tsv")


def test_emotion_files_carry_probabilities_and_pool_them_into_a_new_prediction(tmp_path):
    """Two heads that disagree: the pooled prediction is the argmax of the mean probabilities
    (not a vote on labels), and UA is recomputed from it."""
    classes = ["ANG", "HAP", "SAD"]
    truth = ["ANG", "HAP", "SAD", "ANG"]
    probs = [np.array([[0.5, 0.4, 0.1], [0.1, 0.8, 0.1], [0.6, 0.0, 0.4], [0.2, 0.7, 0.1]]),
             np.array([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.0, 0.2, 0.8], [0.7, 0.2, 0.1]])]
    paths = []
    for k, p in enumerate(probs):
        pred = [classes[i] for i in p.argmax(1)]
        raw = {"v": {"keys": [f"spk{i}/u{i}" for i in range(4)], "speakers": [f"spk{i}" for i in range(4)],
                     "labels": truth, "predictions": pred, "classes": classes, "probabilities": p}}
        (tmp_path / f"s{k}").mkdir()
        paths += write_scores(raw, tmp_path / f"s{k}")
    assert paths[0].read_text().splitlines()[0] == "key\tspeaker\tlabel\tprediction\tp_ANG\tp_HAP\tp_SAD"
    assert read_scores(paths[0])["p_HAP"][1] == "0.8"
    pooled = read_scores(pool_scores(paths, tmp_path / "pooled.tsv"))
    # mean rows: [.3 .6 .1] HAP, [.15 .75 .1] HAP, [.3 .1 .6] SAD, [.45 .45 .1] ANG (argmax takes the first)
    assert pooled["prediction"] == ["HAP", "HAP", "SAD", "ANG"]
    assert headline(tmp_path / "pooled.tsv") == pytest.approx((0.5 + 1 + 1) / 3)
    assert headline(paths[0]) == pytest.approx((0.5 + 1 + 0) / 3)  # ANG 1/2, HAP 1, SAD 0 (predicted ANG)
    old = tmp_path / "old.tsv"  # a file of an earlier version: labels only
    old.write_text("key\tspeaker\tlabel\tprediction\nspk0/u0\tspk0\tANG\tANG\n")
    assert read_scores(old)["prediction"] == ["ANG"]
    with pytest.raises(AvsslError, match="without class probabilities cannot be pooled"):
        pool_scores([old, old], tmp_path / "x.tsv")


def test_comparison_and_markdown_report_each_seeds_gain(tmp_path):
    rng = np.random.default_rng(2)
    labels = np.tile([1, 1, 1, 1, 1, 1, 0, 0], 8)
    files = {}
    for name, s in (("p", labels * 2.0 + rng.normal(0, 1, 64)), ("q", rng.normal(0, 1, 64))):
        (tmp_path / name).mkdir()
        (files[name],) = write_scores(_spoof_raw(s), tmp_path / name)
    seeds = lambda values: [{"seed": k, "value": v, "scores": ""} for k, v in enumerate(values)]  # noqa: E731
    rows = [{"task": "spoof", "mode": "v", "init": "pretrained", "metric": "eer", "value": headline(files["p"]),
             "n": 16, "scores": str(files["p"]), "seeds": seeds([0.10, 0.20])},
            {"task": "spoof", "mode": "v", "init": "random", "metric": "eer", "value": headline(files["q"]),
             "n": 16, "scores": str(files["q"]), "seeds": seeds([0.30, 0.25])}]
    (row,) = comparison(rows, resamples=100)
    assert row["seed_gains"] == pytest.approx([20.0, 5.0])
    text = markdown([row], 100, (0, 1))
    assert "per seed |" in text and "| +20.0 / +5.0 |" in text and "seeds before the verdict" in text
    assert "per seed" not in markdown([row], 100)


def test_attack_table_breaks_each_spoof_row_down_by_attack(tmp_path):
    """Per modality, each attack's EER against all bona fide clips, from the same score files as the
    verdict; proof.md shows it as "pretrained / random"; rows of other tasks are left out."""
    rng = np.random.default_rng(3)
    labels = np.tile([1, 1, 1, 1, 1, 1, 0, 0], 8)
    groups = np.where(labels == 1, "bonafide", np.tile(["A01", "A01", "A01", "A01", "A01", "A01", "A01", "A05"], 8))
    files = {}
    for name, s in (("p", labels * 3.0 + rng.normal(0, 1, 64)), ("q", rng.normal(0, 1, 64))):
        (tmp_path / name).mkdir()
        raw = _spoof_raw(s)
        raw["a"]["groups"] = groups
        (files[name],) = write_scores(raw, tmp_path / name)
    rows = [{"task": "spoof", "mode": "a", "init": init, "metric": "eer", "value": headline(files[k]), "n": 16,
             "scores": str(files[k])} for init, k in (("pretrained", "p"), ("random", "q"))]
    rows.append({"task": "emotion", "mode": "a", "init": "pretrained", "metric": "unweighted_accuracy", "value": 0.5,
                 "n": 8, "scores": "unused"})
    (a,) = attack_table(rows)
    assert a["mode"] == "A" and set(a["eer"]) == {"A01", "A05"}
    f = read_scores(files["q"])
    bona = [float(x) for x, g in zip(f["score"], f["group"]) if g == "bonafide"]
    a05 = [float(x) for x, g in zip(f["score"], f["group"]) if g == "A05"]
    expected = 100 * M.eer(bona + a05, [1] * len(bona) + [0] * len(a05)).eer
    assert a["eer"]["A05"]["random"] == pytest.approx(expected)
    assert a["eer"]["A01"]["pretrained"] < a["eer"]["A01"]["random"]
    table = comparison(rows, resamples=50)
    text = markdown(table, 100, (0,), [a])
    cell = f"{a['eer']['A05']['pretrained']:.1f} / {a['eer']['A05']['random']:.1f}"
    assert "| modality | A01 | A05 |" in text and "| A | " in text and cell in text
    assert "per attack" not in markdown(table, 100)


def test_seeds_and_a_fixed_head_seed_conflict_before_any_work(tmp_path):
    from avssl.finetune.proof import prove

    with pytest.raises(AvsslError, match="--set trainer.seed and --seeds both choose the head seed"):
        prove(tmp_path, tmp_path, tmp_path / "out", 4, tmp_path, overrides=["trainer.seed=3"], seeds=(0, 1))
    assert not (tmp_path / "out").exists()
