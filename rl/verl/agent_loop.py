"""The ``threadweaver`` agent loop for verl 0.9.1: spawn/join decoding, one training row per unit.

verl's V1 trainer (``verl/trainer/ppo/v1``) accepts an agent loop whose ``run`` returns a *list* of
``AgentLoopOutput`` rows for one sample: it scores the sample on the last row and broadcasts the
sample's GRPO advantage to every row (``v1/utils.compute_advantage_for_multi_trajectories``). This
loop returns one row per unit of the trajectory -- the sequential request, each thread, each
continuation after a join -- with the unit's context as the row's prompt, its completion as the
response (every token a training target) and the rollout log-probabilities. So every generated
token is trained once, in the context it was generated in, as in this project's trie learner, but
as ordinary causal rows (no shared-prefix savings).

``run``:

1. builds the prompt ids from the dataset row's ``raw_prompt`` with verl's own chat-template
   builder (``ct_build_initial_tokens``, capped at ``rollout.prompt_length``);
2. runs this project's state machine (``rollout.orchestrator.agenerate``) over verl's server client
   (``rl.verl.engine.ServerClientEngine``; one sticky ``request_id`` per sample);
3. returns the rows; the last row's ``extra_fields["threadweaver"]`` carries the whole trajectory
   (text with tags, units, finish reason, ``L_total``, ``L_crit``, tag ids) to the reward function
   (``rewards.verl_reward.compute_score``), every row's ``extra_fields["threadweaver_unit"]`` its
   unit's place (index, role, block, thread, inserted tokens).

Limits (this project's ``RolloutConfig``), from the agent loop config entry (verl's
``actor_rollout_ref.rollout.agent.agent_loop_config_path`` YAML; ``experiments/verl/agent_loop.yaml``):
``max_tokens`` (generated-token budget, default ``rollout.response_length``), ``max_context``
(default ``rollout.max_model_len``, else ``prompt_length + response_length``), ``max_thread_tokens``
(default: the budget), ``max_threads``, ``max_blocks``, ``sequential`` (the baseline), ``seed`` (base
of the per-request seeds, varied by verl's ``global_steps``; null: unseeded). ``temperature`` and
``top_p`` come from verl's sampling parameters (its validation settings at validation).

A trajectory that makes no request at all (a prompt that leaves no room) raises: verl records the
sample as failed instead of training on an empty row.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any
from uuid import uuid4

from rewards.tag_count import TagTokens
from rewards.verl_reward import TRAJECTORY_KEY
from rl.verl import require
from rl.verl.engine import ServerClientEngine
from rollout.config import RolloutConfig
from rollout.orchestrator import Trajectory, agenerate

_agent_loop = require("verl.experimental.agent_loop.agent_loop")
AgentLoopBase, AgentLoopMetrics, AgentLoopOutput = (_agent_loop.AgentLoopBase, _agent_loop.AgentLoopMetrics,
                                                   _agent_loop.AgentLoopOutput)

#: name under which verl finds this loop (the dataset's agent_name column)
AGENT_NAME = "threadweaver"
#: extra_fields key of each row's unit (the last row's trajectory is under rewards.verl_reward.TRAJECTORY_KEY)
UNIT_KEY = "threadweaver_unit"
#: how far apart the per-request seed bases of successive steps are
STEP_STRIDE = 1_000_003


@_agent_loop.register(AGENT_NAME)
class ThreadWeaverAgentLoop(AgentLoopBase):
    """Spawn/join rollouts of one sample; one ``AgentLoopOutput`` per unit (see the module docstring)."""

    def __init__(self, *args, max_tokens: int | None = None, max_context: int | None = None,
                 max_thread_tokens: int | None = None, max_threads: int = 8, max_blocks: int = 8,
                 sequential: bool = False, seed: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        rc = self.rollout_config
        budget = int(max_tokens or rc.response_length)
        context = int(max_context or rc.get("max_model_len") or rc.prompt_length + rc.response_length)
        self.rollout = RolloutConfig(max_tokens=budget, max_context=context,
                                     max_thread_tokens=int(max_thread_tokens or budget), max_threads=max_threads,
                                     max_blocks=max_blocks, sequential=sequential, seed=seed)
        self.tags = TagTokens.from_tokenizer(self.tokenizer)

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> list:
        start = time.perf_counter()
        prompt_ids = await self.ct_build_initial_tokens(list(kwargs["raw_prompt"]))
        seed = self.rollout.seed
        step = int(kwargs.get("global_steps") or 0)
        config = replace(self.rollout, temperature=float(sampling_params.get("temperature", 1.0)),
                         top_p=float(sampling_params.get("top_p", 1.0)),
                         seed=None if seed is None else seed + STEP_STRIDE * step)
        engine = ServerClientEngine(self.server_manager, uuid4().hex, sampling_params, config.max_context)
        trajectory = await agenerate(engine, self.tokenizer, prompt_ids, config,
                                     prompt_index=int(kwargs.get("index", 0)),
                                     sample_index=int(kwargs.get("session_id", 0)))
        return unit_rows(trajectory, self.tags, engine.global_steps, time.perf_counter() - start)


def unit_rows(trajectory: Trajectory, tags: TagTokens, global_steps: list[int], seconds: float) -> list:
    """One ``AgentLoopOutput`` per unit of ``trajectory``; the last carries the trajectory for the reward."""
    if not trajectory.units:
        raise ValueError(f"the trajectory made no request ({trajectory.finish_reason}: {trajectory.finish_detail})")
    steps = {"min_global_steps": min(global_steps, default=None), "max_global_steps": max(global_steps, default=None)}
    rows = []
    for i, unit in enumerate(trajectory.units):
        place = {"index": i, "role": unit.role, "block": unit.block, "thread": unit.thread,
                 "n_inserted": unit.n_inserted}
        rows.append(AgentLoopOutput(
            prompt_ids=list(unit.context_ids), response_ids=list(unit.completion_ids),
            response_mask=[1] * len(unit.completion_ids), response_logprobs=list(unit.completion_logprobs),
            num_turns=2, metrics=AgentLoopMetrics(generate_sequences=seconds),
            extra_fields={**steps, UNIT_KEY: place, TRAJECTORY_KEY: None}))
    rows[-1].extra_fields[TRAJECTORY_KEY] = {
        "text": trajectory.text, "units": [u.to_dict() for u in trajectory.units],
        "finish_reason": trajectory.finish_reason, "finish_detail": trajectory.finish_detail,
        "L_total": trajectory.L_total, "L_crit": trajectory.L_crit, "eta": trajectory.eta,
        "n_blocks": trajectory.n_blocks, "threads_per_block": trajectory.threads_per_block,
        "tags": tags.to_dict()}
    return rows
