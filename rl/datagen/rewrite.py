"""Steps 1-4 of stage 1 with a teacher LLM, and the checks every rewriter's choices must pass.

The teacher is asked four questions per trace, each answered with one JSON
object (:data:`PROMPTS`); its answer is checked before the next question:

1. **find** — runs of consecutive steps that split into independent parts:
   ``{"runs": [[first, last], ...]}``. Checked: step numbers in range, runs
   of at least ``min_threads`` steps, sorted and disjoint, at most
   ``max_blocks``, at least one run.
2. **cut** — each run cut into threads of consecutive steps:
   ``{"threads": [[[first, last], ...], ...]}``. Checked: one list per run,
   ranges that tile the run exactly, ``min_threads..max_threads`` threads.
3. **decouple** — each thread's text with references to other threads removed
   by minimal edits: ``{"threads": [["text", ...], ...]}``. Checked: the same
   shape, no control tags, no mention of another thread by number, and a
   ``difflib`` similarity of at least ``min_similarity`` to the original text
   (the reasoning is edited, never regenerated).
4. **outline** — one outline per thread, its task without its result, from
   the context before the block alone: ``{"outlines": [["...", ...], ...]}``.
   Checked: the same shape, one non-empty line of at most
   ``max_outline_chars`` characters without tags, and every number in it
   already in the prompt or the reasoning before the block (a number found
   only in the block's threads is a leaked result; one found nowhere does not
   follow from the context; single digits are exempt from the latter).

A reply that is not one JSON object, lacks the key, or fails a check drops the
trace with a :class:`~rl.datagen.trace.Rejection` naming the step, a code
and the reason. The checks are plain functions, also applied to the rule-based
rewriter's choices (:mod:`rl.datagen.rules`).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field

from rollout.config import check_ranges
from rl.datagen.teacher import TeacherCallError, TeacherClient
from rl.datagen.trace import (
    BlockPlan, Reject, Rejection, StepUnit, Trace, assemble, separator, split_steps, thread_source,
)
from rollout.format import ALL_TAGS, thread_references

_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")


@dataclass
class RewriteConfig:
    """Limits that every rewrite must respect (steps 1-4)."""

    step_unit: StepUnit = field(default="line", metadata={
        "help": "what a reasoning step is: 'line' (non-empty lines) or 'paragraph' (blank-line separated)"})
    min_threads: int = field(default=2, metadata={"help": "fewest threads in a block (count)", "range": ">= 2"})
    max_threads: int = field(default=8, metadata={"help": "most threads in a block (count)", "range": ">= 2"})
    max_blocks: int = field(default=8, metadata={
        "help": "most parallel blocks in one response (count)", "range": ">= 1"})
    min_similarity: float = field(default=0.8, metadata={
        "help": "decouple: lowest difflib similarity of an edited thread to its original text (0..1)",
        "range": "[0, 1]"})
    max_outline_chars: int = field(default=200, metadata={"help": "longest outline (characters)", "range": ">= 1"})

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.step_unit not in ("line", "paragraph"):
            raise ValueError(f"step_unit must be 'line' or 'paragraph', got {self.step_unit!r}")
        if self.min_threads > self.max_threads:
            raise ValueError(f"need min_threads <= max_threads, got {self.min_threads}, {self.max_threads}")


# ---------------------------------------------------------------------------- checks (shared by all rewriters)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _span(x, step: str, what: str) -> tuple[int, int]:
    if not (isinstance(x, list) and len(x) == 2 and all(_is_int(v) for v in x)):
        raise Reject(step, "bad_reply", f"{what} is not a [first, last] pair of integers: {json.dumps(x)[:80]}")
    return x[0], x[1]


def check_runs(runs, n_steps: int, cfg: RewriteConfig) -> list[tuple[int, int]]:
    """Step 1's runs as ``(first, last)`` pairs, checked (see module docstring)."""
    if not isinstance(runs, list):
        raise Reject("find", "bad_reply", "'runs' is not a list")
    spans = [_span(r, "find", f"run {i + 1}") for i, r in enumerate(runs)]
    if not spans:
        raise Reject("find", "no_runs", "no run of independent steps found")
    prev = 0
    for a, b in spans:
        if not 1 <= a <= b <= n_steps:
            raise Reject("find", "out_of_range", f"run [{a}, {b}] is outside steps 1..{n_steps}")
        if b - a + 1 < cfg.min_threads:
            raise Reject("find", "run_too_short", f"run [{a}, {b}] has fewer than {cfg.min_threads} steps")
        if a <= prev:
            raise Reject("find", "overlap", f"run [{a}, {b}] overlaps or precedes the run before it")
        prev = b
    if len(spans) > cfg.max_blocks:
        raise Reject("find", "too_many_blocks", f"{len(spans)} runs, more than max_blocks={cfg.max_blocks}")
    return spans


