"""Fused non-causal attention in Triton (FlashAttention-2 algorithm): forward and backward.

Supported
- dtypes: fp16 and bf16 (the fast path: tensor-core dots, fp32 accumulation and softmax
  statistics); fp32 inputs are accepted and use IEEE fp32 dots (for checks, not speed).
- head dims: any D in 1..128. 32, 64 and 128 are the tuned and tested sizes; any other D is
  padded to BLOCK_D = max(16, next power of two) with masked loads and stores (zeros in the
  padded columns change no dot product). D > 128 is rejected (tiles would not fit on chip).
- lengths: any N >= 1; no multiple-of-block rule (rows and columns past the end are masked).
  In the padded form the query and key lengths may differ (cross-attention); the packed form
  is self-attention (one cu_seqlens for queries and keys).
- padded form: q [B, H, Nq, D], k/v [B, H, Nk, D], optional key_padding_mask bool [B, Nk]
  (True = real token), so batches mixing audio-only, video-only and audio-visual samples, or
  different numbers of visible tokens, attend only to their own real tokens.
- packed form: q/k/v [total, H, D], cu_seqlens int32 [B+1] (cumulative offsets, first 0, last
  total), max_seqlen = longest sequence; no padding at all.
- strides: any strides whose last one is 1 (others are copied once); outputs and gradients
  take the memory layout of their input, so transformers' [B, N, H, D]-backed views need no
  copy in or out.
- rows whose keys are ALL masked (padded query rows whose sample has no real key, or a
  sample with no real token): output 0, logsumexp +inf, gradient 0 to q, k and v; no NaN.

Algorithm (Dao, "FlashAttention-2", 2023)
- forward: one program per (query block, head, batch); loops over key blocks with an online
  softmax in base 2 (exp2, scale folded with log2(e)); stores O and the per-row logsumexp.
- backward: `_attn_bwd_preprocess` computes delta = rowsum(dO * O); `_attn_bwd_dkdv_kernel`
  owns one key block and loops over query blocks to accumulate dK and dV; `_attn_bwd_dq_kernel`
  owns one query block and loops over key blocks for dQ. No atomics: the backward is
  deterministic, at the cost of computing QK^T twice.
- every loop runs its full blocks without bounds checks and its one ragged tail block with
  them (constexpr BOUNDARY), so lengths that are not block multiples cost one masked block.

Tiles
- on a GPU each kernel is autotuned, keyed on (sequence-length bucket = next power of two of
  the longest sequence, head dim, mask / varlen flags, dtypes); each candidate is timed for
  25 ms, and a key's later launches use the chosen tiles without going through the tuner.
  `autotune=False` or the environment variable AVSSL_ATTN_AUTOTUNE=0 uses one fixed,
  conservative tile set instead.
- under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) a fixed tile set
  (`INTERPRETER_TILES`) is always used: the interpreter's cost is per operation, so large
  tiles with few loop iterations are fastest.

Known limits
- non-causal only; no dropout; no additive bias or arbitrary [Nq, Nk] mask; q, k and v have
  the same number of heads (expand k/v for GQA before calling); B and H at most 65535 each.
- padded QUERY rows (a padding token's own row) still attend to their sample's real keys, as
  in SDPA: their output is finite but meaningless, so losses must ignore them.
- key blocks that are entirely padding are still visited (masked, not skipped); the packed
  form avoids that cost altogether.
- the GPU path is compile-checked for sm_90 on every CI run (tests/test_attention_kernels.py
  runs ptxas), numerically checked through the interpreter, and the same tests passed on an
  H200 (benchmarks/results/kernel_tests_h200.log); speed is measured by
  benchmarks/bench_attention.py (docs/kernels.md). Not tried under torch.compile.
- host time: a forward + backward cost 2.3-2.8x SDPA's host time per call on an H200 (Triton's
  launches take ~35 arguments each), which shows when the GPU work per call is small (short
  sequences, small batches); tuned keys skip Triton's Autotuner.run (see `_launch`).
- the packed form checks cu_seqlens values (first 0, last total, non-decreasing, longest
  <= max_seqlen) with one host synchronisation per call.
- interpreter only: `_triton_compat.patch_interpreter_index` makes Triton 3.6's interpreter
  accept runtime loop bounds under numpy >= 2.4 (triton-lang/triton#9171). The same
  interpreter gets bf16 wrong in two ways, so bf16 runs there with EMULATE_BF16: `tl.dot`
  multiplies raw uint16 bits (operands are upcast to fp32 first; products of bf16 values are
  exact in fp32, so this matches tensor cores with fp32 accumulation), and fp32 -> bf16
  conversion truncates (`_cast` rounds to nearest even first, as the GPU does).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from avssl.kernels._triton_compat import patch_interpreter_index

__all__ = [
    "INTERPRETER_TILES",
    "MAX_HEAD_DIM",
    "SUPPORTED_DTYPES",
    "flash_attention",
    "flash_attention_varlen",
    "is_triton_available",
]

# Decided once, like `triton.jit` decides at decoration time whether kernels are interpreted.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
if _INTERPRETED:
    patch_interpreter_index()

MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_YZ = 65535  # CUDA limit for grid axes 1 and 2 (heads, batch)
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation (acc None: a @ b); see the header for EMULATE_BF16."""
    if EMULATE_BF16:  # interpreter: its bf16 dot multiplies raw bits
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _cast(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x.to(dtype), rounding to nearest even like the GPU does.

    Under the interpreter (EMULATE_BF16) fp32 -> bf16 would truncate toward zero, so round the
    fp32 bits to the nearest even bf16 first; the final conversion is then exact.
    """
    if EMULATE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        y = ((bits >> 16) << 16).to(tl.float32, bitcast=True).to(dtype)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _load_rows(ptrs, rows, n_rows, mask_d, BOUNDARY: tl.constexpr, PAD_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; out-of-range rows and padded columns read as 0."""
    if BOUNDARY:
        if PAD_D:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & mask_d[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if PAD_D:
            x = tl.load(ptrs, mask=mask_d[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _seq_info(CU_SEQLENS, off_b, N_Q, N_K, IS_VARLEN: tl.constexpr):
    """(token offset of this sequence, query length, key length)."""
    if IS_VARLEN:
        start = tl.load(CU_SEQLENS + off_b)
        seqlen_q = tl.load(CU_SEQLENS + off_b + 1) - start
        seqlen_k = seqlen_q
        tok = start.to(tl.int64)
    else:
        tok = 0
        seqlen_q = N_Q
        seqlen_k = N_K
    return tok, seqlen_q, seqlen_k


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, keep_base, stride_kn, stride_vn,
    lo, hi, seqlen_k, qk_scale, offs_d, mask_d,
    BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, BOUNDARY: tl.constexpr, PAD_D: tl.constexpr,
    EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, seqlen_k,
                       mask_d, BOUNDARY, PAD_D)
        v = _load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, seqlen_k,
                       mask_d, BOUNDARY, PAD_D)
        # Scores in base-2 units: exp2(s * scale * log2 e) == exp(s * scale).
        s = _dot(q, tl.trans(k), None, EMULATE_BF16, DOT_PRECISION) * qk_scale
        if BOUNDARY:
            s = tl.where((offs_n < seqlen_k)[None, :], s, float("-inf"))
        if HAS_MASK:
            if BOUNDARY:
                keep = tl.load(keep_base + offs_n, mask=offs_n < seqlen_k, other=0)
            else:
                keep = tl.load(keep_base + offs_n)
            s = tl.where((keep != 0)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no unmasked key so far has m_new = -inf; subtracting 0 instead keeps
        # exp2(-inf - (-inf)) = NaN out: its p and alpha are then exp2(-inf) = 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(_cast(p, v.dtype, EMULATE_BF16), v, acc * alpha[:, None], EMULATE_BF16, DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KEEP, CU_SEQLENS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh, stride_mb,
    N_Q, N_K, N_BUCKET, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
    EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # N_BUCKET is only an autotuning key (the length bucket); the kernel does not read it.
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    tok, seqlen_q, seqlen_k = _seq_info(CU_SEQLENS, off_b, N_Q, N_K, IS_VARLEN)
    # The grid is sized for the longest sequence; shorter ones have nothing to do here.
    if pid_m * BLOCK_M >= seqlen_q:
        return

    PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    q_base = Q + off_b * stride_qb + off_h * stride_qh + tok * stride_qn
    k_base = K + off_b * stride_kb + off_h * stride_kh + tok * stride_kn
    v_base = V + off_b * stride_vb + off_h * stride_vh + tok * stride_vn
    keep_base = KEEP + off_b * stride_mb

    q = _load_rows(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], offs_m, seqlen_q,
                   mask_d, True, PAD_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    n_full = (seqlen_k // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, keep_base, stride_kn, stride_vn,
        0, n_full, seqlen_k, qk_scale, offs_d, mask_d,
        BLOCK_N, HAS_MASK, False, PAD_D, EMULATE_BF16, DOT_PRECISION,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, keep_base, stride_kn, stride_vn,
        n_full, seqlen_k, seqlen_k, qk_scale, offs_d, mask_d,
        BLOCK_N, HAS_MASK, True, PAD_D, EMULATE_BF16, DOT_PRECISION,
    )

    # Rows without any real key: l = 0. Output 0 and LSE = +inf, so the backward's
    # P = exp2(s - LSE) is exactly 0 for them and they pass no gradient anywhere.
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(no_key, float("inf"), m_i + tl.log2(l_safe))

    row_ok = offs_m < seqlen_q
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + tok * stride_on \
        + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, _cast(out, O.dtype.element_ty, EMULATE_BF16), mask=row_ok[:, None] & mask_d[None, :])
    lse_ptrs = LSE + off_b * stride_lb + off_h * stride_lh + tok + offs_m
    tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA, CU_SEQLENS,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    stride_lb, stride_lh,
    N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, laid out like the LSE."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    tok, seqlen_q, _ = _seq_info(CU_SEQLENS, off_b, N_Q, N_Q, IS_VARLEN)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + tok * stride_on
                + offs_m[:, None] * stride_on + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + tok * stride_don
                 + offs_m[:, None] * stride_don + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_b * stride_lb + off_h * stride_lh + tok + offs_m, delta,
             mask=offs_m < seqlen_q)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, keep, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
    lo, hi, seqlen_q, qk_scale, offs_d, mask_d,
    BLOCK_M: tl.constexpr, HAS_MASK: tl.constexpr, BOUNDARY: tl.constexpr, PAD_D: tl.constexpr,
    EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], offs_m, seqlen_q,
                       mask_d, BOUNDARY, PAD_D)
        do = _load_rows(do_base + offs_m[:, None] * stride_don + offs_d[None, :], offs_m,
                        seqlen_q, mask_d, BOUNDARY, PAD_D)
        if BOUNDARY:
            # Rows past the end: LSE = +inf makes their P exactly 0.
            lse = tl.load(lse_base + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < seqlen_q, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # Transposed scores, (BLOCK_N, BLOCK_M), so dK and dV come out without a transpose.
        s_t = _dot(k, tl.trans(q), None, EMULATE_BF16, DOT_PRECISION) * qk_scale
        if HAS_MASK:
            s_t = tl.where(keep[:, None], s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv = _dot(_cast(p_t, do.dtype, EMULATE_BF16), do, dv, EMULATE_BF16, DOT_PRECISION)
        dp_t = _dot(v, tl.trans(do), None, EMULATE_BF16, DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(_cast(ds_t, q.dtype, EMULATE_BF16), q, dk, EMULATE_BF16, DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KEEP, CU_SEQLENS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, stride_mb,
    N_Q, N_K, N_BUCKET, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
    EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    tok, seqlen_q, seqlen_k = _seq_info(CU_SEQLENS, off_b, N_Q, N_K, IS_VARLEN)
    if pid_n * BLOCK_N >= seqlen_k:
        return

    PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    k = _load_rows(K + off_b * stride_kb + off_h * stride_kh + tok * stride_kn
                   + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, seqlen_k, mask_d,
                   True, PAD_D)
    v = _load_rows(V + off_b * stride_vb + off_h * stride_vh + tok * stride_vn
                   + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, seqlen_k, mask_d,
                   True, PAD_D)
    if HAS_MASK:
        # Masked keys get P = 0, hence dK = dV = 0. Keys past the end need no mask: their rows
        # of dK and dV depend only on themselves and are never stored.
        keep = tl.load(KEEP + off_b * stride_mb + offs_n, mask=offs_n < seqlen_k, other=0) != 0
    else:
        keep = offs_n < seqlen_k

    q_base = Q + off_b * stride_qb + off_h * stride_qh + tok * stride_qn
    do_base = DO + off_b * stride_dob + off_h * stride_doh + tok * stride_don
    lse_base = LSE + off_b * stride_lb + off_h * stride_lh + tok
    delta_base = DELTA + off_b * stride_lb + off_h * stride_lh + tok

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    m_full = (seqlen_q // BLOCK_M) * BLOCK_M
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, keep, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
        0, m_full, seqlen_q, qk_scale, offs_d, mask_d,
        BLOCK_M, HAS_MASK, False, PAD_D, EMULATE_BF16, DOT_PRECISION,
    )
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, keep, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
        m_full, seqlen_q, seqlen_q, qk_scale, offs_d, mask_d,
        BLOCK_M, HAS_MASK, True, PAD_D, EMULATE_BF16, DOT_PRECISION,
    )
    dk = dk * sm_scale  # dS = P * (dP - delta) is w.r.t. the scaled scores

    store_mask = (offs_n < seqlen_k)[:, None] & mask_d[None, :]
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + tok * stride_dkn
             + offs_n[:, None] * stride_dkn + offs_d[None, :], _cast(dk, DK.dtype.element_ty, EMULATE_BF16),
             mask=store_mask)
    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + tok * stride_dvn
             + offs_n[:, None] * stride_dvn + offs_d[None, :], _cast(dv, DV.dtype.element_ty, EMULATE_BF16),
             mask=store_mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta, k_base, v_base, keep_base, stride_kn, stride_vn,
    lo, hi, seqlen_k, qk_scale, offs_d, mask_d,
    BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, BOUNDARY: tl.constexpr, PAD_D: tl.constexpr,
    EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, seqlen_k,
                       mask_d, BOUNDARY, PAD_D)
        v = _load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, seqlen_k,
                       mask_d, BOUNDARY, PAD_D)
        s = _dot(q, tl.trans(k), None, EMULATE_BF16, DOT_PRECISION) * qk_scale
        if BOUNDARY:
            s = tl.where((offs_n < seqlen_k)[None, :], s, float("-inf"))
        if HAS_MASK:
            if BOUNDARY:
                keep = tl.load(keep_base + offs_n, mask=offs_n < seqlen_k, other=0)
            else:
                keep = tl.load(keep_base + offs_n)
            s = tl.where((keep != 0)[None, :], s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), None, EMULATE_BF16, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _dot(_cast(ds, k.dtype, EMULATE_BF16), k, dq, EMULATE_BF16, DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KEEP, CU_SEQLENS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_lb, stride_lh, stride_mb,
    N_Q, N_K, N_BUCKET, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
    EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    tok, seqlen_q, seqlen_k = _seq_info(CU_SEQLENS, off_b, N_Q, N_K, IS_VARLEN)
    if pid_m * BLOCK_M >= seqlen_q:
        return

    PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    row_ok = offs_m < seqlen_q

    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh + tok * stride_qn
                   + offs_m[:, None] * stride_qn + offs_d[None, :], offs_m, seqlen_q, mask_d,
                   True, PAD_D)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh + tok * stride_don
                    + offs_m[:, None] * stride_don + offs_d[None, :], offs_m, seqlen_q, mask_d,
                    True, PAD_D)
    lse = tl.load(LSE + off_b * stride_lb + off_h * stride_lh + tok + offs_m, mask=row_ok,
                  other=float("inf"))
    delta = tl.load(DELTA + off_b * stride_lb + off_h * stride_lh + tok + offs_m, mask=row_ok,
                    other=0.0)

    k_base = K + off_b * stride_kb + off_h * stride_kh + tok * stride_kn
    v_base = V + off_b * stride_vb + off_h * stride_vh + tok * stride_vn
    keep_base = KEEP + off_b * stride_mb

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (seqlen_k // BLOCK_N) * BLOCK_N
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, keep_base, stride_kn, stride_vn,
        0, n_full, seqlen_k, qk_scale, offs_d, mask_d,
        BLOCK_N, HAS_MASK, False, PAD_D, EMULATE_BF16, DOT_PRECISION,
    )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, keep_base, stride_kn, stride_vn,
        n_full, seqlen_k, seqlen_k, qk_scale, offs_d, mask_d,
        BLOCK_N, HAS_MASK, True, PAD_D, EMULATE_BF16, DOT_PRECISION,
    )
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + tok * stride_dqn
             + offs_m[:, None] * stride_dqn + offs_d[None, :], _cast(dq, DQ.dtype.element_ty, EMULATE_BF16),
             mask=row_ok[:, None] & mask_d[None, :])


