"""Held-out evaluation of a model being trained: greedy spawn/join decoding of validation prompts.

The prompts are decoded by the orchestrator (``rollout.orchestrator`` on Ray
rollout workers, ``rollout.workers.RolloutPool``) at temperature 0: in
parallel mode for a model trained on the parallel layout, with spawning off
for the sequential baseline. The learner's current weights reach the engines
in place, in buckets (``RolloutPool.update_weights``); the engines start on
the first evaluation.

Each trajectory is judged by :func:`rl.evaluation.judge` and the means by
:func:`rl.evaluation.summarize` (the definitions every evaluation shares:
``accuracy``, ``format_valid`` -- EOS not required --, ``parallel_valid``,
``L_total``, ``L_crit``, ``eta``, ``speedup``, ``finish/<reason>``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from rewards.checker import AnswerChecker
from rl.evaluation import EvalRecord, judge, summarize
from rollout.config import RolloutConfig, check_ranges
from rollout.orchestrator import generate
from rollout.units import chat_prompt_ids
from rollout.workers import RolloutPool


@dataclass
class EvalConfig:
    """Held-out evaluation: how often, on how many prompts, with which decoding limits."""

    every: int = field(default=0, metadata={
        "help": "evaluate every this many optimizer steps (0: only at the end)", "range": ">= 0"})
    at_end: bool = field(default=True, metadata={"help": "evaluate after the last step"})
    prompts: int = field(default=200, metadata={
        "help": "validation prompts decoded per evaluation (count)", "range": ">= 1"})
    max_tokens: int = field(default=512, metadata={
        "help": "generated-token budget per trajectory (tokens)", "range": ">= 1"})
    max_context: int = field(default=1024, metadata={"help": "per-request context limit (tokens)", "range": ">= 1"})
    max_thread_tokens: int = field(default=256, metadata={
        "help": "length limit of one thread (tokens)", "range": ">= 1"})
    max_threads: int = field(default=8, metadata={"help": "most threads in one block", "range": ">= 1"})
    max_blocks: int = field(default=4, metadata={"help": "most parallel blocks in one trajectory", "range": ">= 0"})
    workers: int = field(default=1, metadata={
        "help": "Ray rollout workers, one vLLM engine each (count)", "range": ">= 1"})
    cpus_per_worker: float = field(default=1.0, metadata={
        "help": "Ray CPUs reserved per rollout worker", "range": ">= 0"})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "Ray GPUs per rollout worker", "range": ">= 0"})
    dtype: str = field(default="float32", metadata={"help": "engine dtype (float32 on CPU, bfloat16 on GPU)"})

    def __post_init__(self) -> None:
        check_ranges(self)
    checker_timeout_s: float = field(default=5.0, metadata={
        "help": "math-verify time limit per answer (s)", "range": "> 0"})

    def rollout_config(self, sequential: bool) -> RolloutConfig:
        return RolloutConfig(
            temperature=0.0, n=1, sequential=sequential, seed=0, max_tokens=self.max_tokens,
            max_context=self.max_context, max_thread_tokens=self.max_thread_tokens, max_threads=self.max_threads,
            max_blocks=self.max_blocks, workers=self.workers, cpus_per_worker=self.cpus_per_worker,
            gpus_per_worker=self.gpus_per_worker, dtype=self.dtype, enforce_eager=self.gpus_per_worker == 0,
        )


class Evaluator:
    """Decodes the validation prompts with the orchestrator and scores them (see module doc).

    By default the engines are Ray rollout workers started on the first call
    (Ray must be initialised). ``engine`` (a ``rollout.engine.Engine``, e.g. a
    ``VLLMEngine`` over an existing ``vllm.LLM``) decodes in this process
    instead; it then evaluates whatever weights that engine holds. Call
    :meth:`close` to stop what this object started.
    """

    def __init__(self, cfg: EvalConfig, model_dir: str | Path, tokenizer, records: Sequence[dict],
                 sequential: bool, prompt_field: str = "prompt", answer_field: str = "answer", engine=None):
        self.cfg = cfg
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

    def __call__(self, weights: dict | None) -> tuple[dict[str, float], list[EvalRecord]]:
        """Evaluate ``weights`` (a full state dict; None: the weights the engines hold)."""
        rollout_cfg = self.cfg.rollout_config(self.sequential)
        start = time.perf_counter()
        if self.checker is None:
            self.checker = AnswerChecker(timeout_s=self.cfg.checker_timeout_s, eager=False)
        if self.engine is None and self.pool is None:
            self.pool = RolloutPool(self.model_dir, rollout_cfg)
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
            trajectories = generate(self.engine, self.tokenizer, self.prompts, rollout_cfg)
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
