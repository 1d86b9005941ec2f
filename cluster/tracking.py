"""MLflow tracking that never stops training.

One :class:`Tracker` is one MLflow run. Where it goes (:func:`resolve_uri`):
``tracking.uri`` from the config, else ``MLFLOW_TRACKING_URI``, else a
local SQLite store in the run's output folder (``RUN_DIR/mlflow.db``, artifacts
in ``RUN_DIR/mlartifacts``; browse it with ``mlflow ui --backend-store-uri
sqlite:///RUN_DIR/mlflow.db --host 127.0.0.1``).

Every MLflow call goes through one guard: an exception (server unreachable,
store error, rejected value) is logged as a warning, never raised. After a
failure the tracker stops calling MLflow for ``retry_after_s`` seconds and
keeps what it was asked to log (run creation, parameters, metrics, artifact
files) in memory, up to ``max_buffered`` metric values (the oldest are dropped
beyond, with a warning); the next attempt sends the backlog first, so a server
that comes back gets the whole history, and a run whose server was down from
the start is created when it comes up. HTTP calls are made with
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` set
from the config (unless already set in the environment), because MLflow's own
defaults (7 retries with exponential backoff, 120 s timeout) would stall a
training step for minutes.

Names: metric and parameter keys are made acceptable to MLflow by
:func:`sanitize_key` (alphanumerics, ``_ - . /`` and spaces; no empty or
``.``/``..`` path segments; at most 250 characters). Parameter values are
strings cut to 6000 characters (MLflow's limit), with a warning when cut.

Resuming: :meth:`Tracker.start` with the ``run_id`` saved in a checkpoint
reopens that run (status back to RUNNING) instead of creating one; its
parameters are not logged again (MLflow refuses to change a parameter), so
callers log the resumed config as an artifact.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from rollout.config import check_ranges

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
_BAD = re.compile(r"[^A-Za-z0-9_\-./ ]")


@dataclass
class TrackingConfig:
    """Where and how runs are tracked in MLflow."""

    enabled: bool = field(default=True, metadata={"help": "log to MLflow (metrics.jsonl is written either way)"})
    uri: str | None = field(default=None, metadata={
        "help": "MLflow tracking URI; null: MLFLOW_TRACKING_URI, else sqlite:///RUN_DIR/mlflow.db"})
    experiment: str = field(default="threadweaver", metadata={"help": "MLflow experiment name"})
    run_name: str | None = field(default=None, metadata={"help": "MLflow run name (null: the run_dir's name)"})
    request_timeout_s: int = field(default=10, metadata={
        "help": "HTTP timeout of one MLflow request (s); sets MLFLOW_HTTP_REQUEST_TIMEOUT unless it is set",
        "range": ">= 1"})
    request_retries: int = field(default=0, metadata={
        "help": "HTTP retries of one MLflow request; sets MLFLOW_HTTP_REQUEST_MAX_RETRIES unless it is set",
        "range": ">= 0"})
    retry_after_s: float = field(default=30.0, metadata={
        "help": "after a failed MLflow call, wait this long before trying again; values are buffered (s)",
        "range": ">= 0"})
    max_buffered: int = field(default=200_000, metadata={
        "help": "metric values kept in memory while MLflow is unreachable (count)", "range": ">= 1"})

    def __post_init__(self) -> None:
        check_ranges(self)


def resolve_uri(cfg: TrackingConfig, run_dir: str | Path) -> str:
    """``cfg.uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<abs run_dir>/mlflow.db``."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def local_artifact_root(uri: str) -> str | None:
    """``<folder of the database>/mlartifacts`` for a SQLite store; None (MLflow's choice) otherwise.

    MLflow would put a SQLite store's artifacts under the current directory
    (``./mlruns``), not next to the database.
    """
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts")
    return None


def sanitize_key(name: str) -> str:
    """``name`` as a key MLflow accepts (see module doc); never empty."""
    key = _BAD.sub("_", str(name))
    parts = [p for p in key.split("/") if p not in ("", ".", "..")]
    key = "/".join(parts) or "_"
    key = key[:MAX_KEY_LENGTH].rstrip("/")
    if posixpath.normpath(key) != key:  # e.g. a trailing "/." left by the cut
        key = posixpath.normpath(key).lstrip("./") or "_"
    return key


def flat_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Parameter key -> string value, keys sanitized and values cut to MLflow's 6000 characters."""
    out: dict[str, str] = {}
    for k, v in params.items():
        text = "null" if v is None else str(v)
        if len(text) > MAX_PARAM_LENGTH:
            log.warning("MLflow parameter %s is %d characters long; logged cut to %d", k, len(text),
                        MAX_PARAM_LENGTH)
            text = text[:MAX_PARAM_LENGTH]
        out[sanitize_key(k)] = text
    return out


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The int/float/bool entries of ``metrics`` with sanitized keys (others left out)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)):
            out[sanitize_key(k)] = float(v)
    return out


