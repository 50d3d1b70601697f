"""The user's top-level folders never shadow installed distributions (Hugging Face's `kernels`!).

`pretrain/`, `finetune/`, `kernels/` and `cluster/` are avssl's subpackages and hold no
`__init__.py`, so a bare `import kernels` from any process whose `sys.path` holds the checkout
(the repository root as the current directory, a Ray worker, a Ray job's working_dir) finds the
installed regular package first. These tests run such processes from the repository root.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("pretrain", "finetune", "kernels", "cluster")

def hf_kernels_file() -> Path | None:
    """The installed Hugging Face `kernels` package's __init__.py, if that distribution is installed."""
    try:
        dist = md.distribution("kernels")
    except md.PackageNotFoundError:
        return None
    return Path(dist.locate_file("kernels/__init__.py")).resolve()


def run_probe(*args: str, cwd: Path) -> list[dict]:
    """tests/probe_imports.py's JSON lines: `python -m` from the repository root, by path elsewhere."""
    target = ["-m", "tests.probe_imports"] if cwd == REPO else [str(REPO / "tests/probe_imports.py")]
    proc = subprocess.run([sys.executable, *target, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def check_probe(out: dict, root: Path = REPO) -> None:
    for name in FOLDERS:
        assert Path(out["ours"][name]).resolve() == root / name, (name, out["ours"][name])
        spec = out["bare"][name]
        # A namespace portion (origin None) runs no code of ours; a module file from the checkout would.
        origin = spec and spec["origin"]
        assert not (origin and Path(origin).resolve().is_relative_to(root / name)), f"bare `{name}` runs {origin}"
    hf = hf_kernels_file()
    if hf is not None:
        assert Path(out["kernels_loaded_from"]).resolve() == hf
        assert Path(out["bare"]["kernels"]["origin"]).resolve() == hf


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_bare_names_resolve_to_installed_packages_from_any_directory(where, tmp_path):
    """`python -c` in the repository root (sys.path[0] == '') imports transformers, HF's kernels and avssl's own."""
    (out,) = run_probe(cwd=REPO if where == "repo_root" else tmp_path)
    check_probe(out)


def test_hf_kernels_is_installed_where_transformers_needs_it():
    """Where the installed transformers requires Hugging Face's `kernels` (5.2x on, as in the lock),
    it is installed, so the tests above exercise the collision with our folder."""
    needs = [r for r in md.requires("transformers") or [] if r.split(";")[0].strip().startswith("kernels") and "extra ==" not in r]
    if needs:
        assert hf_kernels_file() is not None and hf_kernels_file().is_file()


@pytest.mark.slow
def test_ray_worker_started_from_repo_root_imports_hf_kernels_and_ours():
    """Ray puts the driver's working directory on its workers' sys.path: a task still gets HF's kernels."""
    driver, worker = run_probe("--ray", cwd=REPO)
    assert driver["pid"] != worker["pid"]
    check_probe(driver)
    check_probe(worker)


def test_wheel_installs_the_folders_under_avssl_only(tmp_path):
    """A built wheel (what a cluster image installs) holds avssl/kernels/... and no top-level folder of ours."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("avssl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"avssl"}, tops
    for name in FOLDERS:
        assert f"avssl/{name}/__init__.py" not in names
        assert any(n.startswith(f"avssl/{name}/") and n.endswith(".py") for n in names), name
    assert "avssl/kernels/attention.py" in names and "avssl/pretrain/modeling.py" in names
    # The recipes travel with it: `avssl prove` reads configs/finetune/<task>.yaml from the package.
    assert {f"avssl/configs/finetune/{t}.yaml" for t in ("speaker", "emotion", "spoof")} <= set(names)
    assert "avssl/configs/pretrain/tiny.yaml" in names


def test_no_installed_distribution_claims_our_top_level_name():
    """Only the avssl distribution provides the top-level package `avssl`, and avssl claims no other top-level name."""
    owners = md.packages_distributions()
    assert set(owners.get("avssl", ["avssl"])) == {"avssl"}
    for name in FOLDERS:
        assert "avssl" not in owners.get(name, []), f"avssl installs a bare top-level `{name}`"


def test_cluster_never_imports_the_finetuning_package():
    """The layering: finetune/ builds on cluster/ (the loop, engines, MLflow), never the reverse; the
    finetuning workload reaches the loop by its import path in the worker config."""
    import ast

    found = []
    for path in sorted((REPO / "cluster").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in getattr(node, "names", [])] if isinstance(node, ast.Import) else []
            found += [f"{path.name}: {n}" for n in names if n.startswith(("avssl.finetune", "finetune"))]
    assert not found, found


def test_make_test_keeps_a_modules_tests_on_one_worker(tmp_path):
    """`make test` runs `pytest -n 2 --dist loadgroup`; tests/conftest.py marks every test with its
    module's group (spread modules aside), so a module-scoped fixture (a corpus, a pretraining run,
    the GPU script's dry run) is built once. The grouping is silent when it breaks (pytest's node ids,
    hook order): run a small suite with this conftest and check where each test ran."""
    import re
    import shutil

    tests = tmp_path / "tests"
    tests.mkdir()
    shutil.copy(REPO / "tests" / "conftest.py", tests / "conftest.py")
    (tests / "test_shared.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('i', range(4))\ndef test_one(i):\n    pass\n")
    (tests / "test_other.py").write_text("def test_two():\n    pass\n\ndef test_three():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider",
                           "-p", "no:randomly", str(tests)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    ran = re.findall(r"^\[(gw\d)\] .*PASSED tests/(test_\w+)\.py::", proc.stdout, re.M)
    workers = {module: {w for w, m in ran if m == module} for _, module in ran}
    assert len(ran) == 6 and all(len(w) == 1 for w in workers.values()), proc.stdout[-3000:]
