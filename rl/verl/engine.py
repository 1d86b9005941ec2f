"""verl's LLM server client as the orchestrator's :class:`rollout.engine.AsyncEngine`.

verl's agent loops talk to the rollout servers through ``LLMServerClient.generate(request_id,
prompt_ids=..., sampling_params=...)``, which returns a ``TokenOutput`` (``token_ids``,
``log_probs``, ``stop_reason``, ``extra_fields``). :class:`ServerClientEngine` turns each of the
orchestrator's requests into one such call:

* one ``request_id`` for every request of a trajectory: verl's load balancer routes requests with the
  same id to the same server (sticky sessions), so a block's thread requests and the continuation
  after the join hit the prefix cache that the earlier requests filled;
* ``sampling_params`` = verl's (``top_k``, ``repetition_penalty``, ...) plus the request's own
  ``max_tokens``, ``stop_token_ids``, ``temperature``, ``top_p``, ``seed`` (when set) and
  ``logprobs=True`` (the rollout log-probabilities every row carries);
* verl reports ``stop_reason="completed"`` for a stop and for a length limit alike; the completion
  is ``"stop"`` when its last token is one of the request's stop tokens (vLLM returns the stop token
  as part of the completion and checks stop tokens before the length limit), ``"length"`` otherwise;
  an ``"aborted"`` request or missing log-probabilities raise.

``global_steps`` records the weight versions verl reports per request (``extra_fields``), for the
rows' ``min_global_steps`` / ``max_global_steps`` (verl's staleness control). No verl import here.
"""

from __future__ import annotations

from typing import Any

from rollout.engine import LENGTH, STOP, Completion, Request


class ServerClientEngine:
    """An :class:`rollout.engine.AsyncEngine` over verl's ``LLMServerClient`` for one trajectory."""

    def __init__(self, client, request_id: str, sampling_params: dict[str, Any], max_model_len: int):
        self.client = client
        self.request_id = request_id
        # the request sets these itself; verl's flag becomes logprobs=True
        self.base_params = {k: v for k, v in sampling_params.items()
                            if k not in ("temperature", "top_p", "max_tokens", "stop_token_ids", "seed", "logprobs")}
        self.max_model_len = max_model_len
        self.global_steps: list[int] = []

    def params(self, r: Request) -> dict[str, Any]:
        """verl's sampling parameters for request ``r``."""
        out = dict(self.base_params, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
                   stop_token_ids=list(r.stop_token_ids), logprobs=True)
        if r.seed is not None:
            out["seed"] = r.seed
        return out

    async def complete(self, r: Request) -> Completion:
        out = await self.client.generate(request_id=self.request_id, prompt_ids=list(r.prompt_ids),
                                         sampling_params=self.params(r))
        if out.stop_reason == "aborted":
            raise RuntimeError(f"verl's rollout server aborted request {self.request_id} (weights being updated?)")
        tokens = [int(t) for t in out.token_ids]
        if out.log_probs is None or len(out.log_probs) != len(tokens):
            raise RuntimeError(f"verl's rollout server returned {0 if out.log_probs is None else len(out.log_probs)} "
                               f"log-probabilities for {len(tokens)} tokens")
        extra = out.extra_fields or {}
        steps = (extra.get("min_global_steps"), extra.get("max_global_steps"))
        self.global_steps += [s for s in steps if s is not None]
        finish = STOP if tokens and tokens[-1] in r.stop_token_ids else LENGTH
        return Completion(tokens, [float(lp) for lp in out.log_probs], finish)
