#!/usr/bin/env bash
# Proof on this machine (CPU, Python 3.11) that the carry bundle of benchmarks/gpu_bundle.py is
# complete and reproducible, with the same trimming as the GPU's (Python 3.12) bundle:
#   1. build it twice, each from an empty wheel cache (DeepSpeed's wheel rebuilt too), and compare
#      the archives' sha256;
#   2. a scratch venv that stands for the GPU image: torch, torchaudio, triton, transformers and
#      numpy at requirements.lock's versions, plus the image's packages that the bundle relies on
#      (avssl-bundle.json's image_packages_used) and avssl's other image-provided dependencies
#      (scipy, pyyaml, rich, matplotlib, safetensors), each at the lock's version; nothing of the
#      bundle's own list may be in it (checked);
#   3. with PYTHONPATH=<unpacked bundle>/site and that venv's python: the imports; PyAV decodes and
#      encodes H.264 after the encoder libraries' swap; ray.init() starts; a 2-worker Ray Train run
#      with DeepSpeed (ZeRO-1, gloo) finishes; `avssl data synth` and `avssl pretrain` of
#      configs/pretrain/tiny.yaml (2 workers, DeepSpeed, MLflow on SQLite, release) finish.
# Usage, from the repository root (about 15 minutes on 2 cores, most of it xz):
#   bash benchmarks/gpu_bundle_check.sh [WORKDIR]        (default /tmp/avssl-bundle-check)
# Prints one "== stage: ok|FAILED (seconds)" line per stage and ends with a summary.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/avssl-bundle-check}
PY=3.11
BUILDER_PY=$REPO/.venv/bin/python
UV=$REPO/.venv/bin/uv
# AVSSL_CHECK_REUSE_BUILDS=1 keeps the two archives of an earlier run of this script and redoes the rest.
if [ "${AVSSL_CHECK_REUSE_BUILDS:-0}" = 1 ] && [ -f "$WORK/a/avssl-gpu-py$PY.tar.xz" ] && [ -f "$WORK/b/avssl-gpu-py$PY.tar.xz" ]; then
  REUSE=1; find "$WORK" -mindepth 1 -maxdepth 1 ! -name a ! -name b -exec rm -rf {} +
else
  REUSE=0; rm -rf "$WORK" && mkdir -p "$WORK"
fi
cd "$REPO"
declare -a SUMMARY=()
status=0
stage() {  # stage NAME TIMEOUT CMD...: run one stage in its own process under its own limit
  local name=$1 limit=$2; shift 2
  echo; echo "== $(date +%T) $name"
  local t0=$SECONDS rc
  timeout "$limit" "$@"; rc=$?
  local line="$name: $([ $rc = 0 ] && echo ok || echo "FAILED rc=$rc") ($((SECONDS - t0)) s)"
  echo "== $line"; SUMMARY+=("$line")
  [ $rc = 0 ] || status=1
  return $rc
}

if [ $REUSE = 0 ]; then
  stage "build 1 (empty cache)" 1500 "$BUILDER_PY" benchmarks/gpu_bundle.py --python $PY \
    --out "$WORK/a/avssl-gpu-py$PY.tar.xz" --cache "$WORK/a/cache" || exit 1
  stage "build 2 (empty cache)" 1500 "$BUILDER_PY" benchmarks/gpu_bundle.py --python $PY \
    --out "$WORK/b/avssl-gpu-py$PY.tar.xz" --cache "$WORK/b/cache" || exit 1
fi
A=$(sha256sum "$WORK/a/avssl-gpu-py$PY.tar.xz" | cut -d' ' -f1)
B=$(sha256sum "$WORK/b/avssl-gpu-py$PY.tar.xz" | cut -d' ' -f1)
MIB=$(python3 -c "import os; print(f'{os.path.getsize(\"$WORK/a/avssl-gpu-py$PY.tar.xz\") / 2**20:.2f}')")
echo "sha256 build 1: $A"; echo "sha256 build 2: $B"; echo "archive: $MIB MiB"
if [ "$A" = "$B" ]; then SUMMARY+=("reproducible: yes, sha256 $A, $MIB MiB"); else SUMMARY+=("reproducible: NO ($A vs $B)"); status=1; fi

