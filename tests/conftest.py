"""Shared test set-up.

Triton kernels run in the interpreter on machines without a GPU; the variable must be set
before `triton.jit` decorates anything, so it is set here, before any test module imports.
"""

from __future__ import annotations

import os

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
