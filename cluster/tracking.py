"""MLflow tracking that never stops training.

One :class:`Tracker` is one MLflow run. Where it goes (:func:`resolve_uri`):
``tracking.uri`` from the config, else ``MLFLOW_TRACKING_URI``, else the
project's one local SQLite store, ``runs/mlflow.db`` under the current
directory (artifacts in ``runs/mlartifacts``), so every command of a project
lands in one UI (``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db
--host 127.0.0.1``). Runs go to the experiment ``tracking.experiment`` (the
commands default it to the recipe's name: ``cluster.command``), created as an
experiment of the model-training kind (MLflow 3's tag ``mlflow.experimentKind``
= ``custom_model_development``: its UI then opens the runs table, not the GenAI
overview) with a description. ``tracking.system_metrics`` adds MLflow's system
metrics (CPU, memory, disk, network, GPU where present) to the run.

Beyond metrics, parameters and files a tracker keeps tags (:meth:`Tracker.set_tags`,
also given at construction: the run context of ``cluster.lineage``), dataset
and model inputs (:meth:`Tracker.log_inputs`), and a trained model as an
MLflow logged model that points at its checkpoint folder
(:meth:`Tracker.log_model`; nothing is copied). All of them are buffered like
metrics while MLflow is unreachable.

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
from typing import Any, Callable, Mapping, Sequence

from rollout.config import check_ranges

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
_BAD = re.compile(r"[^A-Za-z0-9_\-./ ]")
#: characters MLflow refuses in a logged model's name (a sweep point's name has dots: p00_rho0.5_...)
_BAD_MODEL_NAME = re.compile(r"[/:.%\"']")
#: the project's store when neither tracking.uri nor MLFLOW_TRACKING_URI names one (relative to the current directory)
DEFAULT_STORE = Path("runs") / "mlflow.db"
#: MLflow 3's experiment tag that decides what its UI shows first; "custom_model_development" is "Machine learning"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
#: the experiment's (and a run's) description in MLflow's UI
DESCRIPTION_TAG = "mlflow.note.content"


@dataclass
class TrackingConfig:
    """Where and how runs are tracked in MLflow."""

    enabled: bool = field(default=True, metadata={"help": "log to MLflow (metrics.jsonl is written either way)"})
    uri: str | None = field(default=None, metadata={
        "help": "MLflow tracking URI; null: MLFLOW_TRACKING_URI, else the project store sqlite:///runs/mlflow.db"})
    experiment: str | None = field(default=None, metadata={
        "help": "MLflow experiment name (null: the recipe's name, i.e. the first --config file's stem, else "
                "threadweaver-COMMAND)"})
    description: str | None = field(default=None, metadata={
        "help": "the experiment's description, set when it is created (null: one naming the recipe)"})
    system_metrics: bool = field(default=False, metadata={
        "help": "log MLflow system metrics (system/*: CPU, memory, disk, network, GPU where present)"})
    system_metrics_interval_s: float = field(default=10.0, metadata={
        "help": "seconds between two system-metric samples (s)", "range": "> 0"})
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


def resolve_uri(cfg: TrackingConfig) -> str:
    """``cfg.uri``, else ``MLFLOW_TRACKING_URI``, else the project store ``sqlite:///<abs runs/mlflow.db>``."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{DEFAULT_STORE.resolve()}"


#: tracking URI schemes that name a file on the machine that opens them (MLflow's own local stores)
LOCAL_SCHEMES = ("sqlite", "file")


def local_store(uri: str) -> bool:
    """True when ``uri`` names a store on the local disk: a SQLite file, a ``file:`` URI or a plain folder."""
    scheme = uri.split(":", 1)[0].lower() if "://" in uri or uri.startswith("file:") else ""
    return scheme in LOCAL_SCHEMES or scheme == ""


