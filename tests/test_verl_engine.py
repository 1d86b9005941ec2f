"""The adapters between verl's server-client call and this project's engines (fast, scripted engines).

* ``ServerClientEngine``: verl's ``LLMServerClient.generate`` as the orchestrator's ``AsyncEngine``;
* ``LocalServerClient``: this project's ``Engine`` behind verl's ``generate`` call.
Together they run ``agenerate`` over a scripted model and give ``generate``'s trajectory.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from rl.verl.engine import ServerClientEngine
from rl.verl.local_server import LocalServerClient
from rollout.config import RolloutConfig
from rollout.engine import LENGTH, STOP, Request
from rollout.orchestrator import agenerate, generate
from tests.test_rollout_orchestrator import ScriptedEngine, good_policy, prompt

EOS, CLOSE = 7, 9


class RecordingClient:
    """verl's server-client call answered from a script: (token_ids, log_probs, stop_reason) per call."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        self.calls.append((request_id, prompt_ids, sampling_params))
        tokens, logprobs, reason = self.answers.pop(0)
        return SimpleNamespace(token_ids=tokens, log_probs=logprobs, stop_reason=reason,
                               extra_fields={"global_steps": 3, "min_global_steps": 2, "max_global_steps": 3})


def test_requests_become_verl_calls_with_one_sticky_id():
    client = RecordingClient(([1, 2, CLOSE], [-0.1, -0.2, -0.3], "completed"), ([4, 5], [-1.0, -2.0], "completed"))
    verl_params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": False}
    engine = ServerClientEngine(client, "req-1", verl_params, max_model_len=100)
    stopped = asyncio.run(engine.complete(Request([1, 2, 3], 10, [CLOSE, EOS], 0.7, 0.9, seed=42)))
    cut = asyncio.run(engine.complete(Request([1], 2, [CLOSE, EOS], 0.7, 0.9)))
    assert (stopped.token_ids, stopped.logprobs, stopped.finish) == ([1, 2, CLOSE], [-0.1, -0.2, -0.3], STOP)
    assert cut.finish == LENGTH  # verl says "completed" for both; the last token decides
    (id1, ids1, params1), (id2, _, params2) = client.calls
    assert id1 == id2 == "req-1" and ids1 == [1, 2, 3]
    assert params1 == {"top_k": -1, "repetition_penalty": 1.0, "temperature": 0.7, "top_p": 0.9, "max_tokens": 10,
                       "stop_token_ids": [CLOSE, EOS], "logprobs": True, "seed": 42}
    assert "seed" not in params2
    assert min(engine.global_steps) == 2 and max(engine.global_steps) == 3


@pytest.mark.parametrize("answer, message", [
    (([1], None, "completed"), "0 log-probabilities for 1 tokens"),
    (([], None, "aborted"), "aborted"),
])
def test_server_failures_raise(answer, message):
    engine = ServerClientEngine(RecordingClient(answer), "r", {}, max_model_len=100)
    with pytest.raises(RuntimeError, match=message):
        asyncio.run(engine.complete(Request([1], 4, [EOS])))


def test_local_server_refuses_what_the_engine_would_ignore():
    tok_engine = ScriptedEngine(None, good_policy)
    client = LocalServerClient(tok_engine)
    with pytest.raises(ValueError, match="top_k"):
        client.request([1], {"top_k": 5})
    with pytest.raises(ValueError, match="min_p"):
        client.request([1], {"min_p": 0.1})
    r = client.request([1, 2], {"max_tokens": 3, "stop_token_ids": [EOS], "temperature": 0.5, "seed": 1,
                                "top_k": -1, "repetition_penalty": 1.0, "logprobs": True})
    assert (r.prompt_ids, r.max_tokens, r.stop_token_ids, r.temperature, r.seed) == ([1, 2], 3, [EOS], 0.5, 1)


def test_both_adapters_together_give_generates_trajectories():
    """agenerate -> ServerClientEngine -> LocalServerClient -> a scripted engine, several samples at once."""
    from rollout.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = RolloutConfig(n=3, seed=4, max_tokens=400, max_thread_tokens=16)
    p = prompt(tok)
    expected = generate(ScriptedEngine(tok, good_policy), tok, [p], cfg)
    client = LocalServerClient(ScriptedEngine(tok, good_policy))

    async def samples():
        engines = [ServerClientEngine(client, f"sample-{s}", {"logprobs": True}, 100_000) for s in range(3)]
        return await asyncio.gather(*(agenerate(e, tok, p, cfg, sample_index=s) for s, e in enumerate(engines)))

    got = asyncio.run(samples())
    for a, b in zip(got, expected):
        da, db = a.to_dict(), b.to_dict()
        da.pop("latency_s"), db.pop("latency_s")
        assert da == db
    ids = [request_id for request_id, _ in client.requests]
    assert {i: ids.count(i) for i in set(ids)} == {f"sample-{s}": t.n_requests for s, t in enumerate(expected)}
    assert max(len(b) for b in client.engine.batches) > 1  # requests of different samples shared engine batches
