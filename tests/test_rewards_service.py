"""The reward service on a local Ray: ordered batches, a killed actor, threaded and async actors."""

import os
import threading
import time

import pytest

from rewards.checker import SERVER_GRACE_S, AnswerChecker
from rewards.config import RewardConfig
from rewards.score import RewardItem, score
from rollout.ray_init import start_ray
from rollout.units import Unit

import ray

pytestmark = pytest.mark.integration

TIMEOUT_S = 1.0
SLOW = "2^{2^{2^{2^{30}}}}"  # keeps sympy busy far past the limit


@pytest.fixture(scope="module")
def local_ray():
    start_ray(None, num_cpus=2, include_dashboard=False)  # as the commands start it
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(local_ray):
    from rewards.service import RewardPool

    with RewardPool(RewardConfig(checker_timeout_s=TIMEOUT_S, chunk_size=4, actor_cpus=0.5)) as p:
        p.wait_ready()
        yield p


def item(pred: str, gold: str, units=None) -> RewardItem:
    return RewardItem(f"<think>\nwork\n</think>\n\\boxed{{{pred}}}", gold, units)


def mixed_items(n: int, slow_every: int = 0) -> tuple[list[RewardItem], list[bool]]:
    """Items whose correctness is known: integers, math-verify forms, wrong answers, slow ones."""
    items, expected = [], []
    for i in range(n):
        if slow_every and i % slow_every == 0:
            items.append(item(SLOW, "1"))
            expected.append(False)
        elif i % 3 == 0:
            items.append(item(f"\\sqrt{{{2 * (i + 1) ** 2}}}", f"{i + 1}\\sqrt{{2}}"))  # needs math-verify
            expected.append(True)
        elif i % 3 == 1:
            items.append(item(str(i), str(i + 1)))
            expected.append(False)
        else:
            units = [Unit([1, 2], [3, 4, 5]), Unit([1, 2, 3, 4, 5, 9], [6, 7], role="thread", block=1, thread=1)]
            items.append(item(f"{i:,}", str(i), units))
            expected.append(True)
    return items, expected


def test_pool_scores_a_batch_in_order(pool):
    items, expected = mixed_items(22)
    records = pool.score_batch(items)
    assert pool.score_batch([]) == []
    assert [r.correct for r in records] == expected
    with AnswerChecker(TIMEOUT_S) as checker:
        local = [score(it, pool.cfg, checker) for it in items]
    for got, want in zip(records, local):
        assert (got.reward, got.extracted_answer, got.L_total, got.eta) == \
            (want.reward, want.extracted_answer, want.L_total, want.eta)


def test_an_item_whose_scoring_raises_does_not_fail_the_batch(pool, caplog):
    items, expected = mixed_items(9)
    items[4] = RewardItem(items[4].response, items[4].answer, [object()])  # not units: scoring raises
    before = pool.replaced
    with caplog.at_level("WARNING", logger="rewards.service"):
        records = pool.score_batch(items)
    assert [r.error is not None for r in records] == [i == 4 for i in range(9)]
    assert not records[4].correct and records[4].reward == pool.cfg.incorrect_reward
    assert [r.correct for i, r in enumerate(records) if i != 4] == [c for i, c in enumerate(expected) if i != 4]
    assert pool.replaced == before  # the actor itself is fine: nothing replaced or retried
    assert any("1 of 9 items could not be scored" in m and "item 4: AttributeError" in m for m in caplog.messages)


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_killing_an_actor_mid_batch_still_scores_every_item(pool):
    items, expected = mixed_items(40, slow_every=5)  # 8 slow items: the batch runs for several seconds
    replaced, retried = pool.replaced, pool.retried_chunks
    victim = pool.actors[0]
    _, server_pid = ray.get(victim.pids.remote())
    killer = threading.Timer(1.5, lambda: ray.kill(victim))
    killer.start()
    t0 = time.monotonic()
    records = pool.score_batch(items)
    killer.join()
    assert time.monotonic() - t0 > 1.5, "the batch ended before the kill; make it longer"
    assert all(r is not None for r in records)
    assert [r.correct for r in records] == expected
    assert [r.timed_out for r in records] == [i % 5 == 0 for i in range(40)]
    assert pool.replaced == replaced + 1 and pool.retried_chunks > retried
    assert pool.actors[0] is not victim
    assert _gone(server_pid, 15.0), "the killed actor's math-verify server is still running"


@ray.remote(num_cpus=0.25)
class AsyncScorer:
    """An async actor: its methods run in an event loop outside the main thread."""

    def __init__(self, timeout_s: float):
        self.cfg = RewardConfig(checker_timeout_s=timeout_s)
        self.checker = AnswerChecker(timeout_s)

    async def score(self, it: RewardItem):
        t0 = time.monotonic()
        return score(it, self.cfg, self.checker), time.monotonic() - t0


def test_threaded_and_async_actors_keep_the_time_limit(local_ray):
    from rewards.service import RewardWorker

    cfg = RewardConfig(checker_timeout_s=TIMEOUT_S)
    threaded = ray.remote(RewardWorker).options(max_concurrency=2, num_cpus=0.25).remote(cfg)
    scorer = AsyncScorer.remote(TIMEOUT_S)
    try:
        batches = ray.get([threaded.score_batch.remote([item(SLOW, "1"), item("0.5", "1/2")]) for _ in range(2)],
                          timeout=120)
        for records in batches:
            assert [(r.timed_out, r.correct) for r in records] == [(True, False), (False, True)]
        slow, seconds = ray.get(scorer.score.remote(item(SLOW, "1")), timeout=120)
        # the checker's own bound: the limit plus the grace it gives its server (rewards.checker)
        assert slow.timed_out and not slow.correct and slow.check_seconds < TIMEOUT_S + SERVER_GRACE_S
        assert seconds >= slow.check_seconds
        fine, _ = ray.get(scorer.score.remote(item("\\sqrt{8}", "2\\sqrt{2}")), timeout=60)
        assert fine.correct and fine.check_method == "math_verify"
    finally:
        ray.kill(threaded)
        ray.kill(scorer)
