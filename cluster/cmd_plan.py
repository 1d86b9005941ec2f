"""``threadweaver plan CONFIG [key=value ...]``: the memory plan of an SFT or RL config before anything starts.

Per learner rank: parameters, gradients and optimizer states by ZeRO stage
and offload, the activations of one row (with or without gradient
checkpointing), the log-probability chunk; per rollout worker: weights, KV
cache and its engine's share; the reference model when the KL term is on
(formulas in :mod:`rl.memory_plan`). Prints the table and the total per
device against ``--device-memory-gib`` (else the config's
``plan.device_memory_gib``), and exits 1 naming the knob to turn when a device
does not fit, 2 on a bad config. ``threadweaver sft`` and ``rl`` run the same
check before they start. Nothing is loaded but the model's ``config.json``
(or the shape named by ``plan.architecture``).
"""

from __future__ import annotations

import argparse
import sys

import yaml

from cluster.cmd_rl import RLRunConfig
from cluster.cmd_sft import SFTRunConfig
from cluster.command import add_config_arguments, resolve
from rl import driver, sft

#: keys that only an RL config has (how ``--stage auto`` tells the two apart)
RL_KEYS = {"rollout", "reward", "grpo", "prompts_per_step", "tracking"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "learner.gradient_checkpointing=false learner.row_tokens=131072")
    parser.add_argument("--stage", choices=["auto", "sft", "rl"], default="auto",
                        help="which training config this is (auto: rl when it has a rollout, reward or grpo "
                             "section, else sft)")
    parser.add_argument("--device-memory-gib", type=float, default=None,
                        help="memory of one accelerator (GiB); default: the config's plan.device_memory_gib")
    parser.add_argument("--headroom", type=float, default=None,
                        help="share of device memory to keep free (0-1); default: the config's plan.headroom")


def _stage(args: argparse.Namespace) -> str:
    if args.stage != "auto":
        return args.stage
    keys: set[str] = set()
    for path in args.config:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        keys |= set(data) if isinstance(data, dict) else set()
    keys |= {o.split("=", 1)[0].split(".", 1)[0] for o in args.overrides}
    return "rl" if keys & RL_KEYS else "sft"


def run(args: argparse.Namespace) -> int:
    # ``plan CONFIG key=value``: a positional without '=' is a config file
    args.config = list(args.config) + [o for o in args.overrides if "=" not in o]
    args.overrides = [o for o in args.overrides if "=" in o]
    extra = []
    if args.device_memory_gib is not None:
        extra.append(f"plan.device_memory_gib={args.device_memory_gib}")
    if args.headroom is not None:
        extra.append(f"plan.headroom={args.headroom}")
    try:
        stage = _stage(args)
    except (OSError, yaml.YAMLError) as e:
        print(f"threadweaver plan: {e}", file=sys.stderr)
        return 2
    cls = RLRunConfig if stage == "rl" else SFTRunConfig
    cfg, code = resolve(cls, args, "plan", extra_overrides=extra)
    if cfg is None:
        return code
    try:
        plan = driver.memory_plan(cfg) if stage == "rl" else sft.memory_plan(cfg)
    except (ValueError, OSError) as e:
        print(f"threadweaver plan: {e}", file=sys.stderr)
        return 2
    model = cfg.model if stage == "rl" else cfg.model.path
    print(f"memory plan of the {stage} config ({model or 'tiny model'}"
          f"{', shape ' + cfg.plan.architecture if cfg.plan.architecture else ''}):")
    print(plan.table())
    problems = plan.problems()
    for p in problems:
        print(f"threadweaver plan: does not fit: {p}", file=sys.stderr)
    if not problems and plan.device_bytes > 0:
        print(f"fits, keeping {cfg.plan.headroom:.0%} of every device free")
    return 1 if problems else 0
