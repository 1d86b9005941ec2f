"""Held-out evaluation during P-GRPO: greedy decoding of the validation prompts on the rollout workers, in
parallel (spawn/join) and/or sequential mode, scored by the reward actors.

Metrics are ``eval/<mode>/<name>`` with the names of
:func:`rl.metrics.trajectory_metrics` (``correct`` reported as ``accuracy``),
plus ``eval/<mode>/decode_s``, ``eval/crit_over_sequential`` (parallel
``L_crit`` over sequential ``L_total``, when both modes ran) and
``eval/seconds``. Every decoded trajectory goes to ``RUN_DIR/eval/step_N.jsonl``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from rewards.score import RewardItem
from rl.metrics import trajectory_metrics
from rollout.config import RolloutConfig
from rollout.files import atomic_write


def records_file(run_dir: Path, step: int) -> Path:
    return run_dir / "eval" / f"step_{step:08d}.jsonl"


def evaluate(rollout: RolloutConfig, modes: Sequence[str], rollouts, reward_pool, prompts: list[list[int]],
             answers: list[str], step: int, run_dir: Path) -> tuple[dict[str, float], Path]:
    """Greedy decoding of the held-out prompts in each mode; metrics ``eval/<mode>/...`` and the records file."""
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    out = records_file(run_dir, step)
    with atomic_write(out) as f:
        for mode in modes:
            rc = replace(rollout, temperature=0.0, n=1, sequential=mode == "sequential", seed=0)
            t0 = time.perf_counter()
            trajectories = rollouts.generate(prompts, rc)
            decode_s = time.perf_counter() - t0
            scores = reward_pool.score_batch([RewardItem(t.text, answers[t.prompt_index], t.units, t.finish_reason)
                                              for t in trajectories])
            m = trajectory_metrics(trajectories, scores, f"eval/{mode}/")
            m[f"eval/{mode}/accuracy"] = m.pop(f"eval/{mode}/correct")
            m[f"eval/{mode}/decode_s"] = decode_s
            metrics.update(m)
            for t, s in zip(trajectories, scores):
                f.write(json.dumps({"step": step, "mode": mode, "index": t.prompt_index,
                                    "answer": answers[t.prompt_index], "text": t.text,
                                    "finish_reason": t.finish_reason, "L_total": t.L_total, "L_crit": t.L_crit,
                                    "eta": t.eta, "n_blocks": t.n_blocks, **s.to_dict()}) + "\n")
    if "eval/parallel/L_crit" in metrics and "eval/sequential/L_total" in metrics:
        metrics["eval/crit_over_sequential"] = metrics["eval/parallel/L_crit"] / metrics["eval/sequential/L_total"]
    metrics["eval/seconds"] = time.perf_counter() - start
    return metrics, out
