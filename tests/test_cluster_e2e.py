"""End to end through real Ray, DeepSpeed and MLflow on this machine (2 CPU workers, tiny model).

Each test drives the real entry points (`avssl pretrain`, `avssl submit`) in subprocesses, or
`run_pretraining` against a real multi-node `ray.cluster_utils.Cluster`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from avssl.config import load_config
from avssl.data.corpus import CorpusRecipe, synthesize_corpus
from test_faults import _run_status, _signal_once_training, _stopped_line
from test_packaging import check_probe

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/pretrain/tiny.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cluster") / "tiny"
    synthesize_corpus(load_config(CorpusRecipe, REPO / "configs/data/tiny.yaml"), out)
    return out


def overrides(corpus: Path, storage: Path, name: str, *extra: str) -> list[str]:
    items = [f"data.corpus={corpus}", f"trainer.storage_path={storage}", f"trainer.name={name}", *extra]
    return [w for item in items for w in ("--set", item)]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    e.update(AVSSL_PROGRESS="0", PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    return e


def pretrain(corpus: Path, storage: Path, name: str, *extra: str, timeout: int = 420) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "avssl.cli", "pretrain", "--config", str(TINY), *overrides(corpus, storage, name, *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)


def metric_history(storage: Path, key: str, name: str, uri: str | None = None) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri or f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name("avssl-tests")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`avssl.run_name` = '{name}'")
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def registered_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoint folders Ray Train's controller has registered for a run (its snapshot file)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return []
    return [c["checkpoint_dir_name"] for c in snapshot.get("checkpoint_results", [])]


def _tail(proc) -> str:
    return (proc.stdout or "")[-4000:] + (proc.stderr or "")[-4000:]


def test_ctrl_c_then_sigterm_to_the_process_group_checkpoint_and_the_resumes_are_exact(corpus, tmp_path):
    """Defects: Ctrl-C let training go on, then exited 1 with no message, and the re-run resumed from an
    older step; SIGTERM to the driver's process group (a batch system's stop) killed the local Ray
    instance's processes, which are in that group, and the run exited 1 with 'Failed to connect to
    GCS'. Now SIGINT (a terminal's Ctrl-C) and then, to the re-run, SIGTERM, each to the driver's whole
    process group, checkpoint at the next log step, mark the MLflow run KILLED and end with exit 130 or
    143 and one line: the step, the checkpoint and the command that resumes. Each re-run resumes from
    exactly that step, and every loss after the first resume equals an uninterrupted run's."""
    from avssl.cluster.checkpoint import complete_checkpoints

    reference = pretrain(corpus, tmp_path, "uninterrupted")
    assert reference.returncode == 0, _tail(reference)

    run_dir = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "avssl.cli", "pretrain", "--config", str(TINY), *overrides(corpus, tmp_path, "stopped")]
    stops: list[int] = []
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        # Sent once rank 0 has restored and begun training (its placement record).
        rc, out, started = _signal_once_training(cmd, run_dir, lambda pid, sig=sig: os.killpg(pid, sig))
        assert rc == code, out[-4000:]
        assert "Failed to connect to GCS" not in out
        assert started["resumed"] == bool(stops) and started["start_step"] == (stops[-1] if stops else 0), started
        line = _stopped_line(out)
        step = int(line[1])
        assert line[2] == sig.name and line[3] == str(run_dir / f"checkpoint_{step:09d}"), line[0]
        assert "trainer.name=stopped" in line[4] and line[4].startswith("avssl pretrain --config ")
        assert int((run_dir / "avssl" / "PREEMPTED").read_text()) == step
        assert complete_checkpoints(run_dir)[-1].name == f"checkpoint_{step:09d}"
        assert _run_status(tmp_path, "stopped") == "KILLED"
        stops.append(step)
    assert 0 < stops[0] < stops[1] < 24, stops

    resumed = pretrain(corpus, tmp_path, "stopped")
    assert resumed.returncode == 0, _tail(resumed)
    assert f"resumed at step {stops[1]}/24" in resumed.stdout + resumed.stderr
    assert _run_status(tmp_path, "stopped") == "FINISHED"

    ref = metric_history(tmp_path, "loss", "uninterrupted")
    got = metric_history(tmp_path, "loss", "stopped")
    assert sorted(got) == sorted(ref) == list(range(4, 25, 4)), "step numbers in MLflow are not continuous"
    for step in range(stops[0] + 4, 25, 4):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), f"step {step} differs after a resume"
    assert (run_dir / "avssl" / "release" / "model.safetensors").is_file()


