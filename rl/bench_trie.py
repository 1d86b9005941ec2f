"""Benchmark: trie packing against expanded and padded rows, on synthetic-task groups.

Builds GRPO-like groups: each group is one synthetic-task problem (the prompt,
shared) with ``k`` sampled responses. A "sample" is the problem's parallel
reference response with sampling noise: every digit outside the outlines and
the thread numbers is replaced by a random digit with probability ``noise``,
so samples share the prompt, the outlines and a random stretch of each thread,
then diverge (noise 1 makes them share little more than the format). Responses
are replayed into units with the tiny model's byte tokenizer.

One training step (forward + backward of the weighted loss over all targets,
fp32, a randomly initialised tiny Qwen3) is then timed in three layouts, each
in its own subprocess so that peak memory (``ru_maxrss`` growth over the state
just before the first step) is measured separately:

* ``trie``     -- one trie per group (split into tries of whole samples when
  it exceeds ``row_tokens``, :func:`rl.trie.group_tries`), tries packed into
  rows of at most ``row_tokens`` tokens, tree attention (``--backend``);
* ``expanded`` -- every unit its own causal row (context + completion), one
  row per forward, no padding: the token count the published RL code trains
  on, without its padding;
* ``padded``   -- every unit its own row, right-padded to the longest unit,
  ``row_tokens // longest`` rows per forward, causal + padding mask (the
  published RL layout).

All three compute the same loss (the last column checks it). The dense sdpa
mask makes the trie's attention cost grow with the row length, so rows should
be as short as the tries allow on CPU (flex attention skips masked tiles on
GPUs). Seconds are the median over ``repeats`` steps after one warm-up step;
peak memory is the growth of the process's peak resident size from just
before the warm-up step to the end (coarse: it includes the allocator's
caching).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from rl.attention import BACKENDS, IMPLEMENTATION, tree_forward
from rl.logprobs import token_logprobs, weighted_loss
from rl.trie import build_trie, group_trie, group_tries, pack_tries, tree_stats
from rollout.config import check_range
from rollout.format import Block, Response, parse, serialize
from rollout.task import TaskConfig, parallel_response, sample_problem
from rollout.units import Unit, chat_prompt_ids, replay

LAYOUTS = ("trie", "expanded", "padded")
_LEADING_NUMBER = re.compile(r"\s*\d+\s*:")


def _noisy_digits(text: str, rng: random.Random, noise: float) -> str:
    return "".join(rng.choice("0123456789") if c.isdigit() and rng.random() < noise else c for c in text)


def noisy_response(response: str, rng: random.Random, noise: float) -> str:
    """``response`` with digits flipped at rate ``noise``, outlines and thread numbers kept."""
    parts = []
    for part in parse(response).parts:
        if isinstance(part, str):
            parts.append(_noisy_digits(part, rng, noise))
            continue
        threads = []
        for t in part.threads:
            m = _LEADING_NUMBER.match(t)
            head = m.group() if m else ""
            threads.append(head + _noisy_digits(t[len(head):], rng, noise))
        parts.append(Block(list(part.outlines), threads, list(part.gaps)))
    return serialize(Response(parts))


def synthetic_groups(n_groups: int, k: int, task: TaskConfig, noise: float, seed: int,
                     tokenizer=None) -> list[list[list[Unit]]]:
    """``n_groups`` groups of ``k`` trajectories (lists of units) sharing each group's prompt."""
    from rollout.tiny import build_tokenizer  # lazy: transformers takes seconds to import

    tok = tokenizer or build_tokenizer()
    rng = random.Random(seed)
    groups = []
    for _ in range(n_groups):
        problem = sample_problem(rng, task)
        prompt = chat_prompt_ids(tok, problem.prompt)
        reference = parallel_response(problem, task)
        groups.append([replay(prompt, noisy_response(reference, rng, noise), tok, tok.eos_token_id)
                       for _ in range(k)])
    return groups


def tiny_model(backend: str, seed: int = 0, hidden_size: int = 128, num_layers: int = 3, num_heads: int = 4,
               num_kv_heads: int = 2) -> torch.nn.Module:
    """A randomly initialised fp32 Qwen3 of rollout.tiny's configuration (defaults: the tiny model) for ``backend``."""
    from transformers import Qwen3ForCausalLM

    from rollout.tiny import build_tokenizer, model_config  # lazy: transformers takes seconds to import

    config = model_config(build_tokenizer(), hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                          num_kv_heads=num_kv_heads, intermediate_size=3 * hidden_size)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM._from_config(config, attn_implementation=IMPLEMENTATION[backend]).float()


