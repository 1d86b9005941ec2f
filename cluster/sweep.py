"""``threadweaver sweep``: a grid over the reward weights, one P-GRPO run per point, as Ray Tune trials.

What it really does:

1. resolves the RL stage's config (``rl_config`` files plus ``overrides``,
   exactly as ``threadweaver rl`` would) and the model every point starts
   from (:func:`start_model`: the sweep's ``model``, else the RL config's
   ``model`` when that folder exists, else the newest pipeline's parallel SFT
   checkpoint under ``pipelines``, with that pipeline's data when the RL
   config's data files are missing), and expands the grid
   ``rho x clip x incorrect_reward`` into points; each point is that config
   with ``reward.preset`` off, the three weights set, the base config's
   ``accel_form`` kept, and its own ``run_dir`` (``RUN_DIR/NAME``), made in
   memory from the resolved base config (``cluster.config.with_values``);
2. opens one parent MLflow run for the sweep and, before any trial starts, a
   child run per point (``mlflow.parentRunId``, status SCHEDULED; ids kept in
   ``RUN_DIR/sweep_runs.json``), all with the command's context tags;
3. runs the points as a Ray Tune grid search (``Tuner`` over the point index,
   ``grid_search``; state in ``RUN_DIR/tune``), at most ``max_concurrent`` at
   once; each trial's placement group holds an empty bundle for the trial
   itself and one bundle with the reservations of every actor of its RL run
   (rollout workers, reward actors, learner ranks; one node), in which Tune
   places them (so a point runs with ``ray.placement`` off: no second group
   per role inside the trial's); the trial runs
   the RL stage (``cluster.cmd_rl.run_rl``) in the point's MLflow run and reports the point's held-out
   metrics to Tune at each of its evaluations (``eval.every``) and after the final one;
   ``scheduler: asha`` stops points early with Ray Tune's ASHA on those reports' held-out reward
   (parallel decoding; from ``grace_steps`` RL steps on, about ``1/reduction_factor`` of the points going
   on at each rung); a stopped point keeps the metrics of its last evaluation, and its MLflow run ends
   KILLED with the tag ``threadweaver.stopped_at_step``;
4. collects each point's final held-out evaluation (``eval.at_end`` must be
   on; parallel decoding): accuracy, ``L_crit``, ``L_total``, activation,
   ``eta``; and ends with ``sweep.md`` (a table), ``sweep.json`` and
   ``sweep_plot.png`` (accuracy against ``L_crit``, one labelled point per
   grid point), logged to the parent run.

``--resume`` (``resume=true``) restores the Tune experiment (``Tuner.restore``):
finished points are kept as they are, interrupted and failed ones run again
(every point runs with ``resume=auto``, so an interrupted one continues from
its newest checkpoint), in the same MLflow runs. With ``share_rollout`` the
points run one after another and share one rollout pool (one vLLM engine
start instead of one per point; no rollout bundles in the trials' groups);
each point first loads its starting weights into that pool (the RL driver
does so for any pool it did not start), and gets its own reward actors, since
the reward weights are what the sweep varies. A point that fails is reported
(its error in ``sweep.json``, its MLflow run FAILED with the tag
``threadweaver.error``) and the others go on; the command then exits with
status 1.

On a cluster, submit the whole sweep as a Ray job (``ray job submit
--working-dir . -- threadweaver sweep --config ...``): Ray is joined through
``RAY_ADDRESS`` and the trials spread over the cluster's nodes. Only driver
processes talk to MLflow: the sweep itself (the parent run) and each point's
RL driver (its trial), at the tracking URI the sweep passes on. On a cluster
of more than one live node that URI must be a server every node reaches: a
local store (a SQLite file, a folder) is refused before any run opens
(``cluster.tracking.check_reachable``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from cluster.command import add_config_arguments, resolve
from cluster.config import ConfigError, load_config, to_dict, with_values
from cluster.lineage import run_context
from cluster.ray_setup import RayConfig, Role, init_ray
from cluster.report import save_figure
from cluster.tracking import Tracker, TrackingConfig, check_reachable, resolve_uri
from rollout.config import check_ranges, set_runtime_defaults
from rollout.files import check_model_dir, check_output_dir, write_text
from rollout.storage import is_uri
from rollout.workers import RolloutPool

#: the held-out metrics a point reports (from the RL stage's final evaluation, parallel mode)
POINT_METRICS = ("accuracy", "L_crit", "L_total", "activation", "eta", "reward")
#: what an early-stopping scheduler compares: the held-out reward (parallel decoding), reported at every evaluation
SCHEDULER_METRIC = "reward"


@dataclass
class SweepConfig:
    """A grid over the reward weights of the RL stage."""

    rl_config: list[str] = field(default_factory=list, metadata={
        "help": "YAML config file(s) of the RL stage every point starts from (threadweaver rl --config)"})
    overrides: list[str] = field(default_factory=list, metadata={
        "help": "dotted RL-config overrides applied to every point, e.g. ['steps=5', 'eval.prompts=50']"})
    rho: list[float] = field(default_factory=lambda: [0.5], metadata={
        "help": "values of reward.rho (reward/eta)", "range": ">= 0"})
    clip: list[float] = field(default_factory=lambda: [0.2], metadata={
        "help": "values of reward.clip", "range": ">= 0"})
    incorrect_reward: list[float] = field(default_factory=lambda: [0.0], metadata={
        "help": "values of reward.incorrect_reward (R_correct of a wrong answer)", "range": "finite"})
    model: str | None = field(default=None, metadata={
        "help": "checkpoint every point starts from (null: the RL config's model if it exists, else the newest "
                "pipeline's parallel SFT checkpoint under 'pipelines')"})
    pipelines: str = field(default="runs", metadata={
        "help": "folder searched for pipeline runs (*/pipeline.json) when no model is given or found"})
    run_dir: str = field(default="runs/sweep", metadata={"help": "output folder; point runs go in RUN_DIR/NAME"})
    max_concurrent: int = field(default=1, metadata={"help": "points running at once (Ray Tune trials)", "range": ">= 1"})
    resume: bool = field(default=False, metadata={
        "help": "continue the sweep in run_dir (Tune's state): finished points are kept, interrupted and failed "
                "ones run again (an interrupted one from its newest checkpoint)"})
    share_rollout: bool = field(default=False, metadata={
        "help": "one rollout pool for all points, which then run one at a time (saves an engine start per point)"})
    scheduler: Literal["none", "asha"] = field(default="none", metadata={
        "help": "early stopping: none (every point runs all its steps) or asha (Ray Tune's ASHA on the held-out "
                "reward each point reports at its evaluations; needs eval.every >= 1 in the points' config)"})
    grace_steps: int = field(default=1, metadata={
        "help": "asha: RL steps every point runs before it may be stopped (steps)", "range": ">= 1"})
    reduction_factor: float = field(default=2.0, metadata={
        "help": "asha: about 1/reduction_factor of the points go on at each rung", "range": "> 1"})
    tracking: TrackingConfig = field(default_factory=TrackingConfig,
                                     metadata={"help": "MLflow: the sweep's parent run; points log child runs"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "Ray"})

    def __post_init__(self) -> None:
        check_ranges(self)
        if not self.rl_config:
            raise ValueError("rl_config: name the RL stage's config file(s)")
        if not (self.rho and self.clip and self.incorrect_reward):
            raise ValueError("rho, clip and incorrect_reward each need at least one value")
        if self.share_rollout and self.max_concurrent != 1:
            raise ValueError("share_rollout runs points one at a time: set max_concurrent to 1")


@dataclass
class Point:
    """One grid point: its name, weights and the typed values (dotted RL-config keys) that make it."""

    index: int
    name: str
    rho: float
    clip: float
    incorrect_reward: float
    values: dict[str, Any]


@dataclass
class PointResult:
    """What a point's run produced (metrics None when it failed; ``error`` says why)."""

    point: Point
    metrics: dict[str, float] | None
    mlflow_run_id: str | None
    run_dir: str
    wall_s: float
    error: str | None = None
    stopped_at: int | None = None  # the RL step after which the scheduler stopped the point (its metrics: then)


