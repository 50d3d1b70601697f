"""benchmarks/gpu_pretrain.sh's CPU dry run (AVSSL_GPU_DRY_RUN=1): every stage of the one-call GPU
script runs here at the tiny recipe, and the GPU recipe's overrides load, so the device call cannot
fail on a typo. About 2 minutes on 2 idle cores (it starts Ray five times)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_pretrain.sh"
pytestmark = pytest.mark.slow

STAGES = ["unpack", "gpu-recipes", "imports", "synth", "bench", "bench-model", "zero1", "resume", "export", "zero2",
          "finetune", "evaluate"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-dry")
    out, work = root / "out", root / "work"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env.update(AVSSL_GPU_DRY_RUN="1", OUT=str(out), AVSSL_GPU_WORK=str(work), AVSSL_PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    results = out / "results.json"
    assert results.is_file(), f"no results.json (rc {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    return {"proc": proc, "results": json.loads(results.read_text()), "out": out, "work": work}


def test_every_stage_runs_in_order_and_passes(dry_run):
    """The dry run runs every stage of the GPU call, in order, each ok, and the script exits 0."""
    res, proc = dry_run["results"], dry_run["proc"]
    got = [(s["name"], s["status"]) for s in res["stages"]]
    assert [n for n, _ in got] == STAGES, got
    bad = [(n, s) for n, s in got if s not in ("ok", "skipped-dry-run")]
    assert not bad, f"{bad}\n{proc.stdout[-6000:]}"
    assert res["ok"] is True and proc.returncode == 0
    assert res["mode"] == "dry-run" and res["recipe"]["config"] == "configs/pretrain/tiny.yaml"
    assert {"results.json", "bench_train.json", "bench_model.json", "log.txt"} <= {p.name for p in dry_run["out"].iterdir()}


def test_preemption_resume_and_outputs(dry_run):
    """SIGTERM after the first checkpoint stops zero1 with 143 mid-run; the resume finishes it; export, finetune and evaluate wrote their outputs."""
    res, work = dry_run["results"], dry_run["work"]
    zero1 = next(s for s in res["stages"] if s["name"] == "zero1")
    assert zero1["rc"] == 143
    z1 = res["runs"]["zero1"]
    stopped = int(z1["preempted_at_step"])
    assert 4 <= stopped < res["recipe"]["steps_zero1"]
    assert z1["last_step"] == res["recipe"]["steps_zero1"] and z1["mlflow_status"] == "FINISHED"
    assert res["runs"]["zero2"]["last_step"] == res["recipe"]["steps_zero2"]
    assert (work / "export" / "model.safetensors").is_file()
    assert (work / "runs" / "ft" / "speaker" / "avssl" / "release" / "head.safetensors").is_file()
    report = json.loads((work / "eval" / "report.json").read_text())
    assert report["task"] == "speaker"


def test_results_hold_versions_rates_and_ratios(dry_run):
    """results.json has the versions, the bare step's and each Ray run's samples/s, and their ratios."""
    res = dry_run["results"]
    v = res["versions"]
    assert v["ray"] and v["deepspeed"] and v["torch"] and v["triton"] and v["unmet_requirements"] == []
    bare = res["bench"]["bare_step_samples_per_s"]
    assert bare > 0 and res["bench"]["info"]["batch_size"] == res["recipe"]["batch_size"]
    for name in ("zero1", "zero2"):
        sps = res["runs"][name]["samples_per_s_median"]
        assert sps > 0
        assert res["ratios"][f"{name}_vs_bare_step"] == pytest.approx(sps / bare, rel=1e-2)


def test_bench_model_rows_in_results(dry_run):
    """bench-model ran the eager grid (sdpa and triton, padded and packed) at the tiny size, skipped the
    compiled run after parsing it, and results.json holds its rows with their ratios to the eager padded step."""
    res, out = dry_run["results"], dry_run["out"]
    rows = res["bench_model"]["rows"]
    assert sorted((r["attn"], r["packed"]) for r in rows) == [("sdpa", False), ("sdpa", True), ("triton", False), ("triton", True)]
    assert json.loads((out / "bench_model.json").read_text())["rows"] == rows
    assert not (out / "bench_model_compile.json").exists()
    assert "the compiled run is parsed, not run" in dry_run["proc"].stdout
    for r in rows:
        assert r["arch"] == "avvit_tiny_patch16" and r["batch_size"] == 4 and r["compile"] is None and r["step_ms"] > 0
        assert r["vs_baseline"] == (1.0 if not r["packed"] else pytest.approx(r["vs_padded"]))
