"""Work-arounds for Triton's CPU interpreter (TRITON_INTERPRET=1); inert on a GPU.

- numpy >= 2.4 refuses `int()` of a 1-element 1-D array, which is how Triton 3.6's interpreter
  stores scalars, so any loop `for i in range(lo, hi, BLOCK)` with a runtime bound dies with
  "only 0-dimensional arrays can be converted to Python scalars" (triton-lang/triton#9171,
  fixed upstream by #9172 after 3.6). `patch_interpreter_index()` makes the interpreter's
  `tensor.__index__` read the single element explicitly, which is the upstream fix.
"""

from __future__ import annotations

import numpy as np


def _numpy_at_least(major: int, minor: int) -> bool:
    parts = np.__version__.split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (ValueError, IndexError):
        return True


def patch_interpreter_index() -> None:
    """Idempotently patch the interpreter so runtime loop bounds work under numpy >= 2.4."""
    if not _numpy_at_least(2, 4):
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_avssl_index_fix", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # The scope restores attributes last-in first-out, so patching over the original's
        # __index__ here is undone cleanly after each launch.
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).item()))

    _patch_lang_tensor._avssl_index_fix = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