stage "unpack" 120 tar -xJf "$WORK/a/avssl-gpu-py$PY.tar.xz" -C "$WORK" || exit 1
SITE=$WORK/site

scratch_venv() {
  "$UV" venv --quiet --python "$BUILDER_PY" "$WORK/venv" || return 1
  # Versions: the lock's (torch & co as on the image, the rest as the image's stand-ins).
  grep -E '^[A-Za-z0-9_.-]+==' requirements.lock | sed 's/ .*//' > "$WORK/lockpins.txt"
  "$WORK/venv/bin/python" - "$WORK/avssl-bundle.json" "$WORK/lockpins.txt" > "$WORK/image-reqs.txt" <<'PY' || return 1
import json, re, sys
manifest = json.load(open(sys.argv[1]))
pins = {re.sub(r"[-_.]+", "-", l.split("==")[0]).lower(): l.strip() for l in open(sys.argv[2])}
names = set(manifest["base_pins"]) | set(manifest["image_packages_used"]) | {"scipy", "pyyaml", "rich", "matplotlib", "safetensors"}
print("\n".join(pins[n] for n in sorted(names)))
PY
  VIRTUAL_ENV=$WORK/venv "$UV" pip install --quiet -r "$WORK/image-reqs.txt" -c "$WORK/lockpins.txt" || return 1
  # The venv must not hold anything the bundle carries, else this proof would not test the bundle:
  # what came in as a dependency (transformers -> kernels -> pydantic) goes again, as on the image.
  overlap() {
    "$WORK/venv/bin/python" - "$WORK/avssl-bundle.json" <<'PY'
import importlib.metadata as md, json, re, sys
carried = set(json.load(open(sys.argv[1]))["packages"])
have = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in md.distributions()}
print(" ".join(sorted(carried & have)))
PY
  }
  local extra; extra=$(overlap)
  if [ -n "$extra" ]; then
    echo "removing from the scratch venv what the bundle carries (pulled in as dependencies): $extra"
    VIRTUAL_ENV=$WORK/venv "$UV" pip uninstall --quiet $extra || return 1
  fi
  extra=$(overlap)
  echo "scratch venv: $(VIRTUAL_ENV=$WORK/venv "$UV" pip list 2>/dev/null | tail -n +3 | wc -l) distributions; overlap with the bundle: ${extra:-none}"
  [ -z "$extra" ]
}
export WORK UV BUILDER_PY
export -f scratch_venv
stage "scratch venv (the image's stand-in)" 900 bash -c scratch_venv || exit 1
VPY=$WORK/venv/bin/python
export PYTHONPATH=$SITE:$REPO PYTHONUNBUFFERED=1 AVSSL_PROGRESS=0 RAY_DEDUP_LOGS=0 COLUMNS=200
unset RAY_ADDRESS MLFLOW_TRACKING_URI

stage "imports from the bundle" 180 "$VPY" - <<'PY'
import importlib, importlib.metadata as md, sys
site = sys.path[1] if sys.path[0] == "" else sys.path[0]
for mod in ["ray", "ray.train.torch", "ray.dashboard", "deepspeed", "mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
            "sqlalchemy", "alembic", "webdataset", "av", "soundfile", "pydantic", "torch", "transformers"]:
    m = importlib.import_module(mod)
    print(f"{mod:45s} {getattr(m, '__version__', ''):12s} {m.__file__}")
for dist in ["ray", "deepspeed", "mlflow-skinny", "webdataset", "av", "soundfile", "pydantic", "torch", "transformers", "numpy"]:
    print(f"{dist} {md.version(dist)}")
assert "site" in __import__("ray").__file__ and "site" in __import__("deepspeed").__file__
PY

