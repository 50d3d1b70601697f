#!/usr/bin/env python3
"""Build the carry bundle: the Python packages that avssl's cluster path needs and the lent GPU
machine's image lacks (Ray, DeepSpeed, MLflow's client and SQLite store, webdataset, PyAV,
soundfile, pydantic, and what they pull in), unpacked into one site folder, trimmed, and packed as
one reproducible .tar.xz that travels with the working tree (the device tool's `carry`, 64 MiB per
call with the repository's own files).

    python benchmarks/gpu_bundle.py --python 3.12 --out .bundle/avssl-gpu-py312.tar.xz   # the GPU's
    python benchmarks/gpu_bundle.py --python 3.11 --out .bundle/avssl-gpu-py311.tar.xz   # this machine's

Run it with the project's venv (.venv/bin/python): it needs torch to build DeepSpeed's wheel and
uv (a dev dependency) to resolve. Steps, each printed with its time:
1. DeepSpeed is an sdist on PyPI: build a pure-Python wheel of the locked version here, with
   DS_BUILD_OPS=0 (its ops compile just in time on the machine that uses them).
2. Resolve the requirements for the target Python and manylinux x86-64 with `uv pip compile`
   (metadata only: `pip download` would fetch torch and its CUDA wheels, gigabytes, only to drop
   them), constrained by requirements.lock's versions and by the image's own versions of torch,
   triton, transformers and numpy, so that nothing is resolved against other versions of those.
3. Drop what the image already has (IMAGE_PACKAGES, the device notes' list of 2026-11-17) and
   what is never imported on avssl's path (NEVER_IMPORTED); `pip download --no-deps` the rest as
   wheels for the target Python.
4. Unpack every wheel into site/, then trim (TRIM): Ray's Java jars, its dashboard's web pages
   (an empty client/build/static stays, which the dashboard checks for), ray.rllib, ray.serve and
   ray.llm; `strip --strip-unneeded` on every ELF file; PyAV's HEVC and AV1 encoder libraries
   (libx265, libSvtAv1Enc) replaced by stand-ins that export the same symbols as stubs returning an
   error (an empty library is not enough: Python dlopens with RTLD_NOW and libavcodec's references
   must resolve). avssl encodes H.264 only; every decoder stays.
5. Pack site/ and avssl-bundle.json (versions, what was dropped and why, sizes) as a tar with
   sorted members, mtime 0, uid/gid 0 and no owner names, compressed with xz's x86 BCJ filter then
   LZMA2 preset 9e: the same inputs give the same bytes (gpu_bundle_check.sh builds twice and
   compares the sha256).

Use on the target: `tar -xJf BUNDLE -C DIR && export PYTHONPATH=DIR/site` (see gpu_pretrain.sh).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"

# What avssl's cluster path imports beyond the image (names as in requirements.lock).
REQUIREMENTS = ["ray[train,default]", "deepspeed", "mlflow-skinny", "sqlalchemy", "alembic", "webdataset", "av",
                "soundfile", "pydantic"]
# The image's versions (KINDS.md's pip list row, Python 3.12): the resolution for the image's Python
# is made against these. For another Python (the proof on this machine, 3.11: numpy 2.5 has no
# wheels for it) the lock's versions of the same packages are used, which is what the scratch venv
# of gpu_bundle_check.sh installs.
IMAGE_PYTHON = "3.12"
IMAGE_PINS = {"torch": "2.11.0", "torchaudio": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "numpy": "2.5.2"}
# The lent GPU image's Python packages, as the device notes (KINDS.md) listed them on 2026-11-17:
# never carried (the image's own version is used).
IMAGE_PACKAGES = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split())
# Required by a carried package but never imported on avssl's path (pretrain, finetune, evaluate,
# export with a local Ray instance and a SQLite MLflow store). gpu_bundle_check.sh proves the path
# runs without them.
NEVER_IMPORTED = {
    "uvicorn": "mlflow-skinny's server runner; avssl never serves",
    "gitpython": "mlflow-skinny reads the git commit through it inside try/except ImportError",
    "gitdb": "gitpython's",
    "smmap": "gitpython's",
    "py-spy": "a profiler executable the Ray dashboard runs on request",
    "virtualenv": "Ray's runtime_env pip/virtualenv plugin; avssl's local runs use no runtime_env",
    "distlib": "virtualenv's",
    "python-discovery": "virtualenv's",
    "platformdirs": "virtualenv's",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
# Folders removed from site/ (relative paths) and why.
TRIM = {
    "ray/jars": "Ray's Java worker jars",
    "ray/rllib": "reinforcement learning library",
    "ray/serve": "model serving",
    "ray/llm": "LLM serving and batch inference",
    "ray/dashboard/client/build": "the dashboard's web pages (an empty client/build/static is kept)",
}
# Shared libraries of PyAV replaced by stand-ins, and what each stub returns: NULL from
# x265_api_get_* (FFmpeg then reports "bit depth not supported"), an error code from SVT-AV1's calls.
STANDINS = {"libx265": "0", "libSvtAv1Enc": "-1"}
XZ_FILTERS = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def log(msg: str) -> None:
    print(f"[gpu_bundle {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^ \\;]+)", line)
        if m:
            pins[norm(m.group(1))] = m.group(2)
    return pins


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def build_deepspeed_wheel(version: str, cache: Path) -> Path:
    """A py3-none-any wheel of DeepSpeed `version`, built once per cache folder."""
    out = cache / "deepspeed"
    wheel = out / f"deepspeed-{version}-py3-none-any.whl"
    if wheel.is_file():
        return wheel
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "-d", tmp, f"deepspeed=={version}"])
        (sdist,) = Path(tmp).glob("deepspeed-*.tar.gz")
        # PYTHONHASHSEED: setup.py collects the "all" extra in a set, whose order in METADATA
        # otherwise changes from one build to the next.
        env = {**os.environ, "DS_BUILD_OPS": "0", "PYTHONHASHSEED": "0", "SOURCE_DATE_EPOCH": "315532800"}
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp + "/whl", str(sdist)], env=env)
        (built,) = Path(tmp, "whl").glob("deepspeed-*.whl")
        if not built.name.endswith("py3-none-any.whl"):
            sys.exit(f"DeepSpeed's wheel is not pure Python: {built.name}")
        shutil.move(built, wheel)
    return wheel


def base_pins(python: str, pins: dict[str, str]) -> dict[str, str]:
    """The versions of the packages the bundle is used with but never carries (torch & co)."""
    return IMAGE_PINS if python == IMAGE_PYTHON else {k: pins[k] for k in IMAGE_PINS}


def resolve(python: str, pins: dict[str, str], find_links: Path) -> dict[str, str]:
    """{name: version} of everything REQUIREMENTS need on the target Python (image packages included)."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if not uv:
        sys.exit("uv not found: run with the project's venv (.venv/bin/python; uv is a dev dependency)")
    with tempfile.TemporaryDirectory() as tmp:
        req, con, out = Path(tmp, "req.in"), Path(tmp, "constraints.txt"), Path(tmp, "resolved.txt")
        req.write_text("".join(f"{r}=={pins[norm(r.split('[')[0])]}\n" for r in REQUIREMENTS))
        constraints = {**{k: v for k, v in pins.items() if k not in IMAGE_PINS}, **base_pins(python, pins)}
        con.write_text("".join(f"{k}=={v}\n" for k, v in sorted(constraints.items())))
        run([uv, "pip", "compile", str(req), "-c", str(con), "--python-version", python,
             "--python-platform", "x86_64-manylinux_2_28", "--find-links", str(find_links), "--no-build",
             "--no-header", "--no-annotate", "--quiet", "-o", str(out)])
        resolved = {}
        for line in out.read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
            if m:
                resolved[norm(m.group(1))] = m.group(2)
    return resolved


