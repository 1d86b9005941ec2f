"""``threadweaver generate``: sample parallel trajectories for the prompts of a JSONL file with Ray rollout workers.

Each input line needs ``prompt`` (text); it is wrapped in the tokenizer's chat
template as a user turn. For each prompt, ``rollout.n`` trajectories are
sampled with the spawn/join orchestrator (``rollout.sequential=true``: the same
code with spawning off) on ``rollout.workers`` Ray actors, each owning one
vLLM engine.

Each output line is one trajectory: the input record's fields (except
reference responses, ``response*``), ``response`` (the generated text, as
``threadweaver score`` reads it), and the trajectory record: units (context
ids, completion ids, completion log-probs, role, block, thread, inserted
count), the full token sequence, ``L_total``, ``L_crit``, ``eta``, blocks,
threads per block, wall-clock latency and finish reason. Lines are in prompt
order, samples of a prompt together.

Ray: a local instance is started unless ``ray.address`` (or ``RAY_ADDRESS``)
names a running cluster.

Usage: ``threadweaver generate model=DIR prompts=FILE out=FILE [rollout.n=4] [rollout.sequential=true] ...``
(``--show-config`` lists every key).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cluster.command import add_config_arguments, resolve
from cluster.ray_setup import RayConfig, Role, init_ray
from rollout.check import json_objects
from rollout.config import RolloutConfig, check_ranges
from rollout.files import atomic_write, check_model_dir, check_output_file
from rollout.units import chat_prompt_ids
from rollout.workers import RolloutPool


@dataclass
class GenerateConfig:
    """Prompts in, trajectories out: the model, the files, the sampling and workers, Ray."""

    model: str = field(default="", metadata={"help": "model directory (Hugging Face format, tags as tokens) "
                                                     "(required)"})
    prompts: str = field(default="", metadata={"help": "JSONL file with a 'prompt' text per line (required)"})
    out: str = field(default="", metadata={"help": "JSONL file to write, one trajectory per line (required)"})
    limit: int | None = field(default=None, metadata={
        "help": "use only the first LIMIT prompts (null: all)", "range": ">= 1"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={
        "help": "sampling (n samples per prompt, sequential: spawning off), limits, workers and engines"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "Ray"})

    def __post_init__(self) -> None:
        check_ranges(self)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "model=runs/sft/final/hf prompts=p.jsonl out=t.jsonl rollout.n=4")


def read_prompts(path: Path, limit: int | None) -> list[dict]:
    records = []
    for i, rec in json_objects(path):
        if not isinstance(rec.get("prompt"), str):
            raise ValueError(f"{path}:{i}: needs a string field 'prompt'")
        records.append(rec)
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records[:limit] if limit is not None else records


def run(args: argparse.Namespace) -> int:
    cfg, code = resolve(GenerateConfig, args, "generate")
    if cfg is None:
        return code
    try:  # every check before Ray and vLLM start
        for key in ("model", "prompts", "out"):
            if not getattr(cfg, key):
                raise ValueError(f"{key} is required ({key}=...)")
        records = read_prompts(Path(cfg.prompts), cfg.limit)
        check_model_dir(cfg.model, "model")
        check_output_file(cfg.out, "out")
        from rollout.tiny import load_tokenizer  # lazy: transformers takes seconds to import

        tokenizer = load_tokenizer(cfg.model)
        prompts = [chat_prompt_ids(tokenizer, r["prompt"]) for r in records]
    except (OSError, ValueError) as e:
        print(f"threadweaver generate: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    trajectories = _sample(cfg, prompts)
    elapsed = time.perf_counter() - start
    _write(cfg, records, trajectories, elapsed)
    return 0


def _sample(cfg: GenerateConfig, prompts: list[list[int]]) -> list:
    """The trajectories of ``prompts`` from a rollout pool on Ray (started here, and stopped, unless running)."""
    import ray  # lazy: Ray takes seconds to import and --show-config needs none of it
    from tqdm import tqdm

    rc = cfg.rollout
    started = init_ray(cfg.ray, [Role("rollout worker", rc.workers, rc.cpus_per_worker, rc.gpus_per_worker,
                                      tp=rc.tensor_parallel_size)])
    try:
        pool = RolloutPool(cfg.model, rc)
        try:
            with tqdm(total=len(prompts) * rc.n, desc="trajectories", unit="traj", disable=not cfg.progress) as bar:
                trajectories = pool.generate(prompts, progress=lambda k: bar.update(k - bar.n))
                bar.update(len(trajectories) - bar.n)
        finally:
            pool.shutdown()
    finally:
        if started:
            ray.shutdown()
    return trajectories


def _write(cfg: GenerateConfig, records: list[dict], trajectories: list, elapsed: float) -> None:
    with atomic_write(cfg.out) as f:
        for t in trajectories:
            rec = {k: v for k, v in records[t.prompt_index].items() if not k.startswith("response")}
            rec.update(t.to_dict())
            rec["response"] = t.text
            f.write(json.dumps(rec) + "\n")
    reasons = Counter(t.finish_reason for t in trajectories)
    tokens = sum(t.L_total for t in trajectories)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"wrote {len(trajectories)} trajectories to {cfg.out} in {elapsed:.1f}s (engine start included); "
          f"{tokens} generated tokens; mean L_total {mean([t.L_total for t in trajectories]):.1f}, "
          f"L_crit {mean([t.L_crit for t in trajectories]):.1f}, eta {mean([t.eta for t in trajectories]):.3f}; "
          f"finish reasons: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
