"""The ``threadweaver`` agent loop inside verl 0.9.1, on this project's real vLLM engine and tiny model.

verl's ``AgentLoopWorker`` is built in this process from verl's own trainer config, with
``agent_loop_config_path`` naming a YAML like ``experiments/verl/agent_loop.yaml``; it registers the
loop, and the loop is instantiated the way verl's worker does (``hydra.utils.instantiate``). Its
server client is :class:`rl.verl.local_server.LocalServerClient` over the session's shared
``VLLMEngine`` (verl's own rollout servers need GPUs). The tiny model first learns two parallel
answers by rote, so it writes real blocks; sampling at temperature 1.3 makes the samples differ.

Checked, for the same seeds:

* the rows ``run()`` returns are exactly the units of this project's ``generate`` (prompt = the
  unit's context, response = its completion, with its log-probabilities): every generated token in
  exactly one row, in the context it was generated in; one sticky request id per sample;
* the reward of the last row through verl's ``NaiveRewardManager`` and ``rewards.verl_reward``;
* verl's V1 broadcast (``compute_advantage_for_multi_trajectories``, GRPO) over the rows, fed through
  verl's ``AgentLoopOutput.as_dict``, gives every token of every row its sample's
  ``rl.grpo.group_advantages`` (mean-centred and ``std_verl``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
TAUGHT = [("Add 2+3+4.", "9", "<think>\n<Parallel>\n<Outlines>\n<Outline>1: two plus three</Outline>\n"
           "<Outline>2: four</Outline>\n</Outlines>\n<Thread>\n1: 2+3=5, five, done here\n</Thread>\n"
           "<Thread>\n2: 4\n</Thread>\n</Parallel>\n5+4=9\n</think>\n\n\\boxed{9}"),
          ("Add 1+1+5.", "7", "<think>\n<Parallel>\n<Outlines>\n<Outline>1: one plus one</Outline>\n"
           "<Outline>2: five</Outline>\n</Outlines>\n<Thread>\n1: 1+1=2, two, done here\n</Thread>\n"
           "<Thread>\n2: 5\n</Thread>\n</Parallel>\n2+5=7\n</think>\n\n\\boxed{7}")]
SEED, SAMPLES, TEMPERATURE = 5, 4, 1.3
LIMITS = {"max_tokens": 160, "max_context": 512, "max_thread_tokens": 40, "max_threads": 4, "max_blocks": 2}


@pytest.fixture(scope="module")
def taught(llm, tiny_model_dir, tokenizer, tmp_path_factory):
    """The shared engine with the rote-taught weights; the tiny model's weights are loaded back afterwards."""
    from rollout.rote import teach
    from rollout.units import chat_prompt_ids
    from rollout.weights import reload_in_place

    out = tmp_path_factory.mktemp("verl_taught") / "model"
    examples = [(chat_prompt_ids(tokenizer, q), r) for q, _, r in TAUGHT]
    taught = teach(tiny_model_dir, out, examples, tokenizer)  # until every taught token is greedy by a margin
    assert taught.learned, f"the tiny model did not learn the answers by rote: {taught}"
    reload_in_place(llm, out)
    try:
        yield out
    finally:
        reload_in_place(llm, tiny_model_dir)


def verl_config(model_dir: Path, agent_yaml: Path):
    """verl's generated PPO trainer config with the rollout limits of this test."""
    import verl
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(verl.__file__).parent / "trainer" / "config" / "_generated_ppo_trainer.yaml")
    rollout = cfg.actor_rollout_ref.rollout
    cfg.actor_rollout_ref.model.path = str(model_dir)
    rollout.name, rollout.prompt_length, rollout.response_length = "vllm", 256, LIMITS["max_tokens"]
    rollout.max_model_len, rollout.temperature = LIMITS["max_context"], TEMPERATURE
    rollout.agent.agent_loop_config_path = str(agent_yaml)
    cfg.data.max_prompt_length = 256
    return cfg


