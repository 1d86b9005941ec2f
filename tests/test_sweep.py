"""Reward-weight sweeps: the grid and its overrides, the scheduler, the plot (fast), and a killed sweep resumed on
Ray Tune, in which ASHA stops a point early (one sweep proves both: two engine starts, not three).

The resumed sweep runs the real RL stage (vLLM rollout worker, reward actors,
DeepSpeed learner) for up to two steps per point on the untrained tiny model, which
never answers correctly; like the driver's tests it rewards format validity
(``format_penalty=1``) so the runs have something to learn. The points share
one rollout pool (``share_rollout``), so each sweep command starts one engine.
A two-point sweep from a pipeline's SFT checkpoint, its table, plot, metrics
and MLflow runs, is part of ``tests/test_pipeline.py``'s integration test
(one store for the pipeline, an ablation and the sweep).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config
from cluster.sweep import Point, PointResult, SweepConfig, base_config, grid, plot, point_config, table

RL_TINY = "experiments/rl_tiny.yaml"


def test_grid_sets_the_weights_turns_the_preset_off_and_keeps_the_accel_form(tmp_path):
    cfg = load_config(SweepConfig, None, [f"rl_config=[{RL_TINY}]", "rho=[0.25,1]", "incorrect_reward=[0,-1]",
                                          f"run_dir={tmp_path}", "overrides=[steps=2]"])
    points = grid(cfg, "sqlite:///x.db")
    assert [(p.rho, p.clip, p.incorrect_reward) for p in points] == [(0.25, 0.2, 0.0), (0.25, 0.2, -1.0),
                                                                     (1.0, 0.2, 0.0), (1.0, 0.2, -1.0)]
    assert len({p.name for p in points}) == 4
    base = base_config(cfg)
    rl = point_config(base, points[1])  # experiments/rl_tiny.yaml sets preset: paper
    assert rl.reward.preset is None and rl.reward.rho == 0.25 and rl.reward.incorrect_reward == -1.0
    assert rl.reward.accel_form == base.reward.accel_form and rl.steps == 2
    assert point_config(replace(base, reward=replace(base.reward, preset=None, accel_form="clip_then_scale")),
                        points[1]).reward.accel_form == "clip_then_scale"
    assert rl.run_dir == str(tmp_path / points[1].name) and rl.tracking.uri == "sqlite:///x.db"
    assert rl.tracking.run_name == points[1].name and rl.tracking.experiment == cfg.tracking.experiment


def test_bad_sweeps_are_refused():
    with pytest.raises(ConfigError, match="rl_config"):
        load_config(SweepConfig, None, [])
    with pytest.raises(ConfigError, match="share_rollout"):
        load_config(SweepConfig, None, [f"rl_config=[{RL_TINY}]", "share_rollout=true", "max_concurrent=2"])
    with pytest.raises(ConfigError, match="at least one value"):
        load_config(SweepConfig, None, [f"rl_config=[{RL_TINY}]", "clip=[]"])
    cfg = load_config(SweepConfig, None, [f"rl_config=[{RL_TINY}]", "overrides=[reward.rhoo=3]"])
    with pytest.raises(ConfigError, match="did you mean 'reward.rho'"):
        base_config(cfg)


def test_sweep_experiments_load():
    files = sorted(Path("experiments").glob("sweep_*.yaml"))
    assert files
    for f in files:
        cfg = load_config(SweepConfig, f)
        for p in grid(cfg, None):
            assert point_config(base_config(cfg), p).reward.rho == p.rho


def test_table_and_plot(tmp_path):
    ok = PointResult(Point(0, "a", 0.5, 0.2, 0.0, {}), {"accuracy": 0.5, "L_crit": 120.0, "L_total": 150.0,
                                                        "activation": 0.9, "eta": 0.2, "reward": 0.6}, "r", "d", 60.0)
    bad = PointResult(Point(1, "b", 1.0, 0.2, 0.0, {}), None, None, "d", 5.0, "RuntimeError: boom")
    text = table([ok, bad])
    assert "| a | 0.5 | 0.2 | 0 | 50.0% | 120.0 |" in text and "failed: RuntimeError: boom" in text
    png = plot([ok, bad], tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000


def test_the_model_comes_from_the_sweep_the_rl_config_or_the_newest_pipeline(tmp_path):
    import os

    from cluster.sweep import start_model

    def pipeline(name, mtime):
        ckpt = tmp_path / "runs" / name / "sft_parallel" / "final" / "hf"
        ckpt.mkdir(parents=True)
        (ckpt / "config.json").write_text("{}")
        record = tmp_path / "runs" / name / "pipeline.json"
        record.write_text(json.dumps({"stages": {"data": {"dir": f"/d/{name}"}, "sft_parallel": {"checkpoint": str(ckpt)}}}))
        os.utime(record, (mtime, mtime))
        return str(ckpt)

    cfg = load_config(SweepConfig, None, [f"rl_config=[{RL_TINY}]", f"pipelines={tmp_path / 'runs'}",
                                          f"overrides=[model={tmp_path / 'missing'}, data.dir={tmp_path / 'nodata'}]"])
    base = base_config(cfg)
    with pytest.raises(ValueError, match=r"no model to start from.*set model=DIR"):
        start_model(cfg, base)
    (tmp_path / "runs" / "broken").mkdir(parents=True)
    (tmp_path / "runs" / "broken" / "pipeline.json").write_text("{not json")
    pipeline("old", 1_000_000)
    newest = pipeline("new", 2_000_000)
    values, origin = start_model(cfg, base)
    assert values == {"model": newest, "data.dir": "/d/new", "data.generate": False}
    assert "newest pipeline's parallel SFT checkpoint" in origin

    given = replace(cfg, model=pipeline("given", 0))
    assert start_model(given, base)[0] == {"model": given.model}
    with pytest.raises(ValueError, match="model"):
        start_model(replace(cfg, model=str(tmp_path / "nope")), base)
    own = base_config(replace(cfg, overrides=[f"model={newest}"]))
    assert start_model(cfg, own) == ({}, f"model {newest} (the RL config's model)")


def _point_overrides(tiny_model_dir, tmp_path, save_every: int, eval_every: int, steps: int = 2) -> list[str]:
    """``steps``-step RL points on the tiny model with their own small synthetic task (format-scored rewards)."""
    return [
        f"model={tiny_model_dir}", f"data.dir={tmp_path / 'data'}", "data.generate=true", "data.train_size=40",
        "data.validation_size=4", "data.test_size=4", f"steps={steps}", "prompts_per_step=2", f"save_every={save_every}",
        "rollout.n=2", "rollout.max_tokens=32", "rollout.max_context=256", "rollout.max_thread_tokens=16",
        "rollout.weight_bucket_mb=0.5", "reward.format_penalty=1.0", "reward.num_actors=1", "learner.lr=3e-3",
        "learner.row_tokens=512", "learner.threads_per_rank=1", "eval.at_start=false", f"eval.every={eval_every}",
        "eval.prompts=2", "eval.modes=[parallel]", "progress=false"]


@pytest.mark.integration
def test_a_killed_asha_sweep_resumed_reruns_only_the_unfinished_point(tiny_model_dir, tmp_path):
    """Three points on Ray Tune with ASHA; the command is killed (SIGKILL to its process group) once the third
    point has started; --resume keeps the first two points as they were and runs the third, in the MLflow runs
    made at the start.

    ASHA, on the untrained tiny model, which never answers correctly: the points learn the same (mean-centred
    advantages ignore a reward offset), but the second point's wrong answers earn -1, so its held-out reward at
    step 1 is lower than the first point's and ASHA stops it there; the first runs both its steps. The stopped
    point's MLflow run ends KILLED with the step. (One sweep proves both: an early-stopped point is a finished
    trial that --resume must keep too. The third point, -0.5, sits between the two, so ASHA lets it go on
    whether or not the resumed Tune still holds the first run's step-1 rewards; it does not: Ray Tune 2.60
    restores the scheduler pickled when the Tuner was made, before any result.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rl_overrides = _point_overrides(tiny_model_dir, tmp_path, save_every=1, eval_every=1)
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "cluster.cli", "sweep", f"rl_config=[{RL_TINY}]",
           f"overrides={json.dumps(rl_overrides)}", "rho=[0.5]", "clip=[0.2]", "incorrect_reward=[0.0,-1.0,-0.5]",
           f"run_dir={out}", "share_rollout=true", "scheduler=asha", "grace_steps=1", "reduction_factor=2",
           "tracking.experiment=sweep-resume", f"tracking.uri={uri}", "ray.num_cpus=3"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    first, second, third = (out / name for name in ("p00_rho0.5_clip0.2_inc0", "p01_rho0.5_clip0.2_inc-1",
                                                     "p02_rho0.5_clip0.2_inc-0.5"))
    deadline = time.monotonic() + 900
    try:
        while not (third / "config.yaml").exists():  # the first two points ended, the third has begun
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the third point did not start within 15 minutes"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (first / "summary.json").is_file() and not (third / "summary.json").exists()
    assert not (second / "summary.json").exists()  # stopped before its second step ended
    kept = (first / "summary.json").stat().st_mtime_ns
    stopped_files = sorted(p.relative_to(second).as_posix() for p in second.rglob("*"))
    client = MlflowClient(uri)
    runs_before = {r.info.run_name: r.info.run_id for r in
                   client.search_runs([client.get_experiment_by_name("sweep-resume").experiment_id])}

    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (first / "summary.json").stat().st_mtime_ns == kept  # the finished point was not run again
    assert sorted(p.relative_to(second).as_posix() for p in second.rglob("*")) == stopped_files  # nor the stopped
    assert json.loads((first / "summary.json").read_text())["steps"] == 2
    assert json.loads((third / "summary.json").read_text())["steps"] == 2
    results = json.loads((out / "sweep.json").read_text())
    assert [r["error"] for r in results] == [None, None, None]
    assert [r["stopped_at"] for r in results] == [None, 1, None]
    assert results[1]["metrics"]["reward"] < results[0]["metrics"]["reward"]
    assert "(stopped after step 1)" in (out / "sweep.md").read_text()
    experiment = client.get_experiment_by_name("sweep-resume").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert {name: r.info.run_id for name, r in runs.items()} == runs_before  # the same runs, none added
    assert {name: r.info.status for name, r in runs.items()} == {
        "sweep": "FINISHED", first.name: "FINISHED", second.name: "KILLED", third.name: "FINISHED"}
    assert runs[second.name].data.tags["threadweaver.stopped_at_step"] == "1"
    parent = runs_before["sweep"]
    assert {r.data.tags.get("mlflow.parentRunId") for r in runs.values() if r.info.run_id != parent} == {parent}