def check_cuts(cuts, runs: list[tuple[int, int]], cfg: RewriteConfig) -> list[BlockPlan]:
    """Step 2's thread ranges, one list per run, checked to tile each run."""
    if not isinstance(cuts, list):
        raise Reject("cut", "bad_reply", "'threads' is not a list")
    if len(cuts) != len(runs):
        raise Reject("cut", "wrong_count", f"{len(cuts)} lists of threads for {len(runs)} runs")
    blocks = []
    for i, ((a, b), threads) in enumerate(zip(runs, cuts), 1):
        if not isinstance(threads, list):
            raise Reject("cut", "bad_reply", f"the threads of run {i} are not a list")
        spans = [_span(t, "cut", f"thread {j} of run {i}") for j, t in enumerate(threads, 1)]
        if not cfg.min_threads <= len(spans) <= cfg.max_threads:
            raise Reject("cut", "thread_count", f"run {i} is cut into {len(spans)} threads, "
                                                f"allowed {cfg.min_threads}..{cfg.max_threads}")
        expected = a
        for s, e in spans:
            if s != expected or e < s or e > b:
                raise Reject("cut", "not_a_tiling", f"threads {json.dumps(threads)[:120]} do not tile run [{a}, {b}] "
                                                    "with consecutive ranges")
            expected = e + 1
        if expected != b + 1:
            raise Reject("cut", "not_a_tiling", f"threads {json.dumps(threads)[:120]} stop before the end of run "
                                                f"[{a}, {b}]")
        blocks.append(BlockPlan(spans))
    return blocks


def _tags_in(text: str) -> list[str]:
    return [t for t in ALL_TAGS if t in text]


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def check_texts(texts, blocks: list[BlockPlan], steps: list[str], cfg: RewriteConfig) -> None:
    """Step 3's edited thread texts, checked against the originals; sets ``block.texts``."""
    if not isinstance(texts, list) or len(texts) != len(blocks):
        raise Reject("decouple", "wrong_count", f"expected {len(blocks)} lists of thread texts")
    for i, (block, edited) in enumerate(zip(blocks, texts), 1):
        if not (isinstance(edited, list) and len(edited) == len(block.threads)
                and all(isinstance(t, str) for t in edited)):
            raise Reject("decouple", "wrong_count", f"block {i}: expected {len(block.threads)} thread texts")
        for n, (span, text) in enumerate(zip(block.threads, edited), 1):
            if not text.strip():
                raise Reject("decouple", "empty_thread", f"block {i}: thread {n} is empty")
            if tags := _tags_in(text):
                raise Reject("decouple", "tags", f"block {i}: thread {n} holds control tags {', '.join(tags)}")
            refs = thread_references(text, n)
            if refs:
                raise Reject("decouple", "cross_reference", f"block {i}: thread {n} still mentions thread "
                                                            f"{', '.join(map(str, refs))}")
            source = thread_source(steps, span, cfg.step_unit)
            ratio = similarity(source, text.strip())
            if ratio < cfg.min_similarity:
                raise Reject("decouple", "rewritten", f"block {i}: thread {n} is not a minimal edit (similarity "
                                                      f"{ratio:.2f} < {cfg.min_similarity})")
        block.texts = [t.strip() for t in edited]


