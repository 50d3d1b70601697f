"""Submitting avssl runs to a Ray cluster through the job submission API, and managing them.

The job's runtime environment ships the source tree as `working_dir` (without data, runs,
checkpoints, MLflow stores, virtualenvs or git history) and runs `python -m avssl.cli <command>`
inside it, so the cluster executes exactly the submitted code. Python dependencies are expected
in the cluster's image (cluster/ray-cluster.yaml installs them); `--pip` adds packages to the
job's environment. Token authentication (Ray >= 2.52 enables it on new clusters): the token is
found in --token-file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`find_token`) and
sent as a bearer token, with RAY_AUTH_MODE=token set, which Ray's client needs to send one at all.
--token works too but shows the secret in `ps` and the shell history. A server that answers
401/403 refused the token; one that does not answer is unreachable: the errors say which.

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


def find_token(token: str | None = None, token_file: str | Path | None = None,
               env: dict[str, str] | None = None, home: Path | None = None) -> tuple[str | None, str | None]:
    """(token, where it came from), looked up as Ray does after the two flags: --token,
    --token-file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token; (None, None) if none."""
    env = os.environ if env is None else env
    if token:
        return token.strip(), "--token"
    if token_file:
        return _read_token(Path(token_file).expanduser(), f"--token-file {token_file}"), f"--token-file {token_file}"
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if env.get("RAY_AUTH_TOKEN_PATH"):
        source = f"RAY_AUTH_TOKEN_PATH={env['RAY_AUTH_TOKEN_PATH']}"
        return _read_token(Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser(), source), source
    default = (home or Path.home()) / ".ray" / "auth_token"
    if default.is_file():
        return _read_token(default, str(default)), str(default)
    return None, None


def _read_token(path: Path, source: str) -> str:
    if not path.is_file():
        raise AvsslError(f"{source}: token file {path} not found; point it at the cluster's token file")
    text = path.read_text().strip()
    if not text:
        raise AvsslError(f"{source}: the token file {path} is empty")
    return text


def client(address: str, token: str | None = None, token_file: str | Path | None = None):
    """A job submission client for `address`, sending the token found by `find_token` if any.
    Ray's client sends a token only when RAY_AUTH_MODE=token, so finding one sets it for this
    process and what it starts; the token also goes in the request header explicitly."""
    secret, source = find_token(token, token_file)
    headers = None
    if secret:
        os.environ["RAY_AUTH_MODE"] = "token"
        headers = {"Authorization": f"Bearer {secret}"}
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:
        if not _refused(exc):
            raise AvsslError(
                f"cannot reach the Ray job server at {address} ({exc}). Use the dashboard address "
                "(http://HEAD:8265) and check that the head is up and reachable from here."
            ) from None
        if secret:
            raise AvsslError(
                f"the Ray job server at {address} refused the token from {source} (HTTP 401/403): it is not this "
                "cluster's token; get the right one with `ray get-auth-token` on the head") from None
        raise AvsslError(
            f"the Ray job server at {address} requires a token (HTTP 401) and none was found: set RAY_AUTH_TOKEN "
            "or RAY_AUTH_TOKEN_PATH, pass --token-file, or put it in ~/.ray/auth_token") from None


def _refused(exc: Exception) -> bool:
    """The server answered and refused the request's credentials: Ray >= 2.52 raises
    AuthenticationError, older releases a RuntimeError carrying the HTTP status."""
    import ray.exceptions

    auth_error = getattr(ray.exceptions, "AuthenticationError", None)
    if auth_error is not None and isinstance(exc, auth_error):
        return True
    text = str(exc)
    return any(code in text for code in ("401", "403", "Unauthorized", "Forbidden"))


def entrypoint(command: str, config: Path, overrides: list[str], root: Path) -> str:
    """`python -m avssl.cli <command> --config <relative path> --set ...` run in the working dir."""
    config = config.resolve()
    if not config.is_relative_to(root):
        raise AvsslError(f"{config}: the recipe must be inside the submitted source tree {root} (e.g. configs/...)")
    words = ["python", "-m", "avssl.cli", command, "--config", str(config.relative_to(root))]
    for item in overrides:
        words += ["--set", item]
    return shlex.join(words)


def submit(address: str, command: str, config: Path, overrides: list[str], *, recipe_cls: type, token: str | None = None,
           token_file: str | Path | None = None, pip: list[str] | None = None, env: dict[str, str] | None = None, submission_id: str | None = None) -> str:
    """Validate the recipe locally against `recipe_cls`, the command's recipe type (fail before anything is
    uploaded), then submit; returns the job id."""
    from avssl.config import load_config

    load_config(recipe_cls, config, overrides)
    root = source_root()
    jobs = client(address, token, token_file)
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


def wait(address: str, job_id: str, *, token: str | None = None, token_file: str | Path | None = None, timeout_s: float | None = None, poll_s: float = 2.0,
         echo=None) -> str:
    """Poll until the job ends, echoing new log text; returns the final status."""
    c = client(address, token, token_file)
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


def list_jobs(address: str, token: str | None = None, token_file: str | Path | None = None) -> list[dict[str, Any]]:
    rows = []
    for job in client(address, token, token_file).list_jobs():
        rows.append({
            "job_id": job.submission_id or job.job_id,
            "status": str(getattr(job.status, "value", job.status)),
            "entrypoint": job.entrypoint,
            "start": job.start_time,
        })
    return rows


def job_status(address: str, job_id: str, token: str | None = None, token_file: str | Path | None = None) -> str:
    status = client(address, token, token_file).get_job_status(job_id)
    return str(getattr(status, "value", status))


def job_logs(address: str, job_id: str, token: str | None = None, token_file: str | Path | None = None) -> str:
    return client(address, token, token_file).get_job_logs(job_id)


def stop_job(address: str, job_id: str, token: str | None = None, token_file: str | Path | None = None) -> bool:
    """Ray sends SIGTERM to the entry point: the run checkpoints and exits (see cluster/launch.py).
    Give it time: set RAY_JOB_STOP_WAIT_TIME_S on the cluster above one log interval."""
    return client(address, token, token_file).stop_job(job_id)
