"""One P-GRPO learning step as a plain function: scored trajectories in, advantages, packed rows and the
learner's update metrics out (DESIGN section 6). No Ray here: the learner and the reference model are
passed in, so a unit test can give small fakes.

Credit rule: trajectory ``i`` of a group gets ``A_i = r_i - mean(r)`` (or the
std-normalised form, :func:`rl.grpo.group_advantages`), broadcast as the loss
weight of every completion token of every one of its units; the trajectories
of one group share one trie (:func:`rl.grpo.rl_tries`). With
``grpo.skip_zero_advantage`` (and no KL term) tries whose weights are all 0
are not forwarded; a batch with nothing left takes no optimizer step.

A trajectory whose own trie is longer than a row (``row_tokens``) cannot be
trained in one forward pass: it is dropped from the step (its reward still
counts in its group's mean), counted in ``batch/dropped_oversize`` and named in
a log line, and the loss normaliser counts only the trajectories trained.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from rl.grpo import GRPOConfig, batch_advantages, completion_tokens, has_weight, rl_tries, with_reference
from rl.learner import strip_row
from rl.trie import PackedRow, Trie, TreeStats, build_trie, pack_tries, tree_stats


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
    dropped: list[int] = field(default_factory=list)  # indices of the trajectories too long for a row


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
    trajectories trained, the zero-advantage groups included (the oversize
    ones dropped, see module doc).
    """
    k = group_size
    adv = batch_advantages(list(rewards), k, grpo.advantage, grpo.std_floor)
    n_groups = len(trajectories) // k
    dropped = oversize(trajectories[:n_groups * k], row_tokens)
    if dropped:
        print(f"rl: dropped {len(dropped)} trajectories (batch index {dropped}) whose trie is longer than "
              f"learner.row_tokens={row_tokens}", file=sys.stderr, flush=True)
    keep = [[j for j in range(i * k, (i + 1) * k) if j not in dropped] for i in range(n_groups)]
    groups = [[trajectories[j].units for j in idx] for idx in keep if idx]
    tries = rl_tries(groups, [[adv[j] for j in idx] for idx in keep if idx], row_tokens)
    trained = tries
    if grpo.skip_zero_advantage and grpo.kl_coef == 0:
        trained = [t for t in tries if has_weight(t)]
    rows = pack_tries(trained, row_tokens) if trained else []
    kept = [trajectories[j] for idx in keep for j in idx]
    return Batch(adv, tries, trained, rows, sum(completion_tokens(t.units) for t in kept), tree_stats(tries),
                 dropped)


def oversize(trajectories: Sequence, row_tokens: int) -> list[int]:
    """Indices of the trajectories whose own trie (all their units) is longer than ``row_tokens``."""
    return [i for i, t in enumerate(trajectories) if len(build_trie(t.units)) > row_tokens]


def rl_step(trajectories: Sequence, rewards: Sequence[float], group_size: int, grpo: GRPOConfig, row_tokens: int,
            learner: Learner, reference_logprobs: Callable[[list[PackedRow]], list] | None = None,
            off_policy: bool = False) -> StepResult:
    """Build the batch and run ``grpo.updates_per_batch`` optimizer steps of the ``"pgrpo"`` loss on it.

    ``reference_logprobs(rows)`` (with a KL term) gives the reference model's
    log-probabilities of the rows stripped of their rollout data.
    ``off_policy``: older weights than the learner's sampled the batch (:mod:`rl.overlap`), so even one
    update uses the PPO-clipped ratio against the rollout's log-probabilities.
    """
    t0 = time.perf_counter()
    batch = build_batch(trajectories, rewards, group_size, grpo, row_tokens)
    learn: list[dict] = []
    if batch.rows:  # else nothing to learn from: no optimizer step, the weights stay as they are
        if reference_logprobs is not None:
            stripped = [strip_row(r) for r in batch.rows]
            batch.rows = with_reference(stripped, reference_logprobs(stripped))
        options = grpo.loss_options(off_policy)
        learn = [learner.train_step(batch.rows, loss="pgrpo", denominator=float(batch.completion_tokens), **options)
                 for _ in range(grpo.updates_per_batch)]
    return StepResult(batch, learn, time.perf_counter() - t0, group_size)