def numbers(text: str) -> set[str]:
    """The numbers in ``text``, integers without leading zeros (``0861`` reads as ``861``)."""
    return {str(int(x)) if "." not in x else x for x in _NUMBER_RE.findall(text)}


def context_before(trace: Trace, steps: list[str], block: BlockPlan, cfg: RewriteConfig) -> str:
    """What the model has seen when it writes the block's outlines: the prompt and the steps before it."""
    return trace.prompt + "\n" + separator(cfg.step_unit).join(steps[:block.first - 1])


def check_outlines(outlines, blocks: list[BlockPlan], trace: Trace, steps: list[str], cfg: RewriteConfig) -> None:
    """Step 4's outlines, checked (see module docstring); sets ``block.outlines``."""
    if not isinstance(outlines, list) or len(outlines) != len(blocks):
        raise Reject("outline", "wrong_count", f"expected {len(blocks)} lists of outlines")
    for i, (block, lines) in enumerate(zip(blocks, outlines), 1):
        if not (isinstance(lines, list) and len(lines) == len(block.threads) and all(isinstance(o, str) for o in lines)):
            raise Reject("outline", "wrong_count", f"block {i}: expected {len(block.threads)} outlines")
        known = numbers(context_before(trace, steps, block, cfg))
        in_threads = set().union(*(numbers(t) for t in block.texts or []))
        for n, outline in enumerate(lines, 1):
            text = outline.strip()
            if not text:
                raise Reject("outline", "empty", f"block {i}: outline {n} is empty")
            if "\n" in text:
                raise Reject("outline", "multiline", f"block {i}: outline {n} spans several lines")
            if len(text) > cfg.max_outline_chars:
                raise Reject("outline", "too_long", f"block {i}: outline {n} has {len(text)} characters, "
                                                    f"limit {cfg.max_outline_chars}")
            if tags := _tags_in(text):
                raise Reject("outline", "tags", f"block {i}: outline {n} holds control tags {', '.join(tags)}")
            new = numbers(text) - known
            leaked = sorted(new & in_threads)
            if leaked:
                raise Reject("outline", "leaks_result", f"block {i}: outline {n} gives {', '.join(leaked[:5])}, "
                                                        "found only in the block's threads")
            unknown = sorted(x for x in new if len(x) > 1)
            if unknown:
                raise Reject("outline", "not_from_context", f"block {i}: outline {n} uses {', '.join(unknown[:5])}, "
                                                            "not in the context before the block")
        block.outlines = [o.strip() for o in lines]


# ---------------------------------------------------------------------------- the teacher's questions

SYSTEM = ("You rewrite step-by-step reasoning so that independent parts can run as parallel threads. "
          "Reply with one JSON object and nothing else.")

PROMPTS = {
    "find": ("Find runs of consecutive steps that split into parts that do not depend on each other "
             "(no part uses a result of another part of the same run). "
             'Reply {{"runs": [[first, last], ...]}} with step numbers, or {{"runs": []}}.'),
    "cut": ("Runs: {runs}. Cut each run into {min_threads} to {max_threads} threads of consecutive steps, "
            "so that no thread uses a result of another thread of its run. "
            'Reply {{"threads": [[[first, last], ...], ...]}}, one list per run, covering each run exactly.'),
    "decouple": ("Each thread below runs in parallel with the others of its block and cannot see them. "
                 "Remove every reference to another thread (\"as above\", \"the previous result\", \"thread 2\") "
                 "with the smallest edit; change nothing else, do not rewrite or solve anything.\n\n{blocks}\n\n"
                 'Reply {{"threads": [["thread 1 text", ...], ...]}}, one list per block.'),
    "outline": ("Write one short outline per thread below: what the thread will do, never its result, "
                "using only what is known before its block starts.\n\n{blocks}\n\n"
                'Reply {{"outlines": [["outline 1", ...], ...]}}, one list per block.'),
}


