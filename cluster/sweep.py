"""``threadweaver sweep``: a grid over the reward weights, one P-GRPO run per point, as Ray tasks.

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
2. opens one parent MLflow run for the sweep, and runs every point as a Ray
   task (``cluster.cmd_rl.run_rl``), at most ``max_concurrent`` at once; a point's
   run is created as an MLflow child run of the sweep's (``mlflow.parentRunId``)
   with the command's context tags;
3. collects each point's final held-out evaluation (``eval.at_end`` must be
   on; parallel decoding): accuracy, ``L_crit``, ``L_total``, activation,
   ``eta``; and ends with ``sweep.md`` (a table), ``sweep.json`` and
   ``sweep_plot.png`` (accuracy against ``L_crit``, one labelled point per
   grid point), logged to the parent run.

Each task reserves no CPU itself (it only drives): its rollout workers, reward
actors and learner ranks reserve what the RL config says. With
``share_rollout`` the points run one after another and share one rollout
pool (one vLLM engine start instead of one per point); each point first loads
its starting weights into that pool (the RL driver does so for any pool it
did not start), and gets its own reward actors, since the reward weights
are what the sweep varies. A point that fails is reported (its error in
``sweep.json``) and the others go on; the command then exits with status 1.

On a cluster, submit the whole sweep as a Ray job (``ray job submit
--working-dir . -- threadweaver sweep --config ...``): Ray is joined through
``RAY_ADDRESS`` and the points spread over the cluster's nodes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cluster.command import add_config_arguments, resolve
from cluster.config import ConfigError, load_config, to_dict, with_values
from cluster.lineage import run_context
from cluster.ray_setup import RayConfig, Role, init_ray
from cluster.report import save_figure
from cluster.tracking import Tracker, TrackingConfig, resolve_uri
from rollout.config import check_ranges, set_runtime_defaults
from rollout.files import check_model_dir, check_output_dir, write_text
from rollout.workers import RolloutPool

#: the held-out metrics a point reports (from the RL stage's final evaluation, parallel mode)
POINT_METRICS = ("accuracy", "L_crit", "L_total", "activation", "eta", "reward")


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
    max_concurrent: int = field(default=1, metadata={"help": "points running at once (Ray tasks)", "range": ">= 1"})
    share_rollout: bool = field(default=False, metadata={
        "help": "one rollout pool for all points, which then run one at a time (saves an engine start per point)"})
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


def _run_point(rl_cfg, rollout_pool=None, tags: dict[str, str] | None = None) -> dict:
    """Body of one point's Ray task: the RL stage on the point's config (its MLflow run gets ``tags``);
    returns its summary."""
    from cluster.cmd_rl import run_rl  # lazy: imports torch via rl/ (~1.5 s); --plan and --show-config need none
    from rl.services import Services  # lazy: imports torch via rl/ (~1.5 s); --plan and --show-config need none

    if rollout_pool is None:
        return run_rl(rl_cfg, tags=tags)
    from rewards.service import RewardPool  # lazy: imports Ray (~1 s); --plan and --show-config need none of it

    rewards = RewardPool(rl_cfg.reward)
    services = Services(rollout_pool, rewards)
    try:
        rewards.wait_ready()
        return run_rl(rl_cfg, services=services, tags=tags)
    finally:
        rewards.close()
        if services.rollout is not rollout_pool:  # the driver rebuilt the pool after a worker died
            services.rollout.shutdown()


def point_metrics(summary: dict) -> dict[str, float]:
    """The parallel-mode held-out metrics of a point's summary (KeyError if the final evaluation is missing)."""
    ev = summary["eval"]
    return {key: float(ev[f"eval/parallel/{key}"]) for key in POINT_METRICS}


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
        lines.append(f"| {p.name} | {_num(p.rho)} | {_num(p.clip)} | {_num(p.incorrect_reward)} | {cells}"
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


def sweep(cfg: SweepConfig, context: dict[str, str] | None = None) -> list[PointResult]:
    """Run every point (see module doc); returns the results in grid order. ``context``: the tags of every
    run (``cluster.lineage.run_context``)."""
    import ray

    from cluster.cmd_rl import roles  # lazy: imports torch via rl/ (~1.5 s); --plan and --show-config need none
    from rl.driver import check_inputs  # lazy: imports torch via rl/ (~1.5 s); --plan and --show-config need none

    run_dir = check_output_dir(cfg.run_dir, "run_dir")
    uri = resolve_uri(cfg.tracking) if cfg.tracking.enabled else None
    base = base_config(cfg)
    values, origin = start_model(cfg, base)
    base = with_values(base, values)
    print(f"sweep: every point starts from {origin}", flush=True)
    if not base.eval.at_end or "parallel" not in base.eval.modes:
        raise ValueError("every point needs its final held-out evaluation in parallel mode: set eval.at_end=true "
                         "and keep 'parallel' in eval.modes")
    points = grid(cfg, uri)
    configs = [point_config(base, p) for p in points]  # every point's config is checked before anything runs
    for point_cfg in configs:
        check_inputs(point_cfg)  # its data, and no earlier run in its run_dir
    per_point = roles(configs[0])
    concurrency = 1 if cfg.share_rollout else min(cfg.max_concurrent, len(points))
    plan = [Role(r.name, r.count * concurrency, r.cpus, r.gpus) for r in per_point]
    started = init_ray(cfg.ray, plan)
    context = dict(context or {})
    tracker = Tracker(cfg.tracking, run_dir, tags=context)
    parent = tracker.start({**to_dict(cfg, flat=True), "points": len(points)}, tags={"stage": "sweep"})
    point_tags = {**context, "stage": "sweep_point"} | ({"mlflow.parentRunId": parent} if parent else {})
    status = "FAILED"
    shared = None
    results: list[PointResult | None] = [None] * len(points)
    try:
        if cfg.share_rollout:
            # the points differ only in reward weights, so the first point's rollout settings hold for all
            shared = RolloutPool(configs[0].model, configs[0].rollout)
        task = ray.remote(num_cpus=0, max_retries=0)(_run_point)
        pending: dict[Any, tuple[Point, float]] = {}
        queue = list(points)
        while queue or pending:
            while queue and len(pending) < concurrency:
                p = queue.pop(0)
                print(f"sweep: starting {p.name} ({p.index + 1}/{len(points)})", flush=True)
                ref = task.remote(configs[p.index], shared, point_tags)
                pending[ref] = (p, time.perf_counter())
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                p, t0 = pending.pop(ref)
                results[p.index] = _collect(ref, p, time.perf_counter() - t0, configs[p.index].run_dir, tracker)
        finished = [r for r in results if r is not None]
        _write_outputs(finished, run_dir, tracker)
        status = "FINISHED" if all(r.error is None for r in finished) else "FAILED"
        return finished
    finally:
        if shared is not None:
            shared.shutdown()
        tracker.finish(status)
        if started:
            ray.shutdown()


def _collect(ref, point: Point, wall_s: float, run_dir: str, tracker) -> PointResult:
    import ray

    try:
        summary = ray.get(ref)
        metrics = point_metrics(summary)
    except Exception as e:  # noqa: BLE001 - one failed point is reported; the sweep goes on
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
        print(f"sweep: {point.name} failed: {msg}", file=sys.stderr, flush=True)
        return PointResult(point, None, None, run_dir, wall_s, msg)
    run_id = summary.get("mlflow_run_id")
    tracker.log_metrics({f"sweep/{k}": v for k, v in metrics.items()}
                        | {"sweep/rho": point.rho, "sweep/clip": point.clip,
                           "sweep/incorrect_reward": point.incorrect_reward}, point.index)
    print(f"sweep: {point.name} done in {wall_s / 60:.1f} min: accuracy {metrics['accuracy']:.3f}, "
          f"L_crit {metrics['L_crit']:.1f}", flush=True)
    return PointResult(point, metrics, run_id, run_dir, wall_s)


def _write_outputs(results: Sequence[PointResult], run_dir: Path, tracker) -> None:
    md = write_text(run_dir / "sweep.md", "# Reward-weight sweep\n\nHeld-out metrics of each point's final "
                    "evaluation (parallel decoding).\n\n" + table(results) + "\n")
    js = write_text(run_dir / "sweep.json", json.dumps([asdict(r) for r in results], indent=1))
    png = plot(results, run_dir / "sweep_plot.png")
    for path in (md, js, png):
        tracker.log_artifact(path)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "'rho=[0.25,0.5]' max_concurrent=2")
    parser.add_argument("--plan", action="store_true", help="print the grid points and the values they set and exit")


def run(args: argparse.Namespace) -> int:
    cfg, code = resolve(SweepConfig, args, "sweep")
    if cfg is None:
        return code

    set_runtime_defaults()
    try:
        if args.plan:
            base = base_config(cfg)
            for p in grid(cfg, None):
                point_config(base, p)
                print(_plan_line(p))
            return 0
        results = sweep(cfg, run_context("sweep", args.config))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"threadweaver sweep: {e}", file=sys.stderr)
        return 2
    print("\n" + table(results))
    print(f"\nplot: {Path(cfg.run_dir) / 'sweep_plot.png'}")
    failed = [r for r in results if r.error is not None]
    return 1 if failed else 0
