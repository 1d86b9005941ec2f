"""Units, replay and latency measures (DESIGN sections 3 and 5).

A *unit* is one engine request: ``(context_ids, completion_ids,
completion_logprobs)``. The list of units of a trajectory is the single source
of truth that rewards, the trie packer and the logs read.

``replay`` rebuilds, from a response's text, the exact units the spawn/join
orchestrator would have produced, tokenizing each segment on its own (the
orchestrator's seeds separately), never the whole text at once. Its units'
contexts are :class:`PrefixView` objects over one shared token list, so the
units of a trajectory take memory linear in its length.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, fields
from typing import Iterator, Protocol, Sequence

from rollout.format import (
    JOIN_SUFFIX, PARALLEL_CLOSE, THREAD_CLOSE, Block, FormatError, canonicalize, leading_number, parse, thread_seed,
)

SEQ, THREAD = "seq", "thread"


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class PrefixView(Sequence[int]):
    """The first ``n`` ids of the list ``ids``, then ``tail``, without copying them.

    ``replay`` gives every unit of a trajectory such a view of one list that
    only grows (the joined trajectory), instead of a copy of its context each.
    It reads like a list: ``len``, iteration, indexing, ``==`` with a list;
    slicing and ``+`` give lists, and a deep copy (``dataclasses.asdict``,
    :meth:`Unit.to_dict`) is a plain list.
    """

    __slots__ = ("ids", "n", "tail")

    def __init__(self, ids: list[int], n: int, tail: Sequence[int] = ()):
        self.ids, self.n, self.tail = ids, n, tail

    def __len__(self) -> int:
        return self.n + len(self.tail)

    def __iter__(self) -> Iterator[int]:
        return itertools.chain(itertools.islice(self.ids, self.n), self.tail)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(self)[i]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("PrefixView index out of range")
        return self.ids[i] if i < self.n else self.tail[i - self.n]

    def __eq__(self, other) -> bool:
        if not isinstance(other, (list, PrefixView)):
            return NotImplemented
        return len(self) == len(other) and list(self) == list(other)

    def __add__(self, other) -> list[int]:
        return list(self) + list(other)

    def __radd__(self, other) -> list[int]:
        return list(other) + list(self)

    def __deepcopy__(self, memo) -> list[int]:
        return list(self)

    def __repr__(self) -> str:
        return repr(list(self))


@dataclass
class Unit:
    """One engine request and what it produced.

    ``role`` is ``"seq"`` for sequential requests and ``"thread"`` for a thread of
    block ``block`` (1-based) numbered ``thread``. ``n_inserted`` counts the
    orchestrator-inserted tokens at the end of ``context_ids`` (a thread's seed,
    the newline after a join); they are never training targets.
    ``context_ids`` is a list, or a :class:`PrefixView` in replayed units.
    """

    context_ids: Sequence[int]
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
        """The unit of a dict as :meth:`to_dict` writes it; ValueError naming a missing, unknown or mistyped field."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a unit object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}")
        for name in ("context_ids", "completion_ids"):
            if not _is_id_list(d.get(name)):
                raise ValueError(f"field {name!r} must be a list of token ids (integers >= 0)")
        logprobs = d.get("completion_logprobs")
        if logprobs is not None and not (
                isinstance(logprobs, list) and len(logprobs) == len(d["completion_ids"])
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in logprobs)):
            raise ValueError("field 'completion_logprobs' must be null or one number per completion token")
        role = d.get("role", SEQ)
        if role not in (SEQ, THREAD):
            raise ValueError(f"field 'role' must be {SEQ!r} or {THREAD!r}")
        for name in ("block", "thread"):
            if d.get(name) is not None and not _is_int(d[name]):
                raise ValueError(f"field {name!r} must be null or an integer")
            if role == THREAD and d.get(name) is None:
                raise ValueError(f"a thread unit needs an integer {name!r}")
        n_inserted = d.get("n_inserted", 0)
        if not (_is_int(n_inserted) and 0 <= n_inserted <= len(d["context_ids"])):
            raise ValueError("field 'n_inserted' must be an integer from 0 to the context length")
        return cls(**d)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_id_list(x) -> bool:
    return isinstance(x, list) and all(type(t) is int and t >= 0 for t in x)


def _list_from_json(value, parse, what: str) -> list:
    """``parse`` of every item of the JSON list ``value``; ValueError naming the unit (item) and field."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list of {what} objects, got {type(value).__name__}")
    out = []
    for i, d in enumerate(value):
        try:
            out.append(parse(d))
        except ValueError as e:
            raise ValueError(f"unit {i}: {e}") from None
    return out


def units_from_json(value) -> list[Unit]:
    """The units of a record's ``units`` field (a list of unit objects); ValueError naming the unit and field."""
    return _list_from_json(value, Unit.from_dict, "unit")


