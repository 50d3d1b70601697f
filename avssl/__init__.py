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
