"""Placement groups on Ray's simulated multi-node cluster (``ray.cluster_utils.Cluster``, raylets on one machine).

The head offers no CPUs, so every bundle lands on one of two worker "nodes":
node A with 3 CPUs and ``{"node_a": 1}``, node B with 1 CPU and ``{"node_b": 1}``.
"""

import contextlib

import pytest

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def simulated_cluster(head: dict, nodes: dict[str, dict]):
    """A head with no CPUs (plus ``head``'s node arguments) and one raylet per ``nodes`` entry (its ``add_node``
    arguments), Ray connected to it; yields the cluster and each node's id by name."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **head})
    added = {name: c.add_node(**args) for name, args in nodes.items()}
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c, {name: n.node_id for name, n in added.items()}
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def cluster():
    with simulated_cluster({}, {"a": dict(num_cpus=3, resources={"node_a": 1}),
                                "b": dict(num_cpus=1, resources={"node_b": 1})}) as c:
        yield c


class Where:
    """Reports the node it runs on."""

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def test_roles_are_placed_where_the_plan_says(cluster):
    import ray

    from cluster.placement import group_plans, reserve
    from cluster.ray_setup import RayConfig, Role, placement_report

    _, node_id = cluster
    roles = [Role("learner rank", 2, 1.0, 0.0, "learner"), Role("reward actor", 2, 0.5, 0.0, "reward")]
    plans = group_plans(roles, "STRICT_PACK")
    reservation = reserve(plans, timeout_s=60)
    try:
        actor = ray.remote(num_cpus=0.5)(Where)
        placed = {key: [ray.get(actor.options(**o).remote().node.remote()) for o in options]
                  for key, options in reservation.actor_options.items()}
        # the learner's two 1-CPU ranks (STRICT_PACK) fit only on node A together
        assert placed["learner"] == [node_id["a"]] * 2
        # reward actors spread over the two nodes
        assert sorted(placed["reward"]) == sorted([node_id["a"], node_id["b"]])
        # and each actor sits where the reservation says its bundle is
        for key, nodes in reservation.node_of.items():
            assert [n.split("(")[1].rstrip(")") for n in nodes] == [p[:8] for p in placed[key]]
    finally:
        reservation.release()
    report = placement_report(RayConfig(learner_strategy="STRICT_PACK"), roles)
    assert f"({node_id['a'][:8]})" in report and "learner rank     bundle 1: 1 CPU (STRICT_PACK) on node" in report


def test_an_unplaceable_bundle_is_refused_before_anything_starts(cluster):
    from ray.util.placement_group import placement_group_table

    from cluster.placement import group_plans, reserve
    from cluster.ray_setup import Role

    groups_before = len(placement_group_table())
    plans = group_plans([Role("reward actor", 1, 1.0, 0.0, "reward"), Role("learner rank", 1, 4.0, 0.0, "learner")])
    with pytest.raises(RuntimeError, match=r"learner rank bundle 0 \(4 CPU\) is larger than every node"):
        reserve(plans, timeout_s=10)
    assert len(placement_group_table()) == groups_before  # no group was created, not even the reward's
    # a STRICT_PACK learner of 2 x 2 CPUs fits in the cluster's 4 CPUs, but on no single node
    with pytest.raises(RuntimeError, match="STRICT_PACK needs 4 CPU on one node"):
        reserve(group_plans([Role("learner rank", 2, 2.0, 0.0, "learner")], "STRICT_PACK"), timeout_s=10)


def test_the_reward_pool_goes_into_its_bundles(cluster):
    """The real reward actors (math-verify servers), scheduled by ``RewardPool(actor_options=...)``."""
    from ray._private.state import state

    from cluster.placement import group_plans, reserve
    from cluster.ray_setup import Role
    from rewards.config import RewardConfig
    from rewards.service import RewardPool

    _, node_id = cluster
    reservation = reserve(group_plans([Role("reward actor", 2, 0.5, 0.0, "reward")]), timeout_s=60)
    try:
        with RewardPool(RewardConfig(num_actors=2, actor_cpus=0.5, max_attempts=1),
                        actor_options=reservation.actor_options["reward"]) as pool:
            pool.wait_ready()
            nodes = [state.actor_table(a._actor_id.hex())["Address"]["NodeID"] for a in pool.actors]
        assert sorted(nodes) == sorted([node_id["a"], node_id["b"]])  # SPREAD: one per node
        assert [n[:8] for n in nodes] == [x.split("(")[1].rstrip(")") for x in reservation.node_of["reward"]]
    finally:
        reservation.release()


def _check(command, cluster, tmp_path, *overrides):
    import subprocess
    import sys
    from pathlib import Path

    c, _ = cluster
    cmd = [str(Path(sys.executable).parent / "threadweaver"), command, "--config", f"experiments/{command}_tiny.yaml",
           "--check", f"ray.address={c.address}", f"run_dir={tmp_path / command}", f"data.dir={tmp_path / 'data'}",
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])


def _sft_check(cluster, tmp_path, *overrides):
    return _check("sft", cluster, tmp_path, "eval.every=0", "eval.at_end=false", *overrides)


def test_check_prints_the_plan_and_refuses_an_unplaceable_bundle(cluster, tmp_path):
    """``threadweaver sft --check`` joined to the cluster: the placement plan with its nodes, or, for a learner that
    fits in the cluster's CPUs but on no node, one line naming the bundle, exit 2, and no group or actor left."""
    from ray._private.state import state
    from ray.util.placement_group import placement_group_table

    _, node_id = cluster
    groups_before, actors_before = len(placement_group_table()), len(state.actor_table(None))
    ok = _sft_check(cluster, tmp_path, "learner.ranks=2", "learner.cpus_per_rank=1",
                    "ray.learner_strategy=STRICT_PACK")
    assert ok.returncode == 0, ok.stderr
    assert "roles fit" in ok.stdout and "SFT learner" in ok.stdout
    assert ok.stdout.count(f"STRICT_PACK) on node") == 2 and ok.stdout.count(f"({node_id['a'][:8]})") == 2
    bad = _sft_check(cluster, tmp_path, "learner.ranks=2", "learner.cpus_per_rank=2",
                     "ray.learner_strategy=STRICT_PACK")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "threadweaver sft: " in bad.stderr and "STRICT_PACK needs 4 CPU on one node" in bad.stderr
    assert "roles fit" not in bad.stdout
    assert len(placement_group_table()) == groups_before + 1  # the good check's group, removed (state REMOVED)
    assert all(g["state"] == "REMOVED" for g in placement_group_table().values())
    assert len(state.actor_table(None)) == actors_before  # nothing was started


