"""Benchmark: rewards per second for realistic responses, in-process and on 1 and 2 Ray actors.

The batch imitates one P-GRPO step: ``--problems`` prompts x ``--group`` sampled
responses each (default 128 x 8 = 1024). Three quarters of the prompts are the
synthetic arithmetic task (``rollout.task``; parallel and sequential layouts,
replayed into units with the tiny tokenizer), one quarter MATH-style problems
with LaTeX answers (fractions, roots, intervals, sets, expressions, words).
Within a group, responses vary the way a policy's samples do: the reference
answer in another form (``0.6`` for ``\\frac{3}{5}``, ``1,000`` for ``1000``),
a wrong answer, a missing ``\\boxed{}``, a malformed block. All three setups
score the same batch, side by side in one run; the table gives rewards per
second, the ratio to one actor, and how answers were decided.

    python scripts/bench_rewards.py [--problems 128] [--group 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import time

from rewards.checker import AnswerChecker
from rewards.config import RewardConfig
from rewards.score import RewardItem, score_many
from rollout.task import TaskConfig, make_dataset

#: (reference, forms a correct sample may write, wrong answers a sample may write)
LATEX = [
    ("\\frac{3}{5}", ["0.6", "\\frac{3}{5}", "\\dfrac{6}{10}", "3/5"], ["\\frac{2}{5}", "0.65"]),
    ("2\\sqrt{3}", ["\\sqrt{12}", "2\\sqrt{3}", "2 \\sqrt 3"], ["3\\sqrt{2}", "\\sqrt{6}"]),
    ("[2, 5)", ["[2,5)", "[2, 5)", "\\left[2, 5\\right)"], ["(2, 5]", "[2, 5]"]),
    ("(-\\infty, -1] \\cup [3, \\infty)", ["(-\\infty,-1]\\cup[3,\\infty)"], ["(-\\infty, -1) \\cup (3, \\infty)"]),
    ("\\{1, 2, 4\\}", ["\\{4, 2, 1\\}", "\\{1,2,4\\}"], ["\\{1, 2\\}", "\\{1, 2, 3\\}"]),
    ("x^2 - 4x + 4", ["(x-2)^2", "x^2-4x+4"], ["(x+2)^2", "x^2 - 4"]),
    ("\\frac{\\pi}{6}", ["\\pi/6", "\\frac{\\pi}{6}"], ["\\frac{\\pi}{3}", "30"]),
    ("-\\frac{7}{2}", ["-3.5", "-\\frac72"], ["\\frac{7}{2}", "-3"]),
    ("1000", ["1,000", "1000", "10^3"], ["100", "1,001"]),
    ("\\text{Tuesday}", ["Tuesday", "\\text{tuesday}"], ["Monday"]),
    ("(3, -2)", ["(3,-2)", "\\left(3, -2\\right)"], ["(-2, 3)", "(3, 2)"]),
    ("12\\%", ["12\\%", "0.12"], ["1.2", "21\\%"]),
]


def _think(rng: random.Random) -> str:
    steps = [f"Step {i}: we simplify the expression and check the case n = {rng.randint(2, 99)}; "
             f"the term becomes \\frac{{{rng.randint(1, 9)}}}{{{rng.randint(2, 9)}}} and we keep going."
             for i in range(rng.randint(8, 20))]
    return "<think>\n" + "\n".join(steps) + "\n</think>\n\n"


def latex_group(rng: random.Random, group: int) -> list[RewardItem]:
    gold, right, wrong = rng.choice(LATEX)
    items = []
    for _ in range(group):
        u = rng.random()
        pred = rng.choice(right) if u < 0.55 else rng.choice(wrong) if u < 0.9 else None
        tail = f"So the answer is $\\boxed{{{pred}}}$." if pred is not None else "So the answer is as above."
        items.append(RewardItem(_think(rng) + tail, gold))
    return items


def arithmetic_groups(rng: random.Random, n: int, group: int, tokenizer) -> list[RewardItem]:
    from rollout.units import chat_prompt_ids, replay

    records = make_dataset(TaskConfig(min_threads=2, max_threads=4, b_digits=3), {"train": n}, seed=11)["train"]
    items = []
    for rec in records:
        prompt = chat_prompt_ids(tokenizer, rec["prompt"])
        for _ in range(group):
            response = rec["response_parallel" if rng.random() < 0.6 else "response_sequential"]
            u = rng.random()
            if u < 0.3:  # a wrong final sum
                response = response.replace(f"\\boxed{{{rec['answer']}}}", f"\\boxed{{{int(rec['answer']) + 10}}}")
            elif u < 0.35:  # the answer written with a thousands separator
                response = response.replace(f"\\boxed{{{rec['answer']}}}", f"\\boxed{{{int(rec['answer']):,}}}")
            elif u < 0.4:  # truncated before the answer
                response = response[: len(response) // 2]
            elif u < 0.43:  # a malformed block: the second thread is dropped
                response = response.replace("</Thread>\n<Thread>\n2:", "</Thread>\n2:", 1)
            try:
                units = replay(prompt, response, tokenizer, tokenizer.eos_token_id)
            except ValueError:
                units = None
            items.append(RewardItem(response, rec["answer"], units))
    return items


def make_batch(problems: int, group: int, seed: int = 0) -> list[RewardItem]:
    from rollout.tiny import build_tokenizer

    rng = random.Random(seed)
    n_latex = problems // 4
    items = arithmetic_groups(rng, problems - n_latex, group, build_tokenizer())
    for _ in range(n_latex):
        items += latex_group(rng, group)
    rng.shuffle(items)
    return items


def bench_local(items, cfg, repeats):
    with AnswerChecker(cfg.timeout_s, cfg.memory_limit_mb) as checker:
        checker.wait_ready()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            records = score_many(items, cfg, checker)
            times.append(time.perf_counter() - t0)
    return records, times


def bench_pool(items, cfg, actors, repeats):
    from rewards.service import RewardPool

    with RewardPool(cfg, num_actors=actors) as pool:
        pool.wait_ready()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            records = pool.score_batch(items)
            times.append(time.perf_counter() - t0)
    return records, times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=128, help="prompts in the batch (count)")
    p.add_argument("--group", type=int, default=8, help="responses per prompt (count)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes over the batch per setup (count)")
    p.add_argument("--chunk-size", type=int, default=32, help="items per actor call (count)")
    args = p.parse_args()

    items = make_batch(args.problems, args.group)
    n = len(items)
    cfg = RewardConfig(chunk_size=args.chunk_size, actor_cpus=1.0)
    print(f"batch: {n} responses ({args.problems} prompts x {args.group}), "
          f"mean {statistics.mean(len(i.response) for i in items):.0f} chars, "
          f"{sum(i.units is not None for i in items)} with units; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work slows every row alike)")

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = [("in-process checker (no Ray)", *bench_local(items, cfg, args.repeats))]
        rows.append(("pool, 1 actor", *bench_pool(items, cfg, 1, args.repeats)))
        rows.append(("pool, 2 actors", *bench_pool(items, cfg, 2, args.repeats)))
    finally:
        ray.shutdown()

    base = n / min(rows[1][2])
    print(f"\n{'setup':<30} {'best s':>7} {'rewards/s':>10} {'vs 1 actor':>10}")
    for name, _, times in rows:
        rate = n / min(times)
        print(f"{name:<30} {min(times):>7.2f} {rate:>10.0f} {rate / base:>9.2f}x")
    records = rows[-1][1]
    assert [r.reward for r in records] == [r.reward for r in rows[0][1]], "pool and in-process rewards differ"
    methods = collections.Counter(r.check_method for r in records)
    mv = [r.check_seconds for r in records if r.check_method == "math_verify"]
    print(f"\nanswers decided by: {dict(methods.most_common())}")
    if mv:
        print(f"math-verify: {len(mv)} items, median {1000 * statistics.median(mv):.1f} ms, "
              f"max {1000 * max(mv):.1f} ms")
    print(f"correct {sum(r.correct for r in records)}/{n}, format-valid {sum(r.format_valid for r in records)}/{n}, "
          f"timed out {sum(r.timed_out for r in records)}, "
          f"mean reward {statistics.mean(r.reward for r in records):.3f}")


if __name__ == "__main__":
    main()
