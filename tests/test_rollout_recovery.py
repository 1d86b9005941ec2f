"""Rollout recovery without Ray: which errors count as a dead rollout worker, how the driver's
:class:`rl.services.Rollouts` rebuilds the pool (current weights first, then the retry), when it gives
up, and the orchestrator aborting the vLLM engine's requests in flight when the engine raises.

The pools are fakes that record what they were asked, in order, in one shared log; the Ray and vLLM
exceptions are the real classes, built the way Ray builds them (``RayTaskError.as_instanceof_cause``
is what ``ray.get`` raises for an exception inside an actor method). The engine test runs the real
orchestrator and the real :class:`rollout.engine.VLLMEngine` over a fake ``vllm.LLM``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from rl.services import Rollouts, Services, rollout_died
from rollout.config import RolloutConfig
from rollout.engine import VLLMEngine
from rollout.orchestrator import generate
from rollout.tiny import build_tokenizer
from rollout.units import chat_prompt_ids


def task_error(cause: BaseException) -> RayTaskError:
    """What ``ray.get`` raises when an actor method raised ``cause``."""
    return RayTaskError("RolloutWorker.generate", "Traceback (most recent call last): ...", cause).as_instanceof_cause()


# --------------------------------------------------------------------------- telling a death from other errors


@pytest.mark.parametrize("make", [
    lambda: RayActorError(),                       # the worker actor is gone
    lambda: ActorDiedError(),                      # what Ray raises for a killed actor (a RayActorError)
    lambda: task_error(EngineDeadError()),         # the worker lives, its vLLM engine core died
    lambda: RayTaskError("generate", "tb", EngineDeadError()),  # the plain wrapper, not the dual class
], ids=["actor_error", "actor_died", "engine_dead", "engine_dead_plain_wrapper"])
def test_a_dead_worker_or_engine_counts_as_died(make):
    assert rollout_died(make()) is True


@pytest.mark.parametrize("make", [
    lambda: ValueError("bad prompt"),                          # raised in the driver itself
    lambda: task_error(ValueError("max_context too large")),   # a configuration error inside the worker
    lambda: task_error(EngineGenerateError()),                 # vLLM failed one request; the engine lives
    lambda: task_error(RuntimeError("EngineDeadError mentioned in a message only")),
], ids=["driver_error", "config_error_in_worker", "engine_generate_error", "name_in_message"])
def test_other_errors_do_not_count_as_died(make):
    assert rollout_died(make()) is False


# --------------------------------------------------------------------------- Rollouts with fake pools


class FakePools:
    """Stands in for ``rollout.workers.RolloutPool``: every pool made (the first one too) logs to ``log``.

    ``script[i]`` lists what pool ``i`` does on its calls, in order: an exception to raise, or
    ``"ok"``. A pool answers ``generate`` with ``("trajectories of pool", i)`` and ``update_weights``
    with ``("update of pool", i)``.
    """

    def __init__(self, script: list[list], shutdown_error: BaseException | None = None):
        self.script, self.shutdown_error = script, shutdown_error
        self.log: list[tuple] = []
        self.pools: list[FakePool] = []
        self.actor_options: list = []  # what each pool was given (its placement group bundles)

    def __call__(self, model_dir, cfg, actor_options=()):  # the RolloutPool constructor
        pool = FakePool(self, len(self.pools), list(self.script[len(self.pools)]))
        self.actor_options.append(actor_options)
        self.pools.append(pool)
        self.log.append(("new", pool.index, model_dir, cfg))
        return pool


class FakePool:
    def __init__(self, owner: FakePools, index: int, actions: list):
        self.owner, self.index, self.actions = owner, index, actions

    def _act(self, entry: tuple, answer):
        self.owner.log.append(entry)
        action = self.actions.pop(0)
        if isinstance(action, BaseException):
            raise action
        return answer

    def generate(self, prompts, *, config=None):
        return self._act(("generate", self.index, [list(p) for p in prompts], config), ("trajectories of pool",
                                                                                        self.index))

    def update_weights(self, state_dict):
        return self._act(("update_weights", self.index, dict(state_dict)), ("update of pool", self.index))

    def shutdown(self):
        self.owner.log.append(("shutdown", self.index))
        if self.owner.shutdown_error is not None:
            raise self.owner.shutdown_error


CFG = RolloutConfig(n=2, max_tokens=16, max_context=64)
BUNDLES = [{"scheduling_strategy": "bundle 0"}]  # stands in for the pool's placement group bundles
PROMPTS = [[1, 2, 3], [4, 5]]


def make_rollouts(monkeypatch, script, max_restarts=3, shutdown_error=None):
    """Rollouts over pool 0 of ``script``; later pools are made by the patched RolloutPool.

    ``weights()`` returns a new dict on every call (``{"version": k}``), so a test sees which call's
    weights a rebuilt pool received.
    """
    pools = FakePools(script, shutdown_error)
    first = pools("model-dir", CFG, BUNDLES)
    pools.log.clear()
    monkeypatch.setattr("rl.services.RolloutPool", pools)
    calls = []

    def weights():
        calls.append(len(calls) + 1)
        return {"version": len(calls)}

    services = Services(rollout=first, rewards=None)
    return Rollouts(services, "model-dir", CFG, max_restarts, weights, BUNDLES), pools, services, first


@pytest.mark.parametrize("death", [RayActorError(), task_error(EngineDeadError())], ids=["actor", "engine"])
def test_a_death_during_a_rollout_rebuilds_the_pool_loads_the_current_weights_then_retries(monkeypatch, capsys,
                                                                                         death):
    rollouts, pools, services, first = make_rollouts(monkeypatch, [[death], ["ok", "ok"]])
    gen_cfg = RolloutConfig(n=4, max_tokens=16, max_context=64, seed=7)
    out = rollouts.generate(PROMPTS, gen_cfg)
    assert out == ("trajectories of pool", 1)
    assert pools.log == [
        ("generate", 0, PROMPTS, gen_cfg),
        ("shutdown", 0),
        ("new", 1, "model-dir", CFG),                 # the pool's own config, not the call's
        ("update_weights", 1, {"version": 1}),         # weights taken at rebuild time, before the retry
        ("generate", 1, PROMPTS, gen_cfg),             # the same rollout again
    ]
    assert services.rollout is pools.pools[1] and services.rollout is not first
    assert pools.actor_options == [BUNDLES, BUNDLES]  # the rebuilt pool goes back into the same bundles
    assert rollouts.restarts == 1
    assert "rebuilding the rollout pool (restart 1 of at most 3" in capsys.readouterr().err


def test_each_rebuild_takes_the_weights_of_that_moment(monkeypatch):
    death = RayActorError()
    rollouts, pools, _, _ = make_rollouts(monkeypatch, [[death], ["ok", death], ["ok", "ok"]])
    assert rollouts.generate(PROMPTS, CFG) == ("trajectories of pool", 2)
    loads = [e for e in pools.log if e[0] == "update_weights"]
    assert loads == [("update_weights", 1, {"version": 1}), ("update_weights", 2, {"version": 2})]
    assert rollouts.restarts == 2


@pytest.mark.parametrize("error", [
    ValueError("bad prompt"),
    task_error(ValueError("max_context too large")),
    task_error(EngineGenerateError()),
], ids=["plain", "in_worker", "engine_generate_error"])
def test_other_errors_are_raised_at_once_without_a_rebuild(monkeypatch, error):
    rollouts, pools, services, first = make_rollouts(monkeypatch, [[error]])
    with pytest.raises(type(error)) as caught:
        rollouts.generate(PROMPTS, CFG)
    assert caught.value is error
    assert pools.log == [("generate", 0, PROMPTS, CFG)]  # no shutdown, no new pool, no weights
    assert services.rollout is first and rollouts.restarts == 0


@pytest.mark.parametrize("max_restarts", [0, 1, 2])
def test_the_error_is_raised_after_exactly_max_restarts_rebuilds(monkeypatch, max_restarts):
    deaths = [RayActorError() for _ in range(max_restarts + 1)]
    script = [[deaths[0]]] + [["ok", d] for d in deaths[1:]]
    rollouts, pools, services, _ = make_rollouts(monkeypatch, script, max_restarts=max_restarts)
    with pytest.raises(RayActorError) as caught:
        rollouts.generate(PROMPTS, CFG)
    assert caught.value is deaths[-1]  # the last pool's death, not an earlier one
    assert [e[1] for e in pools.log if e[0] == "new"] == list(range(1, max_restarts + 1))
    assert [e[1] for e in pools.log if e[0] == "generate"] == list(range(max_restarts + 1))
    assert rollouts.restarts == max_restarts
    assert services.rollout is pools.pools[-1]
    assert ("shutdown", max_restarts) not in pools.log  # the last dead pool is left to the caller's teardown


def test_a_shutdown_that_raises_does_not_stop_the_recovery(monkeypatch):
    rollouts, pools, services, _ = make_rollouts(monkeypatch, [[RayActorError()], ["ok", "ok"]],
                                                 shutdown_error=RayActorError())
    assert rollouts.generate(PROMPTS, CFG) == ("trajectories of pool", 1)
    assert [e[0] for e in pools.log] == ["generate", "shutdown", "new", "update_weights", "generate"]
    assert services.rollout is pools.pools[1] and rollouts.restarts == 1


def test_a_death_during_a_weight_sync_rebuilds_and_syncs_the_new_pool(monkeypatch):
    rollouts, pools, services, _ = make_rollouts(monkeypatch, [[task_error(EngineDeadError())], ["ok", "ok"]])
    new_weights = {"version": "from the learner"}
    assert rollouts.update_weights(new_weights) == ("update of pool", 1)
    assert pools.log == [
        ("update_weights", 0, new_weights),
        ("shutdown", 0),
        ("new", 1, "model-dir", CFG),
        ("update_weights", 1, {"version": 1}),   # the rebuild's load of the current weights
        ("update_weights", 1, new_weights),      # then the sync that failed, redone
    ]
    assert rollouts.restarts == 1


def test_a_weight_sync_raising_another_error_is_not_retried(monkeypatch):
    error = task_error(OSError("disk full"))
    rollouts, pools, _, _ = make_rollouts(monkeypatch, [[error]])
    with pytest.raises(OSError) as caught:
        rollouts.update_weights({"w": 1})
    assert caught.value is error and len(pools.log) == 1 and rollouts.restarts == 0


def test_the_limit_holds_per_call_and_the_count_adds_up_over_calls(monkeypatch):
    """``max_restarts`` bounds one rollout or one sync; ``restarts`` is the run's total (logged, checkpointed)."""
    death = RayActorError()
    rollouts, pools, _, _ = make_rollouts(monkeypatch, [[death], ["ok", "ok", death], ["ok", "ok", "ok"]],
                                          max_restarts=1)
    assert rollouts.generate(PROMPTS, CFG) == ("trajectories of pool", 1)
    assert rollouts.update_weights({"w": 2}) == ("update of pool", 2)
    assert rollouts.generate(PROMPTS, CFG) == ("trajectories of pool", 2)
    assert rollouts.restarts == 2