@pytest.fixture(scope="module")
def runs(taught, llm, tokenizer, tmp_path_factory):
    """The agent loop's rows for SAMPLES sessions of each prompt, and this project's trajectories."""
    import hydra
    from verl.experimental.agent_loop.agent_loop import (
        AgentLoopWorker, DictConfigWrap, ToolListWrap, _agent_loop_registry,
    )

    from rl.verl.local_server import LocalServerClient
    from rollout.config import RolloutConfig
    from rollout.engine import VLLMEngine
    from rollout.orchestrator import generate

    agent_yaml = tmp_path_factory.mktemp("verl_cfg") / "agent_loop.yaml"
    agent_yaml.write_text("- name: threadweaver\n  _target_: rl.verl.agent_loop.ThreadWeaverAgentLoop\n"
                          + "".join(f"  {k}: {v}\n" for k, v in LIMITS.items() if k not in ("max_tokens",
                                                                                          "max_context"))
                          + f"  seed: {SEED}\n")
    cfg = verl_config(taught, agent_yaml)
    client = LocalServerClient(VLLMEngine(llm))
    messages = [[{"role": "user", "content": q}] for q, _, _ in TAUGHT]

    async def agent_loop_runs():
        worker = AgentLoopWorker(cfg, llm_client=client)  # reads agent_loop_config_path
        entry = _agent_loop_registry["threadweaver"]

        async def one(i: int, session: int):
            loop = hydra.utils.instantiate(entry, trainer_config=DictConfigWrap(config=cfg), server_manager=client,
                                           tokenizer=worker.tokenizer, processor=worker.processor,
                                           hf_model_type=worker.hf_model_type, dataset_cls=worker.dataset_cls,
                                           data_config=DictConfigWrap(cfg.data), tools=ToolListWrap(worker.tools))
            params = dict(temperature=TEMPERATURE, top_p=1.0, top_k=-1, repetition_penalty=1.0, logprobs=True)
            return await loop.run(params, raw_prompt=messages[i], index=i, session_id=session, global_steps=0)

        prompt_ids = [await worker_prompt(worker, cfg, m) for m in messages]
        rows = await asyncio.gather(*(one(i, s) for i in range(len(TAUGHT)) for s in range(SAMPLES)))
        return entry, prompt_ids, rows

    entry, prompt_ids, rows = asyncio.run(agent_loop_runs())
    rc = RolloutConfig(n=SAMPLES, seed=SEED, temperature=TEMPERATURE, **LIMITS)
    ours = generate(VLLMEngine(llm), tokenizer, prompt_ids, rc)
    return {"entry": entry, "prompt_ids": prompt_ids, "rows": rows, "ours": ours, "client": client, "cfg": cfg}


async def worker_prompt(worker, cfg, messages):
    """The prompt ids verl's chat-template builder makes (what the agent loop's run() starts from)."""
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap

    from rl.verl.agent_loop import ThreadWeaverAgentLoop

    loop = ThreadWeaverAgentLoop(trainer_config=DictConfigWrap(config=cfg), server_manager=None,
                                 tokenizer=worker.tokenizer, processor=None, dataset_cls=worker.dataset_cls,
                                 data_config=DictConfigWrap(cfg.data), hf_model_type=worker.hf_model_type)
    return await loop.ct_build_initial_tokens(messages)


def test_verl_loads_the_loop_from_the_yaml(runs, tokenizer):
    from rollout.units import chat_prompt_ids

    assert runs["entry"]["_target_"] == "rl.verl.agent_loop.ThreadWeaverAgentLoop"
    # verl's chat-template builder gives the prompt this project's SFT and RL use
    assert runs["prompt_ids"] == [chat_prompt_ids(tokenizer, q) for q, _, _ in TAUGHT]


def test_rows_are_exactly_the_units_of_generate(runs):
    ours, rows = runs["ours"], runs["rows"]
    assert len(rows) == len(ours) == len(TAUGHT) * SAMPLES
    parallel = 0
    for trajectory, sample_rows in zip(ours, rows):
        assert len(sample_rows) == len(trajectory.units)
        for row, unit in zip(sample_rows, trajectory.units):
            assert row.prompt_ids == unit.context_ids and row.response_ids == unit.completion_ids
            assert row.response_mask == [1] * len(unit.completion_ids)
            assert row.response_logprobs == pytest.approx(unit.completion_logprobs, abs=1e-4)
        # every generated token in exactly one row
        assert sum(len(r.response_ids) for r in sample_rows) == trajectory.L_total
        last = sample_rows[-1].extra_fields["threadweaver"]
        assert (last["text"], last["finish_reason"], last["L_crit"]) == \
               (trajectory.text, trajectory.finish_reason, trajectory.L_crit)
        assert all(r.extra_fields["threadweaver"] is None for r in sample_rows[:-1])
        parallel += trajectory.n_blocks > 0
    assert parallel >= len(ours) // 2, "the taught model should answer most samples in parallel"
    assert len({t.text for t in ours}) > 2, "the samples should differ"


def test_one_sticky_request_id_per_sample(runs):
    ids = [request_id for request_id, _ in runs["client"].requests]
    per_id = {i: ids.count(i) for i in set(ids)}
    assert len(per_id) == len(runs["ours"])
    assert sorted(per_id.values()) == sorted(t.n_requests for t in runs["ours"])
    seeds = [r.seed for _, r in runs["client"].requests]
    assert None not in seeds and len(set(seeds)) == len(seeds)