def check_reachable(uri: str | None, alive_nodes: int) -> None:
    """Refuse a local tracking store when runs may start on several nodes (ValueError saying why).

    The points of a sweep on a Ray cluster of several nodes run on any of them and talk to MLflow from there: a
    SQLite file or a folder would be a different (or missing) file on each node, so the runs would be scattered or
    lost. A tracking server that every node reaches (``http://HOST:5000``) keeps them in one place.
    """
    if uri is None or alive_nodes <= 1 or not local_store(uri):
        return
    raise ValueError(f"tracking.uri {uri} is a local store, but the Ray cluster has {alive_nodes} nodes: the sweep's "
                     "points run on any of them and each would write its own node's copy of it. Start an MLflow "
                     "server every node reaches (mlflow server --backend-store-uri sqlite:///PATH --host 0.0.0.0) "
                     "and set tracking.uri=http://HOST:5000 (or MLFLOW_TRACKING_URI)")


def experiment_id(client, name: str, uri: str, description: str | None = None) -> str:
    """The id of experiment ``name``, created if missing as a model-training experiment with ``description``
    (an existing one without a kind gets the kind; another process creating it at the same time is fine)."""
    tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND,
            DESCRIPTION_TAG: description or f"ThreadWeaver runs of the recipe '{name}'."}
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=local_artifact_root(uri), tags=tags)
        except Exception:  # noqa: BLE001 - created by another process meanwhile: use it, else raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id


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


