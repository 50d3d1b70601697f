"""Emotion label sets: CREMA-D default, metadata fields (RAVDESS's eight), a user's CSV; recipe checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from avssl import AvsslError
from avssl.config import ConfigError, load_config
from avssl.finetune.labels import LabelConfig, LabelMap, read_label_csv
from avssl.finetune.recipe import FinetuneRecipe

REPO = Path(__file__).resolve().parents[1]
METAS = [
    {"utterance": "Actor_01/03-01-02-01-01-01-01", "emotion": None, "extra": {"emotion8": "calm"}},
    {"utterance": "Actor_01/03-01-05-01-01-01-01", "emotion": "ANG", "extra": {"emotion8": "angry"}},
    {"utterance": "x/3", "emotion": "SAD", "extra": {}},
]


def test_default_is_cremad_six_from_metadata():
    m = LabelMap(LabelConfig())
    assert m.names == ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
    assert m(METAS).tolist() == [-1, 0, 5]


def test_metadata_field_with_eight_classes_and_labels_outside_the_set(caplog):
    """RAVDESS: extra.emotion8 over its eight names; with six names calm is unlabelled and counted once-warned."""
    eight = LabelMap(LabelConfig(key="extra.emotion8", names=["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]))
    assert eight(METAS).tolist() == [1, 4, -1]
    six = LabelMap(LabelConfig(key="extra.emotion8", names=["neutral", "happy", "sad", "angry", "fearful", "disgust"]))
    assert six(METAS + METAS).tolist() == [-1, 3, -1] * 2
    assert six.outside["calm"] == 2 and sum("'calm'" in r.message for r in caplog.records) == 1


def test_csv_labels_replace_metadata_and_errors_name_the_line(tmp_path):
    good = tmp_path / "labels.csv"
    good.write_text("utterance,label\nActor_01/03-01-02-01-01-01-01,low\nx/3,high\n\n")
    m = LabelMap(LabelConfig(names=["low", "high"], csv=str(good)))
    assert m(METAS).tolist() == [0, -1, 1]
    bad = tmp_path / "bad.csv"
    for text, match in (
        ("utt,lab\na,low\n", r"bad.csv:1: expected the header 'utterance,label'"),
        ("utterance,label\na,low\nb,medium\n", r"bad.csv:3: label 'medium' is not one of labels.names"),
        ("utterance,label\na,low\na,high\n", r"bad.csv:3: utterance 'a' is labelled twice"),
        ("utterance,label\nlonely\n", r"bad.csv:2: expected 'utterance,label'"),
    ):
        bad.write_text(text)
        with pytest.raises(AvsslError, match=match):
            read_label_csv(bad, ["low", "high"])
    with pytest.raises(AvsslError, match="label CSV not found"):
        LabelMap(LabelConfig(names=["low", "high"], csv=str(tmp_path / "missing.csv")))


def test_recipe_classes_follow_labels_and_misuse_is_rejected(tmp_path):
    """head.num_classes follows labels.names; a disagreeing count, a bad key or labels on another task fail at load."""
    emotion = REPO / "configs/finetune/emotion.yaml"
    r = load_config(FinetuneRecipe, emotion, ["labels.names=[low, mid, high]"])
    assert r.head.num_classes == 3 and r.labels.class_names() == ["low", "mid", "high"]
    with pytest.raises(ConfigError, match="head.num_classes=6 but labels.names has 3"):
        load_config(FinetuneRecipe, emotion, ["labels.names=[low, mid, high]", "head.num_classes=6"])
    with pytest.raises(ConfigError, match="key must be 'emotion' or 'extra.<field>'"):
        load_config(FinetuneRecipe, emotion, ["labels.key=speaker"])
    with pytest.raises(ConfigError, match="labels sets emotion classes, but head.task is 'spoof'"):
        load_config(FinetuneRecipe, REPO / "configs/finetune/spoof.yaml", ["labels.names=[a, b]"])
    ravdess = load_config(FinetuneRecipe, REPO / "configs/finetune/emotion_ravdess.yaml")
    assert ravdess.head.num_classes == 8 and ravdess.labels.key == "extra.emotion8"
