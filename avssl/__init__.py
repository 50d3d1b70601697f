"""avssl: self-supervised audio-visual pretraining of one shared ViT backbone for speech.

The repository's top-level folders `pretrain/`, `finetune/`, `kernels/` and `cluster/` are
installed as `avssl.pretrain`, `avssl.finetune`, `avssl.kernels` and `avssl.cluster` (see
pyproject.toml): a bare top-level `kernels` would collide with Hugging Face's `kernels`
distribution, which transformers imports when present.
"""

from __future__ import annotations

__version__ = "0.1.0"


class AvsslError(Exception):
    """An error caused by the user's input (a config key, a file, a line): the CLI prints its
    message without a traceback and exits with status 2. The message says what is wrong, where,
    and what to do."""


def _extend_path_in_source_checkout() -> None:
    """In a plain source tree (a Ray job's uploaded working_dir, PYTHONPATH=.) the folders beside
    `avssl/` are not mapped by an install: let `avssl.kernels` etc. resolve to them. An installed
    wheel has no pyproject.toml beside it, so this never applies there."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "kernels" / "__init__.py").is_file() and str(root) not in __path__:
        __path__.append(str(root))


_extend_path_in_source_checkout()
