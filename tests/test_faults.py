"""Fault matrix: one test per defect a fault and security probe found, each named for what it proves.

| defect                                                        | test                                                          |
| two drivers of one run corrupt each other                     | test_a_second_driver_of_the_same_run_refuses_naming_the_lock_and_its_holder |
| a dead driver's lock would block the run forever              | test_a_stale_run_lock_is_taken_over_with_a_message_and_released_at_exit |
| export and --init unpickle checkpoint files                   | test_export_and_init_refuse_a_checkpoint_carrying_a_pickle_payload |
| resume unpickles DeepSpeed's files                            | test_resume_loads_deepspeed_files_weights_only_and_refuses_a_payload |
| export takes the newest folder, even a partial one            | test_export_uses_the_newest_complete_checkpoint_and_names_the_partial_one |
| the local Ray instance listens on every interface; its end waits ~4 s on processes that cannot hear SIGTERM | test_the_local_ray_instance_listens_on_loopback_only_and_ends_whole |
| tracking credentials written into the model card and params   | test_tracking_credentials_never_reach_the_model_card_config_or_params |
| a found token is not sent; 401 reads as "cannot reach"        | test_job_token_is_found_sent_and_a_refusal_is_told_apart_from_no_server |
| `data inspect` crashes on damaged shards, `stats` drops silently | test_inspect_and_stats_name_the_damaged_shards_and_samples |
| `predict` tracebacks on mixed model sizes, pads short clips silently | test_predict_refuses_a_release_of_two_model_sizes_and_warns_when_padding_a_short_clip |
| skipped samples counted per re-read, per window, never in the console | test_skipped_samples_are_counted_once_each_across_epochs_and_resume_and_shown_everywhere |
| the console line has no elapsed time or ETA                   | test_the_progress_line_carries_step_loss_rate_elapsed_and_eta_once_per_log_step |
| Ray prints an ERROR line about its PreemptionWatcher on every run | test_rays_preemption_watcher_false_alarm_is_dropped_and_other_ray_errors_are_kept |
| registered model versions carry no description, tags or signature | test_a_registered_model_version_has_a_description_tags_and_an_input_signature |
| Ctrl-C trains on, exits 1 silently, resumes from an older step  | test_cluster_e2e.py::test_ctrl_c_then_sigterm_to_the_process_group_checkpoint_and_the_resumes_are_exact |
| SIGTERM to the process group ends in 'Failed to connect to GCS' | test_cluster_e2e.py::test_ctrl_c_then_sigterm_to_the_process_group_checkpoint_and_the_resumes_are_exact |
| a full disk: restarts, a traceback, a partial checkpoint, RUNNING | test_a_full_disk_at_checkpoint_time_stops_at_once_keeping_the_previous_checkpoint |
| no readable shard: every restart spent, then a traceback        | test_a_corpus_with_no_readable_shard_stops_before_any_worker_starts |
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import os
import re
import shutil
import signal
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
print("TRAIN", *(__import__("os").environ.get(k) for k in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")))
print("LISTEN", sorted(set(listening)))
seen = ray.get(ray.remote(lambda: __import__("os").environ.get("RAY_ADDRESS")).remote())
print("ADDRESS", ray.get_runtime_context().gcs_address, seen, __import__("os").environ.get("RAY_ADDRESS"))
instance = me.children(recursive=True)  # GCS, raylet, its agents and workers, dashboard, monitors
ray.shutdown()


def running(p):
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


for _ in range(50):  # SIGKILLed: gone within moments
    left = [p.pid for p in instance if running(p)]
    if not left:
        break
    __import__("time").sleep(0.1)
print("INSTANCE", len(instance), "LEFT", left)
"""


