"""Held-out evaluation of a model being trained: greedy spawn/join decoding of validation prompts.

The prompts are decoded by the orchestrator (``rollout.orchestrator`` on Ray
rollout workers, ``rollout.workers.RolloutPool``) at temperature 0: in
parallel mode for a model trained on the parallel layout, with spawning off
for the sequential baseline. The learner's current weights reach the engines
in place, in buckets that the learner ranks put in Ray's object store
themselves (``rl.learner.LearnerGroup.publish_weights``, then
``RolloutPool.update_weights``: only references pass through the caller),
or broadcast by learner rank 0 with ``rollout.weight_transfer: collective``
(``rollout.collective``);
the engines start on the first evaluation.

Each trajectory is judged by :func:`rl.evaluation.judge` and the means by
:func:`rl.evaluation.summarize` (the definitions every evaluation shares:
``accuracy``, ``format_valid`` -- EOS not required --, ``parallel_valid``,
``L_total``, ``L_crit``, ``eta``, ``speedup``, ``finish/<reason>``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from rewards.checker import AnswerChecker
from rl.evaluation import EvalRecord, judge, summarize
from rollout.collective import Broadcast
from rollout.config import RolloutConfig, check_ranges
from rollout.orchestrator import generate
from rollout.units import chat_prompt_ids
from rollout.weights import PublishedWeights
from rollout.workers import RolloutPool


@dataclass
class EvalConfig:
    """Held-out evaluation: how often, on how many prompts, with which decoding limits."""

    every: int = field(default=0, metadata={
        "help": "evaluate every this many optimizer steps (0: only at the end)", "range": ">= 0"})
    at_end: bool = field(default=True, metadata={"help": "evaluate after the last step"})
    prompts: int = field(default=200, metadata={
        "help": "validation prompts decoded per evaluation (count)", "range": ">= 1"})
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(
        temperature=0.0, max_tokens=512, max_context=1024, max_thread_tokens=256, max_blocks=4), metadata={
        "help": "decoding: limits, sampling (greedy by default), the rollout workers (workers, cpus/gpus_per_worker) "
                "and engine settings; rollout.sequential is set by the layout (spawning off for the sequential "
                "baseline) and rollout.n must stay 1"})
    checker_timeout_s: float = field(default=5.0, metadata={
        "help": "math-verify time limit per answer (s)", "range": "> 0"})

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.rollout.n != 1:
            raise ValueError(f"rollout.n={self.rollout.n}: the held-out evaluation decodes one trajectory per "
                             "prompt (use threadweaver eval for avg@n)")

    def rollout_config(self, sequential: bool) -> RolloutConfig:
        """The decoding of the model's layout: ``rollout`` with spawning on (parallel) or off (sequential)."""
        return replace(self.rollout, sequential=sequential)


class Evaluator:
    """Decodes the validation prompts with the orchestrator and scores them (see module doc).

    By default the engines are Ray rollout workers started on the first call
    (Ray must be initialised). ``engine`` (a ``rollout.engine.Engine``, e.g. a
    ``VLLMEngine`` over an existing ``vllm.LLM``) decodes in this process
    instead; it then evaluates whatever weights that engine holds. Call
    :meth:`close` to stop what this object started. ``actor_options`` as in ``RolloutPool``.
    """

    def __init__(self, cfg: EvalConfig, model_dir: str | Path, tokenizer, records: Sequence[dict],
                 sequential: bool, prompt_field: str = "prompt", answer_field: str = "answer", engine=None,
                 actor_options: Sequence[Mapping] = ()):
        self.cfg = cfg
        self.actor_options = actor_options
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_dir = str(model_dir)
        self.sequential = sequential
        chosen = list(records)[:cfg.prompts]
        if not chosen:
            raise ValueError("no validation records to evaluate on")
        missing = [i for i, r in enumerate(chosen) if not isinstance(r.get(prompt_field), str)
                   or r.get(answer_field) is None]
        if missing:
            raise ValueError(f"validation records {missing[:5]} lack '{prompt_field}' or '{answer_field}'")
        self.prompts = [chat_prompt_ids(tokenizer, r[prompt_field]) for r in chosen]
        self.answers = [str(r[answer_field]) for r in chosen]
        self.pool = None
        self.checker = None

    def __call__(self, weights: PublishedWeights | Broadcast | None) -> tuple[dict[str, float], list[EvalRecord]]:
        """Evaluate ``weights`` (published in Ray's object store, ``rollout.weights``, or a broadcast,
        ``rollout.collective``; None: the weights the engines hold)."""
        rollout_cfg = self.cfg.rollout_config(self.sequential)
        start = time.perf_counter()
        if self.checker is None:
            self.checker = AnswerChecker(timeout_s=self.cfg.checker_timeout_s, eager=False)
        if self.engine is None and self.pool is None:
            self.pool = RolloutPool(self.model_dir, rollout_cfg, actor_options=self.actor_options)
        started = time.perf_counter()
        sync_s = 0.0
        if weights is not None:
            if self.pool is None:
                raise ValueError("an Evaluator on a given engine evaluates the weights that engine holds; "
                                 "pass weights=None")
            sync_s = self.pool.update_weights(weights).seconds
        decode_start = time.perf_counter()
        if self.pool is not None:
            trajectories = self.pool.generate(self.prompts, config=rollout_cfg)
        else:
            from rollout.onboard import eos_token_ids  # lazy: transformers takes seconds to import

            trajectories = generate(self.engine, self.tokenizer, self.prompts, rollout_cfg,
                                    eos_token_id=eos_token_ids(self.model_dir, self.tokenizer))
        decode_s = time.perf_counter() - decode_start
        records = [judge(t, self.answers[t.prompt_index], self.checker) for t in trajectories]
        metrics = summarize(records)
        metrics.update(engine_start_s=started - start, weight_sync_s=sync_s, decode_s=decode_s,
                       seconds=time.perf_counter() - start)
        return metrics, records

    def close(self) -> None:
        if self.checker is not None:
            self.checker.close()
            self.checker = None
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None


def records_to_dicts(records: Sequence[EvalRecord]) -> list[dict]:
    return [asdict(r) for r in records]
