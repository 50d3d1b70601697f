"""Pure-PyTorch attention references for the Triton kernels in `attention.py`.

They define the semantics the kernels must match, including the edge cases:

- non-causal softmax attention, `softmax(q @ k^T * scale) @ v`, scale defaulting to 1/sqrt(D);
- `key_padding_mask` is bool [B, Nk], True = real token: masked keys get zero probability;
- a query row whose keys are ALL masked has output 0 and receives / passes on gradient 0 (no NaN);
- `upcast=True` computes in fp32 (the ground truth the tests compare against); `upcast=False`
  computes in the input dtype, which measures PyTorch's own low-precision error for the
  flash-attention tolerance rule ("kernel error <= 2x PyTorch's low-precision error + atol").
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_reference", "attention_varlen_reference"]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Eager attention. q: [B, H, Nq, D], k/v: [B, H, Nk, D], key_padding_mask: bool [B, Nk].

    Returns [B, H, Nq, D] in q's dtype (computed in fp32 when `upcast`).
    """
    out_dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    has_key = None
    if key_padding_mask is not None:
        keep = key_padding_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, Nk)
        scores = scores.masked_fill(~keep, float("-inf"))
        has_key = keep.any(dim=-1, keepdim=True)  # (B, 1, 1, 1)
        # A row with no real key would be softmax(all -inf) = NaN; give it finite scores so the
        # softmax (and its backward) stay finite, then zero its output below. masked_fill passes
        # zero gradient to the filled positions, so the row contributes no gradient at all.
        scores = scores.masked_fill(~has_key, 0.0)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(v.dtype), v)  # (B, H, Nq, D)
    if has_key is not None:
        out = out * has_key.to(out.dtype)
    return out.to(out_dtype)


def attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Packed variable-length attention, one sequence at a time.

    q/k/v: [total, H, D]; cu_seqlens: int [B+1] cumulative offsets (cu_seqlens[0] = 0,
    cu_seqlens[-1] = total). Token i of sequence b attends only to tokens of sequence b.
    Returns [total, H, D].
    """
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # (n, H, D) -> (1, H, n, D)
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = attention_reference(qs, ks, vs, scale=scale, upcast=upcast)
        outs.append(o[0].transpose(0, 1))  # (n, H, D)
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, dim=0)