def test_killed_worker_restarts_from_checkpoint(corpus, tmp_path):
    """Killing one worker process mid-run: Ray restarts the group from the last checkpoint and the run finishes with continuous steps."""
    cmd = [sys.executable, "-m", "avssl.cli", "pretrain", "--config", str(TINY),
           *overrides(corpus, tmp_path, "faulty", "trainer.max_failures=2", "mlflow.register_model=avssl-tiny",
                      "trainer.total_steps=40")]  # long after the first checkpoint, so the kill lands mid-run
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=REPO)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    # Kill only once the controller has registered a checkpoint: its snapshot file lists it. A
    # logged step after the first checkpoint is not enough (this test's old trigger, step 12):
    # ray.train.report is a barrier between the workers only, the controller picks reports up
    # when it next polls, and on an idle machine the workers ran past step 12 and were killed
    # before that poll, so the restart began from scratch.
    wait_for(lambda: registered_checkpoints(tmp_path / "faulty"), 300, None, "the controller to register a checkpoint")
    # This run's rank 1, from the placement record it wrote: matching processes by name could hit
    # a worker of another Ray session still shutting down.
    rank1 = json.loads((tmp_path / "faulty" / "avssl" / "placement" / "rank_1.json").read_text())
    os.kill(rank1["pid"], signal.SIGKILL)
    proc.wait(timeout=400)
    reader.join(timeout=30)
    out = "".join(lines)
    assert proc.returncode == 0, out[-4000:]
    # The restart is checked from the state it leaves, not from a forwarded log line: Ray's log
    # monitor forwards worker output best-effort and dropped the "resumed at step" line once.
    restarted = json.loads((tmp_path / "faulty" / "avssl" / "placement" / "rank_1.json").read_text())
    assert restarted["pid"] != rank1["pid"], restarted
    assert restarted["resumed"] and restarted["start_step"] >= 8 and restarted["start_step"] % 8 == 0, restarted
    steps = metric_history(tmp_path, "loss", "faulty")
    assert sorted(steps) == list(range(4, 41, 4))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("avssl-tests").experiment_id])[0]
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "loss_curves.png", "release"} <= artifacts
    assert {"derived.effective_batch", "version.torch", "git_commit", "model.arch"} <= set(run.data.params)
    assert {"loss_contrastive", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "data_wait_fraction",
            "skipped_samples", "memory_mb"} <= set(run.data.metrics)
    versions = client.search_model_versions("name='avssl-tiny'")
    assert versions and versions[0].run_id == run.info.run_id


def test_multinode_cluster_places_workers_on_both_nodes(corpus, tmp_path):
    """On a simulated two-node cluster the two ranks land on different nodes, storage is checked shared, and training
    finishes although the MLflow server is down (the run goes on untracked)."""
    import ray
    from ray.cluster_utils import Cluster

    from avssl.cluster.config import PretrainRecipe
    from avssl.cluster.launch import run_pretraining

    ray.shutdown()  # an instance an earlier test of this worker process left connected
    # Ports of their own (Cluster asks for Ray's fixed defaults): other tests' Ray instances may run beside it.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_port": _free_port(),
                                                            "dashboard_agent_listen_port": _free_port()})
    cluster.add_node(num_cpus=1, dashboard_agent_listen_port=_free_port())
    cluster.wait_for_nodes()
    try:
        recipe = load_config(PretrainRecipe, TINY, [
            f"data.corpus={corpus}", f"trainer.storage_path={tmp_path}", "trainer.name=multinode", "trainer.total_steps=8",
            "trainer.export=false", f"mlflow.tracking_uri=http://127.0.0.1:{_free_port()}", "mlflow.retries=0",
            "mlflow.timeout_s=2",
        ])
        result = run_pretraining(recipe, address=cluster.address)
        assert result.status == "FINISHED" and result.metrics["step"] == 8 and result.mlflow_run_id is None
        placements = [json.loads(p.read_text()) for p in sorted((tmp_path / "multinode/avssl/placement").glob("rank_*.json"))]
        assert [p["rank"] for p in placements] == [0, 1]
        assert len({p["node_id"] for p in placements}) == 2, placements
    finally:
        ray.shutdown()
        cluster.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception as exc:  # 401 from an auth-protected server also means it is up
            if getattr(exc, "code", None) in (401, 403):
                return
            time.sleep(1)
    raise AssertionError(f"{url} did not come up")