def test_resume_needs_an_earlier_sweep_and_a_fresh_sweep_refuses_one(tmp_path):
    from cluster.sweep import sweep

    cfg = load_config(SweepConfig, None, [f"rl_config=[{RL_TINY}]", f"run_dir={tmp_path / 'sweep'}"])
    with pytest.raises(ValueError, match="holds no sweep to resume"):
        sweep(cfg, resume=True)
    (tmp_path / "sweep" / "tune").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds an earlier sweep: --resume continues it"):
        sweep(cfg)


def test_a_trial_runs_its_point_without_a_placement_group_per_role(tmp_path):
    """A trial's Tune group holds every actor of its run: the point's config turns ``ray.placement`` off, so
    ``run_rl`` reserves no second group per role (which would ask for the trial's CPUs again and wait)."""
    from cluster.cmd_rl import roles
    from cluster.ray_setup import reserve_roles
    from cluster.sweep import absolute

    cfg = load_config(SweepConfig, None, [f"rl_config=[{RL_TINY}]", f"run_dir={tmp_path}", "rho=[0.5]"])
    base = base_config(cfg)
    assert base.ray.placement  # the rl command's default: a group per role
    rl = absolute(point_config(base, grid(cfg, None)[0]))
    assert not rl.ray.placement and rl.resume == "auto" and Path(rl.run_dir).is_absolute()
    assert reserve_roles(rl.ray, roles(rl)) is None  # no Ray needed: nothing is reserved


