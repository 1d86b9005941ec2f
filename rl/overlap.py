"""Which weights sample which step's batch: the strictly on-policy loop, or rollout overlapped with learning.

Weights are named by *version*: version ``v`` is the learner after ``v``
steps (0: the starting checkpoint). Step ``t`` (1-based) trains on batch
``B_t`` and turns version ``t - 1`` into ``t``; the rollout workers hold
version ``t - 1`` when step ``t`` begins (the weights are synced at the end of
every step; a step that took no optimizer step leaves version ``t`` equal to
``t - 1`` and skips the sync).

* ``max_staleness = 0`` (the default): ``B_t`` is sampled at the start of step
  ``t`` by version ``t - 1``, then learned from: rollout and learner take turns.
* ``max_staleness = 1``: while the learner trains on ``B_t``, a background
  thread of the driver samples and scores ``B_{t+1}`` on the rollout workers,
  which still hold version ``t - 1``; the new weights are synced once both
  are done. So ``B_t`` comes from version ``max(t - 2, 0)``
  (:func:`behaviour_version`), a staleness of 1 from step 2 on, and the
  learner corrects for it with the PPO-clipped ratio against the rollout's
  recorded log-probabilities (``rl.grpo.pgrpo_loss``).

Exact resume: at the end of step ``t`` the next batch ``B_{t+1}`` is already
sampled and scored (the step waited for it before syncing), so the checkpoint
of step ``t`` stores it (:meth:`RolloutBatch.to_dict`, in the trainer state)
next to the prompt order that already counts its prompts. A resumed run
trains on that very batch while it samples ``B_{t+2}`` with the restored
version ``t``, as the uninterrupted run did. (Regenerating ``B_{t+1}`` on
resume would need version ``t - 1``, a second full copy of the weights in
every checkpoint; the batch is a few token lists.)

A rollout worker that dies during an overlapped rollout makes the pool
rebuild (``rl.services.Rollouts``) with the learner's weights of that moment
(the driver makes the fetch wait for a learning in progress, so that two
threads never call into the learner ranks at once), which may be version
``t - 1`` or ``t``: the batch is dropped, and its prompts are sampled again
at the start of the next step by the synced weights (staleness 0 for that
batch).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Generic, TypeVar

from rewards.score import ScoreRecord
from rollout.orchestrator import Trajectory

#: the values ``rl.max_staleness`` takes
STALENESS = (0, 1)


def behaviour_version(step: int, max_staleness: int) -> int:
    """The weights version that samples step ``step``'s batch (1-based step; see the module doc)."""
    if step < 1 or max_staleness not in STALENESS:
        raise ValueError(f"need step >= 1 and max_staleness in {STALENESS}, got {step} and {max_staleness}")
    return max(step - 1 - max_staleness, 0)


@dataclass
class Request:
    """What one batch is sampled for: its step, its prompts (record indices) and the prompt order after them."""

    step: int
    indices: list[int]
    epoch: int
    served: int


@dataclass
class RolloutBatch:
    """One step's trajectories with their scores, the weights version that sampled them and what it cost.

    ``rebuilt``: the rollout pool was rebuilt while sampling it (its version is then unknown).
    """

    request: Request
    version: int
    trajectories: list[Trajectory]
    scores: list[ScoreRecord]
    rollout_s: float = 0.0
    reward_s: float = 0.0
    rebuilt: bool = False

    def staleness(self, step: int) -> int:
        """Learner steps between the weights that sampled this batch and those that train on it at ``step``."""
        return step - 1 - self.version

    def to_dict(self) -> dict:
        """JSON-ready; floats round-trip exactly through ``json``."""
        return {"request": asdict(self.request), "version": self.version,
                "trajectories": [t.to_dict() for t in self.trajectories],
                "scores": [s.to_dict() for s in self.scores], "rollout_s": self.rollout_s,
                "reward_s": self.reward_s, "rebuilt": self.rebuilt}

    @classmethod
    def from_dict(cls, d: dict) -> "RolloutBatch":
        return cls(Request(**d["request"]), int(d["version"]), [Trajectory.from_dict(t) for t in d["trajectories"]],
                   [ScoreRecord(**s) for s in d["scores"]], float(d["rollout_s"]), float(d["reward_s"]),
                   bool(d["rebuilt"]))


R = TypeVar("R")


@dataclass
class Scheduler(Generic[R]):
    """Runs a step's rollout, learning and weight sync in the order ``max_staleness`` asks for.

    ``plan(step)`` takes the prompts of ``step`` from the prompt order (called
    in step order, in the driver's thread); ``produce(request, version)``
    samples and scores them on the rollout workers, which hold ``version``
    (called in a background thread when overlapped). ``pending`` is the next
    step's batch already sampled, ``retry`` a request whose batch was dropped:
    both are saved with a checkpoint (:meth:`state`) and restored from it.
    """

    max_staleness: int
    last_step: int
    plan: Callable[[int], Request]
    produce: Callable[[Request, int], RolloutBatch]
    pending: RolloutBatch | None = None
    retry: Request | None = None
    #: seconds the last step waited for rollouts (all of them on-policy; beyond the learning when overlapped)
    waited_s: float = field(default=0.0, init=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_staleness not in STALENESS:
            raise ValueError(f"max_staleness must be one of {STALENESS}, got {self.max_staleness}")

    def step(self, step: int, learn: Callable[[RolloutBatch], R], sync: Callable[[R], Any]) -> tuple[RolloutBatch, R]:
        """Step ``step``: its batch (pending, or sampled now by version ``step - 1``), ``learn(batch)`` with the
        next step's batch sampled meanwhile when overlapped, then ``sync(result)`` once the workers are idle."""
        version = step - 1  # what the workers hold now
        self.waited_s = 0.0
        batch = self.pending
        if batch is None:
            request = self.retry if self.retry is not None else self.plan(step)
            if request.step != step:
                raise RuntimeError(f"the pending request is for step {request.step}, not {step}")
            t0 = time.perf_counter()
            batch = self.produce(request, version)
            self.waited_s += time.perf_counter() - t0
        elif batch.request.step != step:
            raise RuntimeError(f"the pending batch is for step {batch.request.step}, not {step}")
        self.pending = self.retry = None
        ahead: Future | None = None
        if self.max_staleness > 0 and step < self.last_step:
            ahead = self._executor().submit(self.produce, self.plan(step + 1), version)
        try:
            result = learn(batch)
        except BaseException:
            if ahead is not None:
                wait([ahead])  # leave no rollout running behind the error (its own outcome is dropped)
            raise
        t0 = time.perf_counter()
        following = ahead.result() if ahead is not None else None
        self.waited_s += time.perf_counter() - t0
        if following is not None and following.rebuilt:
            self.retry = following.request  # sampled by unknown weights: sample it again after the sync
        else:
            self.pending = following
        sync(result)
        return batch, result

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def state(self) -> dict:
        """The checkpointed part: the batch (or the request) of the next step."""
        return {"pending": self.pending.to_dict() if self.pending is not None else None,
                "retry": asdict(self.retry) if self.retry is not None else None}

    def restore(self, state: dict | None) -> None:
        state = state or {}
        self.pending = RolloutBatch.from_dict(state["pending"]) if state.get("pending") else None
        self.retry = Request(**state["retry"]) if state.get("retry") else None
