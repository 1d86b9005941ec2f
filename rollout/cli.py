"""Sample parallel trajectories for the prompts of a JSONL file with Ray rollout workers.

Each input line needs ``prompt`` (text); it is wrapped in the tokenizer's chat
template as a user turn. For each prompt, ``-n`` trajectories are sampled with
the spawn/join orchestrator (``--sequential``: the same code with spawning
off) on ``--workers`` Ray actors, each owning one vLLM engine.

Each output line is one trajectory: the input record's fields (except
reference responses, ``response*``), ``response`` (the generated text, as
``threadweaver score`` reads it), and the trajectory record: units (context
ids, completion ids, completion log-probs, role, block, thread, inserted
count), the full token sequence, ``L_total``, ``L_crit``, ``eta``, blocks,
threads per block, wall-clock latency and finish reason. Lines are in prompt
order, samples of a prompt together.

Ray: a local instance is started unless ``--ray-address`` (or ``RAY_ADDRESS``)
names a running cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from collections import Counter
from pathlib import Path

from rollout.config import RolloutConfig, check_range
from rollout.files import atomic_write, check_model_dir, check_output_file
from rollout.ray_init import start_ray

#: RolloutConfig fields with a short option of their own.
_SHORT = {"n": ["-n"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input and output")
    io.add_argument("--model", required=True, type=Path, help="model directory (Hugging Face format, tags as tokens)")
    io.add_argument("--prompts", required=True, type=Path, help="JSONL file with a 'prompt' text per line")
    io.add_argument("--out", required=True, type=Path, help="JSONL file to write, one trajectory per line")
    io.add_argument("--limit", type=int, default=None, help="use only the first LIMIT prompts (default: all)")
    io.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a local one)")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")
    hints = typing.get_type_hints(RolloutConfig)
    groups = {"sampling": ("temperature", "top_p", "n", "sequential", "seed"),
              "limits": ("max_tokens", "max_context", "max_thread_tokens", "max_threads", "max_blocks"),
              "workers and engines": ("workers", "cpus_per_worker", "gpus_per_worker", "tensor_parallel_size",
                                      "dtype", "enforce_eager", "weight_bucket_mb")}
    fields = {f.name: f for f in dataclasses.fields(RolloutConfig)}
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        for name in names:
            f = fields.pop(name)
            flags = _SHORT.get(name, []) + ["--" + name.replace("_", "-")]
            help_ = f"{f.metadata['help']} (default: {f.default})"
            tp = hints[name]
            if tp is bool:
                group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=f.default,
                                   help=help_)
            else:
                base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
                group.add_argument(*flags, dest=name, type=base, default=f.default, help=help_)
    if fields:
        raise RuntimeError(f"RolloutConfig fields without a command-line option: {sorted(fields)}")


def read_prompts(path: Path, limit: int | None) -> list[dict]:
    from rollout.check import json_objects

    records = []
    for i, rec in json_objects(path):
        if not isinstance(rec.get("prompt"), str):
            raise ValueError(f"{path}:{i}: needs a string field 'prompt'")
        records.append(rec)
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records[:limit] if limit is not None else records


def run(args: argparse.Namespace) -> int:
    names = [f.name for f in dataclasses.fields(RolloutConfig)]
    try:  # every check before Ray and vLLM start
        config = RolloutConfig(**{name: getattr(args, name) for name in names})
        if args.limit is not None:
            check_range("--limit", args.limit, ">= 1")
        records = read_prompts(args.prompts, args.limit)
        check_model_dir(args.model, "--model")
        check_output_file(args.out, "--out")
        from rollout.tiny import load_tokenizer
        from rollout.units import chat_prompt_ids

        tokenizer = load_tokenizer(args.model)
        prompts = [chat_prompt_ids(tokenizer, r["prompt"]) for r in records]
    except (OSError, ValueError) as e:
        print(f"threadweaver generate: {e}", file=sys.stderr)
        return 2

    import ray
    from tqdm import tqdm

    from rollout.workers import RolloutPool

    # a local instance unless told: never join a `ray start` cluster found on this machine by accident
    start_ray(args.ray_address or os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    start = time.perf_counter()
    try:
        pool = RolloutPool(args.model, config)
        try:
            with tqdm(total=len(prompts) * config.n, desc="trajectories", unit="traj",
                      disable=args.no_progress) as bar:
                trajectories = pool.generate(prompts, progress=lambda k: bar.update(k - bar.n))
                bar.update(len(trajectories) - bar.n)
        finally:
            pool.shutdown()
    finally:
        ray.shutdown()
    elapsed = time.perf_counter() - start

    with atomic_write(args.out) as f:
        for t in trajectories:
            rec = {k: v for k, v in records[t.prompt_index].items() if not k.startswith("response")}
            rec.update(t.to_dict())
            rec["response"] = t.text
            f.write(json.dumps(rec) + "\n")
    reasons = Counter(t.finish_reason for t in trajectories)
    tokens = sum(t.L_total for t in trajectories)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"wrote {len(trajectories)} trajectories to {args.out} in {elapsed:.1f}s (engine start included); "
          f"{tokens} generated tokens; mean L_total {mean([t.L_total for t in trajectories]):.1f}, "
          f"L_crit {mean([t.L_crit for t in trajectories]):.1f}, eta {mean([t.eta for t in trajectories]):.3f}; "
          f"finish reasons: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    return 0