def download(selected: dict[str, str], python: str, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    names = [k for k in selected if k != "deepspeed"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    run(cmd + [f"{k}=={selected[k]}" for k in names])
    wheels = []
    for k in names:
        found = [w for w in dest.glob("*.whl") if norm(w.name.split("-")[0]) == k and w.name.split("-")[1] == selected[k]]
        if len(found) != 1:
            sys.exit(f"expected one wheel of {k}=={selected[k]} in {dest}, found {[w.name for w in found]}")
        wheels.append(found[0])
    return wheels


def unpack_wheel(wheel: Path, site: Path) -> None:
    """What an installer puts in site-packages: purelib/platlib merged into the root; scripts,
    headers and data files are not needed from PYTHONPATH. Modes normalized to 755/644."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            name = info.filename
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                name = "/".join(parts[2:])
            target = site / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            target.chmod(0o755 if (info.external_attr >> 16) & 0o111 else 0o644)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def make_standins(site: Path) -> list[dict[str, str]]:
    """Replace each STANDINS library in av.libs by a stub exporting the symbols its users import."""
    libs = site / "av.libs"
    made = []
    for prefix, retval in STANDINS.items():
        (lib,) = [p for p in libs.iterdir() if p.name.startswith(prefix + "-")]
        defined = set(run(["nm", "-D", "--defined-only", "--format=posix", str(lib)]).stdout.split("\n"))
        defined = {line.split()[0] for line in defined if line.strip() and line.split()[1] in "TtWiVvDdBbRr"}
        users, wanted = [], set()
        for other in sorted(libs.iterdir()) + sorted((site / "av").rglob("*.so")):
            if other == lib or not is_elf(other):
                continue
            if lib.name in run(["readelf", "-d", str(other)]).stdout:
                users.append(other.name)
                undef = run(["nm", "-D", "--undefined-only", "--format=posix", str(other)]).stdout.split("\n")
                wanted |= {line.split()[0] for line in undef if line.strip()} & defined
        kinds = run(["nm", "-D", "--defined-only", "--format=posix", str(lib)]).stdout.split("\n")
        data = {line.split()[0] for line in kinds if line.strip() and line.split()[1] in "DdBbRrVv"} & wanted
        source = "/* stand-in for %s: %d symbols, never called by avssl */\n" % (lib.name, len(wanted))
        for sym in sorted(wanted):
            source += f"char {sym}[64];\n" if sym in data else f"long {sym}(void) {{ return {retval}; }}\n"
        with tempfile.TemporaryDirectory() as tmp:
            c = Path(tmp, "standin.c")
            c.write_text(source)
            size = lib.stat().st_size
            run(["gcc", "-shared", "-fPIC", "-O2", "-nostdlib", "-Wl,--build-id=none", f"-Wl,-soname,{lib.name}",
                 "-o", str(lib), str(c)])
        made.append({"library": f"av.libs/{lib.name}", "was_bytes": size, "now_bytes": lib.stat().st_size,
                     "symbols": sorted(wanted), "needed_by": users})
    return made


def strip_elves(site: Path) -> tuple[int, list[str]]:
    """`strip --strip-unneeded` on every ELF file; a file strip cannot handle stays as it was."""
    saved, failed = 0, []
    for path in sorted(p for p in site.rglob("*") if p.is_file() and is_elf(p)):
        before = path.stat().st_size
        mode = path.stat().st_mode
        proc = subprocess.run(["strip", "--strip-unneeded", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            failed.append(str(path.relative_to(site)))
            continue
        path.chmod(mode)
        saved += before - path.stat().st_size
    return saved, failed


def trim(site: Path) -> list[str]:
    removed = []
    for rel in TRIM:
        p = site / rel
        if p.exists():
            shutil.rmtree(p)
            removed.append(rel)
    static = site / "ray/dashboard/client/build/static"
    static.mkdir(parents=True, exist_ok=True)
    (static / ".keep").write_text("")  # a tar keeps an empty folder, but this makes it visible in listings
    return removed


def pack(root: Path, out: Path) -> None:
    """Reproducible tar.xz of root's contents: sorted, mtime 0, uid/gid 0, no owner names."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    paths = sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix())
    with lzma.open(tmp, "wb", format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, filters=XZ_FILTERS) as xz:
        with tarfile.open(fileobj=xz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for p in paths:
                info = tar.gettarinfo(str(p), arcname=p.relative_to(root).as_posix())
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                if info.isdir():
                    info.mode = 0o755
                    tar.addfile(info)
                elif info.isfile():
                    info.mode = 0o755 if p.stat().st_mode & 0o111 else 0o644
                    with open(p, "rb") as f:
                        tar.addfile(info, f)
                else:
                    sys.exit(f"unexpected file type in the bundle: {p}")
    os.replace(tmp, out)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", required=True, help="target Python version, e.g. 3.12 (the GPU image's) or 3.11")
    ap.add_argument("--out", required=True, help="archive to write, e.g. .bundle/avssl-gpu-py312.tar.xz")
    ap.add_argument("--cache", default=str(REPO / ".bundle/cache"), help="downloaded and built wheels (default .bundle/cache)")
    ap.add_argument("--keep-site", default=None, metavar="DIR", help="also leave the unpacked, trimmed tree here")
    args = ap.parse_args()
    t_start = time.perf_counter()
    cache, out = Path(args.cache).resolve(), Path(args.out).resolve()
    pins = lock_pins()

    t = time.perf_counter()
    ds_wheel = build_deepspeed_wheel(pins["deepspeed"], cache)
    log(f"deepspeed wheel {ds_wheel.name} ({time.perf_counter() - t:.0f} s)")

    t = time.perf_counter()
    resolved = resolve(args.python, pins, ds_wheel.parent)
    on_image = {k: v for k, v in resolved.items() if k in IMAGE_PACKAGES}
    dropped = {k: v for k, v in resolved.items() if k in NEVER_IMPORTED}
    selected = {k: v for k, v in sorted(resolved.items()) if k not in IMAGE_PACKAGES and k not in NEVER_IMPORTED}
    log(f"resolved {len(resolved)} packages for Python {args.python}: {len(on_image)} on the image, "
        f"{len(dropped)} never imported, {len(selected)} to carry ({time.perf_counter() - t:.0f} s)")

    t = time.perf_counter()
    wheels = download(selected, args.python, cache / f"wheels-py{args.python}") + [ds_wheel]
    wheel_bytes = sum(w.stat().st_size for w in wheels)
    log(f"{len(wheels)} wheels, {wheel_bytes / 1e6:.1f} MB ({time.perf_counter() - t:.0f} s)")

    with tempfile.TemporaryDirectory(prefix="avssl-bundle-") as tmp:
        root = Path(tmp)
        site = root / "site"
        t = time.perf_counter()
        for w in sorted(wheels, key=lambda w: w.name):
            unpack_wheel(w, site)
        unpacked = tree_bytes(site)
        removed = trim(site)
        standins = make_standins(site)
        stripped, strip_failed = strip_elves(site)
        trimmed = tree_bytes(site)
        log(f"unpacked {unpacked / 1e6:.1f} MB, trimmed to {trimmed / 1e6:.1f} MB (strip saved {stripped / 1e6:.1f} MB; "
            f"stand-ins for {', '.join(s['library'] for s in standins)}) ({time.perf_counter() - t:.0f} s)")
        manifest = {
            "python": args.python,
            "platforms": PLATFORMS,
            "packages": selected,
            "image_packages_used": on_image,
            "base_pins": base_pins(args.python, pins),
            "dropped_never_imported": {k: {"version": v, "why": NEVER_IMPORTED[k]} for k, v in dropped.items()},
            "trimmed": {k: TRIM[k] for k in removed},
            "standins": standins,
            "strip_failed": strip_failed,
            "wheel_bytes": wheel_bytes,
            "unpacked_bytes": unpacked,
            "trimmed_bytes": trimmed,
        }
        (root / "avssl-bundle.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if args.keep_site:
            keep = Path(args.keep_site)
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(root, keep, symlinks=True)
        t = time.perf_counter()
        pack(root, out)
        log(f"packed {out} in {time.perf_counter() - t:.0f} s")
    size = out.stat().st_size
    log(f"done: {len(wheels)} packages, {wheel_bytes / 1e6:.1f} MB of wheels, {unpacked / 1e6:.1f} MB unpacked, "
        f"{trimmed / 1e6:.1f} MB trimmed, archive {size / 2**20:.1f} MiB, sha256 {sha256(out)}, "
        f"{time.perf_counter() - t_start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
