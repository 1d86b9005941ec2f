"""The spawn/join state machine of DESIGN section 3, run over an :class:`~rollout.engine.Engine`.

Each trajectory is a small state machine on token ids (never
decode-and-re-encode between requests):

1. *sequential*: continue the context, stopping at ``</Outlines>`` or an EOS;
2. *parse* the block head (from the last ``<Parallel>`` to ``</Outlines>``,
   decoded) into outline numbers, which must be ``1..k``;
3. *spawn* ``k`` thread requests at once, thread ``n`` with prompt
   ``context + tokens("\\n<Thread>\\nn:")`` (the seed, tokenized on its own),
   stopping at ``</Thread>`` or an EOS;
4. *join*: context += every seed and thread output in outline order (a thread
   cut by ``max_thread_tokens`` gets an inserted ``</Thread>``), then the join
   newline, and go back to 1; the model writes ``</Parallel>`` itself;
5. until an EOS or a limit.

EOS is a set: every id of :attr:`TagIds.eos_ids`, the tokenizer's EOS and
those of the model's ``generation_config`` (Qwen3 lists ``<|im_end|>`` and
``<|endoftext|>``; vLLM stops on both). Callers pass the set
(``rollout.onboard.eos_token_ids(model_dir)``). A request the engine stops
on a token that is neither one of them nor the tag it stops at (an engine
stop id the orchestrator was not told of) ends the trajectory with
``unknown_stop``, never as a cut thread or a context overflow.

:func:`generate` runs many trajectories at once over one engine: every request
that becomes ready (a sequential continuation, the threads of a block) is
submitted together with the others, and the engine batches all of them.
:func:`agenerate` runs the same state machine for one trajectory over an
:class:`~rollout.engine.AsyncEngine` (a server client awaited request by
request, as in verl's agent loop), awaiting a block's threads together.
Sequential mode (``RolloutConfig.sequential``) is the same code with step 1
not stopping at ``</Outlines>``, so nothing is ever spawned.

Every request becomes a :class:`~rollout.units.Unit`; a trajectory's units
are what rewards, the trie packer and the logs read. A unit's
``n_inserted`` counts the orchestrator's tokens at the end of its context: the
seed of a thread, the join newline of the first sequential request after a
block. An inserted ``</Thread>`` (a thread cut at its length limit) is part of
the next join context only, never of a completion, and is listed in
``Trajectory.closed_threads``.

Limits end a trajectory with a recorded reason, never a fallback to another
mode (see :data:`FINISH_REASONS`). Model output cannot make this code raise:
an unexpected exception while advancing one trajectory ends that trajectory
with reason ``error`` and the message, and the others go on.

Token budget and threads: the ``k`` threads of a block share the budget left,
each capped at ``min(max_thread_tokens, left // k, room in max_context)``;
a thread stopped by the budget share or the context ends the trajectory
(``budget`` / ``context``) after its block's units are recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from rollout.config import RolloutConfig
from rollout.engine import STOP, AsyncEngine, Completion, Engine, Request
from rollout.format import (
    OUTLINES_CLOSE, PARALLEL_CLOSE, PARALLEL_OPEN, THREAD_CLOSE, FormatError, JOIN_SUFFIX, parse, thread_seed,
)
from rollout.units import SEQ, THREAD, Unit, encode, latency

log = logging.getLogger(__name__)

#: Every finish reason a trajectory can have, and what it means.
FINISH_REASONS: dict[str, str] = {
    "eos": "the model ended its response with an EOS (any id of TagIds.eos_ids) in a sequential request",
    "budget": "the generated-token budget (max_tokens) ran out",
    "context": "a request would not fit the per-request context limit (max_context)",
    "too_many_threads": "a block has more outlines than max_threads",
    "too_many_blocks": "the model opened more blocks than max_blocks",
    "bad_outlines": "the block head does not parse, or its outlines are not numbered 1..k or are empty",
    "eos_in_thread": "a thread ended with an EOS instead of </Thread>",
    "unknown_stop": "the engine stopped a request on a token that is neither an EOS id, nor the tag the request "
                    "stops at, nor a length limit (token id in finish_detail)",
    "error": "an unexpected error while advancing this trajectory (message in finish_detail)",
}


class BadOutlines(ValueError):
    """A block head whose outlines cannot be spawned; the message says why."""


class TooManyThreads(ValueError):
    """A block head with more outlines than allowed."""


def outline_numbers(head_text: str, max_threads: int) -> list[int]:
    """The outline numbers of a block head ``<Parallel> ... </Outlines>``, which must be ``1..k``.

    Raises :class:`TooManyThreads` when ``k > max_threads`` and
    :class:`BadOutlines` when the head does not parse as a block head, has no
    outline, an outline without a leading ``N:``, numbers other than
    ``1..k`` in order, or an empty outline.
    """
    if not head_text.startswith(PARALLEL_OPEN) or not head_text.endswith(OUTLINES_CLOSE):
        raise BadOutlines(f"a block head runs from {PARALLEL_OPEN} to {OUTLINES_CLOSE}")
    try:
        parts = parse(head_text + PARALLEL_CLOSE).parts
    except FormatError as e:
        raise BadOutlines(str(e)) from None
    if len(parts) != 1 or isinstance(parts[0], str) or parts[0].threads:
        raise BadOutlines("the block head holds more than outlines")
    block = parts[0]
    k = len(block.outlines)
    if k == 0:
        raise BadOutlines("no outlines")
    if k > max_threads:
        raise TooManyThreads(f"{k} outlines, more than max_threads={max_threads}")
    numbers = block.outline_numbers
    for i, n in enumerate(numbers):
        if n is None:
            raise BadOutlines(f"outline {i + 1} does not start with 'N:'")
    if numbers != list(range(1, k + 1)):
        shown = ",".join(str(n) for n in numbers[:10]) + (",..." if k > 10 else "")
        raise BadOutlines(f"outlines are numbered {shown}, expected 1..{k}")
    for i, n in enumerate(numbers):
        if not block.outline_body(i).strip():
            raise BadOutlines(f"outline {n} is empty")
    return numbers


@dataclass
class TagIds:
    """The token ids the state machine watches, and the join newline's tokens.

    ``eos`` is the primary EOS (the tokenizer's); ``eos_ids`` every EOS id,
    ``eos`` first (defaults to ``(eos,)``).
    """

    eos: int
    parallel_open: int
    parallel_close: int
    outlines_close: int
    thread_close: int
    join_suffix: list[int]
    eos_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.eos_ids = tuple(dict.fromkeys((self.eos, *self.eos_ids)))

    @classmethod
    def from_tokenizer(cls, tokenizer, eos_token_id: int | Sequence[int] | None = None) -> "TagIds":
        """The ids of ``tokenizer``; ``eos_token_id`` is one EOS id or the list of them (as in a
        ``generation_config``; its first is the primary), default the tokenizer's EOS."""
        def one(tag: str) -> int:
            ids = encode(tokenizer, tag)
            if len(ids) != 1:
                raise ValueError(f"the tokenizer splits {tag} into {len(ids)} tokens; the tags must be single tokens")
            return ids[0]

        given = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        eos_ids = [tokenizer.eos_token_id] if eos_token_id is None else list(given)
        if not eos_ids or any(not isinstance(i, int) or isinstance(i, bool) for i in eos_ids):
            raise ValueError(f"EOS ids must be integers, got {eos_ids} (does the tokenizer have an eos_token_id?)")
        return cls(eos_ids[0], one(PARALLEL_OPEN), one(PARALLEL_CLOSE), one(OUTLINES_CLOSE), one(THREAD_CLOSE),
                   encode(tokenizer, JOIN_SUFFIX), tuple(eos_ids))


@dataclass
class Trajectory:
    """One sampled response and everything measured about it.

    ``sequence_ids`` is the prompt plus the response as joined (seeds, join
    newlines and inserted ``</Thread>`` included); ``text`` decodes the
    response part (special tokens kept, a final EOS left out). Latency
    measures count model-generated tokens only (``rollout.units.latency``).
    ``latency_s`` is the wall-clock time from the start of :func:`generate`
    to this trajectory's end. ``closed_threads`` lists ``(block, thread)``
    of threads closed with an inserted ``</Thread>``.
    """

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    units: list[Unit]
    sequence_ids: list[int]
    text: str
    finish_reason: str
    finish_detail: str
    L_total: int
    L_crit: int
    eta: float
    speedup: float
    n_blocks: int
    threads_per_block: list[int]
    latency_s: float
    closed_threads: list[tuple[int, int]] = field(default_factory=list)
    n_requests: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Trajectory":
        d = dict(d)
        d["units"] = [Unit.from_dict(u) for u in d["units"]]
        d["closed_threads"] = [tuple(x) for x in d.get("closed_threads", [])]
        return cls(**d)


def request_seed(base: int | None, prompt_index: int, sample_index: int, request_number: int) -> int | None:
    """A request's sampling seed, fixed by its place in the rollout (``None`` if ``base`` is)."""
    if base is None:
        return None
    digest = hashlib.blake2b(f"{base}:{prompt_index}:{sample_index}:{request_number}".encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "little") & 0x7FFFFFFF


@dataclass
class _Thread:
    number: int
    seed: list[int]
    cap: int
    limit: str  # what set ``cap``: "thread", "budget" or "context"
    completion: Completion | None = None


@dataclass
class _Block:
    index: int
    base: list[int]
    threads: dict[int, _Thread]


class _Rollout:
    """The state machine of one trajectory."""

    def __init__(self, owner: int, prompt_index: int, sample_index: int, prompt_ids: Sequence[int],
                 cfg: RolloutConfig, tags: TagIds, tokenizer, seeds: dict[int, list[int]]):
        self.owner, self.prompt_index, self.sample_index = owner, prompt_index, sample_index
        self.prompt_ids = list(prompt_ids)
        self.cfg, self.tags, self.tokenizer, self.seeds = cfg, tags, tokenizer, seeds
        self.context = list(prompt_ids)
        self.units: list[Unit] = []
        self.generated = 0
        self.blocks = 0
        self.n_inserted_next = 0
        self.n_requests = 0
        self.block: _Block | None = None
        self.closed: list[tuple[int, int]] = []
        self.record: Trajectory | None = None
        self.t0 = time.perf_counter()

    @property
    def finished(self) -> bool:
        return self.record is not None

    # -- entry points; exceptions end this trajectory only ---------------------------

    def start(self) -> list[Request]:
        return self._guarded(self._start)

    def advance(self, request: Request, completion: Completion) -> list[Request]:
        if self.finished:  # e.g. the other threads of a block that ended in error
            return []
        return self._guarded(lambda: self._advance(request, completion))

    def _guarded(self, step: Callable[[], list[Request]]) -> list[Request]:
        try:
            return step()
        except Exception as e:  # noqa: BLE001 - recorded as this trajectory's finish reason
            log.warning("trajectory (prompt %d, sample %d) ended in error", self.prompt_index, self.sample_index,
                        exc_info=True)
            self.block = None
            return self._finish("error", f"{type(e).__name__}: {e}")

    # -- the state machine -----------------------------------------------------------

    def _start(self) -> list[Request]:
        if not self.cfg.sequential and self.context and self.context[-1] == self.tags.outlines_close:
            return self._on_head()
        return self._sequential()

    def _request(self, prompt: list[int], max_tokens: int, stops: list[int], thread: int | None = None) -> Request:
        seed = request_seed(self.cfg.seed, self.prompt_index, self.sample_index, self.n_requests)
        self.n_requests += 1
        return Request(prompt, max_tokens, stops, self.cfg.temperature, self.cfg.top_p, seed,
                       owner=(self.owner, thread))

    def _sequential(self) -> list[Request]:
        left = self.cfg.max_tokens - self.generated
        room = self.cfg.max_context - len(self.context)
        if left < 1:
            return self._finish("budget", f"{self.generated} tokens generated, budget {self.cfg.max_tokens}")
        if room < 1:
            return self._finish("context", f"context of {len(self.context)} tokens, limit {self.cfg.max_context}")
        stops = list(self.tags.eos_ids) + ([] if self.cfg.sequential else [self.tags.outlines_close])
        return [self._request(list(self.context), min(left, room), stops)]

    def _advance(self, request: Request, c: Completion) -> list[Request]:
        thread = request.owner[1]
        if thread is None:
            return self._on_sequential(request, c)
        if self.block is None or thread not in self.block.threads:
            raise RuntimeError(f"completion for thread {thread} but no such thread is running")
        self.block.threads[thread].completion = c
        if any(t.completion is None for t in self.block.threads.values()):
            return []
        return self._join()

    def _on_sequential(self, request: Request, c: Completion) -> list[Request]:
        self.units.append(Unit(list(request.prompt_ids), list(c.token_ids), list(c.logprobs), SEQ,
                               n_inserted=self.n_inserted_next))
        self.context += c.token_ids
        self.generated += len(c.token_ids)
        last = c.token_ids[-1] if c.token_ids else None
        if c.finish == STOP and last in self.tags.eos_ids:
            return self._finish("eos")
        if c.finish == STOP and last == self.tags.outlines_close and not self.cfg.sequential:
            return self._on_head()
        if c.finish == STOP:
            return self._finish("unknown_stop", _stopped_on(last, "sequential request"))
        if self.generated >= self.cfg.max_tokens:
            return self._finish("budget", f"{self.generated} tokens generated, budget {self.cfg.max_tokens}")
        return self._finish("context", f"context of {len(self.context)} tokens, limit {self.cfg.max_context}")

    def _head_text(self) -> str:
        ctx = self.context
        start = len(ctx) - 1
        while start >= 0 and ctx[start] not in (self.tags.parallel_open, self.tags.parallel_close):
            start -= 1
        if start < 0 or ctx[start] != self.tags.parallel_open:
            raise BadOutlines(f"{OUTLINES_CLOSE} without an open {PARALLEL_OPEN}")
        return self.tokenizer.decode(ctx[start:], skip_special_tokens=False)

    def _on_head(self) -> list[Request]:
        self.blocks += 1
        if self.blocks > self.cfg.max_blocks:
            return self._finish("too_many_blocks", f"block {self.blocks} opened, max_blocks={self.cfg.max_blocks}")
        try:
            numbers = outline_numbers(self._head_text(), self.cfg.max_threads)
        except TooManyThreads as e:
            return self._finish("too_many_threads", f"block {self.blocks}: {e}")
        except BadOutlines as e:
            return self._finish("bad_outlines", f"block {self.blocks}: {e}")
        return self._spawn(numbers)

    def _seed_ids(self, n: int) -> list[int]:
        if n not in self.seeds:
            self.seeds[n] = encode(self.tokenizer, thread_seed(n))
        return self.seeds[n]

    def _spawn(self, numbers: list[int]) -> list[Request]:
        left = self.cfg.max_tokens - self.generated
        share = left // len(numbers)
        if share < 1:
            return self._finish("budget", f"{left} tokens left for the {len(numbers)} threads of block {self.blocks}")
        base = list(self.context)
        threads: dict[int, _Thread] = {}
        for n in numbers:
            seed = self._seed_ids(n)
            room = self.cfg.max_context - len(base) - len(seed)
            if room < 1:
                return self._finish("context", f"thread {n} of block {self.blocks}: prompt of {len(base) + len(seed)} "
                                               f"tokens, limit {self.cfg.max_context}")
            cap = min(self.cfg.max_thread_tokens, share, room)
            limit = "thread" if cap == self.cfg.max_thread_tokens else "context" if cap == room else "budget"
            threads[n] = _Thread(n, seed, cap, limit)
        self.block = _Block(self.blocks, base, threads)
        stops = [self.tags.thread_close, *self.tags.eos_ids]
        return [self._request(base + t.seed, t.cap, stops, thread=t.number) for t in threads.values()]

    def _join(self) -> list[Request]:
        block, self.block = self.block, None
        joined: list[int] = []
        end: tuple[str, str] | None = None
        for t in block.threads.values():  # outline order
            c = t.completion
            self.units.append(Unit(block.base + t.seed, list(c.token_ids), list(c.logprobs), THREAD,
                                   block=block.index, thread=t.number, n_inserted=len(t.seed)))
            self.generated += len(c.token_ids)
            joined += t.seed + list(c.token_ids)
            last = c.token_ids[-1] if c.token_ids else None
            if c.finish == STOP and last == self.tags.thread_close:
                continue
            if c.finish == STOP and last in self.tags.eos_ids:
                end = end or ("eos_in_thread", f"thread {t.number} of block {block.index} ended with EOS {last}")
            elif c.finish == STOP:
                end = end or ("unknown_stop", _stopped_on(last, f"thread {t.number} of block {block.index}"))
            elif t.limit == "thread":
                joined.append(self.tags.thread_close)
                self.closed.append((block.index, t.number))
            else:
                end = end or (t.limit, f"thread {t.number} of block {block.index} reached its {t.limit} "
                                       f"limit of {t.cap} tokens")
        self.context = block.base + joined
        if end is not None:
            return self._finish(*end)
        if len(self.context) + len(self.tags.join_suffix) >= self.cfg.max_context:
            return self._finish("context", f"joined context of block {block.index} has "
                                           f"{len(self.context) + len(self.tags.join_suffix)} tokens, "
                                           f"limit {self.cfg.max_context}")
        self.context += self.tags.join_suffix
        self.n_inserted_next = len(self.tags.join_suffix)
        return self._sequential()

    def _finish(self, reason: str, detail: str = "") -> list[Request]:
        response = self.context[len(self.prompt_ids):]
        if reason == "eos" and response and response[-1] in self.tags.eos_ids:
            response = response[:-1]
        lat = latency(self.units)
        self.record = Trajectory(
            prompt_index=self.prompt_index, sample_index=self.sample_index, prompt_ids=self.prompt_ids,
            units=self.units, sequence_ids=list(self.context),
            text=self.tokenizer.decode(response, skip_special_tokens=False),
            finish_reason=reason, finish_detail=detail, L_total=lat.L_total, L_crit=lat.L_crit, eta=lat.eta,
            speedup=lat.speedup, n_blocks=lat.n_blocks, threads_per_block=lat.threads_per_block,
            latency_s=time.perf_counter() - self.t0, closed_threads=list(self.closed), n_requests=self.n_requests,
        )
        return []


def _stopped_on(token: int | None, where: str) -> str:
    return f"{where} stopped on token {token}, which is neither an EOS id nor the tag it stops at"


def generate(engine: Engine, tokenizer, prompts: Sequence[Sequence[int]], config: RolloutConfig, *,
             prompt_indices: Sequence[int] | None = None, eos_token_id: int | Sequence[int] | None = None,
             on_finish: Callable[[Trajectory], None] | None = None) -> list[Trajectory]:
    """Sample ``config.n`` trajectories for each prompt (token ids), all at once over ``engine``.

    Returns them prompt-major (all samples of prompt 0, then prompt 1...).
    ``prompt_indices`` are the prompts' global indices (for records and
    per-request seeds, so a prompt samples the same wherever it runs; default
    ``0..len-1``). ``eos_token_id``: every EOS id of the model (one id or a
    list, as ``rollout.onboard.eos_token_ids`` gives; default the tokenizer's
    only). ``on_finish`` is called with each trajectory as it ends.
    """
    _check_fits(config, engine)
    indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
    if len(indices) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(indices)} prompt indices")
    tags = TagIds.from_tokenizer(tokenizer, eos_token_id)
    seeds: dict[int, list[int]] = {}
    rollouts = [_Rollout(i * config.n + s, indices[i], s, p, config, tags, tokenizer, seeds)
                for i, p in enumerate(prompts) for s in range(config.n)]

    pending: list[Request] = []
    for rollout in rollouts:
        pending += rollout.start()
        if rollout.finished and on_finish is not None:
            on_finish(rollout.record)
    in_flight = 0
    try:
        while True:
            engine.submit(pending)
            in_flight += len(pending)
            pending = []
            if in_flight == 0:
                break
            done = engine.wait()
            if not done:
                raise RuntimeError(f"the engine returned nothing with {in_flight} requests in flight")
            in_flight -= len(done)
            for request, completion in done:
                rollout = rollouts[request.owner[0]]
                was_finished = rollout.finished
                pending += rollout.advance(request, completion)
                if rollout.finished and not was_finished and on_finish is not None:
                    on_finish(rollout.record)
    except BaseException:
        engine.abort()
        raise
    unfinished = [r for r in rollouts if not r.finished]
    if unfinished:
        raise RuntimeError(f"{len(unfinished)} trajectories have no request in flight and no finish reason")
    return [r.record for r in rollouts]


