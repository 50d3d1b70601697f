"""Fault matrix: one test per defect a fault and security probe found, each named for what it proves.

| defect                                                        | test                                                          |
| two drivers of one run corrupt each other                     | test_a_second_driver_of_the_same_run_refuses_naming_the_lock_and_its_holder |
| a dead driver's lock would block the run forever              | test_a_stale_run_lock_is_taken_over_with_a_message_and_released_at_exit |
| export and --init unpickle checkpoint files                   | test_export_and_init_refuse_a_checkpoint_carrying_a_pickle_payload |
| resume unpickles DeepSpeed's files                            | test_resume_loads_deepspeed_files_weights_only_and_refuses_a_payload |
| export takes the newest folder, even a partial one            | test_export_uses_the_newest_complete_checkpoint_and_names_the_partial_one |
| the local Ray instance listens on every interface             | test_the_local_ray_instance_listens_on_loopback_only |
| tracking credentials written into the model card and params   | test_tracking_credentials_never_reach_the_model_card_config_or_params |
| a found token is not sent; 401 reads as "cannot reach"        | test_job_token_is_found_sent_and_a_refusal_is_told_apart_from_no_server |
| `data inspect` crashes on damaged shards, `stats` drops silently | test_inspect_and_stats_name_the_damaged_shards_and_samples |
| `predict` tracebacks on mixed model sizes, pads short clips silently | test_predict_refuses_a_release_of_two_model_sizes_and_warns_when_padding_a_short_clip |
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from avssl import AvsslError
from avssl.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/pretrain/tiny.yaml"


def sets(*items: str) -> list[str]:
    return [w for item in items for w in ("--set", item)]


# ----------------------------------------------------------------------------- run lock


def test_a_second_driver_of_the_same_run_refuses_naming_the_lock_and_its_holder(tmp_path, capsys):
    """Defect: two `avssl pretrain` of the same trainer.name and storage_path ran together and wrote
    over each other's checkpoints. Now a live run's lock makes the second one exit 2 naming the lock
    file and the holder's pid and host, and leaves the holder's lock in place."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = tmp_path / "runs" / "twin" / "avssl" / "run.lock"
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": time.time(), "token": "a"}))
        code = main(["pretrain", "--config", str(TINY),
                     *sets(f"data.corpus={tmp_path / 'no-corpus'}", f"trainer.storage_path={tmp_path / 'runs'}", "trainer.name=twin")])
        err = capsys.readouterr().err.replace("\n", "")
        assert code == 2
        assert str(lock) in err and f"pid {holder.pid}" in err and "already running" in err
        assert json.loads(lock.read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_run_lock_is_taken_over_with_a_message_and_released_at_exit(tmp_path, caplog):
    """Defect (the lock's own failure mode): a driver that died must not block its run forever. A lock
    whose process is gone on this host, or whose heartbeat is older than the timeout (a holder on
    another host), is taken over with a warning naming it; the new holder's lock is removed at exit."""
    from avssl.cluster.runlock import RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": time.time(), "token": "old"}))
    with caplog.at_level(logging.WARNING, "avssl.runlock"), RunLock(lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "stale" in caplog.text and str(lock) in caplog.text and "no longer running" in caplog.text
    assert not lock.exists()

    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0, "token": "remote"}))
    os.utime(lock, (time.time() - 120, time.time() - 120))
    with RunLock(lock, timeout_s=60):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0, "token": "remote"}))
    with pytest.raises(AvsslError, match="host elsewhere"):  # a fresh heartbeat on another host is respected
        RunLock(lock, timeout_s=60).acquire()


# ----------------------------------------------------------------------------- no unpickling


class _Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _tiny_run(root: Path, steps: tuple[int, ...], registered: tuple[int, ...]) -> Path:
    """A run directory as `avssl pretrain` leaves it: config, Ray's snapshot, checkpoint folders
    (without their DeepSpeed files, which each test writes)."""
    from avssl.cluster.config import PretrainRecipe
    from avssl.config import load_config, save_resolved

    run = root / "run"
    save_resolved(load_config(PretrainRecipe, TINY), run / "avssl" / "config.yaml")
    for step in steps:
        ckpt = run / f"checkpoint_{step:09d}"
        (ckpt / "ds").mkdir(parents=True)
        (ckpt / "train_state.json").write_text(json.dumps({"step": step}))
    results = [{"checkpoint_dir_name": f"checkpoint_{s:09d}", "metrics": {"step": s}} for s in registered]
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoint_results": results}))
    return run