def _num(x: float) -> str:
    return f"{x:g}"


def grid(cfg: SweepConfig, tracking_uri: str | None) -> list[Point]:
    """The points of the grid, in ``rho``-major order, each with the values it sets in the base RL config.

    ``reward.preset`` goes first, off: a preset's weights are already resolved into the base config's fields
    (``accel_form`` among them), so they stay, and the point's own weights may then differ from the preset's.
    """
    points = []
    for i, (rho, clip, bad) in enumerate(itertools.product(cfg.rho, cfg.clip, cfg.incorrect_reward)):
        name = f"p{i:02d}_rho{_num(rho)}_clip{_num(clip)}_inc{_num(bad)}"
        values: dict[str, Any] = {
            "reward.preset": None, "reward.rho": rho, "reward.clip": clip, "reward.incorrect_reward": bad,
            "run_dir": str(Path(cfg.run_dir) / name), "tracking.experiment": cfg.tracking.experiment,
            "tracking.run_name": name, "tracking.enabled": cfg.tracking.enabled}
        if tracking_uri is not None:
            values["tracking.uri"] = tracking_uri
        points.append(Point(i, name, rho, clip, bad, values))
    return points


def base_config(cfg: SweepConfig):
    """The RL config every point starts from: ``rl_config`` files plus ``overrides`` (ConfigError when bad)."""
    from cluster.cmd_rl import RLRunConfig  # lazy: imports torch via rl/ (~1.5 s); --plan and --show-config need none

    return load_config(RLRunConfig, cfg.rl_config, cfg.overrides)