# --------------------------------------------------------------------------- the engine raising mid-rollout


class FakeLLM:
    """The part of ``vllm.LLM`` that :class:`VLLMEngine` uses; ``step`` raises ``error``.

    Requests stay unfinished until aborted; ``aborted`` records each ``abort_request`` call's ids.
    """

    def __init__(self, error: BaseException):
        self.error = error
        self.enqueued: list[str] = []
        self.unfinished: set[str] = set()
        self.aborted: list[list[str]] = []
        self.steps = 0
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096), step=self._step,
                                          has_unfinished_requests=lambda: bool(self.unfinished),
                                          abort_request=self._abort)

    def enqueue(self, prompts, params, use_tqdm=False):
        ids = [f"{len(self.enqueued) + i}-r{len(self.enqueued) + i:07d}" for i in range(len(prompts))]
        self.enqueued += ids
        self.unfinished |= set(ids)
        return ids

    def _step(self):
        self.steps += 1
        if self.steps == 1:
            raise self.error
        return []  # the drain after an abort: nothing more comes out

    def _abort(self, request_ids, internal=False):
        assert internal is True
        self.aborted.append(list(request_ids))
        self.unfinished -= set(request_ids)


@pytest.mark.parametrize("error", [RuntimeError("CPU Generator does not use offset"), EngineDeadError()],
                         ids=["engine_error", "engine_dead"])