@pytest.mark.parametrize("poisoned", ["zero0_model_file", "zero_optimizer_file"])
def test_export_and_init_refuse_a_checkpoint_carrying_a_pickle_payload(tmp_path, capsys, poisoned):
    """Defect: `avssl export` (torch.load weights_only=False) and DeepSpeed's consolidation, also
    reached by `finetune --init RUN_DIR`, unpickled checkpoint files, running any code they carry.
    Now both refuse with a clear error naming the file, and the payload never runs."""
    from avssl.finetune.runner import resolve_init

    marker = tmp_path / "PWNED"
    run = _tiny_run(tmp_path, (4,), (4,))
    ds = run / "checkpoint_000000004" / "ds"
    if poisoned == "zero0_model_file":
        torch.save({"module": {"w": torch.zeros(1)}, "x": _Payload(marker)}, ds / "mp_rank_00_model_states.pt")
        bad = ds / "mp_rank_00_model_states.pt"
    else:
        torch.save({"module": {}, "buffer_names": [], "param_shapes": [], "shared_params": {}}, ds / "mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {"x": _Payload(marker)}}, ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        bad = ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt"

    code = main(["export", str(run), "--out", str(tmp_path / "release")])
    err = capsys.readouterr().err.replace("\n", "")
    assert code == 2 and "refused to load" in err and bad.name in err
    assert not marker.exists() and not (tmp_path / "release").exists()

    with pytest.raises(AvsslError, match="refused to load"):
        resolve_init(str(run), tmp_path / "init")
    assert not marker.exists()


RESUME_SCRIPT = """
import json, os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
from pathlib import Path
import ray.train
from avssl import AvsslError
from avssl.cluster.config import DeepSpeedConfig, OptimConfig
from avssl.cluster.engine import build_engine
from avssl.cluster.train import TrainState, restore_checkpoint
from test_faults import _Payload

# What Ray Train hands a restarted worker: the run's registered checkpoint directory.
ray.train.get_checkpoint = lambda: ray.train.Checkpoint.from_directory(sys.argv[1])

def engine():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    return build_engine(model, DeepSpeedConfig(zero_stage=1), OptimConfig(), micro_batch=2, world_size=1,
                        absolute_lr=1e-3, total_steps=10, device=torch.device("cpu"))

eng, _, sched, _ = engine()
eng.backward(eng(torch.randn(2, 4)).sum()); eng.step()
eng.save_checkpoint(sys.argv[1], tag="ds")
Path(sys.argv[1], "train_state.json").write_text(json.dumps(TrainState(step=1).state_dict()))
fresh, _, fresh_sched, _ = engine()
state = TrainState()
assert restore_checkpoint(fresh, state) and state.step == 1
assert all(torch.equal(a, b) for a, b in zip(eng.module.state_dict().values(), fresh.module.state_dict().values()))
assert fresh_sched.last_epoch == sched.last_epoch == 1
optim = Path(sys.argv[1], "ds", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
states = torch.load(optim, weights_only=False)  # the test's own file: plants the payload
states["x"] = _Payload(Path(sys.argv[2]))
torch.save(states, optim)
try:
    restore_checkpoint(engine()[0], TrainState())
except AvsslError as exc:
    print("REFUSED", exc)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resume_loads_deepspeed_files_weights_only_and_refuses_a_payload(tmp_path):
    """Defect: resume went through DeepSpeed's checkpoint engine, which unpickles. Now a worker's
    restore reads model, optimizer, schedule and step from real ZeRO-1 files weights-only, and an
    optimizer file carrying a payload is refused without running it."""
    marker = tmp_path / "PWNED"
    proc = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "ckpt"), str(marker), str(_free_port())],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED" in proc.stdout and "refused to load" in proc.stdout
    assert not marker.exists()


# ----------------------------------------------------------------------------- exact checkpoint selection


def test_export_uses_the_newest_complete_checkpoint_and_names_the_partial_one(tmp_path, capsys, caplog):
    """Defect: "latest checkpoint" was the newest folder, so after a save cut short export picked the
    partial checkpoint and crashed. Now export, resume and --init take the newest checkpoint Ray
    registered that holds its files, and the partial one is named in a warning."""
    from avssl.cluster.checkpoint import latest_checkpoint
    from avssl.cluster.config import PretrainRecipe
    from avssl.config import load_config
    from avssl.pretrain.config import build_model

    run = _tiny_run(tmp_path, (4, 8), (4,))
    r = load_config(PretrainRecipe, TINY)
    torch.save({"module": build_model(r.model, r.masking, r.loss).state_dict()},
               run / "checkpoint_000000004" / "ds" / "mp_rank_00_model_states.pt")
    (run / "checkpoint_000000008" / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 cut short")

    with caplog.at_level(logging.WARNING, "avssl.checkpoint"):
        assert latest_checkpoint(run) == run / "checkpoint_000000004"
    assert "checkpoint_000000008" in caplog.text and "partial" in caplog.text
    code = main(["export", str(run), "--out", str(tmp_path / "release")])
    out = capsys.readouterr().out.replace("\n", "")
    assert code == 0 and "checkpoint_000000004" in out
    assert (tmp_path / "release" / "config.json").is_file()
    with pytest.raises(AvsslError, match="partial checkpoint"):  # named on its own, it is refused clearly
        latest_checkpoint(run / "checkpoint_000000008")


# ----------------------------------------------------------------------------- safe network defaults

RAY_BIND_SCRIPT = """
import psutil, ray
from avssl.cluster.launch import init_ray
init_ray(None)
me = psutil.Process()
listening = []
for p in [me] + me.children(recursive=True):
    try:
        listening += [(p.name(), c.laddr.ip) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
print("NODE", ray.util.get_node_ip_address())
print("LISTEN", sorted(set(listening)))
ray.shutdown()
"""


def test_the_local_ray_instance_listens_on_loopback_only(tmp_path):
    """Defect: the Ray instance `avssl pretrain` starts on its own listened on every interface (Ray
    runs any code it is sent), its dashboard and node on the machine's network address. Now every
    server of the local instance listens on the loopback address only."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    proc = subprocess.run([sys.executable, "-c", RAY_BIND_SCRIPT], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    node = next(line for line in proc.stdout.splitlines() if line.startswith("NODE")).split()[1]
    listening = eval(next(line for line in proc.stdout.splitlines() if line.startswith("LISTEN"))[len("LISTEN "):])
    assert node == "127.0.0.1"
    assert listening, "found no listening socket to check"
    exposed = [(name, ip) for name, ip in listening if ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_tracking_credentials_never_reach_the_model_card_config_or_params():
    """Defect: an MLflow URI with user:password@ or a token parameter was written verbatim into the
    release's model card and logged as an MLflow param. Now both get the URI with the credentials
    replaced by ***, while host, port, path and other parameters stay readable."""
    from avssl.cluster.config import PretrainRecipe
    from avssl.cluster.export import model_card
    from avssl.cluster.tracking import public_recipe, redact_uri
    from avssl.config import flatten, load_config

    uri = "https://alice:s3cr3t@mlflow.example.com:5000/track?token=T0K3N&experiment=7&access_token=AXS"
    assert redact_uri(uri) == "https://***@mlflow.example.com:5000/track?token=***&experiment=7&access_token=***"
    assert redact_uri("sqlite:////abs/runs/mlflow.db") == "sqlite:////abs/runs/mlflow.db"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    recipe = load_config(PretrainRecipe, TINY, [f"mlflow.tracking_uri={uri}"])
    card = model_card(recipe, Path("runs/x/checkpoint_000000004"), {"loss": 0.5})
    params = json.dumps(flatten(public_recipe(recipe)))
    for secret in ("s3cr3t", "T0K3N", "AXS", "alice"):
        assert secret not in card and secret not in params
    assert "mlflow.example.com:5000" in card and recipe.mlflow.tracking_uri == uri  # the run itself still connects


# ----------------------------------------------------------------------------- job submission token


class _Answer401(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        _Answer401.seen.append(self.headers.get("Authorization", ""))
        self.send_response(401)
        self.end_headers()
        self.wfile.write(b"Unauthorized: Missing authentication token")

    def log_message(self, *args):
        pass


def test_job_token_is_found_sent_and_a_refusal_is_told_apart_from_no_server(tmp_path, monkeypatch, capsys):
    """Defect: a token in ~/.ray/auth_token or RAY_AUTH_TOKEN was not sent unless RAY_AUTH_MODE=token was
    also set, and a server refusing the token read as "cannot reach". Now every source is found (in
    Ray's order, plus --token-file), RAY_AUTH_MODE=token is set, the token goes out as a bearer
    header, HTTP 401/403 says the server refused the token, a dead address says it cannot be
    reached, and --token warns that it exposes the secret."""
    from avssl.cluster import submit as jobs

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    (tmp_path / "tok").write_text("from-file\n")
    assert jobs.find_token(env={}, home=home) == ("from-home", str(home / ".ray" / "auth_token"))
    assert jobs.find_token(env={"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}, home=home)[0] == "from-file"
    assert jobs.find_token(env={"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}, home=home)[0] == "from-env"
    assert jobs.find_token(token_file=tmp_path / "tok", env={"RAY_AUTH_TOKEN": "from-env"}, home=home)[0] == "from-file"
    assert jobs.find_token("flag", env={"RAY_AUTH_TOKEN": "from-env"}, home=home)[0] == "flag"
    assert jobs.find_token(env={}, home=tmp_path) == (None, None)
    with pytest.raises(AvsslError, match="not found"):
        jobs.find_token(env={"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=home)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer401)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    try:
        with pytest.raises(AvsslError, match="refused the token") as refused:
            jobs.client(address)
        assert str(home / ".ray" / "auth_token") in str(refused.value)
        assert os.environ.get("RAY_AUTH_MODE") == "token"
        assert "Bearer from-home" in _Answer401.seen
        assert main(["jobs", "list", "--address", address, "--token", "visible"]) == 2
        err = capsys.readouterr().err.replace("\n", "")
        assert "refused the token" in err and "--token" in err and "ps" in err and "--token-file" in err
    finally:
        server.shutdown()
    with pytest.raises(AvsslError, match="cannot reach") as unreachable:
        jobs.client(f"http://127.0.0.1:{_free_port()}")
    assert "refused" not in str(unreachable.value)


# ----------------------------------------------------------------------------- damaged corpora


def test_inspect_and_stats_name_the_damaged_shards_and_samples(tmp_path, capsys):
    """Defect: `avssl data inspect` ended in a traceback on a truncated or random-bytes shard, and
    `avssl data stats` dropped unreadable clips without a word. Now inspect lists every damaged shard
    and sample by name with counts and exits 1; stats completes and names what it skipped."""
    from avssl.data.features import FeatureConfig
    from avssl.data.shards import CorpusWriter, ShardConfig
    from avssl.data.stats import compute_stats
    from test_data_pipeline import make_clip

    corpus = tmp_path / "corpus"
    with CorpusWriter(corpus, ShardConfig(max_count=2), dataset="test") as w:
        for i in range(8):
            w.write(make_clip(i, video=False))
    compute_stats(corpus, FeatureConfig(num_mel_bins=32))
    whole = (corpus / "train-000001.tar").read_bytes()
    (corpus / "train-000001.tar").write_bytes(whole[: len(whole) // 2])  # truncated mid-member
    (corpus / "train-000002.tar").write_bytes(np.random.default_rng(0).bytes(20000))  # not a tar at all
    with tarfile.open(corpus / "train-000003.tar", "a") as tar:  # one sample whose audio is garbage
        info = tarfile.TarInfo("spk9/garbage.json")
        meta = json.dumps(make_clip(9, video=False).meta.to_dict()).encode()
        info.size = len(meta)
        tar.addfile(info, __import__("io").BytesIO(meta))
        info = tarfile.TarInfo("spk9/garbage.flac")
        info.size = 9
        tar.addfile(info, __import__("io").BytesIO(b"not audio"))

    with pytest.raises(SystemExit) as exit_:
        main(["data", "inspect", str(corpus), "--plot", str(tmp_path / "p.png")])
    printed = capsys.readouterr()
    err = printed.err.replace("\n", "")
    assert exit_.value.code == 1 and "Traceback" not in printed.out + printed.err
    assert "train-000001.tar" in err and "train-000002.tar" in err and "2 unreadable shards" in err
    assert (tmp_path / "p.png").is_file()

    assert main(["data", "stats", str(corpus), "--set", "features.num_mel_bins=32"]) == 0
    out = capsys.readouterr().out.replace("\n", "")
    assert "skipped" in out and "train-000001.tar" in out and "train-000002.tar" in out and "spk9/garbage" in out


# ----------------------------------------------------------------------------- predict


def _release(out: Path, arch: str) -> Path:
    """A finetuned emotion release (random weights) laid out as `avssl finetune` writes it."""
    from safetensors.torch import save_file

    from avssl.data.features import FeatureConfig
    from avssl.finetune.config import HeadConfig
    from avssl.finetune.heads import TaskModel
    from avssl.pretrain.modeling import AVViTModel
    from avssl.pretrain.registry import avvit_config

    cfg = avvit_config(arch, audio_num_mel_bins=64, audio_num_frames=98, video_image_size=32, video_num_frames=2)
    model = TaskModel(AVViTModel(cfg), HeadConfig(task="emotion", num_classes=3, modalities=["audio"]))
    model.backbone.save_pretrained(out / "backbone", safe_serialization=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("backbone.")},
              out / "head.safetensors")
    (out / "head.json").write_text(model.cfg.model_dump_json())
    (out / "labels.json").write_text(json.dumps(["ANG", "HAP", "SAD"]))
    stats = {"mean": 0.0, "std": 1.0, "num_mel_bins": 64, "frame_shift_ms": 10.0, "frame_length_ms": 25.0,
             "norm_std_scale": 2.0, "num_clips": 1}
    features = FeatureConfig(num_mel_bins=64, image_size=32, num_frames=2).model_dump(mode="json")
    (out / "avssl_features.json").write_text(json.dumps({"features": features, "fbank_stats": stats, "clip_seconds": 1.0,
                                                         "modalities": ["audio"]}))
    return out


def test_predict_refuses_a_release_of_two_model_sizes_and_warns_when_padding_a_short_clip(tmp_path, capsys, caplog):
    """Defect: a release whose head came from another model size ended `avssl predict` in a
    traceback, and a 5 ms clip was zero-padded to the 1 s window without a word. Now the first is a
    clear error naming the release and the widths, the second a warning giving the padding used."""
    import soundfile as sf

    tiny = _release(tmp_path / "tiny", "avvit_tiny_patch16")
    small = _release(tmp_path / "small", "avvit_small_patch16")
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny, mixed)
    shutil.rmtree(mixed / "backbone")
    shutil.copytree(small / "backbone", mixed / "backbone")
    clip, short = tmp_path / "clip.wav", tmp_path / "short.wav"
    sf.write(clip, (0.1 * np.sin(np.arange(16000) / 10)).astype("float32"), 16000)
    sf.write(short, (0.1 * np.sin(np.arange(80) / 10)).astype("float32"), 16000)  # 5 ms

    assert main(["predict", str(clip), "--task", "emotion", "--checkpoint", str(mixed), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert str(mixed) in err and "another model size" in err and "192" in err and "Traceback" not in err

    with caplog.at_level(logging.WARNING, "avssl.inference"):
        assert main(["predict", str(clip), str(short), "--task", "emotion", "--checkpoint", str(tiny), "--device", "cpu"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "avssl.inference"]
    assert len(warned) == 1 and "short.wav" in warned[0] and "5 ms" in warned[0] and "0.995 s" in warned[0]
