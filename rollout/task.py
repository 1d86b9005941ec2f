"""The synthetic task: sums of products, worked out digit by digit.

A problem is ``a1*b1 + a2*b2 + ... + an*bn`` with an exact integer answer. Each
product is an independent sub-computation: in the *parallel* reference response
every product is one thread of a block, under terse outlines that name the
product without its result; after the join, a running sum adds the products.
The *sequential* reference response does the same work line after line.

A thread multiplies ``a`` by each digit of ``b`` (times its power of ten) and
adds the partial products up; every number in a thread is zero-padded to the
width of the largest possible product, and every number of the running sum to
the width of the largest possible answer, so digits line up for a small model.

``number_order="reversed"`` writes every one of those worked numbers (partial
products, thread sums, the running sum) least-significant digit first: a
small model then produces each digit of a sum from the two digits above it and
the carry of the digit it has just written, instead of working out the whole
carry chain before the first digit. The prompt, the factors named in the steps
and the ``\boxed{}`` answer stay in ordinary order (``7*30=012`` reads
"7 times 30 is 210").

Splits are disjoint by construction: a problem's split is a hash of its text,
so the same problem can never land in two splits, whatever the seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from rollout.config import check_range, check_ranges
from rollout.files import atomic_write, check_output_dir, write_text
from rollout.format import (
    OUTLINE_CLOSE, OUTLINE_OPEN, OUTLINES_CLOSE, OUTLINES_OPEN, PARALLEL_CLOSE, PARALLEL_OPEN,
    THINK_CLOSE, THINK_OPEN, THREAD_CLOSE, THREAD_OPEN,
)
from rollout.units import latency, replay

SPLITS = ("train", "validation", "test")
NUMBER_ORDERS = ("normal", "reversed")
SUM_STYLES = ("restate", "chain")
OUTLINE_STYLES = ("spaced", "tight")
PAD_WIDTHS = ("product", "answer")
RESULT_KEYS = ("none", "hash")
SEQUENTIAL_KEYS = ("none", "prefix", "plan")
FILE_NAMES = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}


@dataclass
class TaskConfig:
    """Difficulty knobs of the synthetic task."""

    min_threads: int = field(default=2, metadata={"help": "fewest products per block (count)", "range": ">= 1"})
    max_threads: int = field(default=4, metadata={"help": "most products per block (count)", "range": ">= 1"})
    blocks: int = field(default=1, metadata={"help": "parallel blocks per problem (count)", "range": ">= 1"})
    a_digits: int = field(default=1, metadata={"help": "digits of each product's first factor", "range": "[1, 12]"})
    b_digits: int = field(default=3, metadata={
        "help": "digits of each product's second factor (one step each)", "range": "[1, 12]"})
    validation_share: float = field(default=0.1, metadata={
        "help": "share of the problem space hashed to validation", "range": "(0, 1)"})
    test_share: float = field(default=0.1, metadata={
        "help": "share of the problem space hashed to test", "range": "(0, 1)"})
    number_order: str = field(default="normal", metadata={
        "help": "digit order of the worked numbers: normal, or reversed (least-significant digit first)"})
    sum_style: str = field(default="restate", metadata={
        "help": "sum lines after a join: restate (every line 'total+term=new'), or chain (a block's first line "
                "'total+term=new', each next line '+term=new' on the total that ends the line above)"})
    thread_width: str = field(default="product", metadata={
        "help": "digits of every number in a thread: product (the widest product), or answer (the widest "
                "answer, as in the sums after the join: a thread's result is then copied digit for digit)"})
    outline_style: str = field(default="spaced", metadata={
        "help": "outlines: spaced ('<Outline>1: 7*486</Outline>' one a line), or tight "
                "('<Outline>1:7*486</Outline>' back to back, 2 tokens fewer each)"})
    result_key: str = field(default="none", metadata={
        "help": "how a sum after the join finds the products it adds: none (it copies each thread's last "
                "number), or hash (each product ends with ' #k:RESULT', k its number in the block, and each "
                "sum line names the key of every term it adds, '#1:..+#2:..=..': a copy that follows a key "
                "found nowhere else instead of a position)"})
    sequential_keys: str = field(default="none", metadata={
        "help": "how the sequential reference finds each product in the prompt: none (each line starts with "
                "the bare product, found by its position among the prompt's terms), prefix (each line starts "
                "'k: ' like a thread), or plan (prefix, and a line after each block's start that lists the "
                "block's products with their keys, '1:6*22 2:3*97', as the outlines do: each line then copies "
                "what follows its key). The parallel reference is unchanged; train the sequential baseline on "
                "response_sequential (data.response_field), which no longer equals the flattened parallel one"})

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        check_ranges(self)
        if self.min_threads > self.max_threads:
            raise ValueError(f"need min_threads <= max_threads, got {self.min_threads}, {self.max_threads}")
        if self.validation_share + self.test_share >= 1:
            raise ValueError("validation_share and test_share must sum to less than 1")
        if self.number_order not in NUMBER_ORDERS:
            raise ValueError(f"number_order must be one of {NUMBER_ORDERS}, got {self.number_order!r}")
        for name, allowed in (("sum_style", SUM_STYLES), ("thread_width", PAD_WIDTHS),
                              ("outline_style", OUTLINE_STYLES), ("result_key", RESULT_KEYS),
                              ("sequential_keys", SEQUENTIAL_KEYS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


@dataclass
class Problem:
    """Products grouped by block: ``groups[i]`` lists the (a, b) pairs of block i."""

    groups: list[list[tuple[int, int]]]

    @property
    def terms(self) -> list[tuple[int, int]]:
        return [t for g in self.groups for t in g]

    @property
    def answer(self) -> int:
        return sum(a * b for a, b in self.terms)

    @property
    def prompt(self) -> str:
        return "Compute " + " + ".join(f"{a}*{b}" for a, b in self.terms) + "."


def sample_problem(rng: random.Random, cfg: TaskConfig) -> Problem:
    def number(digits: int) -> int:
        return rng.randint(10 ** (digits - 1) if digits > 1 else 2, 10**digits - 1)

    return Problem([
        [(number(cfg.a_digits), number(cfg.b_digits)) for _ in range(rng.randint(cfg.min_threads, cfg.max_threads))]
        for _ in range(cfg.blocks)
    ])


def _pad(n: int, width: int, reverse: bool = False) -> str:
    """``n`` zero-padded to ``width`` digits, least-significant digit first if ``reverse``."""
    text = str(n).zfill(width)
    return text[::-1] if reverse else text


def product_steps(a: int, b: int, width: int, reverse: bool = False, key: int | None = None) -> str:
    """``a*b: a*d0=.., a*d1 0=.., p0+p1=.., ..`` with every result padded to ``width`` (reversed if ``reverse``),
    then `` #key:RESULT`` when ``key`` is given."""
    partials = []
    for power, digit in enumerate(reversed(str(b))):
        if digit != "0":
            partials.append((int(digit) * 10**power, a * int(digit) * 10**power))
    steps = [f"{a}*{factor}={_pad(p, width, reverse)}" for factor, p in partials]
    running = partials[0][1] if partials else 0
    for _, p in partials[1:]:
        steps.append(f"{_pad(running, width, reverse)}+{_pad(p, width, reverse)}={_pad(running + p, width, reverse)}")
        running += p
    tail = f" #{key}:{_pad(a * b, width, reverse)}" if key is not None else ""
    return f"{a}*{b}: " + ", ".join(steps) + tail


