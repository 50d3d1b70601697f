"""Numerics and integration of the Triton attention kernels (avssl.kernels).

On a machine without CUDA the kernels run in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports Triton). Shapes are tiny because the interpreter is
slow; lengths are awkward on purpose (1, 7, 61, 197, 255: no block multiple).

Tolerance rule (flash-attention's tests): the kernel's error against an fp32 reference must be
at most twice PyTorch's own error when it computes the same thing in the low dtype, plus a
small atol. fp16 and bf16 run in the interpreter too; bf16 dots there are upcast to fp32
(see the kernel header), which matches tensor-core numerics.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from avssl.kernels.attention import flash_attention, flash_attention_varlen, is_triton_available
from avssl.kernels.hf_attention import register_attention, triton_attention_forward
from avssl.kernels.reference import attention_reference, attention_varlen_reference
from avssl.kernels import attention as fa_module

pytestmark = pytest.mark.skipif(
    not is_triton_available(), reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest)"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# atol of the tolerance rule, per dtype (fp32: PyTorch's fp32 error against itself is 0).
ATOL = {torch.float32: 2e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def _inputs(shape, dtype, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(shape, generator=gen) * scale).to(DEVICE, dtype).requires_grad_()
        for _ in range(3)
    ]


def _grads(fn, q, k, v, do):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(do)
    return [out.detach()] + [t.grad.detach().clone() for t in (q, k, v)]


def _leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_()


def _check_against_reference(kernel_fn, ref_fn, q, k, v, do, label=""):
    """Kernel vs fp32 reference, bounded by 2x PyTorch's low-precision error + atol."""
    dtype = q.dtype
    got = _grads(kernel_fn, q, k, v, do)
    q32, k32, v32 = (_leaf(t, torch.float32) for t in (q, k, v))
    want = _grads(lambda a, b, c: ref_fn(a, b, c, True), q32, k32, v32, do.float())
    ql, kl, vl = (_leaf(t, dtype) for t in (q, k, v))
    torch_lp = _grads(lambda a, b, c: ref_fn(a, b, c, False), ql, kl, vl, do)
    for name, g, w, p in zip(("out", "dq", "dk", "dv"), got, want, torch_lp):
        assert g.shape == w.shape, f"{label} {name}: shape {g.shape} != {w.shape}"
        assert torch.isfinite(g).all(), f"{label} {name}: non-finite values"
        err = (g.float() - w).abs().max().item()
        pt_err = (p.float() - w).abs().max().item()
        bound = 2 * pt_err + ATOL[dtype]
        assert err <= bound, (
            f"{label} {name} ({dtype}): kernel error {err:.3g} > 2 x torch error {pt_err:.3g} "
            f"+ atol {ATOL[dtype]:.1g}"
        )
    return got


# (B, H, N, D, dtype): every dtype meets awkward lengths and head dims 32 / 64, one case 128.
DENSE_CASES = [
    (2, 2, 1, 32, torch.float32),
    (2, 2, 7, 32, torch.float16),
    (2, 2, 7, 64, torch.bfloat16),
    (1, 2, 61, 64, torch.float32),
    (1, 2, 61, 32, torch.float16),
    (2, 1, 61, 64, torch.bfloat16),
    (1, 2, 197, 64, torch.float32),
    (1, 1, 197, 64, torch.bfloat16),
    (1, 1, 255, 32, torch.float16),
    (1, 1, 37, 128, torch.bfloat16),
    (1, 1, 37, 128, torch.float32),
]


