"""The one-command pipeline: its config, the wiring of stage configs, refusals, and the per-stage logging helpers.

The integration test runs every stage on the real engines (DeepSpeed, vLLM,
Ray, math-verify, MLflow) at toy sizes; the README's main job
(``threadweaver run experiments/pipeline_tiny.yaml``) is the full-size run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config
from cluster.pipeline import PipelineConfig, Progress, check_config, planned_stages, run_pipeline, stage_config
from rl.sft import SFTConfig


def test_pipeline_experiments_load_and_check():
    files = sorted(Path("experiments").glob("pipeline_*.yaml"))
    assert files
    for f in files:
        cfg = load_config(PipelineConfig, f)
        check_config(cfg)
        assert cfg.rl is None or cfg.rl.rollout.n >= 2


def test_stage_config_applies_the_wiring_last_and_keeps_the_section(tmp_path):
    cfg = load_config(PipelineConfig, "experiments/pipeline_tiny.yaml")
    sft = stage_config(SFTConfig, cfg.sft, tmp_path / "s" / "stage_config.yaml",
                       ["steps=7", f"run_dir={tmp_path / 's'}", "data.layout=sequential"])
    assert sft.steps == 7 and sft.data.layout == "sequential" and sft.run_dir == str(tmp_path / "s")
    assert sft.learner.lr == cfg.sft.learner.lr and sft.tokens_per_step == cfg.sft.tokens_per_step
    assert "layout: parallel" in (tmp_path / "s" / "stage_config.yaml").read_text()  # the section as given
    wired = stage_config(SFTConfig, cfg.sft, tmp_path / "w" / "stage_config.yaml", ["steps=7", "data.generate=true"],
                         {"data.generate": False, "data.dir": "x: y"})  # typed values, never parsed as YAML
    assert wired.steps == 7 and wired.data.generate is False and wired.data.dir == "x: y"


def test_bad_stage_overrides_are_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        check_config(load_config(PipelineConfig, "experiments/pipeline_tiny.yaml", ["sft_sequential=[stepz=3]"]))
    with pytest.raises(ConfigError, match="rollout.n"):
        check_config(load_config(PipelineConfig, "experiments/pipeline_tiny.yaml", ["rl_sequential=[rollout.n=1]"]))
    with pytest.raises(ConfigError, match="unknown key 'sft.stepz'; did you mean 'sft.steps'"):
        load_config(PipelineConfig, "experiments/pipeline_tiny.yaml", ["sft.stepz=3"])


def test_a_used_run_dir_is_refused_unless_reuse_and_an_unfinished_stage_is_kept_aside(tmp_path, monkeypatch):
    (tmp_path / "pipeline.json").write_text(json.dumps({"stages": {"data": {"dir": "x", "wall_s": 1.0}}}))
    cfg = load_config(PipelineConfig, "experiments/pipeline_tiny.yaml", [f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"already holds pipeline stages \['data'\]; set reuse=true"):
        run_pipeline(cfg)
    (tmp_path / "pipeline.json").unlink()
    (tmp_path / "sft_parallel").mkdir()
    with pytest.raises(ValueError, match="sft_parallel exists but did not finish"):
        run_pipeline(cfg)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop()

    monkeypatch.setattr("cluster.pipeline.init_ray", stop)  # stop right after the checks
    (tmp_path / "sft_parallel" / "kept.txt").write_text("x")
    (tmp_path / "sft_parallel.incomplete-1").mkdir()
    with pytest.raises(Stop):
        run_pipeline(load_config(PipelineConfig, "experiments/pipeline_tiny.yaml",
                                 [f"run_dir={tmp_path}", "reuse=true"]))
    assert not (tmp_path / "sft_parallel").exists()  # kept aside, the stage runs again
    assert (tmp_path / "sft_parallel.incomplete-2" / "kept.txt").read_text() == "x"


def test_cli_needs_a_file():
    from cluster.cli import main

    assert main(["run"]) == 2
    assert main(["run", "--show-config"]) == 0


@pytest.mark.integration
def test_every_stage_runs_at_toy_size_into_one_mlflow_parent_run(tmp_path):
    from mlflow import MlflowClient

    run_dir = tmp_path / "p"
    overrides = [f"run_dir={run_dir}", "data.train_size=40", "data.validation_size=4", "data.test_size=4",
                 "data.task.max_threads=3", "sft.steps=2", "sft.tokens_per_step=900", "sft.learner.row_tokens=600",
                 "sft.learner.threads_per_rank=1", "rl.steps=1", "rl.prompts_per_step=2", "rl.rollout.n=2",
                 "rl.rollout.max_tokens=48", "rl.eval.prompts=2", "eval.limit=3", "eval.rollout.max_tokens=48",
                 "eval.pages=2", "tracking.experiment=pipeline-test"]
    record = run_pipeline(load_config(PipelineConfig, "experiments/pipeline_tiny.yaml", overrides))
    assert list(record["stages"]) == ["data", "sft_parallel", "sft_sequential", "rl_parallel", "rl_sequential",
                                      "eval"]
    report = (run_dir / "report.md").read_text()
    assert "ThreadWeaver" in report and "sequential baseline" in report
    assert all(f"| {stage} |" in report for stage in record["stages"])
    par = [json.loads(x) for x in open(run_dir / "eval" / "tiny_parallel.jsonl")]
    seq = [json.loads(x) for x in open(run_dir / "eval" / "tiny_sequential.jsonl")]
    assert len(par) == len(seq) == 3

    client = MlflowClient(f"sqlite:///{run_dir.resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("pipeline-test").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id)
    assert children == sorted(record["stages"])  # one child run per stage
    metrics = set(parents[0].data.metrics)
    assert {"eval/tiny/parallel/accuracy", "eval/tiny/sequential/L_crit", "time/total_s"} <= metrics

    again = run_pipeline(load_config(PipelineConfig, "experiments/pipeline_tiny.yaml", overrides + ["reuse=true"]))
    same = json.dumps(again["stages"], sort_keys=True) == json.dumps(record["stages"], sort_keys=True)  # NaN-safe
    assert same  # every stage reused, nothing rerun
