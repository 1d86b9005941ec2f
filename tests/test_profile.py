"""The latency profile: phase labels of a hand-built engine trace, and a trace of the real engine."""

from __future__ import annotations

import pytest

from rollout.engine import Request
from rollout.profile import EngineTrace, merge, phase_profile, step_cost_fit


def _req(prompt_len: int, trajectory: int, thread: int | None) -> Request:
    return Request(list(range(prompt_len)), 16, owner=(trajectory, thread))


def one_trajectory() -> EngineTrace:
    """Prompt of 10 tokens, 3 prefix steps, 2 threads (2 and 4 steps), join, 2 continuation steps."""
    tr = EngineTrace()
    tr.submitted(0.00, 0.01, [("a", _req(10, 0, None))])
    tr.stepped(0.02, 0.05, [])  # prompt prefill
    tr.stepped(0.05, 0.06, [])
    tr.stepped(0.06, 0.07, [("a", 0, 3)])
    tr.submitted(0.08, 0.09, [("t1", _req(15, 0, 1)), ("t2", _req(15, 0, 2))])
    tr.stepped(0.10, 0.14, [])  # spawn prefill
    tr.stepped(0.14, 0.16, [("t1", 12, 2)])
    tr.stepped(0.16, 0.17, [])  # t2 alone: the slowest thread
    tr.stepped(0.17, 0.18, [("t2", 12, 4)])
    tr.submitted(0.20, 0.21, [("c", _req(25, 0, None))])
    tr.stepped(0.22, 0.25, [])  # join prefill
    tr.stepped(0.25, 0.26, [("c", 16, 2)])
    return tr


def test_steps_are_labelled_by_phase():
    prof = phase_profile(one_trajectory(), wall_s=0.30)
    steps = {name: s.steps for name, s in prof.phases.items() if s.steps}
    assert steps == {"prompt prefill": 1, "prefix decode": 2, "spawn prefill": 1, "threads": 1,
                     "slowest thread": 2, "join prefill": 1, "continuation": 1, "submit": 3}
    assert prof.steps == 9 == 3 + 4 + 2  # one step per token of the critical path
    assert prof.trajectory_steps == {0: 9}
    assert prof.phases["spawn prefill"].seconds == pytest.approx(0.04)
    assert prof.phases["spawn prefill"].mean_sequences == 2
    assert prof.phases["slowest thread"].mean_sequences == 1
    # Prefilled prompt tokens: computed against served from the prefix cache.
    assert (prof.phases["prompt prefill"].prefill_computed, prof.phases["prompt prefill"].prefill_cached) == (10, 0)
    assert (prof.phases["spawn prefill"].prefill_computed, prof.phases["spawn prefill"].prefill_cached) == (6, 24)
    assert (prof.phases["join prefill"].prefill_computed, prof.phases["join prefill"].prefill_cached) == (9, 16)
    # Between steps: 0.07-0.10 and 0.18-0.22 minus the two submits inside them (0.01 each).
    assert prof.phases["submit"].seconds == pytest.approx(0.03)
    assert prof.phases["orchestrator"].seconds == pytest.approx(0.05)
    assert prof.other_s == pytest.approx(0.30 - 0.03 - 0.05 - sum(s.t1 - s.t0 for s in one_trajectory().steps))
    # Decode steps (no prefill in them) with the number of requests running: the data of the step-cost fit.
    assert sorted(prof.decode_steps) == sorted([(1, pytest.approx(0.01))] * 2 + [(2, pytest.approx(0.02))]
                                               + [(1, pytest.approx(0.01))] * 2 + [(1, pytest.approx(0.01))])


def test_parts_of_a_step_go_with_that_step():
    tr = EngineTrace()
    tr.submitted(0.00, 0.01, [("a", _req(10, 0, None))])
    tr.part("model", 0.01)
    tr.stepped(0.02, 0.05, [])  # prompt prefill: no decode step
    tr.part("model", 0.002)
    tr.part("schedule", 0.001)
    tr.part("model", 0.003)
    tr.stepped(0.05, 0.06, [])
    tr.stepped(0.06, 0.07, [("a", 0, 3)])  # no parts timed
    prof = phase_profile(tr, wall_s=0.1)
    assert prof.decode_parts == [(1, {"model": pytest.approx(0.005), "schedule": pytest.approx(0.001),
                                      "step": pytest.approx(0.01)})]
    assert merge([prof, prof]).decode_parts == prof.decode_parts * 2


