"""Rollout overlapped with learning (``rl.max_staleness``, :mod:`rl.overlap`) on small fakes, without Ray.

The fakes keep a *version* of the weights: the learner counts its optimizer
steps and hands that count out as its "state dict"; the rollout workers
record which version they held when they sampled each batch. So the tests
check which weights really sampled each step's batch, not only what the
scheduler believes.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from types import SimpleNamespace as T

import pytest

from rewards.score import ScoreRecord
from rl.overlap import Request, RolloutBatch, Scheduler, behaviour_version
from rollout.orchestrator import Trajectory
from rollout.units import Unit


def test_behaviour_version_per_step():
    assert [behaviour_version(t, 0) for t in range(1, 6)] == [0, 1, 2, 3, 4]  # on-policy: the weights before t
    assert [behaviour_version(t, 1) for t in range(1, 6)] == [0, 0, 1, 2, 3]  # one step behind from step 2 on
    for bad in ((0, 0), (1, 2), (1, -1)):
        with pytest.raises(ValueError):
            behaviour_version(*bad)


# --------------------------------------------------------------------------- the scheduler alone


class Workers:
    """Fake rollout workers: hold a weights version; ``produce`` records it, and whether it ran in a background
    thread while the learner was busy (it then waits, bounded, for the learner to start)."""

    def __init__(self, fail_at: set[int] = frozenset()):
        self.version = 0
        self.sampled: dict[int, int] = {}  # step -> version that sampled its batch
        self.during_learning: dict[int, bool] = {}
        self.busy, self.started_ahead = threading.Event(), threading.Event()
        self.fail_at = set(fail_at)  # steps whose first rollout sees a rebuilt pool

    def produce(self, request: Request, version: int) -> RolloutBatch:
        background = threading.current_thread() is not threading.main_thread()
        self.during_learning[request.step] = background and self.busy.wait(timeout=5)
        self.sampled[request.step] = self.version
        if background:
            self.started_ahead.set()
        rebuilt = request.step in self.fail_at
        self.fail_at.discard(request.step)
        return RolloutBatch(request, version, [], [], rebuilt=rebuilt)


class Learner:
    """Counts its steps; with ``overlap`` it stays busy until the rollout ahead has started (bounded wait)."""

    def __init__(self, workers: Workers, overlap: bool = False, last: int = 0):
        self.version, self.workers, self.trained = 0, workers, []
        self.overlap, self.last = overlap, last

    def learn(self, batch: RolloutBatch) -> int:
        self.trained.append((batch.request.step, batch.request.indices, batch.version))
        self.workers.busy.set()
        if self.overlap and batch.request.step < self.last:
            self.workers.started_ahead.wait(timeout=5)
        self.workers.started_ahead.clear()
        self.workers.busy.clear()
        self.version += 1
        return self.version

    def sync(self, version: int) -> None:
        self.workers.version = version


def planner():
    served = []

    def plan(step: int) -> Request:
        served.append(step)
        return Request(step, [2 * step, 2 * step + 1], 0, len(served) * 2)
    return plan, served


@pytest.mark.parametrize("staleness", [0, 1])
def test_each_step_is_sampled_by_the_weights_the_schedule_names(staleness):
    workers = Workers()
    learner = Learner(workers, overlap=bool(staleness), last=5)
    plan, served = planner()
    schedule = Scheduler(staleness, 5, plan, workers.produce)
    try:
        for step in range(1, 6):
            batch, _ = schedule.step(step, learner.learn, learner.sync)
            assert batch.request.step == step and batch.staleness(step) == (min(step - 1, 1) if staleness else 0)
    finally:
        schedule.close()
    assert workers.sampled == {t: behaviour_version(t, staleness) for t in range(1, 6)}
    assert [v for _, _, v in learner.trained] == [behaviour_version(t, staleness) for t in range(1, 6)]
    # overlapped: steps 2..5 were sampled while the learner trained on the step before; never on-policy
    assert workers.during_learning == {t: bool(staleness) and t > 1 for t in range(1, 6)}
    assert served == [1, 2, 3, 4, 5] and schedule.pending is None  # no rollout beyond the last step


def test_a_rebuilt_pool_drops_its_batch_and_the_same_prompts_are_sampled_after_the_sync():
    workers = Workers(fail_at={3})
    learner = Learner(workers, overlap=True, last=4)
    plan, served = planner()
    schedule = Scheduler(1, 4, plan, workers.produce)
    try:
        for step in range(1, 5):
            schedule.step(step, learner.learn, learner.sync)
            if step == 2:
                assert schedule.pending is None and schedule.retry.step == 3
    finally:
        schedule.close()
    # step 3's overlapped batch came from a rebuilt pool: sampled again by version 2 (staleness 0), same prompts
    assert [(s, v) for s, _, v in learner.trained] == [(1, 0), (2, 0), (3, 2), (4, 2)]
    assert learner.trained[2][1] == [6, 7] and served == [1, 2, 3, 4]


def test_a_failed_learning_waits_for_the_rollout_ahead_and_raises():
    workers = Workers()
    plan, _ = planner()
    schedule = Scheduler(1, 3, plan, workers.produce)

    def boom(batch):
        workers.busy.set()
        raise RuntimeError("learner died")
    with pytest.raises(RuntimeError, match="learner died"):
        schedule.step(1, boom, lambda r: None)
    assert 2 in workers.sampled  # the rollout ahead ended before the error left the step
    schedule.close()


def test_the_schedule_state_round_trips_through_json():
    units = [Unit([1, 2], [3, 4], [-0.25, -1.5], n_inserted=0)]
    traj = Trajectory(0, 1, [1, 2], units, [1, 2, 3, 4], "ab", "eos", "", 2, 2, 0.0, 1.0, 0, [], 0.5)
    score = ScoreRecord(reward=1.0, R_correct=1.0, R_accel=0.0, format_penalty=0.0, correct=True, timed_out=False,
                        format_valid=True, format_error=None, extracted_answer="3", extraction="ok",
                        check_method="exact", check_error=None, check_seconds=0.01, check_cached=False,
                        parallel=False, accel_measured=False)
    schedule = Scheduler(1, 5, lambda s: None, lambda r, v: None)
    schedule.pending = RolloutBatch(Request(3, [4, 5], 1, 6), 1, [traj], [score], 2.5, 0.5)
    restored = Scheduler(1, 5, lambda s: None, lambda r, v: None)
    restored.restore(json.loads(json.dumps(schedule.state())))
    assert restored.pending == schedule.pending and restored.retry is None
    schedule.pending, schedule.retry = None, Request(3, [4, 5], 1, 6)
    restored.restore(json.loads(json.dumps(schedule.state())))
    assert restored.pending is None and restored.retry == Request(3, [4, 5], 1, 6)
    with pytest.raises(ValueError, match="max_staleness"):
        Scheduler(2, 5, lambda s: None, lambda r, v: None)


# --------------------------------------------------------------------------- the driver's loop on fakes


class VersionLearner:
    """A learner whose weights are the number of optimizer steps it took; records the loss options."""

    def __init__(self):
        self.version, self.options = 0, []

    def train_step(self, rows, loss, **options):
        self.options.append(options)
        self.version += 1
        return {"loss": 0.1, "pg_sum": 1.0, "kl_sum": 0.0, "clipped": 0.0, "targets": 4.0, "grad_norm": 1.0,
                "lr": 1e-3, "tokens": 8.0, "lp_absdiff_sum": 0.0, "lp_count": 4.0, "ratio_dev_sum": 0.0,
                "ratio_absdev_sum": 0.0, "ratio_sqdev_sum": 0.0}

    def weights(self, cfg, lock=None):  # the real one returns references to buckets or a broadcast; here the version
        return {"version": self.version}


class VersionRollouts:
    """Rollout workers holding a weights version; every rollout is logged with the version that sampled it."""

    def __init__(self):
        self.version, self.restarts, self.sampled = 0, 0, []

    def generate(self, prompts, config):
        self.sampled.append((config.seed, [list(p) for p in prompts], self.version))
        out = []
        for i, p in enumerate(prompts):
            for j in range(config.n):
                units = [Unit(list(p), [3 + j, 4], [-0.5, -0.5])]
                out.append(Trajectory(i, j, list(p), units, list(p) + [3 + j, 4], "t", "eos", "", 2, 2, 0.0, 1.0, 0,
                                      [], 0.1))
        return out

    def update_weights(self, published):
        self.version = published["version"]
        return T(load_s=0.0)


def _score(reward: float) -> ScoreRecord:
    return ScoreRecord(reward=reward, R_correct=reward, R_accel=0.0, format_penalty=0.0, correct=reward > 0,
                       timed_out=False, format_valid=True, format_error=None, extracted_answer=None,
                       extraction="ok", check_method="exact", check_error=None, check_seconds=0.0,
                       check_cached=False, parallel=False, accel_measured=False)


def _run(tmp_path, staleness: int, steps: int, state: dict | None = None):
    from rl.driver import PromptState, PromptStream, RLConfig, Run
    from rollout.config import RolloutConfig

    cfg = RLConfig(model="m", run_dir=str(tmp_path), steps=steps, prompts_per_step=2, max_staleness=staleness,
                   rollout=RolloutConfig(n=2, seed=7))
    services = T(rewards=T(score_batch=lambda items: [_score(float(i % 2)) for i in range(len(items))]),
                 reference=None)
    records = [{"prompt": chr(97 + i), "answer": "1"} for i in range(10)]
    stream = PromptStream(len(records), 0, PromptState(**state["data"]) if state else None)
    tracker = T(run_id=None, uri=None, log_metrics=lambda m, s: None)
    run = Run(cfg, tracker, VersionLearner(), services, VersionRollouts(), stream, T(), records, [], [], None,
              Counter(), step=state["step"] if state else 0)
    if state:
        run.group.version = run.rollouts.version = state["step"]  # the checkpoint's weights, synced on resume
        run.schedule.restore(state["overlap"])
    return run


def _steps(run, until: int, log_path) -> list[dict]:
    from rl.metrics_log import MetricsLog

    out = []
    with MetricsLog(log_path, None) as run.log:
        try:
            while run.step < until:
                out.append(run.train_step())
        finally:
            run.schedule.close()
    return out


@pytest.mark.parametrize("staleness", [0, 1])
def test_the_driver_samples_each_step_with_the_scheduled_weights_and_logs_the_staleness(
        tmp_path, monkeypatch, staleness):
    monkeypatch.setattr("rl.driver.chat_prompt_ids", lambda tok, text: [ord(text)])
    run = _run(tmp_path, staleness, 4)
    metrics = _steps(run, 4, tmp_path / "m.jsonl")
    # rollout seeds 7 * 1_000_003 + step, in step order; the version that sampled each is the schedule's
    assert [s - 7 * 1_000_003 for s, _, _ in run.rollouts.sampled] == [1, 2, 3, 4]
    assert [v for _, _, v in run.rollouts.sampled] == [behaviour_version(t, staleness) for t in range(1, 5)]
    assert [m["rollout/staleness"] for m in metrics] == ([0, 1, 1, 1] if staleness else [0, 0, 0, 0])
    # a stale batch is learned from with the clipped ratio, an on-policy one without
    assert [o["clip_eps"] for o in run.group.options] == ([None, 0.2, 0.2, 0.2] if staleness else [None] * 4)
    assert [m["data/prompts_seen"] for m in metrics] == [2, 4, 6, 8]  # the batch's own prompts, not the next's
    assert all("ratio/std" in m and "time/rollout_wait_s" in m for m in metrics)


def test_a_resumed_driver_trains_on_the_checkpointed_batch_as_the_uninterrupted_one(tmp_path, monkeypatch):
    monkeypatch.setattr("rl.driver.chat_prompt_ids", lambda tok, text: [ord(text)])
    full = _run(tmp_path / "full", 1, 5)
    _steps(full, 5, tmp_path / "full.jsonl")
    cut = _run(tmp_path / "cut", 1, 5)
    _steps(cut, 2, tmp_path / "cut.jsonl")
    state = json.loads(json.dumps({"step": cut.step, **cut.trainer_state()}))  # as a checkpoint holds it
    assert state["overlap"]["pending"]["request"]["step"] == 3 and state["overlap"]["pending"]["version"] == 1
    resumed = _run(tmp_path / "cut", 1, 5, state)
    _steps(resumed, 5, tmp_path / "resumed.jsonl")
    # steps 1-2 before the cut, step 3's batch from the checkpoint, steps 4-5 sampled after the resume
    assert cut.rollouts.sampled + resumed.rollouts.sampled == full.rollouts.sampled
    assert resumed.group.version == full.group.version == 5
