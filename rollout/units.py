"""Units, replay and latency measures (DESIGN sections 3 and 5).

A *unit* is one engine request: ``(context_ids, completion_ids,
completion_logprobs)``. The list of units of a trajectory is the single source
of truth that rewards, the trie packer and the logs read.

``replay`` rebuilds, from a response's text, the exact units the spawn/join
orchestrator would have produced, tokenizing each segment on its own (the
orchestrator's seeds separately), never the whole text at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence

from rollout.format import (
    JOIN_SUFFIX, PARALLEL_CLOSE, THREAD_CLOSE, Block, FormatError, canonicalize, leading_number, parse, thread_seed,
)

SEQ, THREAD = "seq", "thread"


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass
class Unit:
    """One engine request and what it produced.

    ``role`` is ``"seq"`` for sequential requests and ``"thread"`` for a thread of
    block ``block`` (1-based) numbered ``thread``. ``n_inserted`` counts the
    orchestrator-inserted tokens at the end of ``context_ids`` (a thread's seed,
    the newline after a join); they are never training targets.
    """

    context_ids: list[int]
    completion_ids: list[int]
    completion_logprobs: list[float] | None = None
    role: str = SEQ
    block: int | None = None
    thread: int | None = None
    n_inserted: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Unit":
        return cls(**d)


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` alone, without BOS/EOS or other added tokens."""
    if not text:
        return []
    return list(tokenizer.encode(text, add_special_tokens=False))


def replay(
    prompt_ids: Sequence[int],
    response: str,
    tokenizer: Tokenizer,
    eos_token_id: int | None = None,
) -> list[Unit]:
    """The units the orchestrator would have produced for ``response``.

    Sequential requests stop right after ``</Outlines>``; each thread starts
    from the pre-block context plus its seed and ends with ``</Thread>``; the
    join context is the pre-block context, every seed and thread in outline
    order, and a newline. ``eos_token_id``, if given, ends the last unit.
    Raises FormatError when the response cannot be parsed or a thread has no
    number.
    """
    canonical = canonicalize(parse(response))
    units: list[Unit] = []
    context = list(prompt_ids)
    pending = ""
    n_inserted = 0
    block_index = 0
    for part in canonical.parts:
        if isinstance(part, str):
            pending += part
            continue
        block_index += 1
        head = encode(tokenizer, pending + part.head_text())
        units.append(Unit(list(context), head, role=SEQ, n_inserted=n_inserted))
        context += head
        pending = PARALLEL_CLOSE  # the model writes it after the join
        joined = _replay_threads(units, context, part, block_index, tokenizer)
        join_suffix = encode(tokenizer, JOIN_SUFFIX)
        context = context + joined + join_suffix
        n_inserted = len(join_suffix)
    tail = encode(tokenizer, pending) + ([eos_token_id] if eos_token_id is not None else [])
    if tail or not units:
        units.append(Unit(list(context), tail, role=SEQ, n_inserted=n_inserted))
    return units


def _replay_threads(units: list[Unit], base: list[int], block: Block, block_index: int,
                    tokenizer: Tokenizer) -> list[int]:
    joined: list[int] = []
    for i, raw in enumerate(block.threads):
        number = leading_number(raw)
        if number is None:
            raise FormatError(f"block {block_index}: thread {i + 1} has no number, cannot replay it")
        seed = encode(tokenizer, thread_seed(number))
        body = encode(tokenizer, block.thread_body(i) + THREAD_CLOSE)
        units.append(Unit(base + seed, body, role=THREAD, block=block_index, thread=number,
                          n_inserted=len(seed)))
        joined += seed + body
    return joined


def full_sequence(units: Sequence[Unit]) -> list[int]:
    """Prompt plus the whole joined trajectory: the last unit's context and completion."""
    last = units[-1]
    return list(last.context_ids) + list(last.completion_ids)


@dataclass
class Latency:
    """Latency measures of one trajectory, in tokens (DESIGN section 3)."""

    L_total: int
    L_crit: int
    eta: float
    speedup: float
    n_blocks: int
    threads_per_block: list[int] = field(default_factory=list)

    @property
    def is_parallel(self) -> bool:
        return self.n_blocks > 0


def latency(units: Sequence[Unit], count_inserted: bool = False, count_prompt: bool = False) -> Latency:
    """``L_total``, ``L_crit``, ``eta = 1 - L_crit/L_total`` and ``L_total/L_crit``.

    Only model-generated tokens count by default; ``count_inserted`` adds the
    orchestrator's seeds and join newlines, ``count_prompt`` the prompt (the
    first unit's context without its inserted tokens) once on both paths.
    """
    total = crit = 0
    block_threads: dict[int, list[int]] = {}
    for u in units:
        n = len(u.completion_ids) + (u.n_inserted if count_inserted else 0)
        total += n
        if u.role == THREAD:
            block_threads.setdefault(u.block, []).append(n)
        else:
            crit += n
    crit += sum(max(lengths) for lengths in block_threads.values())
    if count_prompt and units:
        # The first unit's context is the prompt plus what the orchestrator inserted after it: nothing for a
        # sequential request, the thread's seed when the prompt itself ends in </Outlines>.
        prompt = len(units[0].context_ids) - units[0].n_inserted
        total += prompt
        crit += prompt
    eta = 1.0 - crit / total if total else 0.0
    speedup = total / crit if crit else 1.0
    return Latency(total, crit, eta, speedup, len(block_threads),
                   [len(block_threads[b]) for b in sorted(block_threads)])


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a user turn in the tokenizer's chat template,
    ending where the assistant's response starts."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    return encode(tokenizer, text)