def _widths(problem: Problem, cfg: TaskConfig) -> tuple[int, int]:
    """Digits of the numbers in a thread and in the sums after a join."""
    max_terms = cfg.max_threads * cfg.blocks
    answer_width = len(str(max_terms * (10**cfg.a_digits - 1) * (10**cfg.b_digits - 1)))
    return (answer_width if cfg.thread_width == "answer" else cfg.a_digits + cfg.b_digits), answer_width


def _sum_lines(values: list[int], start: int | None, width: int, reverse: bool = False,
               chain: bool = False, keyed: bool = False) -> tuple[list[str], int]:
    """The running sum of ``values`` onto ``start``: one line per addition, and the new total.

    With ``chain`` only a block's first line restates the total; each next line
    adds its term to the total that ends the line above (``+term=new``). With
    ``keyed`` every term is written after its key (``#k:term``, k counting
    ``values`` from 1), and so is the first term when it opens the sum.
    """
    def term(k: int, v: int) -> str:
        return (f"#{k}:" if keyed else "") + _pad(v, width, reverse)

    lines = []
    total, left = start, None if start is None else _pad(start, width, reverse)
    for k, v in enumerate(values, start=1):
        if total is None:
            total, left = v, term(k, v)
            continue
        if chain and lines:
            left = ""
        lines.append(f"{left}+{term(k, v)}={_pad(total + v, width, reverse)}")
        total += v
        left = _pad(total, width, reverse)
    return lines, total