def model_name(name: str) -> str:
    """``name`` as a logged-model name MLflow accepts: a key (:func:`sanitize_key`) with ``/ : . % " '`` made
    ``_`` (``p00_rho0.5_clip0.2`` -> ``p00_rho0_5_clip0_2``)."""
    return _BAD_MODEL_NAME.sub("_", sanitize_key(name))


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
    """One MLflow run whose failures only warn (see module doc); ``tags`` go on the run when it is created.
    ``run_id`` names a run created for this tracker beforehand (a sweep's point, shown in the UI before it
    starts): :meth:`start` then opens that run and logs the parameters into it."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, tags: Mapping[str, str] | None = None,
                 run_id: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.uri = resolve_uri(cfg)
        self.experiment = cfg.experiment or "threadweaver"
        self.run_id: str | None = None
        self._client = None
        self._want_run = False
        self._resume_id: str | None = None
        self._made_id = run_id
        self._tags: dict[str, str] = {sanitize_key(k): str(v) for k, v in (tags or {}).items()}
        self._params: dict[str, str] = {}
        self._metrics: deque = deque()
        self._artifacts: list[tuple[str, str | None]] = []
        self._deferred: list[tuple[str, Callable[[Any], Any]]] = []
        self._monitor = None
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
        self._tags.update({sanitize_key(k): str(v) for k, v in (tags or {}).items()})
        if run_id is None:
            self._params = flat_params(params)
        self._flush()
        return self.run_id

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set ``tags`` on the run (values as strings; buffered while MLflow is unreachable)."""
        if not self.cfg.enabled:
            return
        items = {sanitize_key(k): str(v) for k, v in tags.items()}
        if self.run_id is None:
            self._tags.update(items)  # go on the run when it is created
            return
        self._deferred.append(("set tags", lambda c: [c.set_tag(self.run_id, k, v) for k, v in items.items()]))
        self._flush()

    def log_inputs(self, datasets: Sequence[Any] = (), models: Sequence[str] = ()) -> None:
        """Log MLflow ``DatasetInput`` entities and logged-model ids as the run's inputs (buffered)."""
        if not self.cfg.enabled or not (datasets or models):
            return

        def send(client) -> None:
            from mlflow.entities import LoggedModelInput

            client.log_inputs(self.run_id, datasets=list(datasets) or None,
                              models=[LoggedModelInput(m) for m in models] or None)

        self._deferred.append(("log inputs", send))
        self._flush()

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

    def log_model(self, name: str, location: str | Path, metrics: Mapping[str, Any], step: int,
                  params: Mapping[str, Any] | None = None) -> str | None:
        """Register the checkpoint folder ``location`` as an MLflow logged model of this run that points at it
        (an external model: nothing is copied), with ``metrics`` attached at ``step``; returns its id, or None
        when there is no run or MLflow is unreachable (a warning)."""
        if not self.cfg.enabled or self.run_id is None:
            return None
        out: list[str] = []

        def send() -> None:
            from mlflow.entities import LoggedModelOutput, Metric

            client = self._get_client()
            run = client.get_run(self.run_id)
            model = client.create_logged_model(
                run.info.experiment_id, name=model_name(name), source_run_id=self.run_id,
                tags={"mlflow.model.isExternal": "true", "threadweaver.checkpoint": str(location)},
                params=flat_params(params or {}), model_type="hf-checkpoint")
            client.finalize_logged_model(model.model_id, "READY")
            now = int(time.time() * 1000)
            values = [Metric(k, v if math.isfinite(v) else float("nan"), now, int(step), model_id=model.model_id)
                      for k, v in numeric_metrics(metrics).items()]
            for start in range(0, len(values), METRICS_PER_BATCH):
                client.log_batch(self.run_id, metrics=values[start:start + METRICS_PER_BATCH], synchronous=True)
            client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, int(step))])
            out.append(model.model_id)

        self._guard(f"log the model {location}", send)
        return out[0] if out else None

    def log_model_metrics(self, model_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Log ``metrics`` in this run, attached to the logged model ``model_id`` (e.g. an evaluation of a
        checkpoint another run made; buffered while MLflow is unreachable)."""
        if not self.cfg.enabled:
            return
        now = int(time.time() * 1000)
        values = numeric_metrics(metrics)

        def send(client) -> None:
            from mlflow.entities import Metric

            batch = [Metric(k, v if math.isfinite(v) else float("nan"), now, int(step), model_id=model_id)
                     for k, v in values.items()]
            for start in range(0, len(batch), METRICS_PER_BATCH):
                client.log_batch(self.run_id, metrics=batch[start:start + METRICS_PER_BATCH], synchronous=True)

        self._deferred.append((f"log metrics of model {model_id}", send))
        self._flush()

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is buffered (one last try) and close the run with ``status``."""
        if not self.cfg.enabled or not self._want_run:
            return
        if self._monitor is not None:
            self._guard("stop the system metrics", self._monitor.finish)
            self._monitor = None
        self._retry_at = 0.0
        self._flush()
        if self.run_id is not None and not self._pending():
            self._guard("close the run", lambda: self._get_client().set_terminated(self.run_id, status))
        elif self._pending():
            log.warning("MLflow at %s unreachable: %d metric values, %d artifacts and %d parameters were not "
                        "logged (they are in the run folder %s)", self.uri, len(self._metrics),
                        len(self._artifacts), len(self._params), self.run_dir)

    def client(self):
        """The ``MlflowClient`` of this tracker's store, for calls it does not wrap (they may raise)."""
        return self._get_client()

    @property
    def pending(self) -> int:
        """Metric values waiting for MLflow."""
        return len(self._metrics)

    # ------------------------------------------------------------------ internals

    def _pending(self) -> bool:
        return bool(self._metrics or self._artifacts or self._params or self._deferred or self.run_id is None)

    def _get_client(self):
        if self._client is None:
            from mlflow import MlflowClient

            if self.uri.startswith("sqlite:///"):  # SQLite creates the file, not its folder
                Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
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
        while self._deferred:
            what, fn = self._deferred[0]
            if not self._guard(what, lambda: fn(self._get_client())):
                return
            self._deferred.pop(0)
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
        if self._resume_id is not None or self._made_id is not None:
            self.run_id = self._resume_id or self._made_id
            client.update_run(self.run_id, status="RUNNING")
            for k, v in self._tags.items():
                client.set_tag(self.run_id, k, v)
        else:
            exp = experiment_id(client, self.experiment, self.uri, self.cfg.description)
            run = client.create_run(exp, run_name=self.cfg.run_name or self.run_dir.name, tags=self._tags)
            self.run_id = run.info.run_id
        if self.cfg.system_metrics:
            self._guard("start the system metrics", self._start_monitor)

    def _start_monitor(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.cfg.system_metrics_interval_s,
                                       resume_logging=self._resume_id is not None, tracking_uri=self.uri)
        monitor.start()
        self._monitor = monitor

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


class Throttle:
    """``ready()`` is True at most once every ``every_s`` seconds (or when forced): live metrics from a
    fast loop without a database write per item."""

    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self._last = -math.inf

    def ready(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self._last >= self.every_s:
            self._last = now
            return True
        return False
