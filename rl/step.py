"""One P-GRPO learning step as a plain function: scored trajectories in, advantages, packed rows and the
learner's update metrics out (DESIGN section 6). No Ray here: the learner and the reference model are
passed in, so a unit test can give small fakes.

Credit rule: trajectory ``i`` of a group gets ``A_i = r_i - mean(r)`` (or the
std-normalised form, :func:`rl.grpo.group_advantages`), broadcast as the loss
weight of every completion token of every one of its units; the trajectories
of one group share one trie (:func:`rl.grpo.rl_tries`). With
``grpo.skip_zero_advantage`` (and no KL term) tries whose weights are all 0
are not forwarded; a batch with nothing left takes no optimizer step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from rl.grpo import GRPOConfig, batch_advantages, completion_tokens, has_weight, rl_tries, with_reference
from rl.learner import strip_row
from rl.trie import PackedRow, Trie, TreeStats, pack_tries, tree_stats


class Learner(Protocol):
    """What a step needs of the learner (``rl.learner.LearnerGroup``)."""

    def train_step(self, rows: Sequence[PackedRow], loss: str, **options) -> dict: ...


@dataclass
class Batch:
    """What a step learns from: advantages (trajectory order), the group tries, those trained, their rows."""

    advantages: list[float]
    tries: list[Trie]
    trained: list[Trie]
    rows: list[PackedRow]
    completion_tokens: int
    stats: TreeStats


@dataclass
class StepResult:
    """A step's batch, the learner's metrics of each update (empty: no optimizer step) and its seconds."""

    batch: Batch
    learn: list[dict]
    learn_s: float
    group_size: int


def build_batch(trajectories: Sequence, rewards: Sequence[float], group_size: int, grpo: GRPOConfig,
                row_tokens: int) -> Batch:
    """Advantages per group of ``group_size`` consecutive trajectories, one weighted trie per group, packed rows.

    The loss normaliser is ``completion_tokens``: every completion token of the
    whole batch, the zero-advantage groups included.
    """
    k = group_size
    adv = batch_advantages(list(rewards), k, grpo.advantage, grpo.std_floor)
    n_groups = len(trajectories) // k
    groups = [[t.units for t in trajectories[i * k:(i + 1) * k]] for i in range(n_groups)]
    tries = rl_tries(groups, [adv[i * k:(i + 1) * k] for i in range(n_groups)], row_tokens)
    trained = tries
    if grpo.skip_zero_advantage and grpo.kl_coef == 0:
        trained = [t for t in tries if has_weight(t)]
    rows = pack_tries(trained, row_tokens) if trained else []
    return Batch(adv, tries, trained, rows, sum(completion_tokens(t.units) for t in trajectories),
                 tree_stats(tries))


def rl_step(trajectories: Sequence, rewards: Sequence[float], group_size: int, grpo: GRPOConfig, row_tokens: int,
            learner: Learner, reference_logprobs: Callable[[list[PackedRow]], list] | None = None) -> StepResult:
    """Build the batch and run ``grpo.updates_per_batch`` optimizer steps of the ``"pgrpo"`` loss on it.

    ``reference_logprobs(rows)`` (with a KL term) gives the reference model's
    log-probabilities of the rows stripped of their rollout data.
    """
    t0 = time.perf_counter()
    batch = build_batch(trajectories, rewards, group_size, grpo, row_tokens)
    learn: list[dict] = []
    if batch.rows:  # else nothing to learn from: no optimizer step, the weights stay as they are
        if reference_logprobs is not None:
            stripped = [strip_row(r) for r in batch.rows]
            batch.rows = with_reference(stripped, reference_logprobs(stripped))
        options = grpo.loss_options()
        learn = [learner.train_step(batch.rows, loss="pgrpo", denominator=float(batch.completion_tokens), **options)
                 for _ in range(grpo.updates_per_batch)]
    return StepResult(batch, learn, time.perf_counter() - t0, group_size)