@pytest.mark.parametrize("B,H,N,D,dtype", DENSE_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_dense_forward_and_grads_match_reference(B, H, N, D, dtype):
    """Output and dq, dk, dv match the fp32 reference within the 2x-PyTorch rule at awkward N."""
    q, k, v = _inputs((B, H, N, D), dtype, seed=N + D)
    do = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    _check_against_reference(
        lambda a, b, c: flash_attention(a, b, c),
        lambda a, b, c, up: attention_reference(a, b, c, upcast=up),
        q, k, v, do, label=f"N={N} D={D}",
    )


def test_cross_attention_lengths_and_custom_scale():
    """Query and key lengths may differ (Nq=13, Nk=50) and a custom scale is honoured."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 13, 32, generator=gen).to(DEVICE).requires_grad_()
    k = torch.randn(2, 2, 50, 32, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(2, 2, 50, 32, generator=gen).to(DEVICE).requires_grad_()
    do = torch.randn(2, 2, 13, 32, generator=gen).to(DEVICE)
    _check_against_reference(
        lambda a, b, c: flash_attention(a, b, c, scale=0.3),
        lambda a, b, c, up: attention_reference(a, b, c, scale=0.3, upcast=up),
        q, k, v, do,
    )


def _padding_mask(lengths, n, random_sample=None):
    mask = torch.zeros(len(lengths), n, dtype=torch.bool)
    for i, length in enumerate(lengths):
        mask[i, :length] = True
    if random_sample is not None:  # visible tokens scattered, as after random masking
        gen = torch.Generator().manual_seed(7)
        mask[random_sample] = torch.rand(n, generator=gen) < 0.4
        mask[random_sample, 0] = True
    return mask.to(DEVICE)


@pytest.mark.parametrize(
    "dtype,N,D",
    [(torch.float32, 45, 32), (torch.bfloat16, 45, 64), (torch.float16, 197, 64)],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_key_padding_mask_matches_reference(dtype, N, D):
    """Per-sample key padding (full, 1 real token, short, scattered) matches the reference."""
    B, H = 4, 2 if N < 100 else 1
    mask = _padding_mask([N, 1, 9, N], N, random_sample=3)
    q, k, v = _inputs((B, H, N, D), dtype, seed=11)
    do = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    got = _check_against_reference(
        lambda a, b, c: flash_attention(a, b, c, key_padding_mask=mask),
        lambda a, b, c, up: attention_reference(a, b, c, key_padding_mask=mask, upcast=up),
        q, k, v, do,
    )
    dk, dv = got[2], got[3]
    masked_keys = ~mask[:, None, :, None].expand_as(dk)
    assert (dk[masked_keys] == 0).all() and (dv[masked_keys] == 0).all(), (
        "padded keys must receive exactly zero gradient"
    )


def test_key_padding_mask_equals_dropping_the_padding():
    """A padded sample's real rows equal attention over only its real tokens (no leakage)."""
    N, n_real, D = 40, 17, 64
    q, k, v = (t.detach() for t in _inputs((1, 2, N, D), torch.float32, seed=5))
    mask = _padding_mask([n_real], N)
    padded = flash_attention(q, k, v, key_padding_mask=mask)[:, :, :n_real]
    alone = flash_attention(q[:, :, :n_real], k[:, :, :n_real], v[:, :, :n_real])
    torch.testing.assert_close(padded, alone, atol=1e-6, rtol=1e-5)


def test_all_masked_rows_give_zero_output_and_zero_grads():
    """A sample with no real key gets output 0 and exactly-zero, finite gradients (no NaN)."""
    B, H, N, D = 2, 2, 23, 32
    mask = _padding_mask([N - 4, 0], N)
    q, k, v = _inputs((B, H, N, D), torch.float16, seed=13)
    out = flash_attention(q, k, v, key_padding_mask=mask)
    do = torch.randn_like(out)
    out.backward(do)
    assert (out[1] == 0).all(), "rows without any real key must output exactly 0"
    for name, t in (("dq", q), ("dk", k), ("dv", v)):
        assert torch.isfinite(t.grad).all(), f"{name} has NaN/inf"
        assert (t.grad[1] == 0).all(), f"{name} of the all-masked sample must be 0"
    ref = attention_reference(q.detach(), k.detach(), v.detach(), key_padding_mask=mask)
    torch.testing.assert_close(out[0].float(), ref[0].float(), atol=2e-3, rtol=0)
    assert (ref[1] == 0).all(), "the reference defines the same all-masked semantics"


def test_small_tiles_many_programs(monkeypatch):
    """16x16 tiles (many programs, several full blocks plus a ragged tail) give the same result."""
    small = fa_module.Tiles(block_m=16, block_n=16)
    for kind in ("fwd", "dkdv", "dq", "preprocess"):
        monkeypatch.setitem(fa_module.INTERPRETER_TILES, kind, small)
    B, H, N, D = 2, 1, 53, 32
    mask = _padding_mask([N, 20], N)
    q, k, v = _inputs((B, H, N, D), torch.float32, seed=17)
    do = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    _check_against_reference(
        lambda a, b, c: flash_attention(a, b, c, key_padding_mask=mask),
        lambda a, b, c, up: attention_reference(a, b, c, key_padding_mask=mask, upcast=up),
        q, k, v, do,
    )


def test_transformers_layout_strides_and_sum_gradient():
    """[B, N, H, D]-backed views match the reference, the output keeps that layout, .sum() works."""
    B, N, H, D = 2, 29, 2, 32
    gen = torch.Generator().manual_seed(19)
    base = [torch.randn(B, N, H, D, generator=gen).to(DEVICE).requires_grad_() for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in base)  # (B, H, N, D) views
    out = flash_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous(), "output should share q's [B, N, H, D] layout"
    out.sum().backward()  # upstream gradient with all-zero strides
    q32, k32, v32 = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in base)
    ref = attention_reference(q32, k32, v32)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for b, r in zip(base, (q32, k32, v32)):
        torch.testing.assert_close(b.grad.transpose(1, 2), r.grad, atol=1e-5, rtol=1e-5)