def test_the_local_ray_instance_listens_on_loopback_only_and_ends_whole(tmp_path):
    """Defect: the Ray instance `avssl pretrain` starts on its own listened on every interface (Ray
    runs any code it is sent), its dashboard and node on the machine's network address. Now every
    server of the local instance listens on the loopback address only. Ending it ends every one of
    its processes, the raylet's agents and workers included."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") and not k.startswith("RAY_TRAIN_")}
    proc = subprocess.run([sys.executable, "-c", RAY_BIND_SCRIPT], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    node = next(line for line in proc.stdout.splitlines() if line.startswith("NODE")).split()[1]
    listening = eval(next(line for line in proc.stdout.splitlines() if line.startswith("LISTEN"))[len("LISTEN "):])
    assert node == "127.0.0.1"
    # Ray Train's settings for one machine, which the driver hands its controller: workers polled
    # every quarter second (Ray's 2 s default is sized for clusters), no watcher for node drains.
    assert next(line for line in proc.stdout.splitlines() if line.startswith("TRAIN")).split()[1:] == ["0.25", "0"]
    assert listening, "found no listening socket to check"
    exposed = [(name, ip) for name, ip in listening if ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"listening beyond loopback: {exposed}"
    # Its processes know its address (Ray Train's placement-group cleaner asks the state API with no
    # address of its own: a guess among several instances on the machine picks another), and the
    # driver's environment is left as it was.
    gcs, seen, driver = next(line for line in proc.stdout.splitlines() if line.startswith("ADDRESS")).split()[1:]
    assert gcs.startswith("127.0.0.1:") and seen == gcs and driver == "None"
    ended = next(line for line in proc.stdout.splitlines() if line.startswith("INSTANCE")).split()
    assert int(ended[1]) >= 4 and ended[3:] == ["[]"], ended


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


# ----------------------------------------------------------------------------- a damaged corpus, end to end

DAMAGED = ("train-000002.tar", "train-000003.tar:spk9/garbage")  # what the fixture breaks, as the run names it


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory) -> dict:
    """One tiny pretraining (16 steps: 5 epochs of 3 steps and a bit) on a corpus with one shard of
    random bytes and one sample of garbage audio, registered in MLflow: shared by the tests below."""
    from avssl.config import load_config
    from avssl.data.corpus import CorpusRecipe, synthesize_corpus
    from avssl.data.shards import iter_raw_samples

    root = tmp_path_factory.mktemp("damaged")
    corpus = root / "tiny"
    synthesize_corpus(load_config(CorpusRecipe, REPO / "configs/data/tiny.yaml"), corpus)
    (corpus / "train-000002.tar").write_bytes(np.random.default_rng(0).bytes(20000))  # rank 0 reads it
    meta = next(iter_raw_samples([corpus / "train-000000.tar"]))["json"]
    with tarfile.open(corpus / "train-000003.tar", "a") as tar:  # rank 1 reads it
        for ext, data in (("json", meta), ("flac", b"not audio")):
            info = tarfile.TarInfo(f"spk9/garbage.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AVSSL_VERBOSE")}
    env.update(AVSSL_PROGRESS="0", PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    cmd = [sys.executable, "-m", "avssl.cli", "pretrain", "--config", str(TINY),
           *sets(f"data.corpus={corpus}", f"trainer.storage_path={root / 'runs'}", "trainer.name=damaged",
                 "trainer.total_steps=16", "mlflow.register_model=avssl-faults")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return {"out": out, "stdout": proc.stdout, "corpus": corpus, "run_dir": root / "runs" / "damaged",
            "uri": f"sqlite:///{root / 'runs' / 'mlflow.db'}"}


def _mlflow_run(damaged_run: dict):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(damaged_run["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("avssl-tests").experiment_id],
                                filter_string="tags.`avssl.run_name` = 'damaged'")
    return client, run


@pytest.mark.slow
def test_skipped_samples_are_counted_once_each_across_epochs_and_resume_and_shown_everywhere(damaged_run):
    """Defect: each log window's skipped count went to MLflow, the total lived only in the checkpoint,
    the summary showed the last window, and a damaged shard re-read every epoch (or after a restart)
    counted again. Now the run keeps the distinct bad samples (shard:key, or the shard) in its train
    state: MLflow's skipped_samples, the console line and the summary say 2 after 5 epochs that met
    them again and again, the names are an MLflow tag, and a resumed state does not count them twice."""
    from avssl.cluster.train import TrainState

    client, run = _mlflow_run(damaged_run)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "skipped_samples")}
    reads = sum(m.value for m in client.get_metric_history(run.info.run_id, "skipped_reads"))
    assert sorted(history) == [4, 8, 12, 16] and history[16] == 2
    assert reads > 4 and run.data.metrics["epoch"] >= 2  # both were met again, in later epochs too
    assert run.data.tags["avssl.skipped_samples"].splitlines() == sorted(DAMAGED)  # ranks' names merge in rank order
    state = json.loads((damaged_run["run_dir"] / "checkpoint_000000016" / "train_state.json").read_text())
    assert state["skipped_samples"] == 2 and sorted(state["bad_samples"]) == sorted(DAMAGED)
    summary = damaged_run["stdout"].replace("\n", " ")
    assert "skipped samples: 2 distinct" in summary and all(name in summary for name in DAMAGED)
    assert "| skipped 2 |" in [line for line in damaged_run["out"].splitlines() if "step 16/16" in line][0]

    resumed = TrainState()  # what a restarted worker reads back, meeting both again
    resumed.load_state_dict(state)
    assert resumed.add_skipped([DAMAGED[1], DAMAGED[0], DAMAGED[1]]) == [] and resumed.skipped_samples == 2
    assert resumed.add_skipped(["train-000001.tar:spk0/x"]) == ["train-000001.tar:spk0/x"] and resumed.skipped_samples == 3


@pytest.mark.slow
def test_the_progress_line_carries_step_loss_rate_elapsed_and_eta_once_per_log_step(damaged_run):
    """Defect: the console line had step, losses and samples/s but no elapsed time or ETA. Now rank 0
    (only) prints, at every log step, step/total, loss, samples/s, skipped, elapsed and ETA; on a
    terminal the driver draws those lines in place instead of scrolling them."""
    from avssl.cluster.console import ForwardedOutput

    pattern = re.compile(r"step (\d+)/16 \| loss \d+\.\d{4} .*\| \d+\.\d samples/s \| skipped \d+ \| "
                         r"elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$")
    steps = [int(m[1]) for line in damaged_run["out"].splitlines() if (m := pattern.search(line))]
    assert steps == [4, 8, 12, 16], steps
    assert re.search(r"step 16/16 .* ETA 0:00:00$", damaged_run["out"], re.M)

    printed: list[list[str]] = []
    console = ForwardedOutput(lambda data: printed.append(data["lines"]), verbose=False, live=True)
    line = "step 4/16 | loss 2.9074 | 11.7 samples/s | skipped 0 | elapsed 0:00:02 | ETA 0:00:08"
    console({"lines": [line, "starting at step 0/16"], "is_err": True, "pid": 1})
    assert printed == [["starting at step 0/16"]] and console.live.last == (4, 16)
    console({"lines": [line.replace("step 4/16", "step 16/16")], "is_err": True, "pid": 1})
    assert printed == [["starting at step 0/16"]] and console.live.progress is None  # closed at the total


# The line Ray 2.60's core worker logs from Ray Train's controller on every run (see cluster/console.py),
# without its closing link.
WATCHER_ALARM = ("[2026-12-04 19:53:51,662 E 10738 10767] core_worker.cc:2465: Actor with class name: "
                 "'PreemptionWatcher' and ID: 'c1c51176a0c080ba5773012b01000000' has constructor arguments in the "
                 "object store and max_restarts > 0. If the arguments in the object store go out of scope or are "
                 "lost, the actor restart will fail.")


@pytest.mark.slow
def test_rays_preemption_watcher_false_alarm_is_dropped_and_other_ray_errors_are_kept(damaged_run):
    """Defect: every run printed an ERROR line from Ray Core about Ray Train's PreemptionWatcher actor
    (a warning that cannot apply: its arguments are the workers' handles). Now that one line is dropped
    from the forwarded output unless `avssl -v`; the same warning about another actor, and any other
    error, still reach the console."""
    from avssl.cluster.console import ForwardedOutput

    assert "PreemptionWatcher" not in damaged_run["out"]
    assert "(TrainController pid=" in damaged_run["out"]  # the controller's other output still comes through

    other = WATCHER_ALARM.replace("'PreemptionWatcher'", "'MyActor'")
    died = "[2026-12-04 19:53:52,001 E 10738 10767] core_worker.cc:812: The worker died unexpectedly."
    for verbose, kept in ((False, [other, died]), (True, [WATCHER_ALARM, other, died])):
        printed: list[list[str]] = []
        ForwardedOutput(lambda data: printed.append(data["lines"]), verbose=verbose, live=False)(
            {"lines": [WATCHER_ALARM, other, died], "is_err": True, "pid": 2})
        assert printed == [kept]
    printed = []
    ForwardedOutput(lambda data: printed.append(data["lines"]), verbose=False, live=False)({"lines": [WATCHER_ALARM]})
    assert printed == []  # nothing left: nothing printed, not an empty prefix line


@pytest.mark.slow
def test_the_console_carries_no_framework_dumps_and_the_summary_opens_mlflow(damaged_run):
    """Defect: DeepSpeed's and Ray Train's INFO messages (engine set-up, configs, a TrainingReport from
    every rank at every checkpoint) filled the console before and between avssl's lines, and the
    summary did not say how to see the run. Now their warnings only reach the console (`avssl -v`
    brings the rest back), no traceback appears in a run that succeeds (Ray Train's placement-group
    cleaner once failed to find its instance among several on the machine), and the summary ends
    with the command that opens the MLflow UI on the run's store."""
    lines = damaged_run["out"].splitlines()
    dumps = [line for line in lines if "TrainingReport" in line or "[INFO]" in line or "Traceback" in line]
    assert not dumps, "\n".join(dumps[:20])
    first = next(i for i, line in enumerate(lines) if "starting at step 0/16" in line)
    assert sum("DeepSpeed" in line or "ray.train" in line for line in lines[:first]) <= 8, "\n".join(lines[:first])
    summary = " ".join(damaged_run["stdout"].split())
    assert "MLflow UI: " in summary and f"mlflow ui --backend-store-uri {damaged_run['uri']}" in summary


@pytest.mark.slow
def test_a_registered_model_version_has_a_description_tags_and_an_input_signature(damaged_run, tmp_path):
    """Defect: `mlflow.register_model` created versions with no description, no tags and no signature.
    Now each version says architecture, parameters, corpus and its index hash, steps, objectives and
    final losses, is tagged with them, and its MLmodel gives the input signature the backbone takes."""
    import hashlib

    import mlflow

    client, run = _mlflow_run(damaged_run)
    (version,) = client.search_model_versions("name='avssl-faults'")
    version = client.get_model_version("avssl-faults", version.version)
    corpus_hash = hashlib.sha256((damaged_run["corpus"] / "index.json").read_bytes()).hexdigest()
    assert version.run_id == run.info.run_id
    for fact in ("avvit_tiny_patch16", "parameters", "16 steps", str(damaged_run["corpus"]), corpus_hash,
                 "objectives: loss_contrastive, loss_rec_audio, loss_rec_video", f"loss {run.data.metrics['loss']:.4g}"):
        assert fact in version.description, (fact, version.description)
    assert version.tags["arch"] == "avvit_tiny_patch16" and version.tags["steps"] == "16"
    assert version.tags["corpus_hash"] == corpus_hash
    assert version.tags["objectives"] == "loss_contrastive,loss_rec_audio,loss_rec_video"  # segment weight is 0
    assert int(version.tags["parameters"]) > 1_000_000

    # The files `models:/avssl-faults/VERSION` resolves to, fetched without setting this process's tracking URI.
    files = mlflow.artifacts.download_artifacts(client.get_model_version_download_uri("avssl-faults", version.version),
                                                dst_path=str(tmp_path), tracking_uri=damaged_run["uri"])
    signature = mlflow.models.Model.load(files).signature
    inputs = {spec.name: (spec.type, spec.shape) for spec in signature.inputs.inputs}
    assert inputs == {"audio": (np.dtype("float32"), (-1, 98, 64)), "video": (np.dtype("float32"), (-1, 2, 3, 32, 32))}


# ----------------------------------------------------------------------------- clean stops

@pytest.fixture(scope="module")
def stop_corpus(tmp_path_factory) -> Path:
    from avssl.config import load_config
    from avssl.data.corpus import CorpusRecipe, synthesize_corpus

    out = tmp_path_factory.mktemp("stops") / "tiny"
    synthesize_corpus(load_config(CorpusRecipe, REPO / "configs/data/tiny.yaml"), out)
    return out


def _pretrain_cmd(corpus: Path, storage: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "avssl.cli", "pretrain", "--config", str(TINY),
            *sets(f"data.corpus={corpus}", f"trainer.storage_path={storage}", f"trainer.name={name}", *extra)]


def _run_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AVSSL_VERBOSE")}
    env.update(AVSSL_PROGRESS="0", PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    return env


def _signal_once_training(cmd: list[str], run_dir: Path, send) -> tuple[int, str, dict]:
    """Start `cmd` in a process group of its own (as a terminal starts a job), wait
    until rank 0 has restored and begun training (its placement record), call `send(pid)`, and
    return the exit status, the output and that placement record."""
    placement = run_dir / "avssl" / "placement" / "rank_0.json"
    placement.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_run_env(), cwd=REPO,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    end = time.monotonic() + 300
    while not placement.is_file():
        assert proc.poll() is None and time.monotonic() < end, "".join(lines)[-4000:]
        time.sleep(0.3)
    started = json.loads(placement.read_text())
    send(proc.pid)
    proc.wait(timeout=300)
    reader.join(timeout=30)
    return proc.returncode, "".join(lines), started


STOPPED = re.compile(r"^stopped at step (\d+) on (SIG\w+); checkpoint saved \((\S+)\); resume with: (avssl pretrain .*)$")


def _stopped_line(out: str) -> re.Match:
    last = [line for line in out.splitlines() if line.strip()][-1]
    match = STOPPED.match(last)
    assert match, out[-4000:]
    return match


def _run_status(storage: Path, name: str, uri: str | None = None) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri or f"sqlite:///{storage}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("avssl-tests").experiment_id],
                                filter_string=f"tags.`avssl.run_name` = '{name}'")
    return run.info.status


class _OneFileEngine:
    """What `save_engine_checkpoint` drives: DeepSpeed's checkpoint engine writing one 4 MB file."""

    def __init__(self) -> None:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self.checkpoint_engine = TorchCheckpointEngine()
        self.checkpoint_engine.zipfile_serialization = True  # DeepSpeed's default, which avssl's engines keep

    def save_checkpoint(self, directory: str, tag: str) -> None:
        Path(directory, tag).mkdir(parents=True)
        self.checkpoint_engine.save({"w": torch.zeros(1_000_000)}, str(Path(directory, tag, "model_states.pt")))


# Runs `avssl pretrain` on a tmpfs of $1 mounted at $2, in a mount namespace of its own (a user
# namespace maps this user to its root, so no privilege is needed), then copies what the run left
# there to $OUT (the tmpfs ends with the namespace) and exits with the run's status.
SMALL_DISK = 'disk="$2"; mount -t tmpfs -o size="$1" tmpfs "$disk" || exit 99; shift 2; "$@"; rc=$?; cp -a "$disk/." "$OUT/"; exit $rc'


@pytest.mark.slow
def test_a_full_disk_at_checkpoint_time_stops_at_once_keeping_the_previous_checkpoint(stop_corpus, tmp_path):
    """Defect: a full disk at checkpoint time cost four restarts, ended in a traceback with 'No space left
    on device' at its end, left a partial checkpoint behind and the MLflow run RUNNING. Now a write the
    storage refuses stops the run at once (no restart), exit 1, one line naming the path, the error and
    the step a re-run resumes from; the partial checkpoint is removed, the previous one is intact and
    the MLflow run is FAILED. The disk is a real one that fills: a 64 MB tmpfs, which holds one tiny
    checkpoint (41 MB) but not two. (RLIMIT_FSIZE cannot stand in: the raylet's object store is a
    multi-GB file in /dev/shm, so Ray itself dies at start; and a per-file limit fails every save.)"""
    import resource

    from avssl.cluster.checkpoint import complete_checkpoints, describe_refusal, refused_write, save_engine_checkpoint

    # DeepSpeed's own write says only "file write failed"; through avssl's, the errno and the file come out.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, hard))
    try:
        with pytest.raises(OSError) as refused:
            save_engine_checkpoint(_OneFileEngine(), tmp_path / "local", tag="ds")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert refused_write(refused.value) is refused.value
    assert describe_refusal(refused.value, "?") == f"{tmp_path / 'local' / 'ds' / 'model_states.pt'}: File too large (EFBIG)"

    if shutil.which("unshare") is None or subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("needs unshare and user namespaces for a small private tmpfs")
    small, out = tmp_path / "small", tmp_path / "out"
    small.mkdir()
    out.mkdir()
    uri = f"sqlite:///{tmp_path}/mlflow.db"  # tracking off the full disk, so the run's end can be recorded
    cmd = _pretrain_cmd(stop_corpus, small, "full", "trainer.total_steps=24", "trainer.export=false", f"mlflow.tracking_uri={uri}")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", SMALL_DISK, "sh", "64m", str(small),
                           *cmd], capture_output=True, text=True, timeout=420, env={**_run_env(), "OUT": str(out)}, cwd=REPO)
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 1, printed[-4000:]
    last = [line for line in printed.splitlines() if line.strip()][-1]
    assert last.startswith(f"error: run full stopped: checkpoint at step 16 not saved: cannot write "
                           f"{small / 'full' / 'checkpoint_000000016'}: No space left on device (ENOSPC). "), last
    assert "resume from step 8 (checkpoint_000000008, intact); removed the partial checkpoint_000000016" in last
    assert "restart 1 of" not in printed  # stopped at the first failure
    run_dir = out / "full"
    assert [p.name for p in complete_checkpoints(run_dir)] == ["checkpoint_000000008"]
    assert not (run_dir / "checkpoint_000000016").exists()
    assert json.loads((run_dir / "checkpoint_000000008" / "train_state.json").read_text())["step"] == 8
    assert _run_status(tmp_path, "full", uri) == "FAILED"


