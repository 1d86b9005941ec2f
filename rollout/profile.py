"""Where the wall clock of spawn/join decoding goes: an engine-step trace and its per-phase profile.

:class:`EngineTrace` is handed to :class:`~rollout.engine.VLLMEngine` (``engine.trace = EngineTrace()``);
the engine then records every ``submit`` (its time, the requests, the seconds vLLM's input processing
took) and every engine step (start, end, the requests that finished in it with their prompt length,
the prompt tokens vLLM served from its prefix cache and the tokens generated). Recording costs two
clock reads per step and one small record per request; nothing else changes. A caller that times
parts of vLLM's step (scheduler, model, sampler, output processing; ``scripts/bench_latency.py
--breakdown`` on an in-process engine) reports them with :meth:`EngineTrace.part`, and the profile
keeps them per decode step with the number of requests in it.

:func:`phase_profile` labels each engine step by what it did for the trajectory in flight:

* ``prompt prefill``: the first step of a trajectory's first request (its prompt is prefilled and
  its first token sampled);
* ``prefix decode``: decoding that first request (the text before the first block);
* ``spawn prefill``: the first step of a block's thread requests (context + seed prefilled, each
  thread's first token sampled);
* ``threads``: decode steps while all the block's threads run;
* ``slowest thread``: decode steps after some of the block's threads have finished, waiting for the
  others;
* ``join prefill``: the first step of the request after a join (the joined context prefilled);
* ``continuation``: decoding after a join;

and the time between steps: ``submit`` (vLLM's input processing of new requests) and ``orchestrator``
(the state machine and the engine wrapper's Python). Each step produces one token of every request
in it (a prefill step samples the request's first token), so a trajectory takes at least ``L_crit``
steps in parallel mode and ``L_total`` steps in sequential mode, exactly that many when each new
request (threads at a spawn, the continuation at a join) enters the step right after the one that
ended its predecessor. :attr:`Profile.trajectory_steps` counts the steps each trajectory spanned:
the steps above ``L_crit`` are steps lost between requests (an engine core in another process may
already be running the next step when the orchestrator submits). The rest of the gap between
token-latency and wall-clock speedup is the extra time per step of the parallel run, which the
profile splits by phase. When several trajectories are in flight a step is labelled by the most
expensive work in it (a prefill before a decode, threads before sequential decoding), so the labels
then describe the batch, not one trajectory. Steps are seen from the caller: with vLLM's engine core in
a process of its own (the default) the core may already run the next step while the caller handles
the last one, so in a batch a new request's prefill can land one step after the step it is labelled
in; an in-process engine (``make_llm(in_process=True)``) makes the labels exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

#: phases in the order a trajectory meets them; the profile table keeps this order.
STEP_PHASES = ("prompt prefill", "prefix decode", "spawn prefill", "threads", "slowest thread", "join prefill",
               "continuation")
GAP_PHASES = ("submit", "orchestrator")
PREFILL_PHASES = ("prompt prefill", "spawn prefill", "join prefill")


@dataclass
class RequestRecord:
    """One request as the trace saw it."""

    key: str
    trajectory: Any
    thread: int | None
    prompt_len: int
    submitted: float
    block: int | None = None  # index of the submit call that spawned this thread's block
    first_step: int | None = None
    finish_step: int | None = None
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache (vLLM's num_cached_tokens)
    completion_len: int = 0


@dataclass
class StepRecord:
    """One engine step: when it ran and which requests finished in it."""

    t0: float
    t1: float
    finished: list[str] = field(default_factory=list)
    parts: dict[str, float] = field(default_factory=dict)  # seconds of named parts of the step (see EngineTrace.part)


@dataclass
class EngineTrace:
    """Submissions and engine steps of a :class:`~rollout.engine.VLLMEngine`, in order."""

    requests: dict[str, RequestRecord] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)
    submits: list[tuple[float, float, list[str]]] = field(default_factory=list)  # (t0, t1, keys)
    pending_parts: dict[str, float] = field(default_factory=dict)  # parts of the step in progress

    def part(self, name: str, seconds: float) -> None:
        """``seconds`` spent in part ``name`` of the engine step in progress (a caller that times vLLM's scheduler,
        model or output processing inside ``engine.step()``); attached to that step when it is recorded."""
        self.pending_parts[name] = self.pending_parts.get(name, 0.0) + seconds

    def submitted(self, t0: float, t1: float, requests: Sequence[tuple[str, Any]]) -> None:
        """``requests`` are ``(key, Request)`` pairs that ``LLM.enqueue`` took between ``t0`` and ``t1``."""
        block = len(self.submits)
        keys = []
        for key, r in requests:
            owner = r.owner if isinstance(r.owner, tuple) and len(r.owner) == 2 else (r.owner, None)
            self.requests[key] = RequestRecord(key, owner[0], owner[1], len(r.prompt_ids), t0,
                                               block=block if owner[1] is not None else None)
            keys.append(key)
        self.submits.append((t0, t1, keys))

    def stepped(self, t0: float, t1: float, finished: Sequence[tuple[str, int | None, int]]) -> None:
        """One engine step from ``t0`` to ``t1``; ``finished``: ``(key, cached prompt tokens, tokens)``."""
        index = len(self.steps)
        for key, cached, n in finished:
            rec = self.requests.get(key)
            if rec is not None:
                rec.finish_step, rec.cached_tokens, rec.completion_len = index, cached, n
        self.steps.append(StepRecord(t0, t1, [k for k, _, _ in finished], self.pending_parts))
        self.pending_parts = {}

    def clear(self) -> None:
        self.requests.clear()
        self.steps.clear()
        self.submits.clear()
        self.pending_parts = {}


@dataclass
class PhaseStats:
    """Time spent in one phase."""

    steps: int = 0
    seconds: float = 0.0
    sequences: int = 0  # sum over its steps of the requests running in the step
    prefill_computed: int = 0  # prompt tokens prefilled (computed) by its requests
    prefill_cached: int = 0  # prompt tokens its requests found in the prefix cache

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / self.steps if self.steps else float("nan")

    @property
    def mean_sequences(self) -> float:
        return self.sequences / self.steps if self.steps else float("nan")


@dataclass
class Profile:
    """Per-phase time of one or more decoding runs (see the module doc)."""

    phases: dict[str, PhaseStats]
    wall_s: float  # the runs' wall clock, as measured by the caller
    steps: int
    runs: int = 1
    decode_steps: list[tuple[int, float]] = field(default_factory=list)  # (requests running, seconds), no prefill
    #: (requests running, timed parts and "step": the whole step's seconds) of decode steps with timed parts
    decode_parts: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    #: per trajectory (the requests' owner), engine steps from its first request's first step to its end
    #: (one run; :func:`merge` leaves it empty)
    trajectory_steps: dict[Any, int] = field(default_factory=dict)

    @property
    def step_s(self) -> float:
        return sum(self.phases[p].seconds for p in STEP_PHASES)

    @property
    def other_s(self) -> float:
        """Wall clock outside engine steps, submits and the gaps between steps (set-up, the end)."""
        return self.wall_s - sum(s.seconds for s in self.phases.values())


def _step_phase(running: list[RequestRecord], index: int, first_seq: set[str], block_size: dict[int, int]) -> str:
    prefill = [r for r in running if r.first_step == index]
    if prefill:
        if any(r.thread is not None for r in prefill):
            return "spawn prefill"
        if any(r.key not in first_seq for r in prefill):
            return "join prefill"
        return "prompt prefill"
    threads = [r for r in running if r.thread is not None]
    if threads:
        blocks: dict[int, int] = {}
        for r in threads:
            blocks[r.block] = blocks.get(r.block, 0) + 1
        return "threads" if any(n == block_size[b] for b, n in blocks.items()) else "slowest thread"
    if any(r.key not in first_seq for r in running):
        return "continuation"
    return "prefix decode"


def phase_profile(trace: EngineTrace, wall_s: float, runs: int = 1) -> Profile:
    """Label every step and gap of ``trace`` by phase (module doc) and sum their time.

    ``wall_s`` is the caller's wall clock around the traced runs (its part outside steps and gaps
    is :attr:`Profile.other_s`). Requests must have finished (a trace of completed runs).
    """
    phases = {p: PhaseStats() for p in STEP_PHASES + GAP_PHASES}
    reqs = sorted(trace.requests.values(), key=lambda r: r.submitted)
    first_seq: set[str] = set()
    seen: set[Any] = set()
    block_size: dict[int, int] = {}
    for r in reqs:
        if r.thread is None and r.trajectory not in seen:
            first_seq.add(r.key)
        seen.add(r.trajectory)
        if r.block is not None:
            block_size[r.block] = block_size.get(r.block, 0) + 1
    # A request's first step is the first one that starts after it was submitted.
    starts = [s.t0 for s in trace.steps]
    j = 0
    for r in reqs:
        while j < len(starts) and starts[j] < r.submitted:
            j += 1
        r.first_step = j
    span: dict[Any, list[int]] = {}
    for r in reqs:
        if r.finish_step is not None:
            lo_hi = span.setdefault(r.trajectory, [r.first_step, r.finish_step])
            lo_hi[0], lo_hi[1] = min(lo_hi[0], r.first_step), max(lo_hi[1], r.finish_step)
    decode_steps: list[tuple[int, float]] = []
    decode_parts: list[tuple[int, dict[str, float]]] = []
    for i, step in enumerate(trace.steps):
        running = [r for r in reqs if r.first_step is not None and r.first_step <= i
                   and (r.finish_step is None or r.finish_step >= i)]
        name = _step_phase(running, i, first_seq, block_size)
        p = phases[name]
        if name not in PREFILL_PHASES:
            decode_steps.append((len(running), step.t1 - step.t0))
            if step.parts:
                decode_parts.append((len(running), {**step.parts, "step": step.t1 - step.t0}))
        p.steps += 1
        p.seconds += step.t1 - step.t0
        p.sequences += len(running)
        for r in running:
            if r.first_step == i:
                cached = r.cached_tokens or 0
                p.prefill_cached += cached
                p.prefill_computed += r.prompt_len - cached
    submit_s = sum(t1 - t0 for t0, t1, _ in trace.submits)
    phases["submit"].seconds = submit_s
    phases["submit"].steps = len(trace.submits)
    gaps = sum(max(0.0, b.t0 - a.t1) for a, b in zip(trace.steps, trace.steps[1:]))
    phases["orchestrator"].seconds = max(0.0, gaps - sum(
        t1 - t0 for t0, t1, _ in trace.submits if trace.steps and trace.steps[0].t0 < t0 < trace.steps[-1].t1))
    return Profile(phases, wall_s, len(trace.steps), runs, decode_steps, decode_parts,
                   {t: hi - lo + 1 for t, (lo, hi) in span.items()})


def merge(profiles: Sequence[Profile]) -> Profile:
    """The sum of several profiles (several problems decoded one after another)."""
    phases = {p: PhaseStats() for p in STEP_PHASES + GAP_PHASES}
    for prof in profiles:
        for name, s in prof.phases.items():
            m = phases[name]
            m.steps += s.steps
            m.seconds += s.seconds
            m.sequences += s.sequences
            m.prefill_computed += s.prefill_computed
            m.prefill_cached += s.prefill_cached
    return Profile(phases, sum(p.wall_s for p in profiles), sum(p.steps for p in profiles),
                   sum(p.runs for p in profiles), [x for p in profiles for x in p.decode_steps],
                   [x for p in profiles for x in p.decode_parts])


def step_cost_fit(decode_steps: Sequence[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares ``seconds = a + b * requests`` over decode steps: the fixed cost of an engine step and the
    cost of each sequence in it; None without two different batch sizes."""
    n = len(decode_steps)
    if n < 2:
        return None
    mx = sum(x for x, _ in decode_steps) / n
    my = sum(y for _, y in decode_steps) / n
    sxx = sum((x - mx) ** 2 for x, _ in decode_steps)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in decode_steps) / sxx
    return my - b * mx, b


def now() -> float:
    """The trace's clock."""
    return time.perf_counter()