def test_the_engine_raising_aborts_every_request_in_flight_and_the_error_reaches_the_caller(error):
    tok = build_tokenizer()
    fake = FakeLLM(error)
    engine = VLLMEngine(fake)
    prompts = [chat_prompt_ids(tok, "what is 1+1?"), chat_prompt_ids(tok, "what is 2+2?")]
    with pytest.raises(type(error)) as caught:
        generate(engine, tok, prompts, RolloutConfig(n=2, max_tokens=32, max_context=256, seed=1))
    assert caught.value is error  # unchanged: the driver tells an engine death by its type
    assert len(fake.enqueued) == 4  # two samples of two prompts, submitted together
    assert fake.aborted == [fake.enqueued]  # once, with vLLM's own ids (counter plus suffix)
    assert not fake.unfinished
    assert engine.wait() == []  # nothing left in flight: the engine can be used (or shut down) cleanly


def test_a_rebuilt_pool_that_dies_while_taking_the_weights_is_rebuilt_again(monkeypatch, capsys):
    """The rebuild itself is inside the retry: pool 1 dies on its first weight load, pool 2 does the work."""
    rollouts, pools, services, first = make_rollouts(monkeypatch, [[RayActorError()], [RayActorError()],
                                                                   ["ok", "ok"]])
    assert rollouts.generate(PROMPTS, CFG) == ("trajectories of pool", 2)
    assert [e[:2] for e in pools.log] == [("generate", 0), ("shutdown", 0), ("new", 1), ("update_weights", 1),
                                          ("shutdown", 1), ("new", 2), ("update_weights", 2), ("generate", 2)]
    assert rollouts.restarts == 2 and services.rollout is pools.pools[2]
    assert pools.log[6][2] == {"version": 2}  # the weights of that moment, taken again for the new pool


def test_when_the_last_rebuild_dies_the_error_is_raised_and_no_dead_pool_is_kept(monkeypatch, capsys):
    from rl.services import stop_services

    rollouts, pools, services, first = make_rollouts(monkeypatch, [[RayActorError()], [RayActorError()]],
                                                     max_restarts=1)
    with pytest.raises(RayActorError):
        rollouts.generate(PROMPTS, CFG)
    assert services.rollout is pools.pools[1] and rollouts.restarts == 1
    services.rewards = type("Rewards", (), {"close": lambda self: None})()
    stop_services(services)  # shuts pool 1 down
    assert pools.log[-1] == ("shutdown", 1)