def _key(number: int, cfg: TaskConfig) -> int | None:
    """The key a product's result is written under (its number in the block), or None without keys."""
    return number if cfg.result_key == "hash" else None


def _answer_text(answer: int) -> str:
    return f"{THINK_CLOSE}\n\n\\boxed{{{answer}}}"


def sequential_response(problem: Problem, cfg: TaskConfig) -> str:
    pw, sw = _widths(problem, cfg)
    rev = cfg.number_order == "reversed"
    lines = [THINK_OPEN]
    total = None
    for group in problem.groups:
        if cfg.sequential_keys == "plan":
            lines.append(" ".join(f"{i}:{a}*{b}" for i, (a, b) in enumerate(group, start=1)))
        prefix = "{}: " if cfg.sequential_keys != "none" else ""
        lines += [prefix.format(i) + product_steps(a, b, pw, rev, _key(i, cfg))
                  for i, (a, b) in enumerate(group, start=1)]
        sums, total = _sum_lines([a * b for a, b in group], total, sw, rev, cfg.sum_style == "chain",
                                 cfg.result_key == "hash")
        lines += sums
    return "\n".join(lines) + "\n" + _answer_text(problem.answer)


def outline(number: int, a: int, b: int, style: str = "spaced") -> str:
    """The outline of the thread that multiplies ``a`` by ``b``: names the product, not its result."""
    if style == "tight":
        return f"{OUTLINE_OPEN}{number}:{a}*{b}{OUTLINE_CLOSE}"
    return f"{OUTLINE_OPEN}{number}: {a}*{b}{OUTLINE_CLOSE}\n"


def parallel_response(problem: Problem, cfg: TaskConfig) -> str:
    pw, sw = _widths(problem, cfg)
    rev = cfg.number_order == "reversed"
    out = [THINK_OPEN + "\n"]
    total = None
    for group in problem.groups:
        out.append(f"{PARALLEL_OPEN}\n{OUTLINES_OPEN}\n")
        out += [outline(i, a, b, cfg.outline_style) for i, (a, b) in enumerate(group, start=1)]
        out.append(OUTLINES_CLOSE)
        out += [f"\n{THREAD_OPEN}\n{i}: {product_steps(a, b, pw, rev, _key(i, cfg))}\n{THREAD_CLOSE}"
                for i, (a, b) in enumerate(group, start=1)]
        out.append(f"\n{PARALLEL_CLOSE}\n")
        sums, total = _sum_lines([a * b for a, b in group], total, sw, rev, cfg.sum_style == "chain",
                                 cfg.result_key == "hash")
        out += [line + "\n" for line in sums]
    return "".join(out) + _answer_text(problem.answer)


def split_of(prompt: str, cfg: TaskConfig) -> str:
    """The split a problem belongs to, from a hash of its text alone."""
    return hash_split(prompt, cfg.validation_share, cfg.test_share)


def hash_split(prompt: str, validation_share: float, test_share: float) -> str:
    """``"test"``, ``"validation"`` or ``"train"`` from a hash of ``prompt`` alone (the shares of each)."""
    u = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") / 2**64
    if u < test_share:
        return "test"
    if u < test_share + validation_share:
        return "validation"
    return "train"


def record(problem: Problem, cfg: TaskConfig, split: str, index: int) -> dict:
    return {
        "id": f"{split}-{index}",
        "prompt": problem.prompt,
        "answer": str(problem.answer),
        "response_parallel": parallel_response(problem, cfg),
        "response_sequential": sequential_response(problem, cfg),
        "terms": [list(g) for g in problem.groups],
    }