async def agenerate(engine: AsyncEngine, tokenizer, prompt_ids: Sequence[int], config: RolloutConfig, *,
                    prompt_index: int = 0, sample_index: int = 0, eos_token_id: int | None = None) -> Trajectory:
    """One trajectory of ``prompt_ids`` over ``engine``: the state machine of :func:`generate`, awaited.

    Each request is awaited as it becomes ready; a block's thread requests are
    awaited together. ``prompt_index`` and ``sample_index`` fix the per-request
    seeds: sample ``s`` of prompt ``i`` in :func:`generate` draws the same seeds
    as ``prompt_index=i, sample_index=s`` here. ``config.n`` is not used (run one
    coroutine per sample). An engine error cancels the trajectory's other
    requests and propagates.
    """
    _check_fits(config, engine)
    tags = TagIds.from_tokenizer(tokenizer, eos_token_id)
    rollout = _Rollout(0, prompt_index, sample_index, prompt_ids, config, tags, tokenizer, {})
    pending = rollout.start()
    while pending:
        tasks = [asyncio.ensure_future(engine.complete(r)) for r in pending]
        try:
            completions = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        pending = [nxt for r, c in zip(pending, completions) for nxt in rollout.advance(r, c)]
    if not rollout.finished:
        raise RuntimeError("the trajectory has no request in flight and no finish reason")
    return rollout.record


def _check_fits(config: RolloutConfig, engine: Engine | AsyncEngine) -> None:
    if config.max_context > engine.max_model_len:
        raise ValueError(f"max_context {config.max_context} exceeds the engine's max_model_len "
                         f"{engine.max_model_len}")
