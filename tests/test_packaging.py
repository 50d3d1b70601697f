"""The user's top-level folders never collide with installed distributions (HF `kernels`!)."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("pretrain", "finetune", "kernels", "cluster")

PROBE = r"""
import importlib.util, json, sys
import avssl.kernels, avssl.pretrain, avssl.finetune, avssl.cluster
import transformers, ray.train
from transformers.utils import import_utils
out = {
    "bare": {n: (getattr(importlib.util.find_spec(n), "origin", None) if importlib.util.find_spec(n) else None)
             for n in ("pretrain", "finetune", "kernels", "cluster")},
    "ours": {n: sys.modules["avssl." + n].__file__ for n in ("pretrain", "finetune", "kernels", "cluster")},
    "hf_kernels_available": import_utils.is_kernels_available(),
    "bare_loaded": [n for n in ("pretrain", "finetune", "kernels", "cluster") if n in sys.modules],
}
print(json.dumps(out))
"""


def test_folders_import_under_avssl_namespace_only(tmp_path):
    """From a neutral directory, our folders import as avssl.<name>, and no bare `kernels` etc. resolves to them."""
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in FOLDERS:
        assert Path(out["ours"][name]).resolve().parent == REPO / name
        bare = out["bare"][name]
        assert bare is None or not Path(bare).resolve().is_relative_to(REPO), f"bare `{name}` resolves into the repo"
    assert out["bare_loaded"] == [], "importing transformers/ray loaded a bare top-level module named like ours"


def test_hf_kernels_detection_is_not_fooled():
    """transformers sees the hub `kernels` package only if that distribution is installed, never our folder."""
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd="/", capture_output=True, text=True, timeout=300)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    try:
        md.distribution("kernels")
        hf_installed = True
    except md.PackageNotFoundError:
        hf_installed = False
    assert out["hf_kernels_available"] in ((True, False) if hf_installed else (False,))


def test_no_installed_distribution_claims_our_top_level_name():
    """Only the avssl distribution provides the top-level package `avssl`, and avssl claims no other top-level name."""
    owners = md.packages_distributions()
    assert set(owners.get("avssl", ["avssl"])) == {"avssl"}
    for name in FOLDERS:
        assert "avssl" not in owners.get(name, []), f"avssl installs a bare top-level `{name}`"