def newest_pipeline(folder: str | Path) -> dict | None:
    """The stages of the newest pipeline run under ``folder`` (``*/pipeline.json``, by modification time) whose
    parallel SFT checkpoint exists, or None."""
    found = []
    for record_file in Path(folder).glob("*/pipeline.json"):
        try:
            stages = json.loads(record_file.read_text()).get("stages", {})
            ckpt = stages["sft_parallel"]["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if Path(ckpt, "config.json").is_file():
            found.append((record_file.stat().st_mtime, str(record_file), stages))
    return max(found)[2] if found else None


def start_model(cfg: SweepConfig, base) -> tuple[dict[str, Any], str]:
    """The values that set every point's model (and data, when they come from a pipeline), and a line saying
    where the model comes from; ValueError naming the keys when there is none (see module doc)."""
    if cfg.model is not None:
        check_model_dir(cfg.model, "model")
        return {"model": cfg.model}, f"model {cfg.model} (the sweep's model)"
    if Path(base.model, "config.json").is_file():
        return {}, f"model {base.model} (the RL config's model)"
    stages = newest_pipeline(cfg.pipelines)
    if stages is None:
        raise ValueError(f"no model to start from: the RL config's model ({base.model}) has no config.json and no "
                         f"pipeline under {cfg.pipelines}/ has a parallel SFT checkpoint; run 'make run' first, or "
                         "set model=DIR (a Hugging Face checkpoint folder)")
    values: dict[str, Any] = {"model": stages["sft_parallel"]["checkpoint"]}
    data_dir = stages.get("data", {}).get("dir")
    data = base.data
    if data_dir and not (Path(data.dir) / data.train_file).is_file():
        values |= {"data.dir": data_dir, "data.generate": False}
    return values, (f"model {values['model']} (the newest pipeline's parallel SFT checkpoint)"
                    + (f", data {data_dir}" if "data.dir" in values else ""))


def point_config(base, point: Point):
    """The RL config of ``point``: ``base`` (:func:`base_config`) with the point's values, composed in memory
    (every section's checks run again; ValueError for a bad value)."""
    return with_values(base, point.values)


def _plan_line(point: Point) -> str:
    """``NAME: key=value ...``, each value written as an override would spell it."""
    def text(v: Any) -> str:
        if v is None or isinstance(v, bool):
            return {None: "null", True: "true", False: "false"}[v]
        return _num(v) if isinstance(v, float) else str(v)

    return f"{point.name}: " + " ".join(f"{k}={text(v)}" for k, v in point.values.items())


def _run_point(rl_cfg, rollout_pool=None, tags: dict[str, str] | None = None, run_id: str | None = None,
               on_step=None) -> dict:
    """One point: the RL stage on the point's config (its MLflow run: ``run_id`` made beforehand, else a new
    one with ``tags``; ``on_step`` as in ``rl.driver.train``); returns its summary."""
    from cluster.cmd_rl import run_rl  # lazy: imports torch via rl/ (~1.5 s); --plan and --show-config need none
    from rl.services import Services  # lazy: imports torch via rl/ (~1.5 s); --plan and --show-config need none

    if rollout_pool is None:
        return run_rl(rl_cfg, on_step=on_step, tags=tags, run_id=run_id)
    from rewards.service import RewardPool  # lazy: imports Ray (~1 s); --plan and --show-config need none of it

    rewards = RewardPool(rl_cfg.reward)
    services = Services(rollout_pool, rewards)
    try:
        rewards.wait_ready()
        return run_rl(rl_cfg, on_step=on_step, services=services, tags=tags, run_id=run_id)
    finally:
        rewards.close()
        if services.rollout is not rollout_pool:  # the driver rebuilt the pool after a worker died
            services.rollout.shutdown()


def point_metrics(summary: dict) -> dict[str, float]:
    """The parallel-mode held-out metrics of a point's summary (KeyError if the final evaluation is missing)."""
    return eval_metrics(summary["eval"])


def eval_metrics(metrics: dict) -> dict[str, float]:
    """The parallel-mode held-out metrics (:data:`POINT_METRICS`) among an RL run's ``eval/parallel/...`` values."""
    return {key: float(metrics[f"eval/parallel/{key}"]) for key in POINT_METRICS}


def make_scheduler(cfg: SweepConfig, steps: int):
    """Ray Tune's trial scheduler of ``cfg.scheduler``: None (every point runs all ``steps``), or ASHA stopping
    points on their held-out parallel-mode ``reward`` (higher is better), measured in RL steps (``step``):
    a point may be stopped from ``grace_steps`` on, at the rungs ASHA derives from ``reduction_factor``."""
    if cfg.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="step", metric=SCHEDULER_METRIC, mode="max", max_t=steps,
                         grace_period=cfg.grace_steps, reduction_factor=cfg.reduction_factor)


