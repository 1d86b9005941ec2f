"""``threadweaver rl``: the command around :func:`rl.driver.train`: its config with tracking and Ray, Ray
start-up with a resource check, the MLflow tracker, the viewer pages of each evaluation."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Callable

from cluster.command import add_config_arguments, resolve
from cluster.ray_setup import RayConfig, Role, init_ray, placement_report, plan_text, reserve_roles
from cluster.tracking import Tracker, TrackingConfig
from cluster.viewer import eval_page
from rl import driver
from rl.driver import RLConfig, check_inputs, load_data
from rl.services import Services
from rollout.config import set_runtime_defaults

#: the ``--help`` text: what the stage really does
DESCRIPTION = driver.__doc__


@dataclass
class RLRunConfig(RLConfig):
    """The P-GRPO stage: model, prompts, rollout, reward, objective, learner, evaluation, tracking, Ray."""

    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"help": "MLflow"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "Ray"})


def roles(cfg: RLConfig) -> list[Role]:
    """The actors this run starts, with their reservations (see ``cluster.ray_setup``)."""
    out = [Role("rollout worker", cfg.rollout.workers, cfg.rollout.cpus_per_worker, cfg.rollout.gpus_per_worker,
                "rollout"),
           Role("reward actor", cfg.reward.num_actors, cfg.reward.actor_cpus, 0.0, "reward"),
           Role("learner rank", cfg.learner.ranks, cfg.learner.cpus_per_rank, cfg.learner.gpus_per_rank, "learner")]
    if cfg.grpo.kl_coef > 0:
        out.append(Role("reference model", 1, cfg.learner.cpus_per_rank, cfg.learner.gpus_per_rank, "reference"))
    return out


def run_rl(cfg: RLRunConfig, on_step: Callable[[int, dict], None] | None = None,
           services: Services | None = None) -> dict:
    """The P-GRPO stage with its MLflow tracker, on Ray: started here (and stopped after) unless this process
    already runs it; ``on_step`` and ``services`` as in :func:`rl.driver.train`."""
    import ray  # lazy: Ray takes seconds to import and --show-config needs none of it

    check_inputs(cfg)
    started = init_ray(cfg.ray, roles(cfg))
    reservation = None
    try:
        reservation = reserve_roles(cfg.ray, roles(cfg)) if services is None else None
        return driver.train(cfg, Tracker(cfg.tracking, cfg.run_dir), on_step=on_step, services=services,
                            eval_page=eval_page, placement=reservation.actor_options if reservation else None)
    finally:
        if reservation is not None:
            reservation.release()
        if started:
            ray.shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "steps=50 grpo.advantage=std",
                         resume="continue from RUN_DIR's newest checkpoint (same as resume=auto)")
    parser.add_argument("--check", action="store_true",
                        help="resolve the config, read the data, start or join Ray, check that every role fits, "
                             "print the plan and exit without training")


def run(args: argparse.Namespace) -> int:
    cfg, code = resolve(RLRunConfig, args, "rl", check=check_inputs)
    if cfg is None:
        return code
    set_runtime_defaults()
    if args.check:
        return check(cfg)
    summary = run_rl(cfg)
    ev = summary["eval"]
    print(f"rl done: {summary['steps']} steps in {summary['wall_s'] / 60:.1f} min, checkpoint {summary['checkpoint']}")
    for mode in cfg.eval.modes:
        if f"eval/{mode}/accuracy" in ev:
            print(f"held-out {mode}: accuracy {ev[f'eval/{mode}/accuracy']:.3f}, activation "
                  f"{ev[f'eval/{mode}/activation']:.3f}, L_crit {ev[f'eval/{mode}/L_crit']:.1f}, "
                  f"eta {ev[f'eval/{mode}/eta']:.3f}")
    if summary["mlflow_run_id"]:
        print(f"MLflow run {summary['mlflow_run_id']} at {summary['tracking_uri']}")
    return 0


def check(cfg: RLRunConfig) -> int:
    """``--check``: everything but training (see ``add_arguments``)."""
    import ray

    try:
        train_records, val_records = load_data(cfg)
    except (OSError, ValueError) as e:
        print(f"threadweaver rl: {e}", file=sys.stderr)
        return 2
    try:
        started = init_ray(cfg.ray, roles(cfg))
    except RuntimeError as e:
        print(f"threadweaver rl: {e}", file=sys.stderr)
        return 2
    try:
        resources = ray.cluster_resources()
        print(f"rl check: {len(train_records)} training and {len(val_records)} validation records; Ray at "
              f"{ray.get_runtime_context().gcs_address} with {resources.get('CPU', 0):g} CPU, "
              f"{resources.get('GPU', 0):g} GPU; the roles fit:\n{plan_text(roles(cfg))}")
        print(placement_report(cfg.ray, roles(cfg)))
    except RuntimeError as e:
        print(f"threadweaver rl: {e}", file=sys.stderr)
        return 2
    finally:
        if started:
            ray.shutdown()
    return 0