stage "PyAV: H.264 encode + decode after the encoder swap" 120 "$VPY" - <<'PY'
import io
import av, numpy as np
buf = io.BytesIO()
with av.open(buf, "w", format="mp4") as out:
    s = out.add_stream("libx264", rate=25)
    s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
    for i in range(10):
        frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 20, np.uint8), format="rgb24")
        for p in s.encode(frame):
            out.mux(p)
    for p in s.encode():
        out.mux(p)
buf.seek(0)
with av.open(buf) as inp:
    frames = [f.to_ndarray(format="rgb24") for f in inp.decode(video=0)]
assert len(frames) == 10 and abs(int(frames[5].mean()) - 100) < 8, (len(frames), frames[5].mean())
print(f"h264: encoded and decoded {len(frames)} frames ({len(buf.getvalue())} bytes)")
for name in ("hevc", "av1", "vp9", "h264", "aac", "flac", "opus"):
    av.codec.Codec(name, "r")  # every decoder still there
try:  # the stand-in answers: no crash, a clean error
    with av.open(io.BytesIO(), "w", format="mp4") as out:
        s = out.add_stream("libx265", rate=25); s.width = s.height = 64
        s.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24"))
    print("libx265: unexpectedly encoded")
except Exception as exc:
    print(f"libx265 stand-in refuses cleanly: {type(exc).__name__}: {str(exc)[:100]}")
PY

stage "ray.init() starts" 180 "$VPY" - <<'PY'
import time, ray
t = time.perf_counter()
ray.init(num_cpus=2, include_dashboard=True, _node_ip_address="127.0.0.1")
print(f"ray {ray.__version__} up in {time.perf_counter() - t:.1f} s: {ray.cluster_resources()}")
assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
ray.shutdown()
PY

stage "Ray Train: 2 workers, DeepSpeed ZeRO-1 on gloo" 420 "$VPY" - <<'PY'
import tempfile, time
import ray, ray.train
from ray.train.torch import TorchTrainer

def train_func(config):
    import tempfile
    import deepspeed, torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    ds = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 8, "zero_optimization": {"stage": 1},
          "bf16": {"enabled": False}, "steps_per_print": 10**9}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    for step in range(5):
        x = torch.randn(4, 16)
        loss = (engine(x) - x.sum(1, keepdim=True)).pow(2).mean()
        engine.backward(loss)
        engine.step()
    with tempfile.TemporaryDirectory() as d:  # Ray Train V2 keeps the metrics of checkpointed reports
        engine.save_checkpoint(d, tag="final")
        ray.train.report({"loss": loss.item(), "world": ray.train.get_context().get_world_size()},
                         checkpoint=ray.train.Checkpoint.from_directory(d))

ray.init(num_cpus=2, _node_ip_address="127.0.0.1")
t = time.perf_counter()
result = TorchTrainer(train_func, scaling_config=ray.train.ScalingConfig(num_workers=2),
                      run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(), name="bundle-check")).fit()
print(f"Ray Train + DeepSpeed finished in {time.perf_counter() - t:.1f} s: {result.metrics}, checkpoint {result.checkpoint}")
assert result.metrics["world"] == 2 and result.checkpoint is not None
PY

CORPUS=$WORK/tiny
RUNS=$WORK/runs
stage "avssl data synth (configs/data/tiny.yaml)" 300 "$VPY" -m avssl.cli data synth --config configs/data/tiny.yaml --out "$CORPUS"
stage "avssl pretrain (configs/pretrain/tiny.yaml, 2 workers, DeepSpeed, MLflow SQLite)" 900 \
  "$VPY" -m avssl.cli pretrain --config configs/pretrain/tiny.yaml --set data.corpus="$CORPUS" \
  --set trainer.storage_path="$RUNS" --set trainer.name=bundle-check
if [ -f "$RUNS/bundle-check/avssl/release/model.safetensors" ]; then SUMMARY+=("release written: yes"); else SUMMARY+=("release written: NO"); status=1; fi

echo; echo "== summary (python $PY, bundle $WORK/a/avssl-gpu-py$PY.tar.xz)"
printf '%s\n' "${SUMMARY[@]}"
exit $status
