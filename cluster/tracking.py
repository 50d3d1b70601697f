"""MLflow tracking that can never kill or stall training.

Rank 0 gets an `MlflowLogger`; every other rank a `NullLogger` with the same methods, so call
sites never branch on rank (nanochat's DummyWandb). The logger only enqueues: a background
thread sends batches to the tracking store with a per-call timeout and retries with backoff.
A store that is down or slow costs a warning and, past `retries`, the dropped batch; training
never waits on it (except a bounded flush at the end).

The default store is SQLite next to the runs (`sqlite:///<storage>/mlflow.db`, artifacts in
`<storage>/mlartifacts`); `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db` shows it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from avssl.cluster.config import MlflowConfig

log = logging.getLogger(__name__)

RUN_NAME_TAG = "avssl.run_name"


SECRET_QUERY_KEYS = ("token", "access_token", "api_key", "apikey", "key", "password", "passwd", "secret",
                     "signature", "sig", "x-amz-signature", "x-amz-credential", "x-amz-security-token", "auth")


def redact_uri(uri: str | None) -> str | None:
    """The tracking URI without its credentials, for anything written down or shown (model
    card, config.yaml, MLflow params, logs): `user:password@` becomes `***@`, and the values of
    token-like query parameters become `***`. What the run itself connects with is unchanged."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    if not uri or "://" not in uri:
        return uri
    parts = urlsplit(uri)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret = [any(s in k.lower() for s in SECRET_QUERY_KEYS) for k, _ in pairs]
    if "@" not in parts.netloc and not any(secret):
        return uri
    netloc = "***@" + parts.netloc.rsplit("@", 1)[1] if "@" in parts.netloc else parts.netloc
    query = urlencode([(k, "***" if hide else v) for (k, v), hide in zip(pairs, secret)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def public_recipe(recipe: Any) -> Any:
    """A copy of a run recipe that is safe to write down: the MLflow URI redacted."""
    mlflow = getattr(recipe, "mlflow", None)
    if mlflow is None or not mlflow.tracking_uri:
        return recipe
    return recipe.model_copy(update={"mlflow": mlflow.model_copy(update={"tracking_uri": redact_uri(mlflow.tracking_uri)})})


def resolve_tracking_uri(cfg: MlflowConfig, storage_path: str | Path) -> str:
    """Config first, then MLFLOW_TRACKING_URI, then SQLite beside the run storage."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    storage = Path(storage_path).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{storage / 'mlflow.db'}"


def _client(uri: str, timeout_s: float):
    # MLflow's own HTTP layer reads these; keep its internal retries short, ours do the rest.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def mlflow_ui_command(uri: str) -> str:
    """The command that shows a tracking store's runs: `mlflow ui` for a local SQLite store, the
    server's address otherwise."""
    import sys

    if uri.startswith("sqlite:"):
        return f"{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)"
    return f"open {redact_uri(uri)} in a browser"


def open_run(cfg: MlflowConfig, uri: str, run_name: str, storage_path: str | Path) -> str:
    """Create the run for `run_name`, or return the id of the one a previous attempt started
    (same experiment, same avssl.run_name tag): re-running a command continues its MLflow run."""
    client = _client(uri, cfg.timeout_s)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:"):
            location = (Path(storage_path).resolve() / "mlartifacts").as_uri()
        exp_id = client.create_experiment(cfg.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    if exp is None or EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        # MLflow 3's UI opens an experiment without this tag in its GenAI view; these are training runs.
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {RUN_NAME_TAG: run_name, "mlflow.runName": cfg.run_name or run_name, **cfg.tags}
    return client.create_run(exp_id, run_name=cfg.run_name or run_name, tags=tags).info.run_id


def find_run(cfg: MlflowConfig, uri: str, run_name: str) -> tuple[str | None, dict[str, float]]:
    """The id and latest metrics of the run `open_run` made for `run_name`, left as it is; (None, {})
    where there is none or the tracking server cannot be reached."""
    try:
        client = _client(uri, cfg.timeout_s)
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            return None, {}
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                   max_results=1, order_by=["attributes.start_time DESC"])
    except Exception as exc:  # the run itself is on disk: tracking is not needed to return it
        log.warning("MLflow at %s unavailable (%s): the finished run's metrics are not shown", redact_uri(uri), exc)
        return None, {}
    return (found[0].info.run_id, dict(found[0].data.metrics)) if found else (None, {})


class NullLogger:
    """What every rank but 0 gets: the same methods, doing nothing."""

    run_id: str | None = None
    dropped = 0

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def register(self, release_dir: str | Path, name: str) -> None: ...
    def finish(self, status: str | None = "FINISHED", timeout_s: float = 30.0) -> None: ...


class MlflowLogger(NullLogger):
    """Asynchronous, retrying MLflow logging for one run."""

    def __init__(self, uri: str, run_id: str, cfg: MlflowConfig) -> None:
        self.uri, self.run_id, self.cfg = uri, run_id, cfg
        self.dropped = 0
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._warned_at = 0.0
        self._thread = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
        self._thread.start()

    # The training loop's side: enqueue only.
    def log_params(self, params: dict[str, Any]) -> None:
        self._queue.put(("params", {k: str(v)[:6000] for k, v in params.items()}))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._queue.put(("metrics", (dict(metrics), step, int(time.time() * 1000))))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._queue.put(("tags", dict(tags)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._queue.put(("artifact", (str(path), artifact_path)))

    def register(self, release_dir: str | Path, name: str) -> None:
        """Register the logged release (artifact path `release`) as a new version of model `name`,
        with the description and tags its MLmodel file gives (cluster/export.py; the signature is
        read from that file by MLflow): `avssl finetune --init models:/NAME/VERSION` starts from it."""
        from avssl.cluster.export import registry_details

        description, tags = registry_details(Path(release_dir))
        self._queue.put(("register", (name, description, tags)))

    def finish(self, status: str | None = "FINISHED", timeout_s: float = 30.0) -> None:
        """Flush what is queued (bounded by timeout_s), then close the run with `status` (None:
        flush only, leave the run open)."""
        if status is not None:
            self._queue.put(("status", status))
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("MLflow: gave up flushing after %.0f s; some records were not sent", timeout_s)

    # The background thread's side.
    def _work(self) -> None:
        client = None
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, payload = item
            for attempt in range(self.cfg.retries + 1):
                try:
                    client = client or _client(self.uri, self.cfg.timeout_s)
                    self._send(client, kind, payload)
                    break
                except Exception as exc:  # the store's problem must never become training's
                    client = None
                    if attempt == self.cfg.retries:
                        self.dropped += 1
                        self._warn(f"MLflow: dropped a {kind} record after {attempt + 1} attempts: {exc}")
                    else:
                        self._warn(f"MLflow: {kind} failed ({exc}); retrying")
                        time.sleep(min(10.0, 0.5 * 2**attempt))

    def _send(self, client, kind: str, payload: Any) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if kind == "metrics":
            metrics, step, ts = payload
            client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])
        elif kind == "params":
            # MLflow params are write-once: a resumed run (new code commit, new library version)
            # keeps the first values as params and records what changed as `resumed.<key>` tags.
            logged = client.get_run(self.run_id).data.params
            changed = {k: v for k, v in payload.items() if k in logged and logged[k] != v}
            items = [Param(k, v) for k, v in payload.items() if k not in logged]
            for i in range(0, len(items), 100):  # MLflow's per-batch limit
                client.log_batch(self.run_id, params=items[i : i + 100])
            if changed:
                client.log_batch(self.run_id, tags=[RunTag(f"resumed.{k}", v[:5000]) for k, v in changed.items()])
        elif kind == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in payload.items()])
        elif kind == "artifact":
            path, artifact_path = payload
            if Path(path).is_dir():
                client.log_artifacts(self.run_id, path, artifact_path)
            else:
                client.log_artifact(self.run_id, path, artifact_path)
        elif kind == "register":
            from mlflow.exceptions import MlflowException

            name, description, tags = payload
            try:
                client.create_registered_model(name)
            except MlflowException:  # exists already: add a version
                pass
            source = f"{client.get_run(self.run_id).info.artifact_uri}/release"
            version = client.create_model_version(name, source=source, run_id=self.run_id, tags=tags,
                                                  description=description or None)
            log.info("registered models:/%s/%s", name, version.version)
        elif kind == "status":
            client.set_terminated(self.run_id, status=payload)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at > 30:  # one line per 30 s, not one per step
            log.warning(message)
            self._warned_at = now


def make_logger(rank: int, uri: str | None, run_id: str | None, cfg: MlflowConfig) -> NullLogger:
    if rank != 0 or uri is None or run_id is None:
        return NullLogger()
    return MlflowLogger(uri, run_id, cfg)
