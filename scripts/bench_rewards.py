"""Benchmark: rewards per second for realistic responses, in-process and on 1 and 2 Ray actors.

The batch imitates one P-GRPO step: ``--problems`` prompts x ``--group`` sampled
responses each (default 128 x 8 = 1024). By default three quarters of the
prompts are the synthetic arithmetic task (``rollout.task``; parallel and
sequential layouts, replayed into units with the tiny tokenizer), one quarter
(``--latex-share``) MATH-style problems with LaTeX answers (fractions, roots,
intervals, sets, expressions, words), most of which need math-verify.
Within a group, responses vary the way a policy's samples do: the reference
answer in another form (``0.6`` for ``\\frac{3}{5}``, ``1,000`` for ``1000``),
a wrong answer, a missing ``\\boxed{}``, a malformed block. All three setups
score the same batch, side by side in one run; the table gives rewards per
second (wall clock), the ratio to one actor, the CPU seconds the scoring
processes used (a measure that other load on the machine does not change), and
how answers were decided.

    python scripts/bench_rewards.py [--problems 128] [--group 8] [--repeats 2] [--latex-share 0.25]
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
from rollout.ray_init import start_ray
from rollout.task import TaskConfig, make_dataset

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def latex_problem(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """A random MATH-style reference, forms a correct sample may write, and wrong answers."""
    kind = rng.randrange(10)
    a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
    if kind == 0:  # a fraction
        q, r = (a, b) if a != b else (a, b + 1)
        right = [f"\\frac{{{q}}}{{{r}}}", f"\\dfrac{{{q * c}}}{{{r * c}}}", f"{q}/{r}", f"{q / r:.6g}"]
        return f"\\frac{{{q}}}{{{r}}}", right, [f"\\frac{{{q + 1}}}{{{r}}}", f"\\frac{{{r}}}{{{q}}}"]
    if kind == 1:  # a root
        n = rng.choice([2, 3, 5, 6, 7])
        return (f"{c}\\sqrt{{{n}}}", [f"\\sqrt{{{c * c * n}}}", f"{c}\\sqrt{{{n}}}", f"{c} \\sqrt {n}"],
                [f"{c + 1}\\sqrt{{{n}}}", f"\\sqrt{{{c * n}}}"])
    if kind == 2:  # an interval
        lo, hi = sorted((a, b + 41))
        return (f"[{lo}, {hi})", [f"[{lo},{hi})", f"\\left[{lo}, {hi}\\right)"], [f"({lo}, {hi}]", f"[{lo}, {hi}]"])
    if kind == 3:  # a union of rays
        return (f"(-\\infty, -{a}] \\cup [{b}, \\infty)", [f"(-\\infty,-{a}]\\cup[{b},\\infty)"],
                [f"(-\\infty, -{a}) \\cup ({b}, \\infty)", f"[-{a}, {b}]"])
    if kind == 4:  # a set
        xs = rng.sample(range(1, 30), 3)
        perm = rng.sample(xs, 3)
        return ("\\{" + ", ".join(map(str, xs)) + "\\}", ["\\{" + ",".join(map(str, perm)) + "\\}"],
                ["\\{" + ", ".join(map(str, xs[:2])) + "\\}", "\\{" + ", ".join(map(str, xs[:2] + [31])) + "\\}"])
    if kind == 5:  # a polynomial
        return (f"x^2 - {2 * c}x + {c * c}", [f"(x-{c})^2", f"x^2-{2 * c}x+{c * c}"], [f"(x+{c})^2", f"x^2 - {c * c}"])
    if kind == 6:  # a multiple of pi
        return (f"\\frac{{{c}\\pi}}{{{a + c}}}", [f"{c}\\pi/{a + c}"], [f"\\frac{{\\pi}}{{{a + c}}}", f"{c}"])
    if kind == 7:  # a large integer
        n = rng.randint(1000, 999_999)
        return str(n), [f"{n:,}", str(n)], [f"{n + 9:,}", str(n // 10)]
    if kind == 8:  # a word
        day, other = rng.sample(WEEKDAYS, 2)
        return f"\\text{{{day}}}", [day, f"\\text{{{day.lower()}}}"], [other]
    return f"({a}, -{b})", [f"({a},-{b})", f"\\left({a}, -{b}\\right)"], [f"(-{b}, {a})", f"({a}, {b})"]


def _think(rng: random.Random) -> str:
    steps = [f"Step {i}: we simplify the expression and check the case n = {rng.randint(2, 99)}; "
             f"the term becomes \\frac{{{rng.randint(1, 9)}}}{{{rng.randint(2, 9)}}} and we keep going."
             for i in range(rng.randint(8, 20))]
    return "<think>\n" + "\n".join(steps) + "\n</think>\n\n"


def latex_group(rng: random.Random, group: int) -> list[RewardItem]:
    gold, right, wrong = latex_problem(rng)
    items = []
    for _ in range(group):
        u = rng.random()
        pred = rng.choice(right) if u < 0.55 else rng.choice(wrong) if u < 0.9 else None
        tail = f"So the answer is $\\boxed{{{pred}}}$." if pred is not None else "So the answer is as above."
        items.append(RewardItem(_think(rng) + tail, gold))
    return items


def arithmetic_groups(rng: random.Random, n: int, group: int, tokenizer, seed: int) -> list[list[RewardItem]]:
    from rollout.units import chat_prompt_ids, replay

    records = make_dataset(TaskConfig(min_threads=2, max_threads=4, b_digits=3), {"train": n}, seed=seed)["train"]
    groups = []
    for rec in records:
        prompt = chat_prompt_ids(tokenizer, rec["prompt"])
        items = []
        groups.append(items)
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
    return groups


def make_batch(problems: int, group: int, latex_share: float = 0.25, seed: int = 0) -> list[RewardItem]:
    from rollout.tiny import build_tokenizer

    rng = random.Random(seed)
    n_latex = round(problems * latex_share)
    groups = arithmetic_groups(rng, problems - n_latex, group, build_tokenizer(), seed)
    groups += [latex_group(rng, group) for _ in range(n_latex)]
    rng.shuffle(groups)  # prompts in random order, each group's samples together, as a GRPO batch
    return [item for g in groups for item in g]


def cpu_seconds(root_pids) -> dict[int, float]:
    """User+system CPU seconds of each process in the trees under ``root_pids``."""
    import psutil

    out = {}
    for pid in root_pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return out


def timed(score_fn, batches, pids):
    """``(records, wall seconds, CPU seconds)`` per batch; CPU over the processes doing the scoring."""
    out = []
    for items in batches:
        before = cpu_seconds(pids)
        t0 = time.perf_counter()
        records = score_fn(items)
        wall = time.perf_counter() - t0
        after = cpu_seconds(pids)
        out.append((records, wall, sum(v - before.get(pid, 0.0) for pid, v in after.items())))
    return out


def bench_local(batches, cfg):
    with AnswerChecker(cfg.checker_timeout_s, cfg.memory_limit_mb, cache_size=cfg.verdict_cache) as checker:
        checker.wait_ready()
        return timed(lambda items: score_many(items, cfg, checker), batches, [os.getpid(), checker.server_pid])


def bench_pool(batches, cfg, actors):
    import ray

    from rewards.service import RewardPool

    with RewardPool(cfg, num_actors=actors) as pool:
        pool.wait_ready()
        pids = [pid for pair in ray.get([a.pids.remote() for a in pool.actors]) for pid in pair]
        return timed(pool.score_batch, batches, [os.getpid(), *pids])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=128, help="prompts in a batch (count)")
    p.add_argument("--group", type=int, default=8, help="responses per prompt (count)")
    p.add_argument("--repeats", type=int, default=2,
                   help="batches, each with new prompts, scored by every setup (count)")
    p.add_argument("--latex-share", type=float, default=0.25,
                   help="share of prompts with MATH-style LaTeX answers, the rest arithmetic (0..1)")
    p.add_argument("--chunk-size", type=int, default=32, help="items per actor call (count)")
    args = p.parse_args()

    batches = [make_batch(args.problems, args.group, args.latex_share, seed=i) for i in range(args.repeats)]
    n = len(batches[0])
    cfg = RewardConfig(chunk_size=args.chunk_size, actor_cpus=1.0)
    print(f"{args.repeats} batches of {n} responses ({args.problems} prompts x {args.group}), "
          f"{args.latex_share:.0%} LaTeX prompts, mean {statistics.mean(len(i.response) for i in batches[0]):.0f} "
          f"chars, {sum(i.units is not None for i in batches[0])} with units; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")

    import ray

    start_ray(None, num_cpus=2, include_dashboard=False)
    try:
        rows = [("in-process checker (no Ray)", bench_local(batches, cfg))]
        rows.append(("pool, 1 actor", bench_pool(batches, cfg, 1)))
        rows.append(("pool, 2 actors", bench_pool(batches, cfg, 2)))
    finally:
        ray.shutdown()
    print(f"load average after: {os.getloadavg()[0]:.1f} (Ray actors run at nice 15: other work on the "
          "machine slows them more than the in-process row)")

    def rate(runs):
        return len(runs) * n / sum(wall for _, wall, _ in runs)

    def cpu_rate(runs):
        return len(runs) * n / sum(cpu for _, _, cpu in runs)

    base = rate(rows[1][1])
    print(f"\n{'setup':<28} {'wall s/batch':>13} {'rewards/s':>10} {'vs 1 actor':>10} {'CPU s/batch':>12} "
          f"{'rewards/CPU-s':>13}")
    for name, runs in rows:
        walls = " ".join(f"{wall:.2f}" for _, wall, _ in runs)
        cpus = " ".join(f"{cpu:.2f}" for _, _, cpu in runs)
        print(f"{name:<28} {walls:>13} {rate(runs):>10.0f} {rate(runs) / base:>9.2f}x {cpus:>12} "
              f"{cpu_rate(runs):>13.0f}")
    print("CPU: the driver, actor, math-verify server and worker processes (Ray's own daemons excluded); "
          "rewards/CPU-s does not depend on other load")
    for (records, _, _), (local, _, _) in zip(rows[-1][1], rows[0][1]):
        assert [r.reward for r in records] == [r.reward for r in local], "pool and in-process rewards differ"
    records = [r for recs, _, _ in rows[-1][1] for r in recs]
    methods = collections.Counter(r.check_method + (" (cached)" if r.check_cached else "") for r in records)
    mv = [r.check_seconds for r in records if r.check_method == "math_verify" and not r.check_cached]
    print(f"\nanswers decided by (2-actor pool, all batches): {dict(methods.most_common())}")
    if mv:
        print(f"math-verify calls: {len(mv)}, median {1000 * statistics.median(mv):.1f} ms, "
              f"max {1000 * max(mv):.1f} ms")
    print(f"correct {sum(r.correct for r in records)}/{len(records)}, "
          f"format-valid {sum(r.format_valid for r in records)}/{len(records)}, "
          f"timed out {sum(r.timed_out for r in records)}, "
          f"mean reward {statistics.mean(r.reward for r in records):.3f}")


if __name__ == "__main__":
    main()
