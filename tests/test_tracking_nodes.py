"""A sweep on several nodes needs a tracking server every node reaches (fast: Ray and MLflow are never started).

A sweep's points run as Ray Tune trials on any node of the cluster, and each point's driver talks to MLflow
from there; the sweep passes its tracking URI on to them. A SQLite file or a folder is a different file on every
node, so it is refused as soon as the sweep sees more than one live node, with a message saying why.
"""

from __future__ import annotations

import pytest

from cluster.cli import main
from cluster.tracking import check_reachable, local_store


@pytest.mark.parametrize("uri, local", [("sqlite:////tmp/runs/mlflow.db", True), ("sqlite:///runs/mlflow.db", True),
                                        ("file:///tmp/mlruns", True), ("file:mlruns", True), ("runs/mlruns", True),
                                        ("/abs/mlruns", True), ("http://head:5000", False),
                                        ("https://mlflow.example.org", False), ("databricks://profile", False)])
def test_local_stores_are_recognised(uri, local):
    assert local_store(uri) is local


def test_a_local_store_is_refused_only_for_several_nodes():
    check_reachable("sqlite:////tmp/x.db", 1)  # one node: every point opens the same file
    check_reachable("http://head:5000", 3)
    check_reachable(None, 3)  # tracking off
    with pytest.raises(ValueError, match=r"tracking.uri sqlite:////tmp/x.db is a local store, but the Ray cluster "
                                         r"has 2 nodes: .* each would write its own node's copy"):
        check_reachable("sqlite:////tmp/x.db", 2)


def test_the_sweep_command_refuses_a_local_store_on_a_multi_node_cluster(tmp_path, capsys, monkeypatch,
                                                                        bare_rl_inputs):
    model, data = bare_rl_inputs

    def no_tracker(*args, **kwargs):
        raise AssertionError("an MLflow run was opened before the tracking URI was checked")

    monkeypatch.setattr("cluster.sweep.init_ray", lambda cfg, roles: False)  # "joined" a running cluster
    monkeypatch.setattr("cluster.sweep.alive_nodes", lambda: 3)
    monkeypatch.setattr("cluster.sweep.Tracker", no_tracker)
    argv = ["sweep", "rl_config=[experiments/rl_tiny.yaml]", "rho=[0.5]", f"run_dir={tmp_path / 'sweep'}",
            f"model={model}", f"overrides=[data.dir={data}, data.generate=false]"]
    assert main([*argv, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a local store, but the Ray cluster has 3 nodes" in err and "http://HOST:5000" in err, err
    assert "\n" not in err and "Traceback" not in err
    # the same sweep with a server URI gets past the check (to the tracker, which this test refuses)
    with pytest.raises(AssertionError, match="MLflow run was opened"):
        main([*argv, "tracking.uri=http://head:5000"])