@dataclass
class UnitTokens:
    """A unit's token counts without its ids: what a viewer page needs to measure threads in tokens, at a
    fraction of the units' size (evaluations write them as a record's ``unit_tokens``)."""

    role: str
    block: int | None
    thread: int | None
    context: int  # context tokens, the inserted ones included
    completion: int  # model-generated tokens (what L_total and L_crit count)
    inserted: int  # orchestrator-inserted tokens at the end of the context

    @classmethod
    def of(cls, unit: Unit) -> "UnitTokens":
        return cls(unit.role, unit.block, unit.thread, len(unit.context_ids), len(unit.completion_ids),
                   unit.n_inserted)

    @classmethod
    def from_dict(cls, d: dict) -> "UnitTokens":
        """The counts of a dict as ``asdict`` writes them; ValueError naming a missing, unknown or mistyped field."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a unit-tokens object, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        if sorted(d) != sorted(names):
            wrong = sorted(set(d) ^ set(names))
            raise ValueError(f"{'unknown' if wrong[0] in d else 'missing'} field {wrong[0]!r}")
        if d["role"] not in (SEQ, THREAD):
            raise ValueError(f"field 'role' must be {SEQ!r} or {THREAD!r}")
        for name in ("block", "thread"):
            if not (d[name] is None and d["role"] == SEQ or _is_int(d[name])):
                raise ValueError(f"field {name!r} must be an integer" + (" or null" if d["role"] == SEQ else ""))
        for name in ("context", "completion", "inserted"):
            if not (_is_int(d[name]) and d[name] >= 0):
                raise ValueError(f"field {name!r} must be an integer >= 0")
        if d["inserted"] > d["context"]:
            raise ValueError("field 'inserted' must be at most the context length")
        return cls(**d)


def unit_tokens(units: Sequence[Unit]) -> list[dict]:
    """The :class:`UnitTokens` of ``units`` as JSON-ready dicts."""
    return [asdict(UnitTokens.of(u)) for u in units]


def unit_tokens_from_json(value) -> list[UnitTokens]:
    """The counts of a record's ``unit_tokens`` field; ValueError naming the unit and field."""
    return _list_from_json(value, UnitTokens.from_dict, "unit-tokens")


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
    Every context is a :class:`PrefixView` of one list, the joined trajectory,
    so time and memory are linear in the response (check it with
    ``rollout.format.validate`` first: a hostile response is cheaper to refuse).
    Raises FormatError when the response cannot be parsed or a thread has no
    number.
    """
    canonical = canonicalize(parse(response))
    units: list[Unit] = []
    joined = list(prompt_ids)  # grows only: every context below is a prefix of it (plus a seed)
    pending = ""
    n_inserted = 0
    block_index = 0
    for part in canonical.parts:
        if isinstance(part, str):
            pending += part
            continue
        block_index += 1
        head = encode(tokenizer, pending + part.head_text())
        units.append(Unit(PrefixView(joined, len(joined)), head, role=SEQ, n_inserted=n_inserted))
        joined += head
        pending = PARALLEL_CLOSE  # the model writes it after the join
        _replay_threads(units, joined, part, block_index, tokenizer)
        join_suffix = encode(tokenizer, JOIN_SUFFIX)
        joined += join_suffix
        n_inserted = len(join_suffix)
    tail = encode(tokenizer, pending) + ([eos_token_id] if eos_token_id is not None else [])
    if tail or not units:
        units.append(Unit(PrefixView(joined, len(joined)), tail, role=SEQ, n_inserted=n_inserted))
    return units


def _replay_threads(units: list[Unit], joined: list[int], block: Block, block_index: int,
                    tokenizer: Tokenizer) -> None:
    """Append the block's thread units; each thread's seed and output go onto ``joined``."""
    base = len(joined)
    for i, raw in enumerate(block.threads):
        number = leading_number(raw)
        if number is None:
            raise FormatError(f"block {block_index}: thread {i + 1} has no number, cannot replay it")
        seed = encode(tokenizer, thread_seed(number))
        body = encode(tokenizer, block.thread_body(i) + THREAD_CLOSE)
        units.append(Unit(PrefixView(joined, base, seed), body, role=THREAD, block=block_index, thread=number,
                          n_inserted=len(seed)))
        joined += seed + body


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
