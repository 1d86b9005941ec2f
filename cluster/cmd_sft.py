"""``threadweaver sft``: the command around :func:`rl.sft.train`: its config with Ray, Ray start-up with a
resource check (``cluster.ray_setup``), then training."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable

from cluster.command import add_config_arguments, resolve
from cluster.ray_setup import RayConfig, Role, init_ray
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
    out = [Role("SFT learner", cfg.learner.ranks, cfg.learner.cpus_per_rank, cfg.learner.gpus_per_rank)]
    if cfg.eval.every > 0 or cfg.eval.at_end:
        out.append(Role("SFT eval worker", cfg.eval.rollout.workers, cfg.eval.rollout.cpus_per_worker,
                        cfg.eval.rollout.gpus_per_worker))
    return out


def run_sft(cfg: SFTConfig, on_step: Callable[[int, dict], None] | None = None,
            ray_cfg: RayConfig | None = None) -> dict:
    """The SFT stage on Ray: started here (and stopped after) unless this process already runs it; Ray's
    settings are ``cfg.ray`` (an :class:`SFTRunConfig`), else ``ray_cfg``, else the defaults."""
    import ray  # lazy: Ray takes seconds to import and --show-config needs none of it

    check_inputs(cfg)
    started = init_ray(getattr(cfg, "ray", None) or ray_cfg or RayConfig(), roles(cfg))
    try:
        return sft.train(cfg, on_step=on_step)
    finally:
        if started:
            ray.shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "steps=200 learner.lr=3e-3",
                         resume="continue from RUN_DIR's newest checkpoint (same as resume=auto)")


def run(args: argparse.Namespace) -> int:
    cfg, code = resolve(SFTRunConfig, args, "sft", check=check_inputs)
    if cfg is None:
        return code
    set_runtime_defaults()
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
