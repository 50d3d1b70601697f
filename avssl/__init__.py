"""avssl: self-supervised audio-visual pretraining of one shared ViT backbone for speech.

The repository's top-level folders `pretrain/`, `finetune/`, `kernels/` and `cluster/` are the
subpackages `avssl.pretrain`, `avssl.finetune`, `avssl.kernels` and `avssl.cluster`. They hold no
`__init__.py` on purpose: a folder without one is only a namespace portion, and Python's path finder
prefers any installed regular package of the same name to it. So a process whose `sys.path` holds
the checkout (`python -m pytest`, a Ray worker started from the repository root, a Ray job whose
working_dir is the source tree) still imports Hugging Face's `kernels` distribution, which
transformers needs, when it asks for the bare name `kernels`. tests/test_packaging.py proves it.
Each subpackage's API lives in its modules (`avssl.kernels.attention.flash_attention`,
`avssl.pretrain.modeling.AVViTModel`, ...).
"""

from __future__ import annotations

__version__ = "0.1.0"


class AvsslError(Exception):
    """An error caused by the user's input (a config key, a file, a line): the CLI prints its
    message without a traceback and exits with status `exit_code` (2). The message says what is
    wrong, where, and what to do."""

    exit_code = 2


class NoRestartError(AvsslError):
    """Raised in a training worker for a failure that restarting the workers cannot fix (a corpus
    with no readable shard, a full disk): the driver stops the run at once with this message
    instead of spending `trainer.max_failures` restarts on it."""


def _extend_path_in_source_checkout() -> None:
    """From a source tree (an editable install, a Ray job's uploaded working_dir, PYTHONPATH=.) the
    folders beside `avssl/` are found through this package's `__path__`. An installed wheel has
    them inside `avssl/` and no pyproject.toml beside it, so this never applies there."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "kernels" / "attention.py").is_file() and str(root) not in __path__:
        __path__.append(str(root))


_extend_path_in_source_checkout()
