"""Weight sync from the learner to the rollout workers without the driver holding the weights.

A real two-rank DeepSpeed learner, started on another random tiny model
(seed 1) than the rollout worker's engine (seed 0), publishes its weights
(each rank puts its share of the buckets in Ray's object store); the test
process, in the driver's place, hands the references to a real rollout pool.
``ray.get`` and ``ray.put`` in this process are watched: neither may move a
bucket (bytes) or a tensor. The worker's greedy outputs must then equal
those of the session's engine loaded with the seed-1 model from disk.
"""

from __future__ import annotations

import pytest
import torch

from rollout.config import RolloutConfig
from rollout.ray_init import start_ray
from rollout.units import chat_prompt_ids

PROMPTS = ("Add 2+3+4.", "Something else?")


def carries_weights(value) -> bool:
    """Bytes or tensors anywhere in ``value`` (lists, tuples, dicts): what a bucket or a state dict holds."""
    if isinstance(value, (bytes, bytearray, memoryview, torch.Tensor)):
        return True
    if isinstance(value, dict):
        return any(carries_weights(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(carries_weights(v) for v in value)
    return False


def test_carries_weights_sees_nested_buckets_and_tensors():
    assert carries_weights([("refs", [b"bucket"])]) and carries_weights({"w": torch.zeros(1)})
    assert not carries_weights([["ref-like", 3, 1.5], {"n_bytes": 10}])


@pytest.mark.integration
def test_learner_weights_reach_the_workers_without_the_driver(tiny_model_dir, tokenizer, llm, tmp_path, monkeypatch):
    import ray

    from rl.learner import LearnerConfig, LearnerGroup
    from rollout.engine import VLLMEngine
    from rollout.orchestrator import generate
    from rollout.tiny import init_model
    from rollout.weights import PublishedWeights, reload_in_place
    from rollout.workers import RolloutPool

    other = init_model(tmp_path / "seed1", seed=1)
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    decoding = RolloutConfig(max_context=1024, max_tokens=40, temperature=0.0, sequential=True)
    before = generate(VLLMEngine(llm), tokenizer, prompts, decoding)
    reload_in_place(llm, other)
    try:
        expected = generate(VLLMEngine(llm), tokenizer, prompts, decoding)
    finally:
        reload_in_place(llm, tiny_model_dir)
    first = lambda trajectories: [t.units[0].completion_ids for t in trajectories]  # noqa: E731
    assert first(expected) != first(before)  # the two models decode differently

    start_ray(None, num_cpus=2, include_dashboard=False)
    pool = group = None
    try:
        pool = RolloutPool(tiny_model_dir, RolloutConfig(workers=1, cpus_per_worker=1, max_context=1024))
        assert first(pool.generate(prompts, config=decoding)) == first(before)
        group = LearnerGroup(LearnerConfig(ranks=2, cpus_per_rank=0.5, threads_per_rank=1), other, total_steps=1)

        moved = []
        real_get, real_put = ray.get, ray.put

        def watched_get(refs, *a, **kw):
            value = real_get(refs, *a, **kw)
            if carries_weights(value):
                moved.append(("get", type(value).__name__))
            return value

        def watched_put(value, *a, **kw):
            if carries_weights(value):
                moved.append(("put", type(value).__name__))
            return real_put(value, *a, **kw)

        monkeypatch.setattr(ray, "get", watched_get)
        monkeypatch.setattr(ray, "put", watched_put)
        published = group.publish_weights(bucket_mb=0.1)
        assert isinstance(published, PublishedWeights) and published.n_buckets > 2  # both ranks put buckets
        assert all(isinstance(r, ray.ObjectRef) for r in published.refs)
        update = pool.update_weights(published)
        del published  # every worker has loaded it: the buckets may go
        monkeypatch.undo()
        assert moved == []  # no bucket and no tensor came into (or left from) this process
        assert update.n_buckets > 2 and update.load_s > 0 and update.seconds >= update.publish_s > 0

        after = pool.generate(prompts, config=decoding)
        assert first(after) == first(expected)
    finally:
        monkeypatch.undo()
        if group is not None:
            group.shutdown()
        if pool is not None:
            pool.shutdown()
        ray.shutdown()


@pytest.mark.integration
def test_collective_broadcast_loads_what_the_objects_way_loads(tiny_model_dir, tokenizer, tmp_path):
    """A real rollout pool (tiny model, seed 0) and a real two-rank ZeRO-3 learner on another model (seed 1):
    after the learner's rank 0 broadcasts its weights over a gloo group (``rollout.weight_transfer:
    collective``), the engine decodes exactly (tokens and log-probabilities) what it decodes after the same
    weights arrive through the object store; a rendezvous that nobody (or no receiver) reaches fails within its
    timeout with a clear error, and leaves the engine working."""
    import socket
    from dataclasses import replace

    import ray

    from rl.learner import LearnerConfig, LearnerGroup
    from rollout.collective import Broadcast, Rendezvous
    from rollout.tiny import init_model
    from rollout.workers import RolloutPool

    other = init_model(tmp_path / "seed1", seed=1)
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    decoding = RolloutConfig(max_context=1024, max_tokens=40, temperature=0.0, sequential=True)
    sync = RolloutConfig(weight_bucket_mb=0.1, weight_transfer="collective", weight_transfer_timeout_s=60)
    decoded = lambda pool: [(t.units[0].completion_ids, t.units[0].completion_logprobs)  # noqa: E731
                            for t in pool.generate(prompts, config=decoding)]

    start_ray(None, num_cpus=2, include_dashboard=False)
    pool = group = None
    try:
        pool = RolloutPool(tiny_model_dir, RolloutConfig(workers=1, cpus_per_worker=1, max_context=1024))
        before = decoded(pool)
        group = LearnerGroup(LearnerConfig(ranks=2, cpus_per_rank=0.5, threads_per_rank=1, zero_stage=3), other,
                             total_steps=1)
        weights = group.weights(sync)
        assert isinstance(weights, Broadcast) and weights.backend == "gloo"
        update = pool.update_weights(weights)
        assert update.n_buckets > 2 and update.n_bytes > 0 and update.load_s > 0 and update.seconds > 0
        collective = decoded(pool)
        assert [ids for ids, _ in collective] != [ids for ids, _ in before]  # the new weights decode differently

        pool.update_weights(group.weights(replace(sync, weight_transfer="objects")))
        objects = decoded(pool)
        assert collective == objects

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            nobody = s.getsockname()[1]
        with pytest.raises(ray.exceptions.RayTaskError, match=f"could not reach learner rank 0's store at "
                                                              f"127.0.0.1:{nobody}"):
            ray.get(pool.workers[0].receive_weights.remote(Rendezvous("127.0.0.1", nobody, 2, "gloo", 2.0).as_dict(),
                                                           1))
        lonely = Broadcast(weights.address, weights.send, "gloo", 2.0)
        with pytest.raises(ray.exceptions.RayTaskError, match="learner rank 0 hosting the store waited for all"):
            host, port = lonely.address()
            ray.get(lonely.send(Rendezvous(host, port, 2, "gloo", 2.0)))
        assert decoded(pool) == objects  # the engine survived both and still holds the learner's weights
    finally:
        if group is not None:
            group.shutdown()
        if pool is not None:
            pool.shutdown()
        ray.shutdown()
