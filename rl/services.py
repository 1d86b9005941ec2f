"""The long-lived actors of a P-GRPO run besides the learner, and the rollout pool's recovery.

:class:`Services` holds the rollout pool (``rollout.workers.RolloutPool``),
the reward pool (``rewards.service.RewardPool``) and, with a KL term, the
reference-model actor. :class:`Rollouts` wraps the rollout pool: a worker
that dies (or whose vLLM engine dies) during a rollout or a weight sync makes
it rebuild the pool, load the learner's current weights into it (published
afresh by the learner, ``rl.learner.LearnerGroup.publish_weights``: only
their references pass through here) and redo the call, at most
``max_restarts`` times per call. A ``placement`` maps a role
(``rollout``, ``reward``, ``reference``) to its actors' extra Ray ``.options``
(their placement group bundles, reserved by the command layer); a rebuilt pool
goes back into the same bundles. Everything here needs a started
Ray; Ray itself is imported lazily (it takes seconds to import, and the
unit tests of the modules that import this one need none of it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from rewards.config import RewardConfig
from rl.grpo import GRPOConfig, ReferenceModel
from rl.learner import LearnerConfig
from rollout.config import RolloutConfig
from rollout.storage import ShippedFolder
from rollout.workers import RolloutPool

if TYPE_CHECKING:
    from rollout.weights import PublishedWeights

#: per role key, the extra Ray ``.options`` of each of its actors (see the module docstring)
Placement = Mapping[str, Sequence[Mapping]]


@dataclass
class Services:
    """The long-lived actors besides the learner: rollout pool, reward pool, optional reference model.

    Passed to ``rl.driver.train`` by tests and sweeps that reuse engines across
    runs; the driver then does not shut them down (it may replace a dead
    rollout pool).
    """

    rollout: object
    rewards: object
    reference: object | None = None

    def reference_logprobs(self, rows):
        """The reference model's log-probabilities of ``rows`` (one tensor per row)."""
        import ray

        return ray.get(self.reference.logprobs.remote(rows))


def start_services(rollout: RolloutConfig, reward: RewardConfig, grpo: GRPOConfig, learner: LearnerConfig,
                   model_dir: "str | Path | ShippedFolder", placement: Placement | None = None) -> Services:
    """Start the reward pool, the rollout pool on ``model_dir`` and (with a KL term) the reference model."""
    import ray

    from rewards.service import RewardPool  # lazy: imports Ray (~1 s); --show-config needs none of it

    placement = placement or {}
    rewards = RewardPool(reward, actor_options=placement.get("reward", ()))
    pool = RolloutPool(model_dir, rollout, actor_options=placement.get("rollout", ()))
    reference = None
    if grpo.kl_coef > 0:
        lc = learner
        extra = (list(placement.get("reference", ())) or [{}])[0]
        reference = ray.remote(ReferenceModel).options(num_cpus=lc.cpus_per_rank, num_gpus=lc.gpus_per_rank,
                                                       **extra).remote(
            model_dir if isinstance(model_dir, ShippedFolder) else str(model_dir), lc.attention,
            lc.threads_per_rank or max(1, int(lc.cpus_per_rank)),
            "cuda" if lc.on_gpu else "cpu", lc.dtype, lc.logprob_chunk_tokens)
    rewards.wait_ready()
    return Services(pool, rewards, reference)


def stop_services(services: Services) -> None:
    import ray

    for what in ("rollout", "rewards"):
        try:
            obj = getattr(services, what)
            if obj is None:  # a rollout pool whose last rebuild failed
                continue
            obj.shutdown() if what == "rollout" else obj.close()
        except Exception as e:  # noqa: BLE001 - best effort at teardown, reported
            print(f"rl: could not stop the {what} service cleanly: {type(e).__name__}: {e}", file=sys.stderr)
    if services.reference is not None:
        ray.kill(services.reference)


def rollout_died(e: BaseException) -> bool:
    """A dead rollout worker actor, or a worker whose vLLM engine died."""
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(e, RayActorError):
        return True
    return isinstance(e, RayTaskError) and "EngineDead" in type(getattr(e, "cause", None)).__name__


class Rollouts:
    """The rollout pool with recovery: a dead worker rebuilds the pool, loads the current weights, retries.

    ``weights()`` publishes the learner's current weights (``rollout.weights.PublishedWeights``). With
    ``progress`` every call shows a bar of the trajectories done out of all asked for."""

    def __init__(self, services: Services, model_dir: "str | Path | ShippedFolder", cfg: RolloutConfig,
                 max_restarts: int, weights: Callable[[], PublishedWeights], actor_options: Sequence[Mapping] = (),
                 progress: bool = False):
        self.services, self.cfg = services, cfg
        self.model_dir = model_dir if isinstance(model_dir, ShippedFolder) else str(model_dir)
        self.actor_options = actor_options
        self.max_restarts, self.weights = max_restarts, weights
        self.progress = progress
        self.restarts = 0

    def _call(self, what: str, fn):
        """``fn(pool)``; a death (during the call, or while a pool is rebuilt) rebuilds the pool and retries,
        at most ``max_restarts`` times per call; any other error is raised at once."""
        for attempt in range(self.max_restarts + 1):
            try:
                if self.services.rollout is None:  # the previous rebuild died: build it again
                    self.services.rollout = RolloutPool(self.model_dir, self.cfg, actor_options=self.actor_options)
                    self.services.rollout.update_weights(self.weights())
                return fn(self.services.rollout)
            except Exception as e:  # noqa: BLE001 - only a dead worker is retried, the rest re-raised
                if not rollout_died(e) or attempt == self.max_restarts:
                    raise
                print(f"rl: a rollout worker died during {what} ({type(e).__name__}); rebuilding the rollout pool "
                      f"(restart {attempt + 1} of at most {self.max_restarts} for this call)", file=sys.stderr,
                      flush=True)
                self._discard_pool()
                self.restarts += 1
        raise AssertionError("unreachable")

    def _discard_pool(self) -> None:
        """Shut the dead pool down (best effort) and forget it; the next attempt builds a new one."""
        try:
            if self.services.rollout is not None:
                self.services.rollout.shutdown()
        except Exception:  # noqa: BLE001 - the dead worker cannot answer; the others were killed
            pass
        self.services.rollout = None

    def generate(self, prompts: Sequence[Sequence[int]], config: RolloutConfig):
        if not self.progress:
            return self._call("a rollout", lambda pool: pool.generate(prompts, config=config))
        from tqdm import tqdm  # lazy: only with a progress bar

        mode = "sequential" if config.sequential else "parallel"
        with tqdm(total=len(prompts) * config.n, desc=f"rollouts ({mode})", unit="traj", leave=False) as bar:
            return self._call("a rollout", lambda pool: pool.generate(
                prompts, config=config, progress=lambda k: bar.update(k - bar.n)))

    def update_weights(self, weights: PublishedWeights):
        """Load published weights into every worker (a retry after a rebuild loads the same references)."""
        return self._call("a weight sync", lambda pool: pool.update_weights(weights))
