"""avssl.kernels: Triton kernels with their pure-PyTorch references.

- `flash_attention` / `flash_attention_varlen`: fused non-causal attention (FlashAttention-2),
  forward and backward, key padding or packed variable length (see attention.py).
- `attention_reference` / `attention_varlen_reference`: the eager definitions they match.
- `register_attention()`: makes the kernel selectable in transformers as
  `attn_implementation="triton"`; `triton_attention_forward` is the registered function.
"""

from avssl.kernels.attention import (
    flash_attention,
    flash_attention_varlen,
    is_triton_available,
)
from avssl.kernels.hf_attention import register_attention, triton_attention_forward
from avssl.kernels.reference import attention_reference, attention_varlen_reference

__all__ = [
    "attention_reference",
    "attention_varlen_reference",
    "flash_attention",
    "flash_attention_varlen",
    "is_triton_available",
    "register_attention",
    "triton_attention_forward",
]
