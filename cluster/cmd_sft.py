"""``threadweaver sft``: the command around :func:`rl.sft.train` (starts or joins Ray, then trains)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

from cluster.config import ConfigError, describe, load_config
from rl import sft
from rl.sft import SFTConfig, check_inputs
from rollout.config import set_runtime_defaults
from rollout.ray_init import start_ray

#: the ``--help`` text: what the stage really does
DESCRIPTION = sft.__doc__


def init_ray(cfg: SFTConfig) -> bool:
    """Start (or join) Ray; returns True when this call started it."""
    import ray  # lazy: Ray takes seconds to import and --show-config needs none of it

    if ray.is_initialized():
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")  # a Ray job's entrypoint gets RAY_ADDRESS
    if address:
        start_ray(address, log_to_driver=True)
    else:  # local: never join a `ray start` cluster found on this machine by accident
        need = (cfg.learner.ranks * cfg.learner.cpus_per_rank
                + cfg.eval.workers * cfg.eval.cpus_per_worker * (cfg.eval.every > 0 or cfg.eval.at_end))
        start_ray(None, num_cpus=max(os.cpu_count() or 1, math.ceil(need)), include_dashboard=False)
    return True


def run_sft(cfg: SFTConfig, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """The SFT stage on Ray: started here (and stopped after) unless this process already runs it."""
    import ray

    check_inputs(cfg)
    started = init_ray(cfg)
    try:
        return sft.train(cfg, on_step=on_step)
    finally:
        if started:
            ray.shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config (repeat to merge several, later ones win)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted overrides of config keys, e.g. steps=200 learner.lr=3e-3")
    parser.add_argument("--show-config", action="store_true", help="print every config key with its help and exit")


def run(args: argparse.Namespace) -> int:
    if args.show_config:
        print(describe(SFTConfig))
        return 0
    set_runtime_defaults()
    try:
        cfg = load_config(SFTConfig, args.config, args.overrides)
        check_inputs(cfg)
    except (ConfigError, ValueError, OSError) as e:
        print(f"threadweaver sft: {e}", file=sys.stderr)
        return 2
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
