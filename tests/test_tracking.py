"""MLflow tracking: names MLflow accepts, a local store round trip, resume into the same run, and a
tracking server that is down (a closed 127.0.0.1 port) never raising, with the backlog delivered later."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from cluster.tracking import (
    TrackingConfig, Tracker, flat_params, local_artifact_root, metric_table, model_name, numeric_metrics,
    resolve_uri, sanitize_key,
)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


@pytest.mark.parametrize("name, expected", [
    ("eval/parallel/accuracy", "eval/parallel/accuracy"),
    ("finish/eos", "finish/eos"),
    ("reward:R_accel", "reward_R_accel"),
    ("a//b/", "a/b"),
    ("/../x/./y", "x/y"),
    ("threads per block (mean)", "threads per block _mean_"),
    ("", "_"),
    ("é%", "__"),
])
def test_sanitize_key(name, expected):
    assert sanitize_key(name) == expected


def test_sanitized_keys_pass_mlflow_validation():
    from mlflow.utils.validation import _validate_metric_name, _validate_param_name

    for name in ["a:b", "x/../y", "//", "a" * 400, "train/time/rollout s", "L_crit", "x/" * 200 + "."]:
        key = sanitize_key(name)
        assert len(key) <= 250
        _validate_metric_name(key)
        _validate_param_name(key)


def test_model_names_pass_mlflow_validation():
    from mlflow.utils.validation import _validate_logged_model_name

    assert model_name("p00_rho0.5_clip0.2_inc-1") == "p00_rho0_5_clip0_2_inc-1"  # a sweep point's run
    assert model_name("sft_parallel") == "sft_parallel"
    for name in ["a/b:c", "100%", "it's \"x\"", "", "..", "é"]:
        _validate_logged_model_name(model_name(name))


def test_params_and_metrics_are_made_loggable(caplog):
    with caplog.at_level(logging.WARNING):
        params = flat_params({"reward.rho": 0.5, "x": None, "long": "y" * 7000, "list": [1, 2]})
    assert params == {"reward.rho": "0.5", "x": "null", "long": "y" * 6000, "list": "[1, 2]"}
    assert "cut" in caplog.text
    assert numeric_metrics({"a": 1, "b": True, "c": "text", "d": None, "e/f": 2.5}) == {"a": 1.0, "b": 1.0,
                                                                                      "e/f": 2.5}


def test_uri_from_config_then_environment_then_the_project_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_uri(TrackingConfig()) == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_uri(TrackingConfig()) == "http://127.0.0.1:5000"
    assert resolve_uri(TrackingConfig(uri="sqlite:///x.db")) == "sqlite:///x.db"
    assert local_artifact_root(f"sqlite:///{tmp_path}/m.db") == str(tmp_path.resolve() / "mlartifacts")
    assert local_artifact_root("http://127.0.0.1:5000") is None


def test_disabled_tracker_does_nothing(tmp_path):
    t = Tracker(TrackingConfig(enabled=False), tmp_path)
    assert t.start({"a": 1}) is None
    t.log_metrics({"x": 1.0}, step=0)
    t.finish()
    assert not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------- integration (real MLflow)


@pytest.mark.integration
def test_local_store_round_trip_and_resume(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    cfg = TrackingConfig(uri=uri, experiment="test")
    t = Tracker(cfg, tmp_path / "run")
    run_id = t.start({"reward.rho": 0.5, "grpo.advantage": "mean"}, tags={"stage": "rl"})
    assert run_id is not None
    t.log_metrics({"train/reward": 0.25, "finish:eos": 1.0}, step=1)
    t.log_metrics({"train/reward": 0.5}, step=2)
    artifact = tmp_path / "config.yaml"
    artifact.write_text("a: 1\n")
    t.log_artifact(artifact)
    t.finish("KILLED")

    resumed = Tracker(cfg, tmp_path / "run")
    assert resumed.start({"reward.rho": 0.7}, run_id=run_id) == run_id  # params are not logged again
    resumed.log_metrics({"train/reward": 0.75}, step=3)
    resumed.finish()

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params == {"reward.rho": "0.5", "grpo.advantage": "mean"}
    assert run.data.tags["stage"] == "rl"
    assert [r["train/reward"] for r in metric_table(uri, run_id, ["train/reward"])] == [0.25, 0.5, 0.75]
    assert "finish_eos" in run.data.metrics
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]
    assert (tmp_path / "store" / "mlartifacts").is_dir()  # next to the database, not in the working directory


def _start_server(port: int, root) -> subprocess.Popen:
    """A real MLflow tracking server on 127.0.0.1:port (sqlite store, artifacts served from ``root``)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"),
        start_new_session=True)  # its own process group: the server and its uvicorn worker end together
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the MLflow server exited with code {proc.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise AssertionError("the MLflow server did not start within 120 s")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.integration
def test_unreachable_server_warns_buffers_and_delivers_later(tmp_path, caplog):
    port = _closed_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = TrackingConfig(uri=uri, retry_after_s=0.0, request_timeout_s=2)
    t = Tracker(cfg, tmp_path / "run")
    artifact = tmp_path / "notes.txt"
    artifact.write_text("kept until MLflow answers")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="cluster.tracking"):
        assert t.start({"a": 1}) is None
        for step in range(5):
            t.log_metrics({"train/reward": float(step)}, step=step)
        t.log_artifact(artifact)
        t.finish()
    elapsed = time.monotonic() - start
    assert elapsed < 30, f"a closed port stalled tracking for {elapsed:.0f} s"  # MLflow's defaults take minutes
    assert t.run_id is None and t.pending == 5 and t.failures >= 6
    assert "training goes on" in caplog.text and "were not logged" in caplog.text

    # the server comes up on that port: the same tracker delivers its backlog with the next values
    root = tmp_path / "server"
    root.mkdir()
    server = _start_server(port, root)
    try:
        with caplog.at_level(logging.WARNING, logger="cluster.tracking"):
            t.log_metrics({"train/reward": 5.0}, step=5)
            t.finish()
        assert "reachable again" in caplog.text
        assert t.run_id is not None and t.pending == 0
        assert [r["train/reward"] for r in metric_table(uri, t.run_id, ["train/reward"])] == [0, 1, 2, 3, 4, 5]
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        run = client.get_run(t.run_id)
        assert run.info.status == "FINISHED" and run.data.params == {"a": "1"}
        assert [a.path for a in client.list_artifacts(t.run_id)] == ["notes.txt"]
    finally:
        _stop(server)