def make_dataset(cfg: TaskConfig, sizes: dict[str, int], seed: int = 0,
                 max_tries_per_item: int = 200) -> dict[str, list[dict]]:
    """``sizes[split]`` distinct problems per split, deterministic for ``seed``.

    Raises ValueError when the problem space is too small for the sizes asked.
    """
    cfg.check()
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
    for split, n in sizes.items():
        check_range(f"the {split} size", n, ">= 0")
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {s: [] for s in sizes}
    seen: set[str] = set()
    budget = max_tries_per_item * max(1, sum(sizes.values()))
    while any(len(out[s]) < n for s, n in sizes.items()):
        budget -= 1
        if budget < 0:
            got = {s: len(v) for s, v in out.items()}
            raise ValueError(f"problem space too small for {sizes} with {cfg}: got {got}; "
                             "raise the digit or term counts")
        problem = sample_problem(rng, cfg)
        prompt = problem.prompt
        split = split_of(prompt, cfg)
        if prompt in seen or split not in out or len(out[split]) >= sizes[split]:
            continue
        seen.add(prompt)
        out[split].append(record(problem, cfg, split, len(out[split])))
    return out


def write_dataset(data: dict[str, list[dict]], out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {}
    for split, records in data.items():
        path = out_dir / FILE_NAMES[split]
        with atomic_write(path) as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        paths[split] = path
    return paths


@dataclass
class Ceiling:
    """The token-latency speedup a model reaches by writing the reference responses exactly."""

    problems: int
    L_sequential: float  # mean L_total of the sequential references (model-generated tokens)
    L_crit_parallel: float  # mean L_crit of the parallel references
    L_total_parallel: float  # mean L_total of the parallel references (outlines and tags included)
    speedup: float  # L_sequential / L_crit_parallel: the task's ceiling
    speedup_per_problem: float  # mean over problems of L_sequential / L_crit_parallel (the eval's speedup)


def ceiling(records: Sequence[dict], tokenizer) -> Ceiling:
    """The task's ceiling on ``records``: mean ``L`` of ``response_sequential`` over mean ``L_crit`` of
    ``response_parallel``, both counted as the orchestrator would (``rollout.units.replay``: generated tokens
    only, the end-of-sequence token included, seeds and the prompt not)."""
    if not records:
        raise ValueError("no records to measure the ceiling on")
    eos = tokenizer.eos_token_id
    seq = [latency(replay([], r["response_sequential"], tokenizer, eos)).L_total for r in records]
    par = [latency(replay([], r["response_parallel"], tokenizer, eos)) for r in records]
    n = len(records)
    return Ceiling(problems=n, L_sequential=sum(seq) / n, L_crit_parallel=sum(p.L_crit for p in par) / n,
                   L_total_parallel=sum(p.L_total for p in par) / n,
                   speedup=sum(seq) / sum(p.L_crit for p in par),
                   speedup_per_problem=sum(s / p.L_crit for s, p in zip(seq, par)) / n)


# ---------------------------------------------------------------- CLI: make-data

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="folder for train.jsonl, validation.jsonl, test.jsonl")
    g = p.add_argument_group("sizes")
    g.add_argument("--train", type=int, default=2000, help="training problems (count, default 2000)")
    g.add_argument("--validation", type=int, default=200, help="validation problems (count, default 200)")
    g.add_argument("--test", type=int, default=200, help="test problems (count, default 200)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g = p.add_argument_group("difficulty")
    for f in TaskConfig.__dataclass_fields__.values():
        g.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=f"{f.metadata['help']} (default {f.default})")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = TaskConfig(**{k: getattr(args, k) for k in TaskConfig.__dataclass_fields__})
        data = make_dataset(cfg, {"train": args.train, "validation": args.validation, "test": args.test},
                            seed=args.seed)
        check_output_dir(args.out_dir)
    except ValueError as e:
        print(f"threadweaver make-data: {e}", file=sys.stderr)
        return 2
    paths = write_dataset(data, args.out_dir)
    write_text(Path(args.out_dir) / "task.json", json.dumps({"seed": args.seed, **asdict(cfg)}, indent=2))
    for split, path in paths.items():
        print(f"{split:<10} {len(data[split]):>6} problems -> {path}")
    measured = next((s for s in ("test", "validation", "train") if data[s]), None)
    if measured:
        from rollout.tiny import build_tokenizer  # lazy: transformers takes seconds to import

        c = ceiling(data[measured][:1000], build_tokenizer())
        print(f"ceiling: {c.speedup:.2f}x (mean L of the sequential references {c.L_sequential:.1f} / mean L_crit "
              f"of the parallel ones {c.L_crit_parallel:.1f}, {c.problems} problems of the {measured} split)")
    return 0
