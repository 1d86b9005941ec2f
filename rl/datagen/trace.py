"""Records of stage 1: a sequential trace, its steps, a block plan, a rejection; assembly of the parallel text.

A *trace* is a sequential response cut into its parts: the reasoning inside
``<think>...</think>`` and the final text after ``</think>`` (which holds the
``\\boxed{}`` answer), plus the prompt and the reference answer.

The reasoning is cut into *steps* (non-empty lines, or paragraphs separated by
blank lines). A rewriter decides which consecutive steps form each thread of
each parallel block (:class:`BlockPlan`), may edit each thread's text, and
writes one outline per thread. :func:`assemble` then writes the parallel
response in the canonical layout of DESIGN section 2; every step outside a
block is copied unchanged, and so is the final text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol

from rollout.format import BLOCK_TAGS, THINK_CLOSE, THINK_OPEN, Block, Response, serialize

#: The steps of stage 1, in order; a rejection names one of them.
#: ``input`` is not one of the five: it rejects a record that is not a sequential trace.
STEPS = ("input", "find", "cut", "decouple", "outline", "validate")

StepUnit = Literal["line", "paragraph"]


@dataclass
class Rejection:
    """Why a trace was dropped: the step, a short stable ``code`` (counted) and a readable ``detail``."""

    step: str
    code: str
    detail: str

    def __post_init__(self) -> None:
        if self.step not in STEPS:
            raise ValueError(f"unknown step {self.step!r}; steps are {STEPS}")


class Reject(Exception):
    """Raised inside a rewriter to drop the trace; carries the :class:`Rejection`."""

    def __init__(self, step: str, code: str, detail: str):
        super().__init__(f"{step}/{code}: {detail}")
        self.rejection = Rejection(step, code, detail)


@dataclass
class Trace:
    """One sequential trace: ``reasoning`` is the text inside ``<think>``, ``final`` the text after ``</think>``."""

    id: str
    prompt: str
    reasoning: str
    final: str
    answer: str


@dataclass
class BlockPlan:
    """One parallel block: the 1-based inclusive step range of each thread, then its text and outline.

    ``texts`` and ``outlines`` stay None until the steps that write them
    (decouple, outline) have run.
    """

    threads: list[tuple[int, int]]
    texts: list[str] | None = None
    outlines: list[str] | None = None

    @property
    def first(self) -> int:
        return self.threads[0][0]

    @property
    def last(self) -> int:
        return self.threads[-1][1]


class Rewriter(Protocol):
    """Steps 1-4 of stage 1: a sequential trace to a parallel response, or a rejection.

    ``rewrite`` returns the response text (step 5, validation, is run on it by
    :func:`rl.datagen.stage1.run_stage1`), or a :class:`Rejection`. It
    must not raise on bad model output; it may raise on infrastructure or
    configuration errors (which stop the run).
    """

    name: str

    def rewrite(self, trace: Trace) -> str | Rejection: ...


def trace_from_record(record: dict, field_name: str, index: int) -> Trace:
    """The trace in ``record[field_name]``; raises :class:`Reject` (step ``input``) if it is not one."""
    rid = str(record.get("id", index))
    prompt, answer, text = record.get("prompt"), record.get("answer"), record.get(field_name)
    if not isinstance(prompt, str) or not prompt.strip():
        raise Reject("input", "no_prompt", "the record has no non-empty string 'prompt'")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise Reject("input", "no_answer", "the record has no reference 'answer' (string or number)")
    if not isinstance(text, str):
        raise Reject("input", "no_response", f"the record has no string field '{field_name}'")
    found = [t for t in BLOCK_TAGS if t in text]
    if found:
        raise Reject("input", "already_parallel", f"the response already holds block tags ({', '.join(found)})")
    start, end = text.find(THINK_OPEN), text.find(THINK_CLOSE)
    if start < 0 or end < start:
        raise Reject("input", "no_think", f"the response does not wrap its reasoning in {THINK_OPEN}...{THINK_CLOSE}")
    if text[:start].strip():
        raise Reject("input", "text_before_think", f"the response has text before {THINK_OPEN}")
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        raise Reject("input", "several_think", f"the response has more than one {THINK_OPEN} or {THINK_CLOSE}")
    reasoning = text[start + len(THINK_OPEN):end].strip()
    if not reasoning:
        raise Reject("input", "empty_reasoning", "the reasoning inside <think> is empty")
    return Trace(rid, prompt, reasoning, text[end + len(THINK_CLOSE):], answer)


def separator(unit: StepUnit) -> str:
    """Text between two steps: one newline between lines, a blank line between paragraphs."""
    if unit == "line":
        return "\n"
    if unit == "paragraph":
        return "\n\n"
    raise ValueError(f"step unit must be 'line' or 'paragraph', got {unit!r}")


def split_steps(reasoning: str, unit: StepUnit) -> list[str]:
    """The reasoning's non-empty lines (trailing spaces removed) or paragraphs (stripped)."""
    if unit == "line":
        return [line.rstrip() for line in reasoning.split("\n") if line.strip()]
    separator(unit)
    return [p.strip() for p in re.split(r"\n[ \t]*\n", reasoning) if p.strip()]


def thread_source(steps: list[str], span: tuple[int, int], unit: StepUnit) -> str:
    """The original text of the steps ``span`` (1-based, inclusive)."""
    return separator(unit).join(steps[span[0] - 1:span[1]])


def assemble(trace: Trace, steps: list[str], blocks: list[BlockPlan], unit: StepUnit) -> str:
    """The parallel response: ``<think>``, steps and blocks in order, ``</think>``, the final text.

    Blocks must be sorted, non-overlapping and complete (texts and outlines
    set); each thread reads ``"N: text"`` and each outline ``"N: outline"``.
    """
    sep = separator(unit)
    pieces: list[str] = []
    pos = 1
    for b in blocks:
        if b.texts is None or b.outlines is None:
            raise ValueError("assemble needs every block's texts and outlines")
        if b.first < pos:
            raise ValueError(f"blocks overlap or are out of order at step {b.first}")
        if b.first > pos:
            pieces.append(sep.join(steps[pos - 1:b.first - 1]))
        k = len(b.threads)
        block = Block([f"{i}: {o}" for i, o in enumerate(b.outlines, 1)],
                      [f"\n{i}: {t}\n" for i, t in enumerate(b.texts, 1)], ["\n"] * (3 + 2 * k))
        pieces.append(serialize(Response([block])))
        pos = b.last + 1
    if pos <= len(steps):
        pieces.append(sep.join(steps[pos - 1:]))
    return f"{THINK_OPEN}\n" + sep.join(pieces) + f"\n{THINK_CLOSE}" + trace.final