class Tracker:
    """One MLflow run whose failures only warn (see module doc)."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.uri = resolve_uri(cfg, run_dir)
        self.run_id: str | None = None
        self._client = None
        self._want_run = False
        self._resume_id: str | None = None
        self._tags: dict[str, str] = {}
        self._params: dict[str, str] = {}
        self._metrics: deque = deque()
        self._artifacts: list[tuple[str, str | None]] = []
        self._retry_at = 0.0
        self._down = False
        self._dropped = 0
        self.failures = 0
        if cfg.enabled:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.request_timeout_s))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.request_retries))

    # ------------------------------------------------------------------ public API

    def start(self, params: Mapping[str, Any], run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> str | None:
        """Create the run (or reopen ``run_id``) and log ``params`` (new runs only); returns the run id or None."""
        if not self.cfg.enabled:
            return None
        self._want_run = True
        self._resume_id = run_id
        self._tags = {sanitize_key(k): str(v) for k, v in (tags or {}).items()}
        if run_id is None:
            self._params = flat_params(params)
        self._flush()
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the numeric entries of ``metrics`` at ``step`` (buffered while MLflow is unreachable)."""
        if not self.cfg.enabled:
            return
        now = int(time.time() * 1000)
        for k, v in numeric_metrics(metrics).items():
            self._metrics.append((k, v, now, int(step)))
        while len(self._metrics) > self.cfg.max_buffered:
            self._metrics.popleft()
            self._dropped += 1
        self._flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload the file ``path`` (kept on local disk; retried while MLflow is unreachable)."""
        if not self.cfg.enabled:
            return
        self._artifacts.append((str(path), artifact_path))
        self._flush()

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is buffered (one last try) and close the run with ``status``."""
        if not self.cfg.enabled or not self._want_run:
            return
        self._retry_at = 0.0
        self._flush()
        if self.run_id is not None and not self._pending():
            self._guard("close the run", lambda: self._get_client().set_terminated(self.run_id, status))
        elif self._pending():
            log.warning("MLflow at %s unreachable: %d metric values, %d artifacts and %d parameters were not "
                        "logged (they are in the run folder %s)", self.uri, len(self._metrics),
                        len(self._artifacts), len(self._params), self.run_dir)

    @property
    def pending(self) -> int:
        """Metric values waiting for MLflow."""
        return len(self._metrics)

    # ------------------------------------------------------------------ internals

    def _pending(self) -> bool:
        return bool(self._metrics or self._artifacts or self._params or self.run_id is None)

    def _get_client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _guard(self, what: str, fn: Callable[[], Any]) -> bool:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self.failures += 1
            self._retry_at = time.monotonic() + self.cfg.retry_after_s
            if not self._down:
                log.warning("MLflow at %s: could not %s (%s: %s); training goes on, values are kept and "
                            "retried every %.0f s", self.uri, what, type(e).__name__, str(e).splitlines()[0][:300]
                            if str(e) else "", self.cfg.retry_after_s)
            self._down = True
            return False
        if self._down:
            log.warning("MLflow at %s is reachable again", self.uri)
            self._down = False
        return True

    def _flush(self) -> None:
        if not self._want_run or time.monotonic() < self._retry_at:
            return
        if self.run_id is None and not self._guard("start the run", self._open_run):
            return
        if self._params:
            items = list(self._params.items())
            if not self._guard("log parameters", lambda: self._send_params(items)):
                return
            self._params = {}
        if self._dropped:
            log.warning("MLflow was unreachable for long: the %d oldest buffered metric values were dropped "
                        "(all are in metrics.jsonl)", self._dropped)
            self._dropped = 0
        while self._metrics:
            batch = [self._metrics[i] for i in range(min(METRICS_PER_BATCH, len(self._metrics)))]
            if not self._guard("log metrics", lambda: self._send_metrics(batch)):
                return
            for _ in batch:
                self._metrics.popleft()
        while self._artifacts:
            path, where = self._artifacts[0]
            if not Path(path).exists():
                log.warning("artifact %s no longer exists; not logged", path)
            elif not self._guard(f"log artifact {path}",
                                 lambda: self._get_client().log_artifact(self.run_id, path, where)):
                return
            self._artifacts.pop(0)

    def _open_run(self) -> None:
        client = self._get_client()
        if self._resume_id is not None:
            client.update_run(self._resume_id, status="RUNNING")
            self.run_id = self._resume_id
            for k, v in self._tags.items():
                client.set_tag(self.run_id, k, v)
            return
        experiment = client.get_experiment_by_name(self.cfg.experiment)
        if experiment is None:
            experiment_id = client.create_experiment(self.cfg.experiment,
                                                     artifact_location=local_artifact_root(self.uri))
        else:
            experiment_id = experiment.experiment_id
        run = client.create_run(experiment_id, run_name=self.cfg.run_name or self.run_dir.name, tags=self._tags)
        self.run_id = run.info.run_id

    def _send_params(self, items: list[tuple[str, str]]) -> None:
        from mlflow.entities import Param

        client = self._get_client()
        for start in range(0, len(items), PARAMS_PER_BATCH):
            chunk = items[start:start + PARAMS_PER_BATCH]
            client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk], synchronous=True)

    def _send_metrics(self, batch: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v if math.isfinite(v) else float("nan"), ts, step) for k, v, ts, step in batch]
        self._get_client().log_batch(self.run_id, metrics=metrics, synchronous=True)


def metric_table(uri: str, run_id: str, keys: list[str]) -> list[dict[str, float]]:
    """Rows ``{"step": s, key: value, ...}`` read back from MLflow (last value per step), sorted by step."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    rows: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            rows.setdefault(m.step, {"step": m.step})[key] = m.value
    return [rows[s] for s in sorted(rows)]
