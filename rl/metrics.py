"""The numbers a P-GRPO step logs: batch means of the trajectories and their scores, the learner's loss terms,
and the step's advantages, batch shape, timings and progress (:func:`step_metrics`).

Every value is a float; a mean over nothing is NaN (never a silent 0).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from rollout.orchestrator import FINISH_REASONS


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def trajectory_metrics(trajectories, scores, prefix: str) -> dict[str, float]:
    """Means over a batch: reward and its components, correctness (also apart for trajectories with and
    without a block; NaN when there are none), parallelism, format, finish reasons."""
    blocks = [k for t in trajectories for k in t.threads_per_block]
    out = {
        f"{prefix}reward": mean([s.reward for s in scores]),
        f"{prefix}R_correct": mean([s.R_correct for s in scores]),
        f"{prefix}R_accel": mean([s.R_accel for s in scores]),
        f"{prefix}format_penalty": mean([s.format_penalty for s in scores]),
        f"{prefix}correct": mean([float(s.correct) for s in scores]),
        f"{prefix}check_timed_out": mean([float(s.timed_out) for s in scores]),
        f"{prefix}format_error": mean([float(not s.format_valid) for s in scores]),
        f"{prefix}cut": mean([float(s.cut) for s in scores]),
        f"{prefix}score_error": mean([float(s.error is not None) for s in scores]),
        f"{prefix}activation": mean([float(t.n_blocks > 0) for t in trajectories]),
        f"{prefix}correct_with_block": mean([float(s.correct) for t, s in zip(trajectories, scores) if t.n_blocks]),
        f"{prefix}correct_without_block": mean([float(s.correct) for t, s in zip(trajectories, scores)
                                                if not t.n_blocks]),
        f"{prefix}blocks": mean([float(t.n_blocks) for t in trajectories]),
        f"{prefix}threads_per_block": mean([float(k) for k in blocks]),
        f"{prefix}eta": mean([t.eta for t in trajectories]),
        f"{prefix}L_crit": mean([float(t.L_crit) for t in trajectories]),
        f"{prefix}L_total": mean([float(t.L_total) for t in trajectories]),
        f"{prefix}speedup": mean([t.speedup for t in trajectories]),
    }
    out.update(finish_shares([t.finish_reason for t in trajectories], prefix))
    return out


def finish_shares(reasons: Sequence[str], prefix: str) -> dict[str, float]:
    """``{prefix}finish/<reason>``: the share of trajectories that ended for each known reason (NaN: none)."""
    counts, n = Counter(reasons), len(reasons)
    return {f"{prefix}finish/{reason}": counts.get(reason, 0) / n if n else float("nan")
            for reason in FINISH_REASONS}


def learner_metrics(learn: list[dict], n_tokens: int, learn_s: float) -> dict[str, float]:
    """Loss terms, gradient and throughput of a step's optimizer steps (``learn``: one dict per update).

    ``learner/skipped`` is 1 when the batch had no non-zero advantage and no
    optimizer step was taken (the other values are then 0). ``loss/clip_frac``
    is the share of target occurrences at an active clip bound over all updates
    (0 when the loss is not clipped). ``ratio/*`` describe the ratio
    ``rho = exp(learner - rollout log-probability)`` at the first update, where
    the learner still holds the weights it had when the step began: ~1 on-policy,
    the drift of one step with a stale batch (``rl.max_staleness = 1``):
    its mean, standard deviation and mean ``|rho - 1|`` over the tokens with a
    rollout log-probability.
    """
    if not learn:
        return {"learner/skipped": 1.0, "loss/total": 0.0, "loss/pg": 0.0, "loss/kl": 0.0, "loss/clip_frac": 0.0,
                "learner/grad_norm": 0.0, "learner/tokens_per_s": 0.0}
    first, last = learn[0], learn[-1]
    count = max(first["lp_count"], 1.0)
    dev = first["ratio_dev_sum"] / count
    return {
        "learner/skipped": 0.0,
        "loss/total": last["loss"],
        "loss/pg": last["pg_sum"] / n_tokens,
        "loss/kl": last["kl_sum"] / n_tokens,
        "loss/clip_frac": sum(m["clipped"] for m in learn) / max(sum(m["targets"] for m in learn), 1.0),
        "learner/grad_norm": last["grad_norm"],
        "learner/lr": last["lr"],
        "learner/tokens_per_s": sum(m["tokens"] for m in learn) / max(learn_s, 1e-9),
        # the first update runs on the weights that sampled the batch
        "logprob/rollout_learner_absdiff": first["lp_absdiff_sum"] / count,
        "ratio/mean": 1.0 + dev,
        "ratio/std": max(first["ratio_sqdev_sum"] / count - dev * dev, 0.0) ** 0.5,
        "ratio/absdev_mean": first["ratio_absdev_sum"] / count,
    }


def advantage_metrics(advantages: Sequence[float], group_size: int) -> dict[str, float]:
    """Mean |A|, the share of groups whose advantages are all 0, and the share of non-zero advantages."""
    groups = [advantages[i:i + group_size] for i in range(0, len(advantages), group_size)]
    return {
        "adv/mean_abs": mean([abs(a) for a in advantages]),
        "adv/zero_groups": mean([float(all(a == 0.0 for a in g)) for g in groups]),
        "adv/nonzero_share": sum(1 for a in advantages if a != 0.0) / len(advantages),
    }


@dataclass
class StepTimes:
    """Seconds spent in each phase of one step (``step_s`` covers the whole step)."""

    rollout_s: float = 0.0
    reward_s: float = 0.0
    learn_s: float = 0.0
    sync_s: float = 0.0
    step_s: float = 0.0
    sync_load_s: float = 0.0
    #: the step waited for rollouts: all of rollout + reward on-policy, what they took beyond the learning overlapped
    rollout_wait_s: float = 0.0


def time_metrics(times: StepTimes, generated: float) -> dict[str, float]:
    """Phase times and the generated-token throughput of the rollout and of the whole step."""
    return {
        "time/rollout_s": times.rollout_s, "time/reward_s": times.reward_s, "time/learn_s": times.learn_s,
        "time/sync_s": times.sync_s, "time/step_s": times.step_s, "time/sync_load_s": times.sync_load_s,
        "time/rollout_wait_s": times.rollout_wait_s,
        "throughput/rollout_tokens_per_s": generated / max(times.rollout_s, 1e-9),
        "throughput/step_tokens_per_s": generated / max(times.step_s, 1e-9),
    }


def step_metrics(trajectories, scores, result, times: StepTimes, restarts: int, epoch: int,
                 prompts_seen: int, staleness: int = 0) -> dict[str, float]:
    """Everything one training step logs; ``result`` is the step's ``rl.step.StepResult``; ``staleness``: learner
    steps between the weights that sampled the batch and those that trained on it (``rl.overlap``)."""
    batch = result.batch
    generated = float(sum(t.L_total for t in trajectories))
    out = trajectory_metrics(trajectories, scores, "train/")
    out.update(learner_metrics(result.learn, batch.completion_tokens, times.learn_s))
    out.update(advantage_metrics(batch.advantages, result.group_size))
    out.update({
        "batch/completion_tokens": float(batch.completion_tokens),
        "batch/trie_tokens": float(batch.stats.unique_tokens),
        "batch/tree_token_ratio": batch.stats.expanded_ratio,
        "batch/trained_tries": float(len(batch.trained)),
        "batch/rows": float(len(batch.rows)),
        "batch/dropped_oversize": float(len(batch.dropped)),
    })
    out.update(time_metrics(times, generated))
    out.update({"rollout/restarts": float(restarts), "rollout/generated_tokens": generated,
                "rollout/staleness": float(staleness),
                "data/epoch": float(epoch), "data/prompts_seen": float(prompts_seen)})
    return out