def rewards_through_verl(runs, tokenizer) -> list[float]:
    """Each sample's reward from verl's NaiveRewardManager on its last row (rewards.verl_reward inside)."""
    from tensordict import TensorDict
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

    from rewards.verl_reward import compute_score

    async def score_all():
        manager = NaiveRewardManager(None, tokenizer, compute_score)
        out = []
        for sample_rows, (q, answer, _) in zip(runs["rows"], [t for t in TAUGHT for _ in range(SAMPLES)]):
            last = sample_rows[-1]
            prompts, responses = torch.tensor([last.prompt_ids]), torch.tensor([last.response_ids])
            data = DataProto(
                batch=TensorDict({"prompts": prompts, "responses": responses, "attention_mask": torch.ones(
                    1, prompts.shape[1] + responses.shape[1], dtype=torch.long)}, batch_size=1),
                non_tensor_batch={"data_source": np.array(["threadweaver/tiny"], dtype=object),
                                  "reward_model": np.array([{"ground_truth": answer}], dtype=object),
                                  "extra_info": np.array([{"index": 0}], dtype=object),
                                  "tool_extra_fields": np.array([last.extra_fields], dtype=object)})
            out.append(await manager.run_single(data))
        return out

    return asyncio.run(score_all())


def test_rewards_and_verls_v1_broadcast_give_our_group_advantages(runs, tokenizer):
    from rewards.checker import AnswerChecker
    from rewards.config import RewardConfig
    from rewards.score import RewardItem, score

    results = rewards_through_verl(runs, tokenizer)
    answers = [a for _, a, _ in TAUGHT for _ in range(SAMPLES)]
    with AnswerChecker(10.0) as checker:
        direct = [score(RewardItem(t.text, a, t.units, t.finish_reason), RewardConfig(), checker)
                  for t, a in zip(runs["ours"], answers)]
    assert [r["reward_score"] for r in results] == pytest.approx([d.reward for d in direct])
    assert [r["reward_extra_info"]["L_crit"] for r in results] == [float(t.L_crit) for t in runs["ours"]]
    # a latency-penalised reward (the reward minus 1% of L_crit), so every group has distinct rewards
    rewards = [r["reward_score"] - 0.01 * r["reward_extra_info"]["L_crit"] for r in results]

    assert_v1_broadcast_gives_group_advantages(runs["rows"], rewards, SAMPLES)


def assert_v1_broadcast_gives_group_advantages(rows: list[list], rewards: list[float], samples: int) -> None:
    """verl's V1 GRPO broadcast over ``rows`` (one list of AgentLoopOutput per sample, ``samples`` sessions per
    prompt in order) gives every response token of every row its sample's ``rl.grpo.group_advantages``
    (mean-centred, and ``std_verl`` against verl's std normalisation), and padding 0."""
    from verl import DataProto
    from verl.trainer.ppo.core_algos import AdvantageEstimator
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    from rl.grpo import group_advantages

    # the rows as verl's V1 worker stores them (AgentLoopOutput.as_dict, the reward on every row),
    # keyed {uid}_{session}_{index}, padded as the trainer reads them back
    fields, keys, uids = [], [], []
    for n, (sample_rows, reward) in enumerate(zip(rows, rewards)):
        prompt, session = divmod(n, samples)
        for i, row in enumerate(sample_rows):
            row = row.model_copy(deep=True)
            row.reward_score = reward
            fields.append(row.as_dict())
            keys.append(f"p{prompt}_{session}_{i}")
            uids.append(f"p{prompt}")
    pad = lambda name: torch.nn.utils.rnn.pad_sequence([f[name] for f in fields], batch_first=True)  # noqa: E731
    for norm, mode in ((False, "mean"), (True, "std_verl")):
        data = DataProto.from_dict(tensors={"response_mask": pad("response_mask"), "token_level_rewards":
                                            pad("rm_scores")}, non_tensors={"uid": np.array(uids, dtype=object)})
        out = compute_advantage_for_multi_trajectories(data, keys, AdvantageEstimator.GRPO,
                                                       norm_adv_by_std_in_grpo=norm)
        expected = [a for p in range(len(rows) // samples)
                    for a in group_advantages(rewards[p * samples:(p + 1) * samples], mode)]
        assert any(abs(a) > 1e-3 for a in expected)
        for row, key in enumerate(keys):
            prompt, session, _ = key.split("_")
            a = expected[int(prompt[1:]) * samples + int(session)]
            n_tokens = int(fields[row]["response_mask"].sum())
            assert torch.allclose(out.batch["advantages"][row, :n_tokens], torch.full((n_tokens,), a), atol=1e-5)
            assert not out.batch["advantages"][row, n_tokens:].any()


def test_the_recipe_yaml_instantiates(runs, tokenizer):
    """experiments/verl/agent_loop.yaml through verl's registry: the loop takes its limits from it."""
    import hydra
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap

    cfg = runs["cfg"]
    (entry,) = OmegaConf.load(ROOT / "experiments" / "verl" / "agent_loop.yaml")
    assert entry.name == "threadweaver"
    from verl.utils.dataset.rl_dataset import RLHFDataset

    loop = hydra.utils.instantiate(entry, trainer_config=DictConfigWrap(config=cfg), server_manager=None,
                                   tokenizer=tokenizer, processor=None, dataset_cls=RLHFDataset,
                                   data_config=DictConfigWrap(cfg.data))
    assert loop.rollout.max_thread_tokens == entry.max_thread_tokens and loop.rollout.seed is None
    assert type(loop).__module__ == "rl.verl.agent_loop"