# ------------------------------------------------------------------ one step per layout

@dataclass
class LayoutResult:
    layout: str
    rows: int
    tokens: int
    seconds: float
    peak_mib: float
    loss: float


def _advantages(k: int, rng: random.Random) -> list[float]:
    rewards = [float(rng.random() < 0.5) for _ in range(k)]
    mean = sum(rewards) / k
    return [r - mean + 0.01 * (i - k / 2) for i, r in enumerate(rewards)]  # nonzero, mixed signs


def _rows_step(model, units: list[Unit], weights: list[float], per_batch: int, pad: bool,
               denom: float) -> torch.Tensor:
    """Every unit its own causal row, ``per_batch`` rows per forward; ``pad``: all rows as long as the longest."""
    longest = max(len(u.context_ids) + len(u.completion_ids) for u in units)
    total = torch.zeros(())
    for s in range(0, len(units), per_batch):
        chunk, w = units[s:s + per_batch], weights[s:s + per_batch]
        width = longest if pad else max(len(u.context_ids) + len(u.completion_ids) for u in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attn = torch.zeros(len(chunk), width, dtype=torch.long)
        tw = torch.zeros(len(chunk), width)
        for i, (u, wu) in enumerate(zip(chunk, w)):
            seq = list(u.context_ids) + list(u.completion_ids)
            ids[i, :len(seq)] = torch.tensor(seq)
            attn[i, :len(seq)] = 1
            tw[i, len(u.context_ids):len(seq)] = wu
        mask = None if bool(attn.all()) else attn  # no padding: plain causal attention
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        loss = -(tw[:, 1:] * lp).sum() / denom
        loss.backward()
        total = total + loss.detach()
    return total


def _packed_step(model, rows, backend: str, denom: float, row_tokens: int) -> torch.Tensor:
    total = torch.zeros(())
    for row in rows:
        lp = token_logprobs(tree_forward(model, row, backend, max_dense_tokens=row_tokens), row)
        loss = weighted_loss(lp, row, denominator=denom)
        loss.backward()
        total = total + loss.detach()
    return total


def run_layout(layout: str, args: argparse.Namespace) -> LayoutResult:
    """Time ``repeats`` training steps of ``layout`` in this process."""
    torch.set_num_threads(args.threads)
    task = TaskConfig(min_threads=args.threads_per_block, max_threads=args.threads_per_block,
                      blocks=args.blocks, a_digits=args.a_digits, b_digits=args.b_digits)
    groups = synthetic_groups(args.groups, args.k, task, args.noise, args.seed)
    rng = random.Random(args.seed + 1)
    advantages = [_advantages(args.k, rng) for _ in groups]
    units = [u for g in groups for traj in g for u in traj]
    weights = [a for g, adv in zip(groups, advantages) for traj, a in zip(g, adv) for _ in traj]
    denom = float(sum(len(u.completion_ids) for u in units))
    model = tiny_model(args.backend)
    model.train()
    if layout == "trie":
        tries = [t for g, adv in zip(groups, advantages) for t in group_tries(g, adv, args.row_tokens)]
        rows = pack_tries(tries, args.row_tokens)
        n_rows, tokens = len(rows), sum(len(r) for r in rows)
        step = lambda: _packed_step(model, rows, args.backend, denom, args.row_tokens)  # noqa: E731
    elif layout == "expanded":
        n_rows, tokens = len(units), sum(len(u.context_ids) + len(u.completion_ids) for u in units)
        step = lambda: _rows_step(model, units, weights, 1, False, denom)  # noqa: E731
    else:
        longest = max(len(u.context_ids) + len(u.completion_ids) for u in units)
        per_batch = max(1, args.row_tokens // longest)
        n_rows, tokens = len(units), len(units) * longest
        step = lambda: _rows_step(model, units, weights, per_batch, True, denom)  # noqa: E731
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up
    model.zero_grad(set_to_none=True)
    times, loss = [], 0.0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        loss = float(step())
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # KiB -> MiB on Linux
    return LayoutResult(layout, n_rows, tokens, statistics.median(times), peak, loss)


# ------------------------------------------------------------------ CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("groups")
    g.add_argument("--groups", type=int, default=2, help="GRPO groups (prompts) in the batch (count, default 2)")
    g.add_argument("--k", type=int, default=8, help="samples per group (count, default 8)")
    g.add_argument("--threads-per-block", type=int, default=4, help="threads in every block (count, default 4)")
    g.add_argument("--blocks", type=int, default=2, help="parallel blocks per response (count, default 2)")
    g.add_argument("--a-digits", type=int, default=1, help="digits of each product's first factor (default 1)")
    g.add_argument("--b-digits", type=int, default=3, help="digits of each product's second factor (default 3)")
    g.add_argument("--noise", type=float, default=0.05,
                   help="probability that a sample changes a digit of the reference (0-1, default 0.05)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g = p.add_argument_group("step")
    g.add_argument("--backend", choices=[b for b in BACKENDS if b != "flex"], default="sdpa",
                   help="attention implementation of all layouts (default sdpa; flex has no backward on CPU)")
    g.add_argument("--row-tokens", type=int, default=2048,
                   help="token budget of one packed row / padded micro-batch (default 2048)")
    g.add_argument("--repeats", type=int, default=3, help="timed steps per layout after a warm-up (default 3)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared machine OpenMP waits distort timings)")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    g.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)  # internal: one layout, JSON out


def _forward_args(args: argparse.Namespace) -> list[str]:
    out = []
    for name in ("groups", "k", "threads_per_block", "blocks", "a_digits", "b_digits", "noise", "seed",
                 "backend", "row_tokens", "repeats", "threads"):
        out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return out


#: option -> its allowed values (``rollout.config`` ranges); the digit counts are checked by TaskConfig
RANGES = {"groups": ">= 1", "k": ">= 1", "threads_per_block": ">= 1", "blocks": ">= 1", "noise": "[0, 1]",
          "seed": ">= 0", "row_tokens": ">= 2", "repeats": ">= 1", "threads": ">= 1"}


def run(args: argparse.Namespace) -> int:
    if args.layout:
        print(json.dumps(asdict(run_layout(args.layout, args))))
        return 0
    try:
        for name, spec in RANGES.items():
            check_range(f"--{name.replace('_', '-')}", getattr(args, name), spec)
        task = TaskConfig(min_threads=args.threads_per_block, max_threads=args.threads_per_block,
                          blocks=args.blocks, a_digits=args.a_digits, b_digits=args.b_digits)
    except ValueError as e:
        print(f"threadweaver bench trie: {e}", file=sys.stderr)
        return 2
    groups = synthetic_groups(args.groups, args.k, task, args.noise, args.seed)
    stats = tree_stats([group_trie(g) for g in groups])
    results = {}
    for layout in LAYOUTS:
        cmd = [sys.executable, "-m", "rl.bench", "trie", "--layout", layout] + _forward_args(args)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"threadweaver bench trie: layout '{layout}' failed:\n{proc.stderr}", file=sys.stderr)
            return 1
        results[layout] = json.loads(proc.stdout.strip().splitlines()[-1])
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("layout", "json", "what")},
              "stats": {**asdict(stats), "expanded_ratio": stats.expanded_ratio, "padded_ratio": stats.padded_ratio},
              "layouts": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    trie = results["trie"]
    print(f"{args.groups} groups x k={args.k}, {args.blocks} blocks x {args.threads_per_block} threads, "
          f"{stats.n_units} units, {stats.target_tokens} target tokens; backend {args.backend}, "
          f"rows of {args.row_tokens} tokens, median of {args.repeats} fwd+bwd steps")
    print(f"whole-group tries: {stats.unique_tokens} unique tokens; expanded {stats.expanded_ratio:.2f}x, "
          f"padded {stats.padded_ratio:.2f}x as many")
    print(f"{'layout':<9} {'rows':>5} {'tokens':>8} {'x trie':>7} {'fwd+bwd s':>10} {'x trie':>7} "
          f"{'peak MiB':>9} {'loss':>10}")
    for name in LAYOUTS:
        r = results[name]
        print(f"{name:<9} {r['rows']:>5} {r['tokens']:>8} {r['tokens'] / trie['tokens']:>7.2f} "
              f"{r['seconds']:>10.3f} {r['seconds'] / trie['seconds']:>7.2f} {r['peak_mib']:>9.1f} "
              f"{r['loss']:>10.6f}")
    return 0