def test_a_corpus_with_no_readable_shard_stops_before_any_worker_starts(tmp_path, capsys, monkeypatch):
    """Defect: a corpus whose every shard is bad spent all trainer.max_failures restarts, then ended in a
    traceback with the message at its end. Now the driver finds no readable shard before starting Ray
    and exits 2 with one line naming the corpus, the shards and `avssl data inspect`; and a worker
    that meets only unreadable shards mid-run (the loader's NoRestartError, re-raised by torch's
    DataLoader with the traceback as its text) stops the run at once instead of restarting."""
    import pickle

    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from avssl import NoRestartError
    from avssl.cluster.config import PretrainRecipe
    from avssl.cluster.launch import message_of, no_restart_error, stop_message
    from avssl.config import load_config
    from avssl.data.shards import CorpusWriter, ShardConfig
    from avssl.data.stats import compute_stats
    from test_data_pipeline import make_clip

    corpus = tmp_path / "corpus"
    with CorpusWriter(corpus, ShardConfig(max_count=2), dataset="test") as w:
        for i in range(4):
            w.write(make_clip(i, video=False))
    compute_stats(corpus, load_config(PretrainRecipe, TINY).features)
    shards = sorted(corpus.glob("train-*.tar"))
    for i, shard in enumerate(shards):
        shard.write_bytes(np.random.default_rng(i).bytes(4000))

    import avssl.cluster.launch as launch

    started = []
    monkeypatch.setattr(launch, "init_ray", lambda address: started.append(address))  # would start Ray: must not be reached
    code = main(["pretrain", "--config", str(TINY), *sets(f"data.corpus={corpus}", f"trainer.storage_path={tmp_path / 'runs'}")])
    err = capsys.readouterr().err
    assert code == 2 and started == [], "the driver started Ray before finding no readable shard"
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"corpus {corpus}: no readable shard in split 'train'" in err and f"avssl data inspect {corpus} --split train" in err
    assert f"{len(shards)} unreadable shards: {shards[0].name}" in err
    assert not any((tmp_path / "runs").glob("*/checkpoint_*"))

    loader_text = ("Caught NoRestartError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                   "  File \"loader.py\", line 1, in tar_error\navssl.NoRestartError: 64 shard reads in a row failed")
    failure = pickle.loads(pickle.dumps(WorkerGroupError("rank 1 failed", {
        0: UserExceptionWithTraceback(RuntimeError("collective aborted"), "RuntimeError: collective aborted"),
        1: UserExceptionWithTraceback(NoRestartError(loader_text), loader_text)})))
    fatal = no_restart_error(failure)
    assert isinstance(fatal, NoRestartError) and message_of(fatal) == "64 shard reads in a row failed"
    assert str(stop_message(fatal, "tiny", tmp_path)) == "run tiny stopped: 64 shard reads in a row failed"
    crashed = WorkerGroupError("rank 0 died", {0: UserExceptionWithTraceback(RuntimeError("x"), "RuntimeError: x")})
    assert no_restart_error(crashed) is None  # an ordinary failure is still restarted