def tune_config(cfg: SweepConfig, steps: int, concurrency: int):
    """The Tuner's ``TuneConfig``: at most ``concurrency`` trials at once, the scheduler of
    :func:`make_scheduler` (its metric and mode are the scheduler's own)."""
    from ray import tune

    return tune.TuneConfig(max_concurrent_trials=concurrency, scheduler=make_scheduler(cfg, steps))


def check_scheduler(cfg: SweepConfig, base) -> None:
    """ValueError naming the key when the scheduler cannot work with the points' RL config ``base``."""
    if cfg.scheduler == "none":
        return
    if base.eval.every < 1:
        raise ValueError("scheduler=asha stops points on the held-out reward of their evaluations during "
                         "training: set eval.every >= 1 in the points' config (overrides=[eval.every=N, ...])")
    if cfg.grace_steps > base.steps:
        raise ValueError(f"grace_steps ({cfg.grace_steps}) is more than the points' steps ({base.steps})")


# --------------------------------------------------------------------------- report


def table(results: Sequence[PointResult]) -> str:
    lines = ["| point | rho | clip | incorrect reward | accuracy | L_crit | L_total | activation | eta | minutes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        p = r.point
        if r.metrics is None:
            cells = f"failed: {r.error} | | | | | "
        else:
            m = r.metrics
            cells = (f"{100 * m['accuracy']:.1f}% | {m['L_crit']:.1f} | {m['L_total']:.1f} | "
                     f"{100 * m['activation']:.1f}% | {m['eta']:.3f} | ")
        name = p.name if r.stopped_at is None else f"{p.name} (stopped after step {r.stopped_at})"
        lines.append(f"| {name} | {_num(p.rho)} | {_num(p.clip)} | {_num(p.incorrect_reward)} | {cells}"
                     f"{r.wall_s / 60:.1f} |")
    return "\n".join(lines)


def plot(results: Sequence[PointResult], path: str | Path) -> Path:
    """PNG: held-out accuracy against mean ``L_crit``, one labelled marker per finished point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.metrics is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in done:
        x, y = r.metrics["L_crit"], 100 * r.metrics["accuracy"]
        ax.scatter([x], [y], s=40)
        ax.annotate(f"rho={_num(r.point.rho)} clip={_num(r.point.clip)} inc={_num(r.point.incorrect_reward)}",
                    (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel("mean critical path L_crit (tokens, held-out, parallel decoding)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"reward-weight sweep: {len(done)} of {len(results)} points")
    ax.grid(alpha=0.3)

    return save_figure(fig, path)


# --------------------------------------------------------------------------- the sweep


def sweep(cfg: SweepConfig, context: dict[str, str] | None = None, resume: bool = False) -> list[PointResult]:
    """Run every point on Ray Tune (see module doc); returns the results in grid order. ``context``: the tags
    of every run (``cluster.lineage.run_context``); ``resume``: continue the sweep in ``run_dir``."""
    from ray import tune

    from cluster.cmd_rl import roles  # lazy: imports torch via rl/ (~1.5 s); --plan and --show-config need none
    from rl.driver import check_inputs  # lazy: imports torch via rl/ (~1.5 s); --plan and --show-config need none

    run_dir = check_output_dir(cfg.run_dir, "run_dir").resolve()
    tune_dir = run_dir / "tune"
    if resume and not tune.Tuner.can_restore(str(tune_dir)):
        raise ValueError(f"--resume: {run_dir} holds no sweep to resume")
    if not resume and tune_dir.exists():
        raise ValueError(f"{run_dir} holds an earlier sweep: --resume continues it, or choose another run_dir")
    uri = resolve_uri(cfg.tracking) if cfg.tracking.enabled else None
    base = base_config(cfg)
    values, origin = start_model(cfg, base)
    base = with_values(base, values)
    print(f"sweep: every point starts from {origin}", flush=True)
    if not base.eval.at_end or "parallel" not in base.eval.modes:
        raise ValueError("every point needs its final held-out evaluation in parallel mode: set eval.at_end=true "
                         "and keep 'parallel' in eval.modes")
    check_scheduler(cfg, base)
    points = grid(cfg, uri)
    configs = [point_config(base, p) for p in points]  # every point's config is checked before anything runs
    if not resume:
        for point_cfg in configs:
            check_inputs(point_cfg)  # its data, and no earlier run in its run_dir
    configs = [absolute(c) for c in configs]
    per_point = [r for r in roles(configs[0]) if not (cfg.share_rollout and r.name == "rollout worker")]
    concurrency = 1 if cfg.share_rollout else min(cfg.max_concurrent, len(points))
    plan = [Role(r.name, r.count * concurrency, r.cpus, r.gpus, tp=r.tp) for r in roles(configs[0])]
    started = init_ray(cfg.ray, plan)
    try:
        check_reachable(uri, alive_nodes())
    except ValueError:
        if started:
            import ray

            ray.shutdown()
        raise
    # Tune saves its state at every step of its loop (not every few seconds): a sweep killed right after a
    # point finished keeps that point finished on --resume
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    runs = SweepRuns(cfg, run_dir, dict(context or {}), points)
    status = "FAILED"
    shared = None
    try:
        if cfg.share_rollout:
            # the points differ only in reward weights, so the first point's rollout settings hold for all
            shared = RolloutPool(configs[0].model, configs[0].rollout)
        trainable = tune.with_resources(
            tune.with_parameters(_trial, configs=configs, pool=shared, tags=runs.point_tags, run_ids=runs.point_ids),
            trial_resources(per_point))
        if resume:
            tuner = tune.Tuner.restore(str(tune_dir), trainable, restart_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space={"point": tune.grid_search([p.index for p in points])},
                               tune_config=tune_config(cfg, base.steps, concurrency),
                               run_config=tune.RunConfig(name="tune", storage_path=str(run_dir),
                                                         failure_config=tune.FailureConfig(max_failures=0)))
        results = [_result(r, points, configs, runs.point_ids) for r in tuner.fit()]
        results.sort(key=lambda r: r.point.index)
        for r in results:
            runs.record(r)
        _write_outputs(results, run_dir, runs.parent)
        status = "FINISHED" if all(r.error is None for r in results) else "FAILED"
        return results
    finally:
        if shared is not None:
            shared.shutdown()
        runs.parent.finish(status)
        if started:
            import ray

            ray.shutdown()


def alive_nodes() -> int:
    """Live nodes of the connected Ray cluster."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def _absolute(location: str | None) -> str | None:
    """A local path made absolute; a storage URI (or None) as it is."""
    return location if location is None or is_uri(location) else str(Path(location).resolve())


def absolute(rl_cfg):
    """``rl_cfg`` as a trial runs it: its folders as absolute paths (a Tune trial may run in another working
    directory), ``resume=auto``, and ``ray.placement`` off: the trial's own placement group
    (:func:`trial_resources`) already holds every actor of the run, and Tune schedules what the trial starts
    into it; a second reservation per role would ask for the same CPUs again outside that group and wait."""
    return with_values(rl_cfg, {"run_dir": str(Path(rl_cfg.run_dir).resolve()),
                                "model": _absolute(rl_cfg.model), "storage": _absolute(rl_cfg.storage),
                                "data.dir": str(Path(rl_cfg.data.dir).resolve()), "resume": "auto",
                                "ray.placement": False})


def trial_resources(per_point: Sequence[Role]):
    """A trial's placement group: an empty head bundle for the trial's driver, then one bundle holding every
    actor of its RL run (Tune places the actors a trial starts in its group). One bundle, not one per actor:
    Ray puts an actor in any bundle it fits, so a small actor could take a large actor's bundle first."""
    from ray import tune

    cpus = sum(r.count * r.cpus for r in per_point)
    gpus = sum(r.count * r.gpus for r in per_point)
    return tune.PlacementGroupFactory([{"CPU": 0}, {"CPU": cpus, **({"GPU": gpus} if gpus else {})}],
                                      strategy="PACK")


def _trial(config: dict, configs: list, pool, tags: dict[str, str], run_ids: dict[int, str | None]) -> None:
    """One Tune trial: the RL run of grid point ``config["point"]`` (``resume=auto``: an interrupted point
    continues from its newest checkpoint) in the MLflow run made for it. Reports the point's held-out metrics
    at every evaluation during training (``step``: the RL step; what a scheduler stops points on) and after
    the final one (``final``)."""
    from ray import tune

    index = config["point"]
    t0 = time.perf_counter()

    def report_eval(step: int, metrics: dict) -> None:
        if f"eval/parallel/{SCHEDULER_METRIC}" in metrics:
            tune.report({**eval_metrics(metrics), "point": index, "step": step,
                         "wall_s": time.perf_counter() - t0})

    summary = _run_point(configs[index], pool, tags, run_ids.get(index), on_step=report_eval)
    tune.report({**point_metrics(summary), "point": index, "step": summary["steps"], "final": True,
                 "wall_s": time.perf_counter() - t0})


def _result(result, points: Sequence[Point], configs: Sequence, run_ids: dict[int, str | None]) -> PointResult:
    """A Tune result as the point's :class:`PointResult` (its error's last line when it failed; the step and
    metrics of its last evaluation when the scheduler stopped it)."""
    point = points[result.config["point"]]
    run_dir = configs[point.index].run_dir
    summary_file = Path(run_dir) / "summary.json"
    run_id = json.loads(summary_file.read_text()).get("mlflow_run_id") if summary_file.is_file() else None
    run_id = run_id or run_ids.get(point.index)
    if result.error is not None:
        text = str(result.error).strip()
        msg = f"{type(result.error).__name__}: {text.splitlines()[-1][:300] if text else ''}"
        print(f"sweep: {point.name} failed: {msg}", file=sys.stderr, flush=True)
        return PointResult(point, None, run_id, run_dir, float((result.metrics or {}).get("time_total_s") or 0.0),
                           msg)
    m = result.metrics
    stopped = None if m.get("final") or "step" not in m else int(m["step"])
    if stopped is not None:
        print(f"sweep: {point.name} stopped by the scheduler after step {stopped}", flush=True)
    return PointResult(point, {k: float(m[k]) for k in POINT_METRICS}, run_id, run_dir, float(m["wall_s"]),
                       stopped_at=stopped)


class SweepRuns:
    """The sweep's parent MLflow run and a child run per point, made before any trial starts (points waiting
    show as SCHEDULED); their ids are kept in ``RUN_DIR/sweep_runs.json`` so ``--resume`` reopens them."""

    def __init__(self, cfg: SweepConfig, run_dir: Path, context: dict[str, str], points: Sequence[Point]):
        self.file = run_dir / "sweep_runs.json"
        saved = json.loads(self.file.read_text()) if self.file.is_file() else {}
        self.parent = Tracker(cfg.tracking, run_dir, tags=context)
        parent = self.parent.start({**to_dict(cfg, flat=True), "points": len(points)}, run_id=saved.get("parent"),
                                   tags={"stage": "sweep"})
        self.point_tags = {**context, "stage": "rl"} | ({"mlflow.parentRunId": parent} if parent else {})
        self.point_ids: dict[int, str | None] = {int(k): v for k, v in saved.get("points", {}).items()}
        if parent is not None and not self.point_ids:
            self.point_ids = {p.index: self._schedule(cfg, p) for p in points}
        if parent is not None:
            write_text(self.file, json.dumps({"parent": parent, "points": self.point_ids}, indent=1))

    def _schedule(self, cfg: SweepConfig, point: Point) -> str | None:
        """A child run for ``point`` in the SCHEDULED state (None when MLflow does not answer: a warning)."""
        try:
            client = self.parent.client()
            run = client.create_run(client.get_run(self.parent.run_id).info.experiment_id, run_name=point.name,
                                    tags=self.point_tags)
            client.update_run(run.info.run_id, status="SCHEDULED")
            return run.info.run_id
        except Exception as e:  # noqa: BLE001 - tracking never stops the sweep; the point then makes its own run
            print(f"sweep: could not create the MLflow run of {point.name}: {e}", file=sys.stderr)
            return None

    def record(self, result: PointResult) -> None:
        """The point's metrics into the parent run; a failed point's run marked FAILED with its error, a point
        the scheduler stopped KILLED with the step (``threadweaver.stopped_at_step``)."""
        p = result.point
        if result.metrics is not None:
            self.parent.log_metrics({f"sweep/{k}": v for k, v in result.metrics.items()}
                                    | {"sweep/rho": p.rho, "sweep/clip": p.clip,
                                       "sweep/incorrect_reward": p.incorrect_reward}, p.index)
            if result.stopped_at is None:
                return
        run_id = self.point_ids.get(p.index)
        if run_id is None:
            return
        try:
            client = self.parent.client()
            if result.error is not None:
                client.set_tag(run_id, "threadweaver.error", result.error[:5000])
                client.set_terminated(run_id, "FAILED")
            else:  # ended in the middle of its run (left RUNNING, or FAILED by its interrupted driver)
                client.set_tag(run_id, "threadweaver.stopped_at_step", str(result.stopped_at))
                client.set_terminated(run_id, "KILLED")
        except Exception as e:  # noqa: BLE001 - tracking never stops the sweep
            print(f"sweep: could not mark the MLflow run of {p.name} ended: {e}", file=sys.stderr)


def _write_outputs(results: Sequence[PointResult], run_dir: Path, tracker) -> None:
    md = write_text(run_dir / "sweep.md", "# Reward-weight sweep\n\nHeld-out metrics of each point's final "
                    "evaluation (parallel decoding).\n\n" + table(results) + "\n")
    js = write_text(run_dir / "sweep.json", json.dumps([asdict(r) for r in results], indent=1))
    png = plot(results, run_dir / "sweep_plot.png")
    for path in (md, js, png):
        tracker.log_artifact(path)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "'rho=[0.25,0.5]' max_concurrent=2",
                         resume="continue the sweep in run_dir: finished points kept, the others run (resume=true)")
    parser.add_argument("--plan", action="store_true", help="print the grid points and the values they set and exit")


def run(args: argparse.Namespace) -> int:
    cfg, code = resolve(SweepConfig, args, "sweep", resume_override="resume=true")
    if cfg is None:
        return code

    set_runtime_defaults()
    try:
        if args.plan:
            base = base_config(cfg)
            check_scheduler(cfg, base)
            for p in grid(cfg, None):
                point_config(base, p)
                print(_plan_line(p))
            return 0
        results = sweep(cfg, run_context("sweep", args.config), resume=cfg.resume)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"threadweaver sweep: {e}", file=sys.stderr)
        return 2
    print("\n" + table(results))
    print(f"\nplot: {Path(cfg.run_dir) / 'sweep_plot.png'}")
    failed = [r for r in results if r.error is not None]
    return 1 if failed else 0
