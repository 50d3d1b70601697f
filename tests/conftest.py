"""Shared test set-up.

Triton kernels run in the interpreter on machines without a GPU; the variable must be set
before `triton.jit` decorates anything, so it is set here, before any test module imports.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores on CI: keep intra-op threads from oversubscribing when tests start workers.
torch.set_num_threads(min(2, os.cpu_count() or 1))