def test_rl_check_prints_every_role_and_refuses_a_rollout_bundle_larger_than_every_node(cluster, tmp_path,
                                                                                      tiny_model_dir):
    """``threadweaver rl --check``: the data read, every role's bundles with their nodes; a rollout engine's bundle
    of 3.5 CPU (the roles need 4 CPU, the cluster has 4, the largest node 3) is refused by name, exit 2."""
    from ray._private.state import state

    actors_before = len(state.actor_table(None))
    common = [f"model={tiny_model_dir}", "data.generate=true", "data.train_size=20", "data.validation_size=4",
              "data.test_size=4", "reward.actor_cpus=0.25", "learner.cpus_per_rank=0.25"]
    ok = _check("rl", cluster, tmp_path, *common)
    assert ok.returncode == 0, ok.stderr
    assert "rl check: 20 training and 4 validation records; Ray at" in ok.stdout
    assert all(role in ok.stdout for role in ("rollout worker", "reward actor", "learner rank"))
    assert ok.stdout.count(" on node ") == 3  # one bundle per role, each placed
    bad = _check("rl", cluster, tmp_path, *common, "rollout.cpus_per_worker=3.5")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "threadweaver rl: " in bad.stderr and "rollout worker bundle 0 (3.5 CPU) is larger than every node" \
        in bad.stderr
    assert "roles fit" not in bad.stdout
    assert len(state.actor_table(None)) == actors_before  # nothing was started