def test_non_power_of_two_head_dim_is_padded():
    """Head dim 48 (padded to 64 inside the kernel) matches the reference, forward and backward."""
    q, k, v = _inputs((1, 2, 19, 48), torch.float32, seed=23)
    do = torch.randn(1, 2, 19, 48, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    _check_against_reference(
        lambda a, b, c: flash_attention(a, b, c),
        lambda a, b, c, up: attention_reference(a, b, c, upcast=up),
        q, k, v, do,
    )


def test_backward_is_deterministic():
    """Two backward passes give bitwise-identical gradients (no atomics)."""
    q, k, v = _inputs((1, 2, 70, 32), torch.bfloat16, seed=29)
    do = torch.randn(1, 2, 70, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE, q.dtype)
    first = _grads(flash_attention, q, k, v, do)
    second = _grads(flash_attention, q, k, v, do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Packed variable length
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_varlen_matches_per_sequence_reference(dtype):
    """Packed sequences (lengths 1, 7, 0, 61, 33) equal attention run on each sequence alone."""
    lengths = [1, 7, 0, 61, 33]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total, H, D = int(cu[-1]), 2, 64
    cu = cu.to(DEVICE)
    q, k, v = _inputs((total, H, D), dtype, seed=31)
    do = torch.randn(total, H, D, generator=torch.Generator().manual_seed(8)).to(DEVICE, dtype)
    _check_against_reference(
        lambda a, b, c: flash_attention_varlen(a, b, c, cu, max(lengths)),
        lambda a, b, c, up: attention_varlen_reference(a, b, c, cu, upcast=up),
        q, k, v, do,
    )


def test_varlen_equals_padded_with_key_padding_mask():
    """The packed form and the padded form with a key padding mask agree on the real tokens."""
    lengths, H, D = [5, 23, 12], 2, 32
    n = max(lengths)
    gen = torch.Generator().manual_seed(37)
    padded = [torch.randn(len(lengths), H, n, D, generator=gen).to(DEVICE) for _ in range(3)]
    mask = _padding_mask(lengths, n)
    out_padded = flash_attention(*padded, key_padding_mask=mask)  # (B, H, n, D)
    pack = [torch.cat([t[i, :, :L].transpose(0, 1) for i, L in enumerate(lengths)]) for t in padded]
    cu = torch.tensor([0, 5, 28, 40], dtype=torch.int32, device=DEVICE)
    out_packed = flash_attention_varlen(*pack, cu, n)
    expect = torch.cat([out_padded[i, :, :L].transpose(0, 1) for i, L in enumerate(lengths)])
    torch.testing.assert_close(out_packed, expect, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def test_invalid_inputs_raise_clear_errors():
    """Unsupported head dim, dtype, shapes, masks and cu_seqlens raise ValueError saying why."""
    q = torch.randn(1, 2, 8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 256 is not supported"):
        t = torch.randn(1, 1, 4, 256, device=DEVICE)
        flash_attention(t, t, t)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        t = q.double()
        flash_attention(t, t, t)
    with pytest.raises(ValueError, match=r"must be \[B, H, N, D\]"):
        flash_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="share batch and heads"):
        flash_attention(q, q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match="one dtype"):
        flash_attention(q, q.half(), q)
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        flash_attention(q, q, q, key_padding_mask=torch.ones(1, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[B, Nk\]"):
        flash_attention(q, q, q, key_padding_mask=torch.ones(1, 7, dtype=torch.bool, device=DEVICE))
    packed = torch.randn(10, 2, 32, device=DEVICE)
    good_cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="int32"):
        flash_attention_varlen(packed, packed, packed, good_cu.long(), 6)
    with pytest.raises(ValueError, match="end at total"):
        flash_attention_varlen(packed, packed, packed, good_cu - 1, 6)
    with pytest.raises(ValueError, match="shorter than the longest"):
        flash_attention_varlen(packed, packed, packed, good_cu, 5)


# ---------------------------------------------------------------------------------------------
# transformers integration
# ---------------------------------------------------------------------------------------------


def _hf_qkv(B=2, H=2, N=21, D=32, seed=41):
    gen = torch.Generator().manual_seed(seed)
    # transformers projects to (B, N, H, D) and transposes: (B, H, N, D) views.
    return [torch.randn(B, N, H, D, generator=gen).to(DEVICE).transpose(1, 2) for _ in range(3)]


class _EncoderAttention(torch.nn.Module):
    is_causal = False


def test_registry_matches_sdpa_with_key_padding_masks():
    """ALL_ATTENTION_FUNCTIONS['triton'] matches transformers' SDPA for bool/float/2-D masks."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert register_attention() == "triton"
    fn = ALL_ATTENTION_FUNCTIONS["triton"]
    assert callable(fn) and fn is triton_attention_forward
    q, k, v = _hf_qkv()
    B, N = q.shape[0], q.shape[2]
    keep = _padding_mask([N, 6], N)
    bool_mask = keep[:, None, None, :]  # (B, 1, 1, N)
    module = _EncoderAttention()
    want, _ = sdpa_attention_forward(module, q, k, v, bool_mask, scaling=0.2)
    float_mask = torch.zeros(B, 1, 1, N, device=DEVICE).masked_fill(~bool_mask, float("-inf"))
    for mask in (bool_mask, float_mask, keep, bool_mask.expand(B, 1, N, N)):
        out, weights = fn(module, q, k, v, mask, scaling=0.2)
        assert weights is None
        assert out.shape == (B, N, q.shape[1], q.shape[3]) and out.is_contiguous()
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out, _ = fn(module, q, k, v, None, scaling=0.2)
    torch.testing.assert_close(out, sdpa_attention_forward(module, q, k, v, None, scaling=0.2)[0],
                               atol=1e-5, rtol=1e-5)


def test_registry_varlen_kwargs_select_packed_path():
    """cu_seqlens / max_seqlen kwargs run the packed kernel on [1, H, total, D] inputs."""
    q, k, v = _hf_qkv(B=1, N=30)
    cu = torch.tensor([0, 11, 30], dtype=torch.int32, device=DEVICE)
    out, _ = triton_attention_forward(_EncoderAttention(), q, k, v, None, cu_seqlens=cu,
                                      max_seqlen=19)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]  # (T, H, D)
    want = attention_varlen_reference(*packed, cu)
    torch.testing.assert_close(out[0], want, atol=1e-5, rtol=1e-5)


def test_registry_rejects_unsupported_requests():
    """Dropout, causal modules, non-padding [B,1,N,N] masks and additive biases raise ValueError."""
    q, k, v = _hf_qkv(N=9)
    module = _EncoderAttention()
    with pytest.raises(ValueError, match="dropout"):
        triton_attention_forward(module, q, k, v, None, dropout=0.1)
    causal = torch.nn.Module()
    causal.is_causal = True
    with pytest.raises(ValueError, match="non-causal only"):
        triton_attention_forward(causal, q, k, v, None)
    tri = torch.ones(9, 9, dtype=torch.bool, device=DEVICE).tril()
    with pytest.raises(ValueError, match="differs between query rows"):
        triton_attention_forward(module, q, k, v, tri.expand(2, 1, 9, 9).contiguous())
    bias = torch.randn(2, 1, 1, 9, device=DEVICE)
    with pytest.raises(ValueError, match="additive bias"):
        triton_attention_forward(module, q, k, v, bias)


def test_fallback_to_sdpa_without_triton_logs_one_warning():
    """Without CUDA and TRITON_INTERPRET, the registered function runs SDPA and warns once."""
    if torch.cuda.is_available():
        pytest.skip("the fallback path needs a machine without CUDA")
    script = textwrap.dedent(
        """
        import logging, torch
        logging.basicConfig(level=logging.WARNING, format="WARN %(name)s %(message)s")
        from avssl.kernels.attention import is_triton_available
        from avssl.kernels.hf_attention import register_attention
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        assert not is_triton_available(torch.device("cpu"))
        register_attention()
        fn = ALL_ATTENTION_FUNCTIONS["triton"]
        class M(torch.nn.Module):
            is_causal = False
        q, k, v = (torch.randn(2, 12, 2, 16).transpose(1, 2) for _ in range(3))
        mask = torch.ones(2, 1, 1, 12, dtype=torch.bool); mask[1, ..., 5:] = False
        for _ in range(3):
            out, _ = fn(M(), q, k, v, mask)
            want, _ = sdpa_attention_forward(M(), q, k, v, mask)
            torch.testing.assert_close(out, want)
        print("FALLBACK_OK")
        """
    )
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FALLBACK_OK" in result.stdout
    warnings = [ln for ln in result.stderr.splitlines()
                if ln.startswith("WARN avssl.kernels") and "falling back to torch SDPA" in ln]
    assert len(warnings) == 1, result.stderr[-3000:]


def test_pruner_keeps_a_config_and_drops_oversized_tiles():
    """The GPU autotune pruner never returns nothing and drops tiles far longer than N."""
    q = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16)
    for kind, configs in (("fwd", fa_module._FWD_CONFIGS), ("dkdv", fa_module._DKDV_CONFIGS),
                          ("dq", fa_module._DQ_CONFIGS)):
        prune = fa_module._pruner(kind)
        short = prune(configs, {}, Q=q, BLOCK_D=128, N_BUCKET=16)
        assert 1 <= len(short) < len(configs), f"{kind}: {len(short)} configs kept at N=16"
        long = prune(configs, {}, Q=q, BLOCK_D=64, N_BUCKET=2048)
        assert len(long) >= 3, f"{kind}: too few configs left to tune at N=2048"


def test_benchmark_smoke_writes_json(tmp_path):
    """benchmarks/bench_attention.py --smoke runs kernel vs eager and writes its JSON record."""
    import json
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        import bench_attention
    finally:
        sys.path.remove(str(bench_dir))
    out = tmp_path / "attention_smoke.json"
    assert bench_attention.main(["--smoke", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"device", "torch", "triton", "timestamp", "results"} <= set(record)
    providers = {r["provider"] for r in record["results"]}
    assert {"triton", "eager"} <= providers
    by_key = {(r["kind"], r["mode"], r["provider"]): r for r in record["results"]}
    ours = [r for r in record["results"] if r["provider"] == "triton"]
    assert ours and all(r.get("error") is None for r in ours), ours
    for r in ours:  # the 2x-PyTorch rule again, against the eager bf16 provider
        eager = by_key[(r["kind"], r["mode"], "eager")]
        assert r["max_abs_err"] <= 2 * eager["max_abs_err"] + 1e-3, (r, eager)


def test_autotuned_launch_path_runs(monkeypatch):
    """The GPU launch path (autotune key, pruner, grid lambda) runs correctly; timing faked."""
    ran = []

    def fake_bench(kernel_call, quantiles=None):
        kernel_call()
        ran.append(1)
        return [1.0, 1.0, 1.0]

    tuned = {kind: fa_module._make_autotuned(kind, do_bench=fake_bench)
             for kind in ("fwd", "dkdv", "dq")}
    monkeypatch.setattr(fa_module, "_autotuned", tuned.__getitem__)
    monkeypatch.setattr(fa_module, "_use_autotune", lambda autotune, device: True)
    B, H, N, D = 2, 1, 20, 32
    mask = _padding_mask([N, 3], N)
    q, k, v = _inputs((B, H, N, D), torch.float32, seed=43)
    do = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    _check_against_reference(
        lambda a, b, c: flash_attention(a, b, c, key_padding_mask=mask),
        lambda a, b, c, up: attention_reference(a, b, c, key_padding_mask=mask, upcast=up),
        q, k, v, do,
    )
    assert len(ran) >= 3, "the autotuner should have benchmarked configs of all three kernels"

    # Later calls with the same key launch the chosen configs directly, not through the tuner.
    def tuner_called_again(*args, **kwargs):
        raise AssertionError("a tuned key went through Autotuner.run again")

    for tuner in tuned.values():
        monkeypatch.setattr(tuner, "run", tuner_called_again)
    _check_against_reference(
        lambda a, b, c: flash_attention(a, b, c, key_padding_mask=mask),
        lambda a, b, c, up: attention_reference(a, b, c, key_padding_mask=mask, upcast=up),
        q, k, v, do,
    )


def test_prewarm_workers_split_the_autotuning_candidates_without_gaps(monkeypatch):
    """benchmarks/triton_prewarm.py: the workers' shares of each kernel's surviving candidates
    are disjoint and cover them all, so together they compile exactly what autotuning tries."""
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))
    import triton_prewarm

    q = torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)
    named_args = {"Q": q, "BLOCK_D": 64, "N_BUCKET": 1024}
    workers = 3
    for kind in triton_prewarm.KERNELS:
        full = fa_module._make_autotuned(kind)
        survivors = full.early_config_prune(full.configs, named_args)
        assert len(survivors) > workers, "the split is only tested if every worker gets some"
        shares = []
        for index in range(workers):
            tuned = {k: fa_module._make_autotuned(k) for k in triton_prewarm.KERNELS}
            monkeypatch.setattr(fa_module, "_autotuned", tuned.__getitem__)
            triton_prewarm._restrict_candidates(index, workers)
            shares.append(tuned[kind].early_config_prune(tuned[kind].configs, named_args))
        flat = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for share in shares for c in share]
        expected = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                    for c in survivors]
        assert sorted(flat) == sorted(expected) and len(set(flat)) == len(flat), (kind, flat)


_AOT_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from avssl.kernels import attention as A

target = GPUTarget("cuda", 90, 32)
kernels = {
    "fwd": (A._attn_fwd_kernel, "Q K V O", {"qk_scale"}),
    "dkdv": (A._attn_bwd_dkdv_kernel, "Q K V DO DK DV", {"sm_scale", "qk_scale"}),
    "dq": (A._attn_bwd_dq_kernel, "Q K V DO DQ", {"sm_scale", "qk_scale"}),
}
for kind, (fn, tensors, floats) in kernels.items():
    for dtype, d, has_mask, varlen in [("bf16", 64, True, False), ("fp16", 128, False, True)]:
        tiles = A._fixed_gpu_tiles(kind, d, torch.bfloat16)
        const = dict(HEAD_DIM=d, BLOCK_D=d, HAS_MASK=has_mask, IS_VARLEN=varlen,
                     EMULATE_BF16=False, DOT_PRECISION="tf32",
                     BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n)
        ptr = {n: "*" + dtype for n in tensors.split()}
        ptr.update(LSE="*fp32", DELTA="*fp32", KEEP="*u8", CU_SEQLENS="*i32")
        sig = {n: "constexpr" if n in const else ptr.get(n, "fp32" if n in floats else "i32")
               for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if sig[n].startswith("*")}
        k = triton.compile(ASTSource(fn, sig, const, attrs), target=target,
                           options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})
        assert "cubin" in k.asm, kind
        assert k.metadata.shared <= 227 * 1024, (kind, k.metadata.shared)
print("AOT_OK")
"""


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """fwd, dK/dV and dQ kernels compile for sm_90 via ptxas (errors the interpreter cannot see)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this Triton wheel has no bundled ptxas")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "AOT_OK" in result.stdout, result.stderr[-4000:]


def test_transformers_encoder_matches_sdpa_end_to_end():
    """A 2-layer BERT with padded inputs gives the same hidden states with 'triton' as 'sdpa'."""
    from transformers import BertConfig, BertModel

    register_attention()
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=2,
                     intermediate_size=128, vocab_size=100, attention_probs_dropout_prob=0.0,
                     hidden_dropout_prob=0.0)
    model = BertModel(cfg, add_pooling_layer=False).eval().to(DEVICE)
    ids = torch.randint(0, 100, (2, 13), device=DEVICE)
    attention_mask = torch.ones(2, 13, dtype=torch.long, device=DEVICE)
    attention_mask[1, 7:] = 0
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        want = model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        model.set_attn_implementation("triton")
        got = model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_fixed_tiles_can_be_forced_on_gpu(monkeypatch):
    """On a GPU autotune=False or AVSSL_ATTN_AUTOTUNE=0 picks the fixed tiles; CPU never tunes."""
    monkeypatch.setattr(fa_module, "_INTERPRETED", False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("AVSSL_ATTN_AUTOTUNE", raising=False)
    assert fa_module._use_autotune(None, cuda) is True
    assert fa_module._use_autotune(False, cuda) is False
    assert fa_module._use_autotune(None, cpu) is False
    monkeypatch.setenv("AVSSL_ATTN_AUTOTUNE", "0")
    assert fa_module._use_autotune(None, cuda) is False
    assert fa_module._use_autotune(True, cuda) is True
