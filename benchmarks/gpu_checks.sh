#!/usr/bin/env bash
# The GPU checks in one device call: numerics of the kernels on the GPU, the attention
# provider sweep, the base training step with Triton vs SDPA (and its profile). Stages run in
# order of importance, each in its own process under its own time limit, so one failure or
# overrun costs only its stage. Results land in $OUT (the device tool brings back 8 files):
#   log.txt  attention_d64.json  train_step.json  profile.txt  pytest.log  overhead.json
#   attention_d128.json  attention_flex.json
# On an H200 (2026-11-30) the stages took 20 s, 150 s, 70 s, 65 s, 30 s, 110 s, 95 s: about 9 min.
# Run from the repository root:  OUT=/tmp/gpu bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-/tmp/avssl-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stage() { echo; echo "== $(date +%T) $*"; }
{
stage environment
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton, transformers, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'pydantic', pydantic.__version__)"

stage "sanity: one fused attention forward + backward against the fp32 reference"
timeout 90 python3 - <<'PY' || { echo "SANITY FAILED: stopping here to save device time"; exit 1; }
import torch
from avssl.kernels.attention import flash_attention, flash_attention_varlen
from avssl.kernels.reference import attention_reference, attention_varlen_reference
torch.manual_seed(0)
B, H, N, D = 3, 4, 197, 64
q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
mask = torch.ones(B, N, dtype=torch.bool, device="cuda"); mask[1, 50:] = False; mask[2, 120:] = False
def err(fn, ref, *t):
    a = [x.detach().clone().requires_grad_() for x in t]
    o = fn(*a); o.backward(do if o.dim() == 4 else do_p)
    r = [x.detach().float().requires_grad_() for x in t]
    ro = ref(*r); ro.backward((do if o.dim() == 4 else do_p).float())
    lp = [x.detach().clone().requires_grad_() for x in t]
    lo = ref(*lp, upcast=False); lo.backward(do if o.dim() == 4 else do_p)
    ours = max((o.float() - ro).abs().max().item(), *[(x.grad.float() - y.grad).abs().max().item() for x, y in zip(a, r)])
    torchs = max((lo.float() - ro).abs().max().item(), *[(x.grad.float() - y.grad).abs().max().item() for x, y in zip(lp, r)])
    return ours, torchs
o, t = err(lambda a, b, c: flash_attention(a, b, c, key_padding_mask=mask, autotune=False),
           lambda a, b, c, upcast=True: attention_reference(a, b, c, key_padding_mask=mask, upcast=upcast), q, k, v)
print(f"padded bf16: ours {o:.3e}, torch bf16 {t:.3e}"); assert o <= 2 * t + 1e-3
cu = torch.tensor([0, 197, 247, 367], dtype=torch.int32, device="cuda")
qp, kp, vp, do_p = (torch.randn(367, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
o, t = err(lambda a, b, c: flash_attention_varlen(a, b, c, cu, 197, autotune=False),
           lambda a, b, c, upcast=True: attention_varlen_reference(a, b, c, cu, upcast=upcast), qp, kp, vp)
print(f"varlen bf16: ours {o:.3e}, torch bf16 {t:.3e}"); assert o <= 2 * t + 1e-3
print("SANITY OK")
PY

stage "attention sweep, head dim 64 (providers but flex)"
TRITON_PRINT_AUTOTUNING=1 timeout 190 python3 benchmarks/bench_attention.py --head-dims 64 \
  --lengths 64 197 256 512 1024 2048 --providers triton sdpa_flash sdpa_efficient sdpa_cudnn eager \
  --out "$OUT/attention_d64.json"

stage "training step: ViT-B/16 base recipe shapes, triton vs sdpa, with profiles"
timeout 140 python3 benchmarks/bench_train_step.py --profile --out "$OUT/train_step.json" \
  --profile-text "$OUT/profile.txt"

stage "kernel tests on the GPU (tests/test_attention_kernels.py, 14 processes)"
timeout 120 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 14 --durations=10 \
  tests/test_attention_kernels.py > "$OUT/pytest.log" 2>&1; echo "pytest exit $?"; tail -15 "$OUT/pytest.log"

stage "host cost of one attention call (tiny shape), with a cProfile of ours"
timeout 60 python3 benchmarks/attention_overhead.py --out "$OUT/overhead.json" \
  --profile-text /tmp/overhead_profile.txt > /dev/null; cat /tmp/overhead_profile.txt

stage "attention sweep, head dim 128"
timeout 120 python3 benchmarks/bench_attention.py --head-dims 128 --lengths 197 1024 \
  --providers triton sdpa_flash sdpa_efficient sdpa_cudnn eager --out "$OUT/attention_d128.json"

stage "FlexAttention (compiled per shape) against ours, head dim 64"
timeout 100 python3 benchmarks/bench_attention.py --head-dims 64 --lengths 256 1024 \
  --providers triton flex --prewarm-workers 0 --out "$OUT/attention_flex.json"
stage done
} 2>&1 | tee "$OUT/log.txt"
