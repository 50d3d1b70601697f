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

# `make test` runs the suite on two pytest-xdist workers with `--dist loadgroup`. A module's tests
# share its module-scoped fixtures (a corpus, a pretraining run, the GPU script's dry run), so each
# module goes to one worker whole. The modules below are the exceptions: their tests start their
# own runs, so they are spread over the workers one by one, except those that share one of the
# module fixtures named here, which stay together.
SPREAD_MODULES = {
    "test_cluster_e2e.py": (),  # its `corpus` fixture is a few seconds of synthesis: run it per worker
    "test_faults.py": ("damaged_run",),
}


# tryfirst: pytest-xdist reads the xdist_group marks in its own pytest_collection_modifyitems (it
# suffixes each node id with the group), which otherwise runs before this one and finds none.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        if module not in SPREAD_MODULES:
            item.add_marker(pytest.mark.xdist_group(module))
            continue
        shared = sorted(set(SPREAD_MODULES[module]) & set(item.fixturenames))
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{module}::{'+'.join(shared)}"))
