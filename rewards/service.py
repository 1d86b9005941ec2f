"""The reward service: a pool of Ray actors that score trajectories in parallel.

``RewardPool(cfg).score_batch(items)`` splits the items into chunks of
``cfg.chunk_size``, keeps one chunk in flight per actor, and returns one
:class:`ScoreRecord` per item, in order. Each actor (:class:`RewardWorker`, a
plain single-threaded Ray actor) owns an :class:`AnswerChecker`, i.e. a
math-verify server process with its own hard per-item time limit.

Failures: when an actor dies (``ray.exceptions.RayActorError``: killed, out of
memory, node lost) or does not return a chunk within its deadline
(``len(chunk) * (checker_timeout_s + SERVER_GRACE_S) + ACTOR_START_S``), it is killed
and replaced by a fresh actor and its chunk is queued again. A chunk that has
failed on ``cfg.max_attempts`` actors fails the batch with
:class:`RewardServiceError`. An item whose scoring raises (a model output the
scoring code did not foresee) never fails the batch: the actor returns it as
incorrect with ``error`` set (:func:`rewards.score.score_many`), and the pool
logs a warning naming how many items of the batch that hit and the first error.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Mapping, Sequence

import ray
from ray.exceptions import RayActorError

from rewards.checker import SERVER_GRACE_S, AnswerChecker
from rewards.config import RewardConfig
from rewards.score import RewardItem, ScoreRecord, score_many

log = logging.getLogger(__name__)

#: seconds a fresh actor may take to start (Ray worker, imports, math-verify server) before its chunk is late
ACTOR_START_S = 120.0


class RewardServiceError(RuntimeError):
    """A chunk of items could not be scored on any of its attempts."""


class RewardWorker:
    """Body of one reward actor: scores chunks of items with its own math-verify server."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.checker = AnswerChecker(cfg.checker_timeout_s, cfg.memory_limit_mb, cache_size=cfg.verdict_cache)

    def ready(self) -> int:
        """Wait for the math-verify server; return this actor's process id."""
        self.checker.wait_ready()
        return os.getpid()

    def pids(self) -> tuple[int, int | None]:
        """This actor's process id and its math-verify server's."""
        return os.getpid(), self.checker.server_pid

    def score_batch(self, items: Sequence[RewardItem]) -> list[ScoreRecord]:
        return score_many(items, self.cfg, self.checker)


class RewardPool:
    """``cfg.num_actors`` reward actors behind one ``score_batch`` call (see module docstring).

    Needs a running Ray (``ray.init``). ``replaced`` and ``retried_chunks`` count
    the actors replaced and the chunks run again since the pool was created.
    """

    def __init__(self, cfg: RewardConfig, num_actors: int | None = None, actor_options: Sequence[Mapping] = ()):
        self.cfg = cfg
        self._actor_cls = ray.remote(RewardWorker)
        self._options = list(actor_options)  # per actor: extra Ray .options (a placement group bundle)
        self.actors = [self._new_actor(i) for i in range(num_actors or cfg.num_actors)]
        self.replaced = 0
        self.retried_chunks = 0

    def _new_actor(self, index: int):
        extra = self._options[index] if index < len(self._options) else {}
        return self._actor_cls.options(num_cpus=self.cfg.actor_cpus, **extra).remote(self.cfg)

    def wait_ready(self, timeout_s: float = ACTOR_START_S) -> list[int]:
        """Block until every actor's math-verify server is up; their process ids."""
        return ray.get([a.ready.remote() for a in self.actors], timeout=timeout_s)

    def _replace(self, index: int) -> None:
        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._new_actor(index)
        self.replaced += 1

    def _deadline(self, n_items: int) -> float:
        return time.monotonic() + n_items * (self.cfg.checker_timeout_s + SERVER_GRACE_S) + ACTOR_START_S

    def score_batch(self, items: Sequence[RewardItem]) -> list[ScoreRecord]:
        """One record per item, in order; see the module docstring for retries."""
        items = list(items)
        size = self.cfg.chunk_size
        chunks = [(start, items[start:start + size]) for start in range(0, len(items), size)]
        results: list[ScoreRecord | None] = [None] * len(items)
        todo = deque(range(len(chunks)))
        attempts = [0] * len(chunks)
        idle = deque(range(len(self.actors)))
        running: dict = {}  # object ref -> (actor index, chunk index, deadline)

        def retry(actor: int, chunk: int, why: str) -> None:
            self._replace(actor)
            idle.append(actor)
            start, part = chunks[chunk]
            if attempts[chunk] >= self.cfg.max_attempts:
                raise RewardServiceError(f"items {start}..{start + len(part) - 1} failed on "
                                         f"{attempts[chunk]} actors; last failure: {why}")
            self.retried_chunks += 1
            todo.appendleft(chunk)

        while todo or running:
            while todo and idle:
                actor, chunk = idle.popleft(), todo.popleft()
                attempts[chunk] += 1
                ref = self.actors[actor].score_batch.remote(chunks[chunk][1])
                running[ref] = (actor, chunk, self._deadline(len(chunks[chunk][1])))
            wait_s = max(0.0, min(d for _, _, d in running.values()) - time.monotonic())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=wait_s)
            for ref in ready:
                actor, chunk, _ = running.pop(ref)
                try:
                    records = ray.get(ref)
                except RayActorError as e:
                    retry(actor, chunk, f"actor died: {type(e).__name__}")
                    continue
                start, part = chunks[chunk]
                results[start:start + len(part)] = records
                idle.append(actor)
            now = time.monotonic()
            for ref, (actor, chunk, deadline) in list(running.items()):
                if now > deadline:
                    del running[ref]
                    retry(actor, chunk, "no answer before the chunk's deadline")
        errors = [(i, r.error) for i, r in enumerate(results) if r is not None and r.error is not None]
        if errors:
            log.warning("%d of %d items could not be scored and count as incorrect; item %d: %s",
                        len(errors), len(results), *errors[0])
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Kill every actor (their math-verify servers exit with them)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
