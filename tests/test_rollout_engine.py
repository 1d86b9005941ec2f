"""The orchestrator on the real vLLM engine (the session's shared ``llm``, random tiny model).

The random model never writes a block itself, so the prompts here already
end with a block head of three outlines; the state machine must spawn from
there. A recording wrapper around the engine shows what was submitted when.
``allowed_token_ids`` keeps the random model's output to lowercase letters
and ``</Thread>``, so threads end either by themselves or at their limit and
never with EOS.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rollout.config import RolloutConfig
from rollout.engine import LENGTH, VLLMEngine
from rollout.format import thread_seed
from rollout.orchestrator import FINISH_REASONS, generate
from rollout.units import SEQ, THREAD, chat_prompt_ids, encode

pytestmark = pytest.mark.integration

HEAD3 = ("<think>\nsplit it<Parallel>\n<Outlines>\n<Outline>1: first</Outline>\n<Outline>2: second</Outline>\n"
         "<Outline>3: third</Outline>\n</Outlines>")


class Recording:
    """Passes everything to ``engine``; keeps each submitted batch and each finished pair."""

    def __init__(self, engine):
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self.batches, self.done = [], []

    def submit(self, requests):
        if requests:
            self.batches.append(list(requests))
        self.engine.submit(requests)

    def wait(self):
        done = self.engine.wait()
        self.done += done
        return done

    def abort(self):
        self.engine.abort()


@pytest.fixture(scope="module")
def spawned(llm, tokenizer):
    """Two prompts ending in a three-outline head, two samples each, on the real engine."""
    allowed = encode(tokenizer, "abcdefghijklmnopqrstuvwxyz") + encode(tokenizer, "</Thread>")
    engine = Recording(VLLMEngine(llm, sampling_overrides={"allowed_token_ids": allowed}))
    prompts = [chat_prompt_ids(tokenizer, f"question {i}") + encode(tokenizer, HEAD3) for i in range(2)]
    config = RolloutConfig(n=2, max_tokens=80, max_context=1024, max_thread_tokens=12, seed=3)
    return engine, prompts, generate(engine, tokenizer, prompts, config)


def test_three_thread_requests_are_issued_together(spawned, tokenizer):
    engine, prompts, trajectories = spawned
    first = engine.batches[0]
    assert len(first) == 2 * 2 * 3  # every sample's three threads, in one submit
    for owner, p in enumerate(p for p in prompts for _ in range(2)):
        requests = [r for r in first if r.owner[0] == owner]
        assert [r.owner[1] for r in requests] == [1, 2, 3]
        for n, r in enumerate(requests, start=1):
            assert r.prompt_ids == p + encode(tokenizer, thread_seed(n))
    assert len({r.seed for r in first}) == len(first)


def test_joined_context_follows_design_section_3(spawned, tokenizer):
    engine, prompts, trajectories = spawned
    close = encode(tokenizer, "</Thread>")
    closed_by_model = closed_by_us = 0
    for owner, (p, t) in enumerate(zip([p for p in prompts for _ in range(2)], trajectories)):
        threads = {r.owner[1]: c for r, c in engine.done if r.owner == (owner, r.owner[1]) and r.owner[1]}
        expected = list(p)
        for n in (1, 2, 3):
            c = threads[n]
            expected += encode(tokenizer, thread_seed(n)) + c.token_ids
            if c.finish == LENGTH:
                expected += close
                closed_by_us += 1
            else:
                assert c.token_ids[-1] == close[0]
                closed_by_model += 1
        expected += encode(tokenizer, "\n")
        (join,) = [r for batch in engine.batches[1:] for r in batch if r.owner == (owner, None)]
        assert join.prompt_ids == expected
        assert [u.role for u in t.units] == [THREAD, THREAD, THREAD, SEQ]
        assert t.units[3].context_ids == expected and t.units[3].n_inserted == 1
        assert t.units[0].context_ids == p + encode(tokenizer, thread_seed(1))
        assert t.sequence_ids[:len(expected)] == expected
        assert t.finish_reason == "budget" and t.L_total == 80
        assert t.L_crit == max(len(u.completion_ids) for u in t.units[:3]) + len(t.units[3].completion_ids)
    assert closed_by_model and closed_by_us  # both ways a thread can end were exercised


def test_engine_logprobs_match_a_transformers_forward_pass(spawned, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    _, _, trajectories = spawned
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    worst = 0.0
    for t in trajectories:
        for u in t.units:
            ids = torch.tensor([u.context_ids + u.completion_ids])
            with torch.no_grad():
                logits = model(ids).logits[0].float()
            start = len(u.context_ids) - 1
            lp = torch.log_softmax(logits[start:start + len(u.completion_ids)], dim=-1)
            reference = lp.gather(1, torch.tensor(u.completion_ids)[:, None])[:, 0]
            worst = max(worst, float((reference - torch.tensor(u.completion_logprobs)).abs().max()))
    assert worst < 1e-2


def test_plain_prompts_end_with_a_known_reason(llm, tokenizer):
    """No overrides: whatever the random model writes, every trajectory ends with a recorded reason."""
    prompts = [chat_prompt_ids(tokenizer, q) for q in ("hello", "what is 2+2?")]
    for sequential in (False, True):
        config = RolloutConfig(n=3, max_tokens=48, max_context=512, max_thread_tokens=8, seed=0,
                               sequential=sequential)
        trajectories = generate(VLLMEngine(llm), tokenizer, prompts, config)
        assert len(trajectories) == 6
        for t in trajectories:
            assert t.finish_reason in FINISH_REASONS and t.finish_reason != "error", t.finish_detail
            assert 0 < t.L_total <= 48
            assert t.sequence_ids[:len(t.prompt_ids)] == t.prompt_ids
    assert not llm.llm_engine.has_unfinished_requests()


def test_seeded_sampling_of_a_batch_over_the_step_token_budget_is_reproducible(llm, tokenizer):
    """More prompt tokens than one engine step takes: vLLM 0.32 on CPU crashed with chunked prefill."""
    budget = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    prompts = [chat_prompt_ids(tokenizer, f"Compute {i % 9 + 1}*{i + 10} + 7*{i % 89 + 10}.") for i in range(400)]
    assert sum(map(len, prompts)) > budget
    config = RolloutConfig(n=1, max_tokens=4, max_context=512, temperature=1.0, seed=3, sequential=True)
    first = generate(VLLMEngine(llm), tokenizer, prompts, config)
    again = generate(VLLMEngine(llm), tokenizer, prompts[:5], config)
    assert all(t.finish_reason != "error" for t in first), first[0].finish_detail
    assert [t.sequence_ids for t in again] == [t.sequence_ids for t in first[:5]]
    other = generate(VLLMEngine(llm), tokenizer, prompts[:5], dataclasses.replace(config, seed=4))
    assert [t.sequence_ids for t in other] != [t.sequence_ids for t in first[:5]]