def numbered(steps: list[str]) -> str:
    return "\n".join(f"[{i}] {s}" for i, s in enumerate(steps, 1))


def parse_json_object(content: str, step: str, finish_reason: str | None) -> dict:
    """The JSON object in a reply; raises Reject if there is none.

    A leading ``<think>...</think>`` (reasoning teachers), code fences and text
    around the object are allowed.
    """
    text = re.sub(r"^\s*<think>.*?</think>", "", content, flags=re.S).strip()
    if text.startswith("```"):
        text = re.sub(r"^```[a-zA-Z]*\s*|\s*```$", "", text)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        obj = None
        if 0 <= start < end:
            try:
                obj = json.loads(text[start:end + 1])
            except json.JSONDecodeError:
                pass
    if not isinstance(obj, dict):
        cut = " (the reply was cut at max_tokens)" if finish_reason == "length" else ""
        raise Reject(step, "not_json", f"the reply is not a JSON object{cut}: {content[:80]!r}")
    return obj


class TeacherRewriter:
    """Steps 1-4 with a teacher (see the module docstring); one trace at a time, several traces in threads."""

    name = "teacher"

    def __init__(self, client: TeacherClient, cfg: RewriteConfig):
        self.client, self.cfg = client, cfg

    def _ask(self, step: str, trace: Trace, steps: list[str], question: str, key: str):
        user = f"Problem:\n{trace.prompt}\n\nReasoning steps:\n{numbered(steps)}\n\n{question}"
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        try:
            reply = self.client.chat(messages)
        except TeacherCallError as e:
            raise Reject(step, "teacher_error", str(e)) from None
        obj = parse_json_object(reply.content, step, reply.finish_reason)
        if key not in obj:
            raise Reject(step, "bad_reply", f"the reply has no '{key}' (keys: {', '.join(map(str, obj))[:80]})")
        return obj[key]

    def _blocks_text(self, steps: list[str], blocks: list[BlockPlan], with_context: bool) -> str:
        out = []
        for i, b in enumerate(blocks, 1):
            known = f"the problem and steps 1..{b.first - 1}" if b.first > 1 else "the problem only"
            out.append(f"Block {i} (known before it: {known}):" if with_context else f"Block {i}:")
            for n, span in enumerate(b.threads, 1):
                text = b.texts[n - 1] if b.texts else thread_source(steps, span, self.cfg.step_unit)
                out.append(f"--- thread {n} ---\n{text}")
        return "\n".join(out)

    def rewrite(self, trace: Trace) -> str | Rejection:
        try:
            return self._rewrite(trace)
        except Reject as r:
            return r.rejection

    def _rewrite(self, trace: Trace) -> str:
        cfg = self.cfg
        steps = split_steps(trace.reasoning, cfg.step_unit)
        if len(steps) < cfg.min_threads:
            raise Reject("find", "too_few_steps", f"{len(steps)} steps, fewer than min_threads={cfg.min_threads}")
        runs = check_runs(self._ask("find", trace, steps, PROMPTS["find"], "runs"), len(steps), cfg)
        question = PROMPTS["cut"].format(runs=json.dumps([list(r) for r in runs]), min_threads=cfg.min_threads,
                                         max_threads=cfg.max_threads)
        blocks = check_cuts(self._ask("cut", trace, steps, question, "threads"), runs, cfg)
        question = PROMPTS["decouple"].format(blocks=self._blocks_text(steps, blocks, False))
        check_texts(self._ask("decouple", trace, steps, question, "threads"), blocks, steps, cfg)
        question = PROMPTS["outline"].format(blocks=self._blocks_text(steps, blocks, True))
        check_outlines(self._ask("outline", trace, steps, question, "outlines"), blocks, trace, steps, cfg)
        return assemble(trace, steps, blocks, cfg.step_unit)