# --------------------------------------------------------------------------------------------
# Tiles: fixed sets and autotuning
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    """One launch configuration: BLOCK_M query rows x BLOCK_N key rows per step."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 1


# Interpreter: cost is per Triton operation, not per element, so few large tiles are fastest.
# BLOCK_M != BLOCK_N on purpose: a test then catches any query/key tile mix-up.
INTERPRETER_TILES: dict[str, Tiles] = {
    "fwd": Tiles(block_m=64, block_n=32),
    "dkdv": Tiles(block_m=32, block_n=64),
    "dq": Tiles(block_m=64, block_n=32),
    "preprocess": Tiles(block_m=64, block_n=1),
}


def _fixed_gpu_tiles(kind: str, head_dim: int, dtype: torch.dtype) -> Tiles:
    """Conservative tiles that fit every supported head dim on sm80/sm90 shared memory."""
    big = head_dim > 64 or dtype == torch.float32
    if kind == "fwd":
        return Tiles(64, 64, 4, 2) if big else Tiles(128, 64, 4, 3)
    if kind == "dkdv":
        return Tiles(32, 64, 4, 2) if big else Tiles(32, 128, 8, 2)
    if kind == "dq":
        return Tiles(64, 32, 4, 2) if big else Tiles(128, 32, 8, 2)
    return Tiles(64, 1, 4, 1)


def _configs(pairs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in pairs
    ]


_FWD_CONFIGS = _configs([
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4),
    (64, 64, 4, 3), (64, 32, 4, 4), (64, 128, 4, 3), (128, 64, 4, 2),
])
_DKDV_CONFIGS = _configs([
    (32, 128, 4, 3), (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3),
    (64, 64, 4, 2), (16, 128, 4, 3), (16, 64, 4, 4), (64, 128, 8, 3),
])
_DQ_CONFIGS = _configs([
    (128, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3),
    (64, 64, 4, 2), (128, 16, 4, 3), (64, 16, 4, 4), (128, 64, 8, 3),
])


def _smem_bytes(cfg: triton.Config, block_d: int, elem: int, kind: str) -> int:
    """Rough shared-memory need of a config: pipelined tiles of the loop plus the held tile."""
    m, n, stages = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_stages
    if kind == "fwd":  # holds Q, streams K and V
        return (m * block_d + stages * 2 * n * block_d) * elem
    if kind == "dkdv":  # holds K and V, streams Q and dO
        return (2 * n * block_d + stages * 2 * m * block_d) * elem + m * n * 4
    return (2 * m * block_d + stages * 2 * n * block_d) * elem + m * n * 4  # dq


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block_d = args["BLOCK_D"]
        elem = args["Q"].element_size()
        bucket = args["N_BUCKET"]
        budget = 160 * 1024  # sm80's opt-in limit (163 KiB), used when the device says nothing
        try:
            props = torch.cuda.get_device_properties(args["Q"].device)
            budget = int(getattr(props, "shared_memory_per_block_optin", budget))
        except Exception:  # noqa: BLE001 - pruning is an optimisation; keep the default budget
            pass
        kept = []
        for cfg in configs:
            m, n = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
            if elem == 4 and max(m, n) > 64:  # fp32 tiles twice as large: keep them small
                continue
            if block_d > 64 and m * n > 128 * 64:
                continue
            if min(m, n) > max(16, bucket):  # tiles far longer than the sequence
                continue
            if _smem_bytes(cfg, block_d, elem, kind) > budget:
                continue
            kept.append(cfg)
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return prune


_AUTOTUNE_KEY = ["N_BUCKET", "HEAD_DIM", "HAS_MASK", "IS_VARLEN"]


def _tuning_bench(kernel_call, quantiles):
    """Time one config while autotuning: median over ~25 ms after 5 ms of warm-up. Triton's
    default (25 + 100 ms) costs seconds per kernel and length bucket on first use, and a
    median over tens of launches of a sub-millisecond kernel is already stable."""
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _make_autotuned(kind: str, do_bench=None):
    """Wrap a kernel in triton.autotune with its configs, key and pruner."""
    fn, configs = {
        "fwd": (_attn_fwd_kernel, _FWD_CONFIGS),
        "dkdv": (_attn_bwd_dkdv_kernel, _DKDV_CONFIGS),
        "dq": (_attn_bwd_dq_kernel, _DQ_CONFIGS),
    }[kind]
    # Every kernel writes all of its outputs without reading them, so re-running a config
    # while tuning needs no reset (no reset_to_zero / restore_value).
    return triton.autotune(
        configs=configs, key=_AUTOTUNE_KEY, do_bench=do_bench or _tuning_bench,
        prune_configs_by={"early_config_prune": _pruner(kind)},
    )(fn)


@functools.cache
def _autotuned(kind: str):
    """The autotuned wrapper of a kernel, built on first GPU use only."""
    return _make_autotuned(kind)


def _use_autotune(autotune: bool | None, device: torch.device) -> bool:
    if _INTERPRETED or device.type != "cuda":
        return False
    if autotune is not None:
        return autotune
    return os.environ.get("AVSSL_ATTN_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")


def _launch(kind: str, fn, grid_rows: int, heads: int, batch: int, args: dict, *,
            autotune: bool, head_dim: int, dtype: torch.dtype) -> None:
    """Launch `fn` over (row blocks, heads, batch), autotuned or with a fixed tile set."""
    if autotune:
        row_key = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
        tuner = _autotuned(kind)
        # Triton's Autotuner.run rebuilds its key from all ~35 arguments on every call: on an
        # H200 that was a fifth of the host time of a small forward + backward (1363 vs 1102 us
        # per call with fixed tiles, benchmarks/results/attention_overhead_h200.json), and
        # the base pretraining step is host-bound. So the first launch of each key tunes
        # through it, and later ones launch the chosen config directly. This key is the
        # autotuner's own: its key arguments, plus the tensors' dtypes, which all follow q's
        # (a mask or cu_seqlens is implied by HAS_MASK / IS_VARLEN).
        chosen = tuner.__dict__.setdefault("avssl_chosen", {})
        key = (args["N_BUCKET"], head_dim, args["HAS_MASK"], args["IS_VARLEN"], dtype)
        config = chosen.get(key)
        if config is None:
            tuner[lambda meta: (triton.cdiv(grid_rows, meta[row_key]), heads, batch)](**args)
            chosen[key] = tuner.best_config
            return
        grid = (triton.cdiv(grid_rows, config.kwargs[row_key]), heads, batch)
        fn[grid](**args, **config.all_kwargs())
        return
    tiles = INTERPRETER_TILES[kind] if _INTERPRETED else _fixed_gpu_tiles(kind, head_dim, dtype)
    rows_per_program = tiles.block_n if kind == "dkdv" else tiles.block_m
    grid = (triton.cdiv(grid_rows, rows_per_program), heads, batch)
    fn[grid](**args, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
             num_warps=tiles.num_warps, num_stages=tiles.num_stages)


# --------------------------------------------------------------------------------------------
# Host launchers: validate, allocate, choose tiles
# --------------------------------------------------------------------------------------------


def is_triton_available(device: torch.device | str | torch.Tensor | None = None) -> bool:
    """Whether the kernels can run on `device` (a device, its name, or a tensor on it).

    True for CUDA devices when CUDA is available, and for CPU when the process started with
    TRITON_INTERPRET=1 (the kernels were then built for the interpreter). None asks about the
    default place: CUDA if available, else the interpreter.
    """
    if isinstance(device, torch.Tensor):
        device = device.device
    if device is None:
        return torch.cuda.is_available() or _INTERPRETED
    device = torch.device(device)
    if _INTERPRETED:
        # The interpreter copies arguments to the host and back, so it serves every device.
        return True
    return device.type == "cuda" and torch.cuda.is_available()


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides; the packed layout has no batch stride."""
    if varlen:  # (total, H, D)
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)  # (B, H, N, D)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(EMULATE_BF16, DOT_PRECISION): fp32 inputs get exact IEEE dots rather than TF32; the
    precision flag is ignored for 16-bit inputs."""
    emulate_bf16 = _INTERPRETED and dtype == torch.bfloat16
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return emulate_bf16, precision


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, varlen: bool) -> None:
    name = "flash_attention_varlen" if varlen else "flash_attention"
    layout = "[total, H, D]" if varlen else "[B, H, N, D]"
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != (3 if varlen else 4):
            raise ValueError(f"{name}: {label} must be {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{name}: {label} has dtype {t.dtype}; supported: float16, bfloat16, float32"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"{name}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{name}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    head_dim = q.shape[-1]
    if head_dim < 1 or head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"{name}: head dim {head_dim} is not supported (1..{MAX_HEAD_DIM}; 32, 64 and 128 are "
            "the tuned sizes). Use attention_reference or torch SDPA for larger heads."
        )
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise ValueError(
            f"{name}: q, k, v must share the head dim, got {q.shape[-1]}, {k.shape[-1]}, "
            f"{v.shape[-1]}"
        )
    if varlen:
        if not (q.shape == k.shape == v.shape):
            raise ValueError(
                f"{name}: packed q, k, v must have one shape [total, H, D] (self-attention), got "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
    else:
        b, h = q.shape[:2]
        if k.shape[:2] != (b, h) or v.shape[:2] != (b, h):
            raise ValueError(
                f"{name}: q, k, v must share batch and heads [B, H, ., D], got {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(v.shape)} (expand k/v heads for GQA first)"
            )
        if k.shape[2] != v.shape[2]:
            raise ValueError(
                f"{name}: k and v must have the same length, got {k.shape[2]} and {v.shape[2]}"
            )
        if b > _MAX_GRID_YZ or h > _MAX_GRID_YZ:
            raise ValueError(f"{name}: batch and heads must be <= {_MAX_GRID_YZ}, got {b}, {h}")
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"{name}: empty inputs (some dimension is 0): {tuple(q.shape)}")
    if not is_triton_available(q.device):
        raise RuntimeError(
            f"{name}: Triton cannot run on {q.device}: it needs a CUDA device, or the process "
            "must start with TRITON_INTERPRET=1 (CPU interpreter). Use attention_reference or "
            "torch SDPA here (avssl.kernels.triton_attention_forward falls back by itself)."
        )


def _check_key_padding_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Validate a bool [B, Nk] mask; return it as a uint8 [B, Nk] view with unit inner stride."""
    b, nk = q.shape[0], k.shape[2]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"flash_attention: key_padding_mask must be a bool tensor, got {got}")
    if tuple(mask.shape) != (b, nk):
        raise ValueError(
            f"flash_attention: key_padding_mask must be [B, Nk] = [{b}, {nk}] (True = real "
            f"token), got {tuple(mask.shape)}"
        )
    if mask.device != q.device:
        raise ValueError(
            f"flash_attention: key_padding_mask is on {mask.device}, q on {q.device}"
        )
    mask = mask if mask.stride(-1) == 1 else mask.contiguous()
    return mask.view(torch.uint8)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, max_seqlen: int, q: torch.Tensor) -> None:
    name = "flash_attention_varlen"
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens)
        raise ValueError(f"{name}: cu_seqlens must be an int32 tensor, got {got}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{name}: cu_seqlens must be 1-D [B+1] with B >= 1, got {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"{name}: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    if cu_seqlens.numel() - 1 > _MAX_GRID_YZ:
        raise ValueError(f"{name}: at most {_MAX_GRID_YZ} sequences, got {cu_seqlens.numel() - 1}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"{name}: max_seqlen must be a positive int, got {max_seqlen!r}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    # One host sync for all value checks: a wrong cu_seqlens would read other sequences' tokens.
    first, last, min_len, max_len = torch.stack(
        [cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]
    ).tolist()
    total = q.shape[0]
    if first != 0 or last != total:
        raise ValueError(
            f"{name}: cu_seqlens must start at 0 and end at total = {total} tokens, got "
            f"{first} .. {last}"
        )
    if min_len < 0:
        raise ValueError(f"{name}: cu_seqlens must be non-decreasing")
    if max_len > max_seqlen:
        raise ValueError(
            f"{name}: max_seqlen = {max_seqlen} is shorter than the longest sequence ({max_len})"
        )


def _resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"flash_attention: scale must be finite, got {scale}")
    return scale


def _flash_attn_forward(q, k, v, keep, cu_seqlens, max_seqlen, scale, autotune):
    """Run the forward kernel. Returns (o shaped like q, lse fp32 base 2)."""
    varlen = cu_seqlens is not None
    head_dim = q.shape[-1]
    if varlen:
        total, heads, _ = q.shape
        batch = cu_seqlens.numel() - 1
        n_q = n_k = max_seqlen
        lse = torch.empty((heads, total), device=q.device, dtype=torch.float32)
        stride_lb, stride_lh = 0, lse.stride(0)
    else:
        batch, heads, n_q, _ = q.shape
        n_k = k.shape[2]
        lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
        stride_lb, stride_lh = lse.stride(0), lse.stride(1)
    o = torch.empty_like(q)  # keeps q's memory layout, e.g. transformers' [B, N, H, D] storage
    emulate_bf16, dot_precision = _dot_flags(q.dtype)
    # The kernels need real pointers even for disabled features; lse is a harmless stand-in.
    args = dict(
        Q=q, K=k, V=v, O=o, LSE=lse,
        KEEP=keep if keep is not None else lse,
        CU_SEQLENS=cu_seqlens if varlen else lse,
        **_named_strides("q", q, varlen), **_named_strides("k", k, varlen),
        **_named_strides("v", v, varlen), **_named_strides("o", o, varlen),
        stride_lb=stride_lb, stride_lh=stride_lh,
        stride_mb=keep.stride(0) if keep is not None else 0,
        N_Q=n_q, N_K=n_k, N_BUCKET=triton.next_power_of_2(max(n_q, n_k)),
        qk_scale=scale * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
        HAS_MASK=keep is not None, IS_VARLEN=varlen,
        EMULATE_BF16=emulate_bf16, DOT_PRECISION=dot_precision,
    )
    _launch("fwd", _attn_fwd_kernel, n_q, heads, batch, args,
            autotune=autotune, head_dim=head_dim, dtype=q.dtype)
    return o, lse


def _named_strides(prefix: str, t: torch.Tensor, varlen: bool) -> dict[str, int]:
    sb, sh, sn = _strides(t, varlen)
    return {f"stride_{prefix}b": sb, f"stride_{prefix}h": sh, f"stride_{prefix}n": sn}


def _flash_attn_backward(do, q, k, v, o, lse, keep, cu_seqlens, max_seqlen, scale, autotune):
    """Run the three backward kernels. Returns (dq, dk, dv) shaped like q, k, v."""
    varlen = cu_seqlens is not None
    head_dim = q.shape[-1]
    do = _last_dim_contiguous(do)  # e.g. the expanded all-stride-0 gradient of a .sum()
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    if varlen:
        total, heads, _ = q.shape
        batch = cu_seqlens.numel() - 1
        n_q = n_k = max_seqlen
    else:
        batch, heads, n_q, _ = q.shape
        n_k = k.shape[2]
    stride_lb, stride_lh = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    delta = torch.empty_like(lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    block_d = _block_d(head_dim)
    emulate_bf16, dot_precision = _dot_flags(q.dtype)
    cu = cu_seqlens if varlen else lse

    pre = INTERPRETER_TILES["preprocess"] if _INTERPRETED else _fixed_gpu_tiles(
        "preprocess", head_dim, q.dtype)
    _attn_bwd_preprocess[(triton.cdiv(n_q, pre.block_m), heads, batch)](
        O=o, DO=do, DELTA=delta, CU_SEQLENS=cu,
        **_named_strides("o", o, varlen), **_named_strides("do", do, varlen),
        stride_lb=stride_lb, stride_lh=stride_lh, N_Q=n_q,
        HEAD_DIM=head_dim, BLOCK_D=block_d, IS_VARLEN=varlen, BLOCK_M=pre.block_m,
        num_warps=pre.num_warps,
    )
    common = dict(
        Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta,
        KEEP=keep if keep is not None else lse, CU_SEQLENS=cu,
        **_named_strides("q", q, varlen), **_named_strides("k", k, varlen),
        **_named_strides("v", v, varlen), **_named_strides("do", do, varlen),
        stride_lb=stride_lb, stride_lh=stride_lh,
        stride_mb=keep.stride(0) if keep is not None else 0,
        N_Q=n_q, N_K=n_k, N_BUCKET=triton.next_power_of_2(max(n_q, n_k)),
        sm_scale=scale, qk_scale=scale * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, HAS_MASK=keep is not None, IS_VARLEN=varlen,
        EMULATE_BF16=emulate_bf16, DOT_PRECISION=dot_precision,
    )
    _launch("dkdv", _attn_bwd_dkdv_kernel, n_k, heads, batch,
            dict(common, DK=dk, DV=dv, **_named_strides("dk", dk, varlen),
                 **_named_strides("dv", dv, varlen)),
            autotune=autotune, head_dim=head_dim, dtype=q.dtype)
    _launch("dq", _attn_bwd_dq_kernel, n_q, heads, batch,
            dict(common, DQ=dq, **_named_strides("dq", dq, varlen)),
            autotune=autotune, head_dim=head_dim, dtype=q.dtype)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Autograd and functional entry points
# --------------------------------------------------------------------------------------------


class _FlashAttentionFunction(torch.autograd.Function):
    """Padded form: q [B, H, Nq, D], k/v [B, H, Nk, D], keep uint8 [B, Nk] or None."""

    @staticmethod
    def forward(ctx, q, k, v, keep, scale, autotune):
        o, lse = _flash_attn_forward(q, k, v, keep, None, None, scale, autotune)
        ctx.save_for_backward(q, k, v, o, lse, keep)
        ctx.scale, ctx.autotune = scale, autotune
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, keep = ctx.saved_tensors
        dq, dk, dv = _flash_attn_backward(do, q, k, v, o, lse, keep, None, None, ctx.scale,
                                          ctx.autotune)
        return dq, dk, dv, None, None, None


class _FlashAttentionVarlenFunction(torch.autograd.Function):
    """Packed form: q/k/v [total, H, D], cu_seqlens int32 [B+1]."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, autotune):
        o, lse = _flash_attn_forward(q, k, v, None, cu_seqlens, max_seqlen, scale, autotune)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.max_seqlen, ctx.scale, ctx.autotune = max_seqlen, scale, autotune
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _flash_attn_backward(do, q, k, v, o, lse, None, cu_seqlens, ctx.max_seqlen,
                                          ctx.scale, ctx.autotune)
        return dq, dk, dv, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    autotune: bool | None = None,
) -> torch.Tensor:
    """Non-causal fused attention, softmax(q k^T * scale) v, differentiable in q, k and v.

    q: [B, H, Nq, D]; k, v: [B, H, Nk, D]; any N >= 1, D <= 128; fp16, bf16 or fp32.
    key_padding_mask: bool [B, Nk], True = real token; a query row with no real key gets
    output 0 and gradient 0. scale defaults to 1/sqrt(D). autotune: None follows
    AVSSL_ATTN_AUTOTUNE (default on, GPU only); False forces the fixed tile set.
    Returns [B, H, Nq, D] in q's dtype and memory layout.
    """
    _check_qkv(q, k, v, varlen=False)
    keep = None if key_padding_mask is None else _check_key_padding_mask(key_padding_mask, q, k)
    scale = _resolve_scale(scale, q.shape[-1])
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _FlashAttentionFunction.apply(q, k, v, keep, scale, _use_autotune(autotune, q.device))


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    *,
    autotune: bool | None = None,
) -> torch.Tensor:
    """Packed variable-length self-attention; each token attends only within its sequence.

    q/k/v: [total, H, D]; cu_seqlens: int32 [B+1] with cu_seqlens[0] = 0 and
    cu_seqlens[-1] = total; max_seqlen: the longest sequence (a Python int, it sizes the
    grid). Empty sequences are allowed. Returns [total, H, D] in q's dtype and layout.
    """
    _check_qkv(q, k, v, varlen=True)
    _check_cu_seqlens(cu_seqlens, max_seqlen, q)
    scale = _resolve_scale(scale, q.shape[-1])
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _FlashAttentionVarlenFunction.apply(
        q, k, v, cu_seqlens.contiguous(), max_seqlen, scale, _use_autotune(autotune, q.device)
    )