def test_steps_a_trajectory_spans():
    """A continuation submitted while the next step already runs enters the one after: one step lost."""
    tr = EngineTrace()
    tr.submitted(0.00, 0.01, [("a", _req(10, 0, None)), ("b", _req(10, 1, None))])
    tr.stepped(0.02, 0.03, [("a", 0, 1)])  # step 0: both prefilled, a ends
    tr.stepped(0.03, 0.04, [])  # step 1 started before a's continuation came
    tr.submitted(0.035, 0.036, [("a2", _req(12, 0, None))])
    tr.stepped(0.04, 0.05, [("b", 0, 3)])  # step 2: a2 prefilled, b's third token
    tr.stepped(0.05, 0.06, [("a2", 0, 2)])
    prof = phase_profile(tr, wall_s=0.1)
    assert prof.trajectory_steps == {0: 4, 1: 3}  # trajectory 0 generated 3 tokens in 4 steps


def test_step_cost_fit():
    a, b = step_cost_fit([(1, 0.003), (4, 0.0045), (16, 0.0105), (64, 0.0345)])
    assert (a, b) == (pytest.approx(0.0025), pytest.approx(0.0005))
    assert step_cost_fit([(1, 0.003), (1, 0.004)]) is None


def test_merge_adds_runs():
    a = phase_profile(one_trajectory(), wall_s=0.30)
    m = merge([a, a])
    assert m.runs == 2 and m.steps == 18 and m.wall_s == pytest.approx(0.60)
    assert m.phases["threads"].seconds == pytest.approx(2 * a.phases["threads"].seconds)


@pytest.mark.integration
def test_trace_of_the_real_engine(llm, tokenizer):
    """A prompt ending in a block head: spawn at once, join, continue; every step labelled."""
    from rollout.config import RolloutConfig
    from rollout.engine import VLLMEngine
    from rollout.orchestrator import generate
    from rollout.units import chat_prompt_ids, encode

    head = ("<think>\nsplit it<Parallel>\n<Outlines>\n<Outline>1: first</Outline>\n<Outline>2: second</Outline>\n"
            "<Outline>3: third</Outline>\n</Outlines>")
    allowed = encode(tokenizer, "abcdefghijklmnopqrstuvwxyz") + encode(tokenizer, "</Thread>")
    engine = VLLMEngine(llm, sampling_overrides={"allowed_token_ids": allowed})
    engine.trace = trace = EngineTrace()
    prompt = chat_prompt_ids(tokenizer, "question") + encode(tokenizer, head)
    config = RolloutConfig(n=1, max_tokens=40, max_context=1024, max_thread_tokens=10, seed=3)
    [t] = generate(engine, tokenizer, [prompt], config)
    prof = phase_profile(trace, wall_s=t.latency_s)
    # A step makes at most one token of each request: at least L_crit steps. The engine core runs in a process
    # of its own, which may start a step before a new request reaches it: a spawn or a join may lose one step.
    assert t.L_crit <= prof.trajectory_steps[0] <= t.L_crit + 2
    assert prof.trajectory_steps[0] <= prof.steps
    assert prof.phases["spawn prefill"].steps == 1 and prof.phases["join prefill"].steps == 1
    spawn = prof.phases["spawn prefill"]
    assert spawn.prefill_computed + spawn.prefill_cached == sum(len(u.context_ids) for u in t.units[:3])
    block = llm.llm_engine.vllm_config.cache_config.block_size
    if len(prompt) >= block:  # threads 2 and 3 find the shared context's full blocks in the cache
        assert spawn.prefill_cached >= 2 * (len(prompt) // block) * block


@pytest.mark.integration
def test_cpu_engine_uses_small_kv_blocks(llm):
    """make_llm's CPU default (README, "Latency"): 32-token KV blocks, so short contexts share cached blocks."""
    from rollout.engine import CPU_BLOCK_SIZE

    assert llm.llm_engine.vllm_config.cache_config.block_size == CPU_BLOCK_SIZE == 32
