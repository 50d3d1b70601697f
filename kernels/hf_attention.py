"""transformers integration: `attn_implementation="triton"` runs `flash_attention`.

`register_attention()` registers `triton_attention_forward` in transformers' attention registry
(`AttentionInterface`, read through `ALL_ATTENTION_FUNCTIONS`) and, for models that build their
masks with transformers' helpers, the 2-D padding-mask builder in `AttentionMaskInterface`.

Contract of `triton_attention_forward(module, query, key, value, attention_mask, scaling=None,
dropout=0.0, **kwargs)`:
- query/key/value: [B, H, N, Dh] (key/value with fewer heads are expanded, GQA);
  returns (attn_output [B, N, H, Dh] contiguous, None).
- attention_mask: None, bool [B, 1, 1, Nk] (True = attend; the model's convention), a 2-D
  [B, Nk] padding mask (bool, or integer with 1 = real token, as transformers builds for
  flash-attention), or a float additive mask of the same shapes holding only 0 (attend) and
  -inf / dtype-min (masked). A [B, 1, Nq, Nk] mask is accepted only when all its query rows are
  equal (key padding); anything else (causal, arbitrary, additive biases) raises ValueError.
- varlen: kwargs `cu_seqlens` (int [B+1]) and `max_seqlen`, or transformers' flash names
  `cu_seq_lens_q`/`max_length_q`, select the packed path; query/key/value are then
  [1, H, total, Dh] and attention_mask must be None.
- non-causal only: `is_causal=True` (kwarg, or `module.is_causal`) raises ValueError.
- dropout > 0 raises ValueError: the kernel has no dropout. Set the attention dropout to 0 or use
  attn_implementation="sdpa". (Not a silent fallback: a config asking for dropout would
  otherwise train on a different, slower path without anyone noticing.)
- fallback: where Triton cannot run (tensors not on CUDA and the process did not start with
  TRITON_INTERPRET=1) the call runs torch SDPA with the same semantics (rows without keys give
  0) and logs ONE warning per process. On CPU with TRITON_INTERPRET=1 the kernel runs in the
  Triton interpreter.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from avssl.kernels.attention import (
    flash_attention,
    flash_attention_varlen,
    is_triton_available,
)

__all__ = ["key_padding_mask_from_attention_mask", "register_attention", "triton_attention_forward"]

logger = logging.getLogger(__name__)
_fallback_warned = False


def register_attention(name: str = "triton") -> str:
    """Register the kernel with transformers under `name`; returns the name.

    After this, `config._attn_implementation = name` (or `attn_implementation=name` when
    loading) routes every attention call of a transformers model through
    `triton_attention_forward`. Idempotent.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, triton_attention_forward)
    # transformers' mask builders look the implementation up too; the flash-attention builder
    # returns the 2-D [B, Nk] padding mask (or None), which is exactly a key padding mask.
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


def _keep_from_float(mask: torch.Tensor) -> torch.Tensor:
    """Additive 0 / -inf (or dtype-min) mask -> bool keep mask; other values are biases."""
    keep = mask == 0
    dropped = mask <= torch.finfo(mask.dtype).min / 2  # -inf and transformers' dtype-min fill
    if not bool((keep | dropped).all()):
        raise ValueError(
            "triton attention: the float attention_mask holds values other than 0 and -inf "
            "(an additive bias); only key padding is supported. Use attn_implementation='sdpa'."
        )
    return keep


def key_padding_mask_from_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int
) -> torch.Tensor | None:
    """Convert a transformers attention mask to a bool key padding mask [B, Nk] (True = real)."""
    if attention_mask is None:
        return None
    mask = attention_mask
    if mask.dim() == 2:
        if mask.dtype.is_floating_point:
            raise ValueError(
                "triton attention: a 2-D attention_mask must be bool or integer (1 = real token), "
                f"got {mask.dtype}"
            )
        keep = mask != 0
    elif mask.dim() == 4:
        b, h, q, k = mask.shape
        if b not in (1, batch) or h != 1 or q not in (1, q_len) or k != kv_len:
            raise ValueError(
                f"triton attention: attention_mask must be [B, 1, 1, Nk] = [{batch}, 1, 1, "
                f"{kv_len}] (key padding), got {tuple(mask.shape)}"
            )
        if q > 1 and mask.stride(2) != 0 and not torch.equal(mask, mask[:, :, :1].expand_as(mask)):
            raise ValueError(
                "triton attention: the [B, 1, Nq, Nk] attention_mask differs between query rows "
                "(causal or arbitrary mask); only key padding masks ([B, 1, 1, Nk]) are supported"
            )
        mask = mask[:, 0, 0, :]  # (b, Nk)
        keep = _keep_from_float(mask) if mask.dtype.is_floating_point else mask != 0
    else:
        raise ValueError(
            "triton attention: attention_mask must be [B, 1, 1, Nk] or [B, Nk], got "
            f"{tuple(mask.shape)}"
        )
    if keep.shape != (batch, kv_len):
        if keep.shape == (1, kv_len):
            keep = keep.expand(batch, kv_len)
        else:
            raise ValueError(
                f"triton attention: attention_mask must cover [B, Nk] = [{batch}, {kv_len}], got "
                f"{tuple(attention_mask.shape)}"
            )
    return keep.contiguous()


