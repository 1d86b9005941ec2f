"""Benchmark the rollout pool: parallel (spawn/join) against sequential decoding, and weight updates.

What it does, in one run:

1. writes the tiny model and teaches it, by rote (``rollout.rote``), the
   parallel responses of a few synthetic-task problems, both as units (so
   spawn/join decoding reproduces them) and as whole sequences (so
   sequential decoding does too): both modes then do the same work, and
   differ only in how it is scheduled;
2. starts a Ray pool of ``--workers`` rollout workers on the taught model;
3. runs the same prompts x ``-n`` samples once in each mode (after a short
   warm-up) and measures trajectories/s, generated tokens/s, the mean
   wall-clock latency of one trajectory and the mean critical path;
4. publishes the model's state dict to Ray's object store from this process
   (``rollout.weights.publish_state_dict``) and loads it into the pool
   ``--updates`` times; reports the median weight-update seconds
   (``scripts/bench_weight_sync.py`` measures the learner's own publishing).

The table is printed side by side; nothing is asserted. Timings on a shared
CPU machine are noisy: compare the two columns of one run, not runs.

    .venv/bin/python scripts/bench_rollout.py --workers 1 -n 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

for _name, _value in {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_name, _value)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and task")
    g.add_argument("--work-dir", type=Path, default=None,
                   help="where the models go (default: a temporary directory); a taught model found there is reused")
    g.add_argument("--problems", type=int, default=2, help="task problems taught and used as prompts (default 2)")
    g.add_argument("--threads", type=int, default=4, help="threads per block of the taught responses (default 4)")
    g.add_argument("--b-digits", type=int, default=2, help="digits of the multi-digit factor; longer threads "
                                                            "with more digits (default 2)")
    g.add_argument("--teach-steps", type=int, default=2000, help="most rote-learning steps (default 2000)")
    g = p.add_argument_group("rollout")
    g.add_argument("-n", type=int, default=8, help="samples per prompt (default 8)")
    g.add_argument("--workers", type=int, default=1, help="Ray rollout workers (default 1)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs per worker (default 1)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    g.add_argument("--updates", type=int, default=3, help="weight updates to time (default 3)")
    g.add_argument("--bucket-mb", type=float, default=1.0, help="weight-update bucket size (MiB, default 1)")
    return p.parse_args()


def teach_model(work: Path, args) -> tuple[Path, list[list[int]]]:
    from rollout.rote import teach
    from rollout.task import TaskConfig, make_dataset
    from rollout.tiny import init_model, load_tokenizer
    from rollout.units import chat_prompt_ids

    cfg = TaskConfig(min_threads=args.threads, max_threads=args.threads, b_digits=args.b_digits)
    records = make_dataset(cfg, {"train": args.problems}, seed=0)["train"]
    base, taught = work / "tiny", work / f"taught-{args.problems}x{args.threads}x{args.b_digits}"
    if not (base / "config.json").exists():
        init_model(base, seed=0)
    tokenizer = load_tokenizer(base)
    examples = [(chat_prompt_ids(tokenizer, r["prompt"]), r["response_parallel"]) for r in records]
    if not (taught / "config.json").exists():
        start = time.perf_counter()
        result = teach(base, taught, examples, tokenizer, max_steps=args.teach_steps)
        print(f"taught {len(examples)} responses by rote in {time.perf_counter() - start:.0f}s: {result}")
    return taught, [p for p, _ in examples]


def measure(pool, prompts, config) -> dict:
    start = time.perf_counter()
    trajectories = pool.generate(prompts, config=config)
    wall = time.perf_counter() - start
    tokens = sum(t.L_total for t in trajectories)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    reasons = sorted({t.finish_reason for t in trajectories})
    return {"trajectories": len(trajectories), "wall s": wall, "trajectories/s": len(trajectories) / wall,
            "tokens/s": tokens / wall, "mean L_total": mean([t.L_total for t in trajectories]),
            "mean L_crit": mean([t.L_crit for t in trajectories]),
            "mean latency s": mean([t.latency_s for t in trajectories]), "finish": ",".join(reasons)}


def main() -> None:
    args = parse_args()
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from rollout.config import RolloutConfig
    from rollout.ray_init import start_ray
    from rollout.weights import publish_state_dict
    from rollout.workers import RolloutPool

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    model_dir, prompts = teach_model(work, args)
    start_ray(None, num_cpus=max(2, int(args.workers * args.cpus_per_worker)), include_dashboard=False)
    config = RolloutConfig(n=args.n, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                           temperature=args.temperature, max_tokens=1024, max_context=2048, max_thread_tokens=256,
                           weight_bucket_mb=args.bucket_mb)
    pool = RolloutPool(model_dir, config)
    try:
        pool.generate(prompts[:1], n=1)  # warm-up
        parallel = measure(pool, prompts, config)
        sequential = measure(pool, prompts, RolloutConfig(**{**config.__dict__, "sequential": True}))
        state = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).state_dict()
        bucket_bytes = int(args.bucket_mb * 2**20)
        updates = [pool.update_weights(publish_state_dict(state, bucket_bytes)) for _ in range(args.updates)]
    finally:
        pool.shutdown()
        ray.shutdown()

    print(f"\nrollout pool: {args.workers} worker(s) x {args.cpus_per_worker:g} CPU, {len(prompts)} prompts x "
          f"n={args.n}, temperature {args.temperature:g}, {args.threads} threads per block\n")
    print(f"{'':<18}{'parallel':>12}{'sequential':>12}{'par/seq':>9}")
    for key in ("trajectories", "wall s", "trajectories/s", "tokens/s", "mean L_total", "mean L_crit",
                "mean latency s"):
        a, b = parallel[key], sequential[key]
        print(f"{key:<18}{a:>12.2f}{b:>12.2f}{a / b if b else float('nan'):>9.2f}")
    print(f"{'finish reasons':<18}{parallel['finish']:>12}{sequential['finish']:>12}")
    u = updates[len(updates) // 2] if updates else None
    if u is not None:
        seconds = statistics.median(x.seconds for x in updates)
        print(f"\nweight update: median {seconds:.3f}s over {len(updates)} "
              f"({u.n_bytes / 2**20:.1f} MiB in {u.n_buckets} buckets; slowest worker load "
              f"{statistics.median(x.load_s for x in updates):.3f}s, publishing "
              f"{statistics.median(x.publish_s for x in updates):.3f}s)")


if __name__ == "__main__":
    main()