# --------------------------------------------------------------------------- early stopping (scheduler)


def _asha_cfg(*extra: str) -> SweepConfig:
    return load_config(SweepConfig, None, [f"rl_config=[{RL_TINY}]", "scheduler=asha", *extra])


def test_no_scheduler_by_default_and_asha_stops_points_with_a_lower_heldout_reward():
    """ASHA on the held-out reward (higher is better) at the RL step each trial reports: of three points at
    step 1 (reduction factor 2), the one below the others' rewards stops, the better ones go on."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler

    from cluster.sweep import SCHEDULER_METRIC, make_scheduler, tune_config

    cfg = load_config(SweepConfig, None, [f"rl_config=[{RL_TINY}]"])
    assert cfg.scheduler == "none" and make_scheduler(cfg, 10) is None
    assert tune_config(cfg, 10, 2).scheduler is None and tune_config(cfg, 10, 2).max_concurrent_trials == 2
    asha = make_scheduler(_asha_cfg("grace_steps=2", "reduction_factor=3"), 10)
    assert isinstance(asha, ASHAScheduler)
    assert (asha.metric, asha._mode, asha._time_attr, asha._max_t) == ("reward", "max", "step", 10)
    assert SCHEDULER_METRIC == "reward" and asha._reduction_factor == 3
    assert min(r[0] for b in asha._brackets for r in b._rungs) == 2  # no point stops before grace_steps
    assert isinstance(tune_config(_asha_cfg(), 10, 1).scheduler, ASHAScheduler)  # what the Tuner gets

    asha = make_scheduler(_asha_cfg(), 4)
    trials = [SimpleNamespace(trial_id=name) for name in ("good", "bad", "best")]
    for t in trials:
        asha.on_trial_add(None, t)
    decisions = [asha.on_trial_result(None, t, {"step": 1, "reward": r}) for t, r in zip(trials, (1.0, 0.0, 2.0))]
    assert decisions == ["CONTINUE", "STOP", "CONTINUE"]
    with pytest.raises(ConfigError, match="scheduler"):
        load_config(SweepConfig, None, [f"rl_config=[{RL_TINY}]", "scheduler=hyperband"])
    with pytest.raises(ConfigError, match="reduction_factor"):
        _asha_cfg("reduction_factor=1")


def test_asha_needs_evaluations_during_training_and_says_which_key(tmp_path):
    from cluster.sweep import sweep

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = _asha_cfg(f"run_dir={tmp_path / 'sweep'}", f"model={model}", "overrides=[eval.every=0, steps=4]")
    with pytest.raises(ValueError, match=r"set eval.every >= 1"):
        sweep(cfg)  # refused before Ray or any engine starts
    with pytest.raises(ValueError, match=r"grace_steps \(5\) is more than the points' steps \(4\)"):
        sweep(replace(cfg, grace_steps=5, overrides=["eval.every=1", "steps=4"]))


def test_a_trial_reports_every_evaluation_then_its_final_one(monkeypatch):
    """What the scheduler sees: the point's held-out metrics and RL step at each evaluation during training
    (not at steps without one), then after the final evaluation, marked final; a point stopped after such a
    report keeps those metrics and says at which step."""
    from types import SimpleNamespace

    import ray.tune

    from cluster import sweep as sweep_module

    def evaluation(reward: float) -> dict:
        return {f"eval/parallel/{k}": v for k, v in {"accuracy": 0.5, "L_crit": 30.0, "L_total": 40.0,
                                                     "activation": 1.0, "eta": 0.25, "reward": reward}.items()}

    def run_point(rl_cfg, pool, tags, run_id, on_step):
        on_step(1, {"train/reward": 9.0})  # no evaluation at this step: nothing reported
        on_step(2, {"train/reward": 9.0, **evaluation(0.25)})
        return {"steps": 3, "eval": evaluation(0.75)}

    reports = []
    monkeypatch.setattr(ray.tune, "report", reports.append)
    monkeypatch.setattr(sweep_module, "_run_point", run_point)
    sweep_module._trial({"point": 1}, configs=[None, None], pool=None, tags={}, run_ids={})
    assert [(r["step"], r["reward"], r.get("final", False), r["point"]) for r in reports] == [
        (2, 0.25, False, 1), (3, 0.75, True, 1)]

    points = [Point(0, "a", 0.5, 0.2, 0.0, {}), Point(1, "b", 1.0, 0.2, 0.0, {})]
    configs = [SimpleNamespace(run_dir="/nowhere/a"), SimpleNamespace(run_dir="/nowhere/b")]
    stopped = sweep_module._result(SimpleNamespace(config={"point": 1}, error=None, metrics=reports[0]), points,
                                   configs, {1: "run-b"})
    finished = sweep_module._result(SimpleNamespace(config={"point": 1}, error=None, metrics=reports[1]), points,
                                    configs, {1: "run-b"})
    assert stopped.stopped_at == 2 and stopped.metrics["reward"] == 0.25 and stopped.mlflow_run_id == "run-b"
    assert finished.stopped_at is None and finished.metrics["reward"] == 0.75
    assert "| b (stopped after step 2) |" in table([stopped])
