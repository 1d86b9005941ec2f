"""An in-process stand-in for verl's ``LLMServerClient`` over this project's engine.

:class:`LocalServerClient` answers ``await generate(request_id, prompt_ids=..., sampling_params=...)``
with a verl ``TokenOutput``, decoding on a :class:`rollout.engine.Engine` (``VLLMEngine`` over one
``vllm.LLM``). It lets verl's agent loops run without verl's rollout servers and Ray actors: the
agent loop's tests drive the ``threadweaver`` agent loop with it on the tiny model, and a user can
debug an agent loop the same way.

Requests that arrive while the engine is busy join its running batch: a pump coroutine submits what
is waiting, then steps the engine until something finishes (``Engine.wait``, which blocks the event
loop while the engine steps; the coroutines waiting on the engine have nothing else to do), hands
the finished completions back, and goes on while anything is in flight.

Sampling parameters: ``max_tokens`` (default: what fits ``max_model_len``), ``stop_token_ids``,
``temperature``, ``top_p``, ``seed`` and ``logprobs`` are honoured; ``top_k`` -1 and
``repetition_penalty`` 1 are accepted as the no-ops they are; anything else raises, since this
engine would silently ignore it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from rl.verl import require
from rollout.engine import Completion, Engine, Request

TokenOutput = require("verl.workers.rollout.replica").TokenOutput

#: verl sampling parameters that only mean "off" at these values
_NO_OPS = {"top_k": (-1, 0, None), "repetition_penalty": (1.0, None)}


class LocalServerClient:
    """verl's server-client call, answered by ``engine`` in this process (see the module docstring)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.requests: list[tuple[str, Request]] = []  # every (request_id, request), in arrival order
        self._waiting: list[tuple[Request, asyncio.Future]] = []
        self._futures: dict[int, asyncio.Future] = {}
        self._pump: asyncio.Task | None = None

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       **kwargs: Any) -> TokenOutput:
        request = self.request(prompt_ids, sampling_params)
        self.requests.append((request_id, request))
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._pump is None or self._pump.done():
            self._pump = asyncio.ensure_future(self._run())
        completion: Completion = await future
        return TokenOutput(token_ids=completion.token_ids,
                           log_probs=completion.logprobs if sampling_params.get("logprobs") else None,
                           stop_reason="completed",
                           extra_fields={"global_steps": 0, "min_global_steps": 0, "max_global_steps": 0})

    def request(self, prompt_ids: list[int], params: dict[str, Any]) -> Request:
        """The engine request for verl's ``sampling_params``; ValueError for a parameter it cannot honour."""
        known = {"max_tokens", "stop_token_ids", "temperature", "top_p", "seed", "logprobs", *_NO_OPS}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"LocalServerClient does not support the sampling parameters {unknown}")
        for name, allowed in _NO_OPS.items():
            if params.get(name) not in allowed:
                raise ValueError(f"LocalServerClient supports {name} only at {allowed[0]}, got {params[name]}")
        max_tokens = params.get("max_tokens", self.engine.max_model_len - len(prompt_ids))
        return Request(list(prompt_ids), int(max_tokens), list(params.get("stop_token_ids", [])),
                       float(params.get("temperature", 1.0)), float(params.get("top_p", 1.0)), params.get("seed"))

    async def _run(self) -> None:
        try:
            while self._waiting or self._futures:
                await asyncio.sleep(0)  # let every coroutine that is ready ask for its next request
                batch, self._waiting = self._waiting, []
                for request, future in batch:
                    self._futures[id(request)] = future
                self.engine.submit([request for request, _ in batch])
                for request, completion in self.engine.wait():
                    self._futures.pop(id(request)).set_result(completion)
        except BaseException as e:  # noqa: BLE001 - handed to every caller still waiting
            self.engine.abort()
            for future in [f for _, f in self._waiting] + list(self._futures.values()):
                if not future.done():
                    future.set_exception(e)
            self._waiting, self._futures = [], {}
            if not isinstance(e, Exception):
                raise
