"""Shared test set-up.

Triton kernels run in the interpreter on machines without a GPU; the variable must be set
before `triton.jit` decorates anything, so it is set here, before any test module imports.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Ray >= 2.52 turns token authentication on for new local clusters unless RAY_AUTH_MODE says
# otherwise, and a process keeps the mode it first saw. The suite starts many local clusters in
# one process (and a token-authenticated head in another): one explicit mode for all of them,
# the one a user's `avssl pretrain` gets by default.
os.environ.setdefault("RAY_AUTH_MODE", "token")

# Two cores on CI: keep intra-op threads from oversubscribing when tests start workers.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# `make test` runs the suite on pytest-xdist workers with `--dist loadgroup`. A module's tests
# share its module-scoped fixtures (a corpus, a pretraining run, the GPU script's dry run), so each
# module goes to one worker whole. The modules below are the exceptions: their tests start their
# own runs, so they are spread over the workers one by one, except those that share one of the
# module fixtures named here, which stay together. A test may also name its group itself
# (`@pytest.mark.xdist_group("...")`): one long test, then, runs beside the rest of its module,
# which builds its module fixtures on that worker again.
SPREAD_MODULES = {
    "test_cluster_e2e.py": (),  # its `corpus` fixture is a few seconds of synthesis: run it per worker
    "test_faults.py": ("damaged_run",),
}

# Groups handed out first (`make test` passes --no-loadscope-reorder, so groups start in collection
# order): the longest, so that no worker starts one of them while the others run out of work.
# Seconds are each group's time alone on 2 cores (`pytest --durations`); groups not listed follow
# in their collection order.
LONGEST_FIRST = {
    "test_finetune_e2e.py": 300,
    "test_gpu_script.py": 190,
    "test_cluster_e2e.py::test_ctrl_c_then_sigterm_to_the_process_group_checkpoint_and_the_resumes_are_exact": 200,
    "test_cluster_e2e.py::test_submit_to_token_authenticated_head_with_mlflow_server": 120,
    "test_training_parity.py": 115,
    "test_cluster_e2e.py::test_killed_worker_restarts_from_checkpoint": 70,
    "test_faults.py::damaged_run": 75,
}


def _group(item) -> tuple[str, bool]:
    """The item's group and whether to mark it (a test of a spread module sharing none of the named
    fixtures is a group of its own: xdist schedules an unmarked test alone)."""
    own = item.get_closest_marker("xdist_group")
    module = item.path.name
    if own is not None:
        return own.args[0], False
    if module not in SPREAD_MODULES:
        return module, True
    shared = sorted(set(SPREAD_MODULES[module]) & set(item.fixturenames))
    return (f"{module}::{'+'.join(shared)}", True) if shared else (f"{module}::{item.name}", False)


# tryfirst: pytest-xdist reads the xdist_group marks in its own pytest_collection_modifyitems (it
# suffixes each node id with the group), which otherwise runs before this one and finds none.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    groups = {}
    for item in items:
        groups[item.nodeid], mark = _group(item)
        if mark:
            item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
    rank = {name: i for i, name in enumerate(sorted(LONGEST_FIRST, key=LONGEST_FIRST.get, reverse=True))}
    items.sort(key=lambda item: rank.get(groups[item.nodeid], len(rank)))  # stable: the rest keep their order