def _warn_fallback_once(device: torch.device) -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        logger.warning(
            "triton attention: Triton cannot run on %s (no CUDA device, and TRITON_INTERPRET=1 was "
            "not set at start-up); falling back to torch SDPA for this and all later calls.",
            device,
        )


def _sdpa_padded(query, key, value, keep, scaling):
    """SDPA with the kernel's semantics: rows without any real key give 0."""
    attn_mask = None if keep is None else keep[:, None, None, :]  # (B, 1, 1, Nk)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scaling)
    if keep is not None:
        has_key = keep.any(dim=-1)[:, None, None, None]  # (B, 1, 1, 1)
        out = out.masked_fill(~has_key, 0.0)
    return out  # (B, H, N, D)


def _sdpa_varlen(q, k, v, cu_seqlens, scaling):
    """q/k/v (1, H, T, D): block-diagonal SDPA (fallback only: builds a [T, T] mask)."""
    total = q.shape[2]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_id = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths)
    same = (seq_id[:, None] == seq_id[None, :]).view(1, 1, total, total)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=same, scale=scaling)


def triton_attention_forward(
    module: torch.nn.Module | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: [B, H, N, Dh] in, ([B, N, H, Dh], None) out."""
    if dropout and dropout > 0.0:
        raise ValueError(
            f"triton attention: dropout={dropout} is not supported by the kernel; set the "
            "attention dropout to 0 or use attn_implementation='sdpa'"
        )
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        # Encoder attention modules (ViT, BERT) set is_causal = False; a module without the
        # attribute is taken as an encoder, which is all this kernel serves.
        is_causal = getattr(module, "is_causal", False)
    if is_causal:
        raise ValueError(
            "triton attention is non-causal only (ViT encoders); this module is causal. Use "
            "attn_implementation='sdpa' or 'flash_attention_2' for decoders."
        )
    if key.shape[1] != query.shape[1]:
        if query.shape[1] % key.shape[1] != 0:
            raise ValueError(
                f"triton attention: {query.shape[1]} query heads cannot share {key.shape[1]} "
                "key/value heads"
            )
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)

    cu_seqlens = kwargs.get("cu_seqlens")
    if cu_seqlens is None:
        cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None:
        return _varlen_forward(query, key, value, attention_mask, cu_seqlens, scaling, kwargs)

    keep = key_padding_mask_from_attention_mask(
        attention_mask, query.shape[0], query.shape[2], key.shape[2]
    )
    if keep is not None and keep.device != query.device:
        keep = keep.to(query.device)
    if is_triton_available(query.device):
        out = flash_attention(query, key, value, key_padding_mask=keep, scale=scaling)
    else:
        _warn_fallback_once(query.device)
        out = _sdpa_padded(query, key, value, keep, scaling)
    # (B, H, N, D) -> (B, N, H, D); no copy when q came from a [B, N, H, D] projection.
    return out.transpose(1, 2).contiguous(), None


def _varlen_forward(query, key, value, attention_mask, cu_seqlens, scaling, kwargs):
    if attention_mask is not None:
        raise ValueError(
            "triton attention: pass either cu_seqlens (packed sequences) or attention_mask, "
            "not both"
        )
    if query.shape[0] != 1:
        raise ValueError(
            "triton attention: with cu_seqlens, query/key/value must be packed as "
            f"[1, H, total, Dh], got {tuple(query.shape)}"
        )
    max_seqlen = kwargs.get("max_seqlen")
    if max_seqlen is None:
        max_seqlen = kwargs.get("max_length_q")
    cu_k = kwargs.get("cu_seq_lens_k")
    if cu_k is not None and cu_k is not cu_seqlens and not torch.equal(cu_k, cu_seqlens):
        raise ValueError(
            "triton attention: packed cross-attention (cu_seq_lens_k != cu_seq_lens_q) is not "
            "supported; the packed kernel is self-attention"
        )
    if cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    max_seqlen = int(max_seqlen)
    if is_triton_available(query.device):
        # (1, H, T, D) -> (T, H, D): a view, the kernel takes the strides.
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        out = flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, scale=scaling)
        return out.unsqueeze(0).contiguous(), None  # (1, T, H, D)
    _warn_fallback_once(query.device)
    out = _sdpa_varlen(query, key, value, cu_seqlens.to(query.device), scaling)
    return out.transpose(1, 2).contiguous(), None