def test_submit_to_token_authenticated_head_with_mlflow_server(corpus, tmp_path):
    """`avssl submit` runs the job on a real Ray head (token auth) and the run lands in a real MLflow server."""
    bindir = Path(sys.executable).parent
    token = secrets.token_hex(16)
    mlflow_port, dash_port, gcs_port = _free_port(), _free_port(), _free_port()
    base = env()
    base["PATH"] = f"{bindir}{os.pathsep}{base.get('PATH', '')}"  # as with an activated virtualenv: the job's `python`
    mlflow = subprocess.Popen(
        [str(bindir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=base, start_new_session=True,
    )
    head_env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    # --block keeps the head's processes in this process group: the test stops exactly them (not
    # `ray stop`, which would stop every Ray instance on the machine).
    head = subprocess.Popen(
        [str(bindir / "ray"), "start", "--head", "--block", "--port", str(gcs_port), "--num-cpus", "2",
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
         # Free ports for the servers Ray otherwise starts on fixed defaults (the job agent's HTTP
         # server on 52365, the client server on 10001): other tests' Ray instances may run beside it.
         *[w for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                          "--metrics-export-port", "--ray-client-server-port") for w in (flag, str(_free_port()))],
         "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=head_env, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash_port}"
    uri = f"http://127.0.0.1:{mlflow_port}"
    try:
        _wait_http(f"{address}/api/version", 180)
        _wait_http(uri, 120)
        sub = [sys.executable, "-m", "avssl.cli", "submit", "--address", address, "--config", str(TINY),
               *overrides(corpus, tmp_path, "submitted", "trainer.total_steps=8", f"mlflow.tracking_uri={uri}")]
        denied = subprocess.run(sub, capture_output=True, text=True, timeout=120, env={**base, "RAY_AUTH_MODE": "token", "HOME": str(tmp_path)})
        assert denied.returncode == 2 and "Traceback" not in denied.stderr, denied.stderr[-2000:]
        done = subprocess.run([*sub, "--token", token, "--wait"], capture_output=True, text=True, timeout=420, env=base)
        assert done.returncode == 0, _tail(done)
        job_id = done.stdout.split("submitted job ")[1].split()[0]
        status = subprocess.run([sys.executable, "-m", "avssl.cli", "jobs", "status", job_id, "--address", address, "--token", token],
                                capture_output=True, text=True, timeout=60, env=base)
        assert status.stdout.strip() == "SUCCEEDED"
        listed = subprocess.run([sys.executable, "-m", "avssl.cli", "jobs", "list", "--address", address, "--token", token],
                                capture_output=True, text=True, timeout=60, env=base)
        assert job_id in listed.stdout
        steps = metric_history(tmp_path, "loss", "submitted", uri=uri)
        assert sorted(steps) == [4, 8]
        # The same working_dir, a probe as the job: the job's driver and a Ray task it starts
        # import HF's `kernels` (through transformers) and avssl's own, never the uploaded folder.
        # Submitted from a child process, as `avssl submit` is: the client sets Ray's token mode in
        # its own process, which must not leak into this one's later local Ray instances.
        submit_probe = (
            "import sys; from pathlib import Path; from avssl.cluster import submit as jobs\n"
            f"address, token, root = {address!r}, {token!r}, Path({str(REPO)!r})\n"
            "job = jobs.client(address, token).submit_job(entrypoint='python -m tests.probe_imports --ray',"
            " runtime_env=jobs.job_runtime_env(root))\n"
            "assert jobs.wait(address, job, token=token, timeout_s=180) == 'SUCCEEDED', job\n"
            "print(jobs.client(address, token).get_job_logs(job))\n"
        )
        probe = subprocess.run([sys.executable, "-c", submit_probe], capture_output=True, text=True, timeout=300, env=base)
        assert probe.returncode == 0, probe.stderr[-3000:]
        lines = probe.stdout.strip().splitlines()
        for line in (l for l in lines if l.startswith("{")):
            check_probe(json.loads(line), root=Path(json.loads(line)["ours"]["kernels"]).resolve().parent)
        assert sum(l.startswith("{") for l in lines) == 2, lines[-20:]
        # With a cluster recorded by `ray start` on this machine, the embedded default still starts
        # its own private instance instead of attaching to it.
        local_probe = ("from avssl.cluster.launch import init_ray; import ray; init_ray(None); "
                       "print(ray.get_runtime_context().gcs_address)")
        own = subprocess.run([sys.executable, "-c", local_probe], capture_output=True, text=True, timeout=180, env=base)
        assert own.returncode == 0, own.stderr[-3000:]
        assert own.stdout.strip().splitlines()[-1].rsplit(":", 1)[1] != str(gcs_port), own.stdout
    finally:
        # SIGTERM to `ray start` alone: it drains the node through the GCS, then ends its processes
        # (a second or two). Sent to the whole group, the GCS dies first and the drain waits 30 s
        # for it in vain. Whatever is left of the group then goes with SIGKILL.
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        os.killpg(mlflow.pid, signal.SIGTERM)
        mlflow.wait(timeout=30)
