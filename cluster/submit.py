"""Submitting avssl runs to a Ray cluster through the job submission API, and managing them.

The job's runtime environment ships the source tree as `working_dir` (without data, runs,
checkpoints, MLflow stores, virtualenvs or git history) and runs `python -m avssl.cli <command>`
inside it, so the cluster executes exactly the submitted code. Python dependencies are expected
in the cluster's image (cluster/ray-cluster.yaml installs them); `--pip` adds packages to the
job's environment. Token authentication (Ray >= 2.52 enables it on new clusters): set
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or pass --token; Ray's client sends it as a bearer token.

A Ray job does not retry by itself: resubmitting the same recipe (same trainer.name and
storage_path) resumes from its latest checkpoint. Submission itself does retry while the head has
no job agent ready to take the job (a head that has just started, or a busy one answers "No
available agent to submit job, please try again later"): the job was not created, so asking again
is safe; after `AGENT_WAIT_S` the error names the address and what to check.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any

from avssl import AvsslError

EXCLUDES = [
    ".git", ".venv", "venv", "data", "runs", "mlruns", "mlartifacts", "*.db", "__pycache__", "*.egg-info",
    ".pytest_cache", "benchmarks/results", ".whl", ".gl",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 60.0  # how long `submit` keeps asking a head that has no job agent ready
_NO_AGENT = "No available agent to submit job"


def source_root() -> Path:
    import avssl

    root = Path(avssl.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise AvsslError("avssl is installed without its source tree; submit from a checkout of the avssl repository")
    return root


def client(address: str, token: str | None = None):
    if token:
        os.environ["RAY_AUTH_TOKEN"] = token
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        raise AvsslError(
            f"cannot reach the Ray job server at {address} ({exc}). Use the dashboard address "
            "(http://HEAD:8265); with token authentication set RAY_AUTH_TOKEN or pass --token."
        ) from None


def entrypoint(command: str, config: Path, overrides: list[str], root: Path) -> str:
    """`python -m avssl.cli <command> --config <relative path> --set ...` run in the working dir."""
    config = config.resolve()
    if not config.is_relative_to(root):
        raise AvsslError(f"{config}: the recipe must be inside the submitted source tree {root} (e.g. configs/...)")
    words = ["python", "-m", "avssl.cli", command, "--config", str(config.relative_to(root))]
    for item in overrides:
        words += ["--set", item]
    return shlex.join(words)


def submit(address: str, command: str, config: Path, overrides: list[str], *, token: str | None = None,
           pip: list[str] | None = None, env: dict[str, str] | None = None, submission_id: str | None = None) -> str:
    """Validate the recipe locally (fail before anything is uploaded), then submit; returns the job id."""
    from avssl.config import load_config

    recipe_cls = _recipe_class(command)
    load_config(recipe_cls, config, overrides)
    root = source_root()
    jobs = client(address, token)
    return retry_while_no_agent(
        lambda: jobs.submit_job(
            entrypoint=entrypoint(command, Path(config), overrides, root),
            runtime_env=job_runtime_env(root, pip=pip, env=env),
            submission_id=submission_id,
            metadata={"avssl.command": command, "avssl.config": str(config)},
        ),
        address,
    )


def job_runtime_env(root: Path, *, pip: list[str] | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The source tree as the job's working_dir (Ray puts it first on the job's and its workers'
    sys.path; the top-level folders hold no __init__.py, so they cannot shadow installed packages)."""
    runtime_env: dict[str, Any] = {
        "working_dir": str(root),
        "excludes": EXCLUDES,
        "env_vars": {"AVSSL_PROGRESS": "0", "PYTHONUNBUFFERED": "1", **(env or {})},
    }
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def retry_while_no_agent(call, address: str, *, wait_s: float = AGENT_WAIT_S, poll_s: float = 2.0,
                         sleep=time.sleep, clock=time.monotonic):
    """`call()`, asked again every `poll_s` while the head answers that no job agent is ready, up to
    `wait_s`; any other error goes through at once."""
    deadline = clock() + wait_s
    while True:
        try:
            return call()
        except RuntimeError as exc:
            if _NO_AGENT not in str(exc):
                raise
            if clock() >= deadline:
                raise AvsslError(
                    f"the Ray head at {address} had no job agent ready for {wait_s:.0f} s. A head that has "
                    "just started needs a few seconds more; otherwise check `ray status` on the head and its "
                    "dashboard agent log (/tmp/ray/session_latest/logs/dashboard_agent.log)."
                ) from None
            sleep(poll_s)


def _recipe_class(command: str):
    if command == "pretrain":
        from avssl.cluster.config import PretrainRecipe

        return PretrainRecipe
    if command == "finetune":
        from avssl.finetune.recipe import FinetuneRecipe

        return FinetuneRecipe
    raise AvsslError(f"cannot submit {command!r}: choose pretrain or finetune")


def wait(address: str, job_id: str, *, token: str | None = None, timeout_s: float | None = None, poll_s: float = 2.0,
         echo=None) -> str:
    """Poll until the job ends, echoing new log text; returns the final status."""
    c = client(address, token)
    shown = 0
    start = time.monotonic()
    while True:
        raw = c.get_job_status(job_id)
        status = str(getattr(raw, "value", raw))
        if echo is not None:
            logs = c.get_job_logs(job_id)
            if len(logs) > shown:
                echo(logs[shown:])
                shown = len(logs)
        if status in TERMINAL:
            return status
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise AvsslError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def list_jobs(address: str, token: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for job in client(address, token).list_jobs():
        rows.append({
            "job_id": job.submission_id or job.job_id,
            "status": str(getattr(job.status, "value", job.status)),
            "entrypoint": job.entrypoint,
            "start": job.start_time,
        })
    return rows


def job_status(address: str, job_id: str, token: str | None = None) -> str:
    status = client(address, token).get_job_status(job_id)
    return str(getattr(status, "value", status))


def job_logs(address: str, job_id: str, token: str | None = None) -> str:
    return client(address, token).get_job_logs(job_id)


def stop_job(address: str, job_id: str, token: str | None = None) -> bool:
    """Ray sends SIGTERM to the entry point: the run checkpoints and exits (see cluster/launch.py).
    Give it time: set RAY_JOB_STOP_WAIT_TIME_S on the cluster above one log interval."""
    return client(address, token).stop_job(job_id)
