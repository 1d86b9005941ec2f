"""Run context, lineage and models in MLflow (cluster.lineage, cluster.tracking), read back through MLflow's API;
the recipe name of the experiment; the pipeline's stage progress."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cluster.command import recipe_name
from cluster.lineage import SOURCE_FILE, dataset_inputs, file_hash, git_state, run_context, source_of
from cluster.pipeline import PipelineConfig, Progress, planned_stages
from cluster.config import load_config
from cluster.tracking import (DESCRIPTION_TAG, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, Throttle, Tracker,
                              TrackingConfig)

ROOT = Path(__file__).resolve().parent.parent


def test_run_context_names_commit_dirty_flag_command_config_user_and_host():
    tags = run_context("rl", ["experiments/rl_tiny.yaml"], argv=["threadweaver", "rl", "--config", "a b.yaml"])
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert tags["mlflow.source.git.commit"] == commit.strip()
    assert tags["threadweaver.git_dirty"] in ("true", "false")
    assert tags["threadweaver.command"] == "threadweaver rl --config 'a b.yaml'"
    assert tags["threadweaver.config"] == str(Path("experiments/rl_tiny.yaml").resolve())
    assert tags["mlflow.user"] and tags["threadweaver.host"] and tags["mlflow.source.name"] == "threadweaver rl"


def test_git_state_sees_a_dirty_tree_and_none_outside_git(tmp_path):
    assert git_state(tmp_path) is None
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("1")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["add", "a.txt"], check=True)
    subprocess.run(git + ["commit", "-qm", "a"], check=True)
    commit, dirty = git_state(tmp_path)
    assert len(commit) == 40 and not dirty
    (tmp_path / "a.txt").write_text("2")
    assert git_state(tmp_path) == (commit, True)


def test_experiment_is_named_after_the_recipe():
    assert recipe_name(["experiments/rl_tiny.yaml", "more.yaml"], "rl") == "rl_tiny"
    assert recipe_name([], "datagen stage2") == "threadweaver-datagen-stage2"


def test_the_command_sets_the_experiment_from_the_recipe_unless_given(capsys):
    from cluster.cli import main

    assert main(["rl", "--config", "experiments/rl_tiny_mixed.yaml", "--print-config"]) == 0
    assert "experiment: rl_tiny_mixed" in capsys.readouterr().out
    assert main(["sweep", "--config", "experiments/sweep_tiny.yaml", "tracking.experiment=mine",
                 "--print-config"]) == 0
    assert "experiment: mine" in capsys.readouterr().out


def test_source_of_reads_only_a_json_object(tmp_path):
    assert source_of(tmp_path) == {}
    (tmp_path / SOURCE_FILE).write_text("[1]")
    assert source_of(tmp_path) == {}
    (tmp_path / SOURCE_FILE).write_text('{"run_id": "r"}')
    assert source_of(tmp_path) == {"run_id": "r"}


def test_dataset_inputs_carry_the_file_hash(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"a": 1}\n{"a": 2}\n')
    (inp,) = dataset_inputs({"train": f, "missing": tmp_path / "no.jsonl"})
    sha = file_hash(f)
    assert inp.dataset.digest == sha[:16] and json.loads(inp.dataset.profile) == {"sha256": sha, "bytes": 18,
                                                                                  "records": 2}
    assert json.loads(inp.dataset.source)["uri"] == str(f.resolve())


def test_pipeline_progress_counts_stages_and_estimates_the_rest():
    cfg = load_config(PipelineConfig, "experiments/pipeline_tiny.yaml")
    stages = planned_stages(cfg)
    assert stages == ["data", "sft_parallel", "sft_sequential", "rl_parallel", "rl_sequential", "eval"]
    p = Progress(stages, t_start=0.0)
    assert p.line("data", 30.0) == "stage 1 of 6: data, 0.5 min elapsed"
    p.done("data", 60.0)
    p.done("sft_parallel", 180.0)
    assert p.line("sft_sequential", 240.0) == "stage 3 of 6: sft_sequential, 4.0 min elapsed, about 8 min left"


def test_throttle():
    t = Throttle(3600)
    assert t.ready() and not t.ready() and t.ready(force=True)


# --------------------------------------------------------------------------- integration (real MLflow)


@pytest.mark.integration
def test_runs_carry_kind_context_inputs_models_and_lineage(tmp_path):
    from mlflow import MlflowClient

    from cluster.lineage import log_checkpoint, log_source

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    cfg = TrackingConfig(uri=uri, experiment="recipe_x")
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "p", "answer": "1"}\n')
    ckpt = tmp_path / "sft" / "checkpoints" / "step_00000004" / "hf"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")

    sft = Tracker(cfg, tmp_path / "sft", tags=run_context("sft", ["experiments/sft_tiny.yaml"]))
    sft.start({"steps": 4}, tags={"stage": "sft"})
    sft.log_inputs(datasets=dataset_inputs({"train": data}))
    sft.log_metrics({"train/loss": 1.0}, 1)
    sft.finish()
    model_id = log_checkpoint(sft, "sft", ckpt, {"eval/accuracy": 0.75}, 4)
    assert model_id and source_of(ckpt)["run_id"] == sft.run_id

    rl = Tracker(cfg, tmp_path / "rl", tags=run_context("rl", []))
    log_source(rl, ckpt)  # before the run exists: kept and sent when it starts
    rl.start({"steps": 2}, tags={"stage": "rl"})
    rl.log_model_metrics(model_id, {"eval/tiny/parallel/accuracy": 0.5}, 0)
    rl.finish()

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("recipe_x")
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND and "recipe_x" in exp.tags[DESCRIPTION_TAG]
    runs = {r.data.tags["stage"]: r for r in client.search_runs([exp.experiment_id])}
    for r in runs.values():
        assert len(r.data.tags["mlflow.source.git.commit"]) == 40
        assert r.data.tags["threadweaver.git_dirty"] in ("true", "false")
        assert r.data.tags["threadweaver.command"] and r.data.tags["mlflow.user"]
    assert runs["sft"].data.tags["threadweaver.config"].endswith("experiments/sft_tiny.yaml")
    (inp,) = runs["sft"].inputs.dataset_inputs
    assert inp.dataset.name == "train" and json.loads(inp.dataset.profile)["sha256"] == file_hash(data)
    assert runs["rl"].data.tags["threadweaver.source_run_id"] == sft.run_id
    assert runs["rl"].data.tags["threadweaver.source_model_id"] == model_id
    assert [m.model_id for m in client.get_run(rl.run_id).inputs.model_inputs] == [model_id]  # search omits them
    assert [m.model_id for m in runs["sft"].outputs.model_outputs] == [model_id]

    (model,) = client.search_logged_models(experiment_ids=[exp.experiment_id])
    assert model.model_id == model_id and model.source_run_id == sft.run_id and model.status == "READY"
    assert model.tags["threadweaver.checkpoint"] == str(ckpt.resolve())
    assert {(m.key, m.value, m.run_id) for m in model.metrics} == {
        ("eval/accuracy", 0.75, sft.run_id), ("eval/tiny/parallel/accuracy", 0.5, rl.run_id)}
    assert not list((tmp_path / "store").rglob("config.json"))  # the checkpoint is pointed at, not copied


@pytest.mark.integration
def test_system_metrics_on_by_config(tmp_path):
    import time

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = Tracker(TrackingConfig(uri=uri, system_metrics=True, system_metrics_interval_s=0.2), tmp_path / "run")
    t.start({})
    time.sleep(1.5)
    t.finish()
    metrics = MlflowClient(uri).get_run(t.run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)
