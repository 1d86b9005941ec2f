"""The ``threadweaver`` agent loop's ``run()`` inside verl's own set-up, on a scripted engine (fast).

The same path as ``tests/test_verl_agent_loop.py`` (verl's ``AgentLoopWorker`` reads the agent loop
YAML, the loop is instantiated from verl's registry with ``hydra.utils.instantiate``, its server
client is ``rl.verl.local_server.LocalServerClient``), with the scripted engine of the orchestrator's
tests instead of vLLM: a model that always writes a two-thread block. The integration test checks the
same on the real vLLM engine, with real sampling and rewards.
"""

from __future__ import annotations

import asyncio

import pytest

from rl.verl import require
from rl.verl.local_server import LocalServerClient
from rollout.config import RolloutConfig
from rollout.orchestrator import generate
from rollout.units import chat_prompt_ids
from tests.test_rollout_orchestrator import ScriptedEngine, good_policy
from tests.test_verl_agent_loop import assert_v1_broadcast_gives_group_advantages, verl_config

SEED, SAMPLES = 3, 3
QUESTIONS = ["Q: 1+2?", "Q: 4+5?"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    hydra = require("hydra")
    agent_loop = require("verl.experimental.agent_loop.agent_loop")
    agent_yaml = tmp_path_factory.mktemp("verl_cfg") / "agent_loop.yaml"
    agent_yaml.write_text("- name: threadweaver\n  _target_: rl.verl.agent_loop.ThreadWeaverAgentLoop\n"
                          f"  max_thread_tokens: 16\n  seed: {SEED}\n")
    cfg = verl_config(tiny_model_dir, agent_yaml)

    async def rows():
        worker = agent_loop.AgentLoopWorker(cfg, llm_client=None)  # reads agent_loop_config_path
        client = LocalServerClient(ScriptedEngine(worker.tokenizer, good_policy))
        entry = agent_loop._agent_loop_registry["threadweaver"]
        loop = hydra.utils.instantiate(entry, trainer_config=agent_loop.DictConfigWrap(config=cfg),
                                       server_manager=client, tokenizer=worker.tokenizer, processor=None,
                                       hf_model_type=worker.hf_model_type, dataset_cls=worker.dataset_cls,
                                       data_config=agent_loop.DictConfigWrap(cfg.data),
                                       tools=agent_loop.ToolListWrap(worker.tools))
        params = dict(temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, logprobs=True)
        out = await asyncio.gather(*(loop.run(params, raw_prompt=[{"role": "user", "content": q}], index=i,
                                              session_id=s, global_steps=0)
                                     for i, q in enumerate(QUESTIONS) for s in range(SAMPLES)))
        return out, worker.tokenizer, loop, client

    out, tok, loop, client = asyncio.run(rows())
    prompts = [chat_prompt_ids(tok, q) for q in QUESTIONS]
    rc = RolloutConfig(n=SAMPLES, seed=SEED, max_tokens=loop.rollout.max_tokens,
                       max_context=loop.rollout.max_context, max_thread_tokens=16)
    ours = generate(ScriptedEngine(tok, good_policy), tok, prompts, rc)
    return out, ours, client


def test_run_returns_one_row_per_unit_of_generate(runs):
    out, ours, _ = runs
    assert len(out) == len(ours) == len(QUESTIONS) * SAMPLES
    for rows, trajectory in zip(out, ours):
        assert trajectory.n_blocks == 1 and len(rows) == len(trajectory.units) == 4  # prefix, 2 threads, join
        for row, unit in zip(rows, trajectory.units):
            assert (row.prompt_ids, row.response_ids, row.response_logprobs) == \
                   (unit.context_ids, unit.completion_ids, unit.completion_logprobs)
            assert row.response_mask == [1] * len(unit.completion_ids)
        assert sum(len(r.response_ids) for r in rows) == trajectory.L_total
        last = rows[-1].extra_fields["threadweaver"]
        assert (last["text"], last["finish_reason"], last["L_crit"]) == \
               (trajectory.text, trajectory.finish_reason, trajectory.L_crit)
        assert [r.extra_fields["threadweaver_unit"]["role"] for r in rows] == [u.role for u in trajectory.units]


def test_one_request_id_per_sample_and_distinct_seeds(runs):
    out, ours, client = runs
    ids = [request_id for request_id, _ in client.requests]
    assert sorted(ids.count(i) for i in set(ids)) == sorted(t.n_requests for t in ours)
    seeds = [r.seed for _, r in client.requests]
    assert None not in seeds and len(set(seeds)) == len(seeds)


def test_verls_v1_broadcast_over_the_rows_gives_our_group_advantages(runs):
    """The scripted samples are alike, so the rewards are given (distinct within each group): what is checked
    is verl's broadcast from the last row of each sample to all its rows, token by token."""
    out, _, _ = runs
    rewards = [1.0, 0.2, -0.5, 0.7, 0.7, 1.2]
    assert_v1_broadcast_gives_group_advantages(out, rewards, SAMPLES)
