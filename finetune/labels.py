"""Emotion label sets: CREMA-D's six classes, RAVDESS's eight, or a user's own from a CSV.

A recipe's `labels` section names the classes (in logit order) and where each sample's label
comes from: a metadata field (`emotion`, or `extra.<field>` such as RAVDESS's `extra.emotion8`
written by `avssl data prepare ravdess`) or a CSV with the header `utterance,label` that maps
utterance ids (the `utterance` of the sample metadata, as `avssl data inspect` lists them) to
labels. A sample whose label is missing gets -1 (unlabelled: no loss, not scored); a metadata
label outside `names` also gets -1 and is counted and warned about once per value, so that a
class left out on purpose (RAVDESS's calm, say) is visible, not silent.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from avssl import AvsslError
from avssl.config import Section
from avssl.data.schema import EMOTIONS

log = logging.getLogger(__name__)


class LabelConfig(Section):
    """The emotion classes and where a sample's label comes from (emotion task only)."""

    names: list[str] | None = Field(
        None, description="class names in logit order; null: CREMA-D's six (ANG DIS FEA HAP NEU SAD)"
    )
    key: str = Field(
        "emotion", description="metadata field with the label: 'emotion' or 'extra.<field>' (RAVDESS: extra.emotion8)"
    )
    csv: str | None = Field(None, description="CSV with header 'utterance,label'; its labels replace the metadata's")

    @field_validator("names")
    @classmethod
    def _distinct(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (len(v) < 2 or len(set(v)) != len(v)):
            raise ValueError(f"give at least 2 distinct class names, got {v}")
        return v

    @model_validator(mode="after")
    def _key_form(self) -> LabelConfig:
        if self.key != "emotion" and not (self.key.startswith("extra.") and len(self.key) > len("extra.")):
            raise ValueError(f"key must be 'emotion' or 'extra.<field>', got {self.key!r}")
        return self

    def class_names(self) -> list[str]:
        return list(self.names) if self.names is not None else list(EMOTIONS)

    def is_default(self) -> bool:
        return self == LabelConfig()


def read_label_csv(path: Path, names: list[str]) -> dict[str, str]:
    """`utterance,label` rows -> {utterance: label}; every label must be one of `names`."""
    path = Path(path)
    if not path.is_file():
        raise AvsslError(f"{path}: label CSV not found (labels.csv); expected a file with header 'utterance,label'")
    out: dict[str, str] = {}
    with path.open(newline="") as f:
        rows = csv.reader(f)
        header = [h.strip() for h in next(rows, [])]
        if header[:2] != ["utterance", "label"]:
            raise AvsslError(f"{path}:1: expected the header 'utterance,label', got {','.join(header)!r}")
        for lineno, row in enumerate(rows, 2):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise AvsslError(f"{path}:{lineno}: expected 'utterance,label', got {','.join(row)!r}")
            utt, label = row[0].strip(), row[1].strip()
            if label not in names:
                raise AvsslError(f"{path}:{lineno}: label {label!r} is not one of labels.names {names}; "
                                 "add it to labels.names or fix the row")
            if utt in out and out[utt] != label:
                raise AvsslError(f"{path}:{lineno}: utterance {utt!r} is labelled twice ({out[utt]!r} and {label!r})")
            out[utt] = label
    if not out:
        raise AvsslError(f"{path}: no labelled rows")
    return out


class LabelMap:
    """Sample metadata -> class indices [B] (int64, -1 = no label), per a `LabelConfig`."""

    def __init__(self, cfg: LabelConfig, csv_path: str | Path | None = None) -> None:
        self.cfg = cfg
        self.names = cfg.class_names()
        self.index = {n: i for i, n in enumerate(self.names)}
        source = csv_path if csv_path is not None else cfg.csv
        self.table = read_label_csv(Path(source), self.names) if source is not None else None
        self.outside: Counter[str] = Counter()

    def label(self, meta: dict[str, Any]) -> str | None:
        if self.table is not None:
            return self.table.get(meta.get("utterance", ""))
        if self.cfg.key == "emotion":
            return meta.get("emotion")
        return (meta.get("extra") or {}).get(self.cfg.key[len("extra."):])

    def __call__(self, metas: list[dict[str, Any]]) -> torch.Tensor:
        out = []
        for meta in metas:
            label = self.label(meta)
            if label is not None and str(label) not in self.index:
                if not self.outside[str(label)]:
                    log.warning("label %r (%s) is not one of %s: treated as unlabelled", label, self.cfg.key, self.names)
                self.outside[str(label)] += 1
            out.append(self.index.get(str(label), -1) if label is not None else -1)
        return torch.tensor(out, dtype=torch.long)


__all__ = ["LabelConfig", "LabelMap", "read_label_csv"]
