"""``threadweaver sft``: the command around :func:`rl.sft.train`: its config with Ray, Ray start-up with a
resource check (``cluster.ray_setup``), then training."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Callable

from cluster.command import add_config_arguments, resolve
from cluster.ray_setup import RayConfig, Role, init_ray, placement_report, plan_text, reserve_roles
from rl import sft
from rl.sft import SFTConfig, check_inputs
from rollout.config import set_runtime_defaults

#: the ``--help`` text: what the stage really does
DESCRIPTION = sft.__doc__


@dataclass
class SFTRunConfig(SFTConfig):
    """The SFT stage: model, data, learner, schedule length, evaluation, checkpoints, Ray."""

    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "Ray"})


def roles(cfg: SFTConfig) -> list[Role]:
    """The actors this run starts, with their reservations (see ``cluster.ray_setup``)."""
    out = [Role("SFT learner", cfg.learner.ranks, cfg.learner.cpus_per_rank, cfg.learner.gpus_per_rank, "learner")]
    if cfg.eval.every > 0 or cfg.eval.at_end:
        out.append(Role("SFT eval worker", cfg.eval.rollout.workers, cfg.eval.rollout.cpus_per_worker,
                        cfg.eval.rollout.gpus_per_worker, "eval"))
    return out


def run_sft(cfg: SFTConfig, on_step: Callable[[int, dict], None] | None = None,
            ray_cfg: RayConfig | None = None) -> dict:
    """The SFT stage on Ray: started here (and stopped after) unless this process already runs it; Ray's
    settings are ``cfg.ray`` (an :class:`SFTRunConfig`), else ``ray_cfg``, else the defaults."""
    import ray  # lazy: Ray takes seconds to import and --show-config needs none of it

    check_inputs(cfg)
    ray_cfg = getattr(cfg, "ray", None) or ray_cfg or RayConfig()
    started = init_ray(ray_cfg, roles(cfg))
    reservation = None
    try:
        reservation = reserve_roles(ray_cfg, roles(cfg))
        return sft.train(cfg, on_step=on_step, placement=reservation.actor_options if reservation else None)
    finally:
        if reservation is not None:
            reservation.release()
        if started:
            ray.shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "steps=200 learner.lr=3e-3",
                         resume="continue from RUN_DIR's newest checkpoint (same as resume=auto)")
    parser.add_argument("--check", action="store_true",
                        help="resolve the config, start or join Ray, check that every role fits and can be placed, "
                             "print the placement plan and exit without training")


def check(cfg: SFTRunConfig) -> int:
    """``--check``: the resource and placement plan, without training."""
    import ray

    try:
        started = init_ray(cfg.ray, roles(cfg))
    except RuntimeError as e:
        print(f"threadweaver sft: {e}", file=sys.stderr)
        return 2
    try:
        print(f"sft check: Ray at {ray.get_runtime_context().gcs_address}; the roles fit:\n{plan_text(roles(cfg))}")
        print(placement_report(cfg.ray, roles(cfg)))
    except RuntimeError as e:
        print(f"threadweaver sft: {e}", file=sys.stderr)
        return 2
    finally:
        if started:
            ray.shutdown()
    return 0


def run(args: argparse.Namespace) -> int:
    cfg, code = resolve(SFTRunConfig, args, "sft", check=check_inputs)
    if cfg is None:
        return code
    set_runtime_defaults()
    if args.check:
        return check(cfg)
    summary = run_sft(cfg)
    ev = summary["eval"]
    print(f"sft done: {summary['steps']} steps, train {summary['train_s'] / 60:.1f} min, "
          f"eval {summary['eval_s'] / 60:.1f} min, {summary['examples_seen']} examples "
          f"({summary['epochs']:.2f} epochs), {summary['tokens_seen']:.0f} tokens")
    if ev:
        print(f"held-out ({ev['prompts']:.0f} prompts): accuracy {ev['accuracy']:.3f}, format-valid "
              f"{ev['format_valid']:.3f}, parallel-valid {ev['parallel_valid']:.3f}, L_total {ev['L_total']:.1f}, "
              f"L_crit {ev['L_crit']:.1f}, eta {ev['eta']:.3f}")
    print(f"checkpoint (Hugging Face, loads in vLLM): {summary['checkpoint']}")
    return 0
