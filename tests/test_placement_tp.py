"""Tensor-parallel engines' placement on Ray's simulated cluster with fake GPUs (``ray.cluster_utils.Cluster``).

The head offers no CPUs or GPUs; node A and node C have 2 CPUs and 2 GPUs,
node B 2 CPUs and 1 GPU. The GPUs are only Ray resources: vLLM cannot start an
engine on them, so these tests check the plan, the groups, the nodes, and what
vLLM's own Ray executor code reads from inside the worker actor, not a running
tensor-parallel engine (this project has never run one: no GPU machine).
"""

import pytest

from tests.test_placement_cluster import simulated_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gpu_cluster():
    with simulated_cluster({"num_gpus": 0}, {name: dict(num_cpus=2, num_gpus=gpus)
                                             for name, gpus in (("a", 2), ("b", 1), ("c", 2))}) as c:
        yield c


class EngineProbe:
    """Stands where a rollout worker would, and runs what vLLM 0.32's Ray executor runs to find its GPUs."""

    def shard_bundles(self, tp: int) -> dict:
        """The placement group vLLM would take (``get_current_placement_group``, as ``EngineArgs`` does inside
        a Ray actor), checked by vLLM's ``initialize_ray_cluster``, and the bundles (with their nodes) that its
        ``RayExecutorV2`` starts one shard worker in each (``get_bundles_sorted_by_node``).

        vLLM's CPU platform has no Ray device key (vLLM refuses Ray on CPU), so the platform's key is set to
        ``GPU`` here, as on a CUDA machine."""
        from types import SimpleNamespace

        import ray
        from vllm.platforms import current_platform
        from vllm.v1.executor import ray_utils

        type(current_platform).ray_device_key = "GPU"
        pg = ray.util.get_current_placement_group()
        parallel = SimpleNamespace(placement_group=None, world_size=tp, tensor_parallel_size=tp,
                                   ray_runtime_env=None)
        ray_utils.initialize_ray_cluster(parallel, require_gpu_on_driver=False)
        return {"group": pg.id.hex() if pg else None, "same": parallel.placement_group.id == pg.id,
                "capture": ray.get_runtime_context().should_capture_child_tasks_in_placement_group,
                "node": ray.get_runtime_context().get_node_id(),
                "shards": [(i, node) for i, node, _ in ray_utils.get_bundles_sorted_by_node(parallel.placement_group)]}


def test_each_engine_gets_its_tp_gpus_on_one_node_and_vllm_finds_them_from_its_actor(gpu_cluster):
    import ray

    from cluster.placement import group_plans, reserve
    from cluster.ray_setup import Role

    _, node_id = gpu_cluster
    plans = group_plans([Role("rollout worker", 2, 0.5, 0.0, "rollout", tp=2)])
    reservation = reserve(plans, timeout_s=60)
    try:
        groups = reservation.groups
        assert set(groups) == {"rollout/0", "rollout/1"}
        # each engine's two GPU bundles on one node; the two engines on the two nodes that have 2 GPUs
        nodes = [reservation.node_of[f"rollout/{i}"] for i in range(2)]
        assert all(len(set(n)) == 1 for n in nodes)
        assert sorted(n[0].split("(")[1].rstrip(")") for n in nodes) == sorted(node_id[k][:8] for k in "ac")
        probe = ray.remote(num_cpus=0.5, num_gpus=0)(EngineProbe)
        options = reservation.actor_options["rollout"]
        assert len(options) == 2
        for i, o in enumerate(options):
            seen = ray.get(probe.options(**o).remote().shard_bundles.remote(2))
            group = groups[f"rollout/{i}"]
            assert seen["group"] == group.id.hex() and seen["same"] and seen["capture"]
            # vLLM starts a shard in bundle 0 and bundle 1 of the engine's group, both on the actor's node
            assert sorted(seen["shards"]) == [(0, seen["node"]), (1, seen["node"])]
            assert seen["node"][:8] == reservation.node_of[f"rollout/{i}"][0].split("(")[1].rstrip(")")
    finally:
        reservation.release()


def _rl_check(cluster, tmp_path, model, *overrides):
    import subprocess
    import sys
    from pathlib import Path

    c, _ = cluster
    cmd = [str(Path(sys.executable).parent / "threadweaver"), "rl", "--config", "experiments/rl_tiny.yaml", "--check",
           f"ray.address={c.address}", f"run_dir={tmp_path / 'rl'}", f"data.dir={tmp_path / 'data'}",
           f"model={model}", "data.generate=true", "data.train_size=20", "data.validation_size=4",
           "data.test_size=4", "reward.actor_cpus=0.25", "learner.cpus_per_rank=0.25", "rollout.workers=2",
           "rollout.cpus_per_worker=0.5", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])


def test_rl_check_prints_each_engines_bundles_and_refuses_an_engine_larger_than_every_node(gpu_cluster, tmp_path,
                                                                                         tiny_model_dir):
    """``threadweaver rl --check``: each tensor-parallel engine's GPU bundles, all on one node; an engine of 3
    GPUs (the cluster has 5, no node more than 2) is refused by name, exit 2, before anything starts."""
    from ray._private.state import state

    _, node_id = gpu_cluster
    actors_before = len(state.actor_table(None))
    ok = _rl_check(gpu_cluster, tmp_path, tiny_model_dir, "rollout.tensor_parallel_size=2")
    assert ok.returncode == 0, ok.stderr
    assert "rollout worker   2 x (0.5 CPU, 2 GPU: a tensor-parallel engine" in ok.stdout
    for i in range(2):
        lines = [line for line in ok.stdout.splitlines() if f"rollout worker {i} bundle" in line]
        assert len(lines) == 2 and "0.5 CPU, 1 GPU (STRICT_PACK) on node" in lines[0], ok.stdout
        assert "bundle 1: 1 GPU (STRICT_PACK) on node" in lines[1]
        assert len({line.split(" on node ")[1] for line in lines}) == 1  # both bundles on one node
        assert node_id["b"][:8] not in lines[0]  # the 1-GPU node holds no engine
    # one engine of 3 GPUs: the cluster has 5, no node more than 2
    bad = _rl_check(gpu_cluster, tmp_path, tiny_model_dir, "rollout.tensor_parallel_size=3", "rollout.workers=1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "threadweaver rl: " in bad.stderr
    assert "rollout worker 0: STRICT_PACK needs 0.5 CPU, 3 GPU on one node, and no node has that" in bad.stderr
    assert "roles fit" not in bad.stdout
    assert len(state.actor_table(None)) == actors_before  # nothing was started
