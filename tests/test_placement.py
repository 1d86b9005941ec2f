"""Placement groups per role (cluster.placement): the plan from the config, and its refusals (no Ray here)."""

import pytest

from cluster.cmd_rl import RLRunConfig, roles
from cluster.cmd_sft import SFTRunConfig
from cluster.cmd_sft import roles as sft_roles
from cluster.placement import group_plans, plan_text, unplaceable
from cluster.ray_setup import RayConfig, Role, check_fits
from cluster.ray_setup import plan_text as ray_plan_text
from rl.grpo import GRPOConfig
from rl.learner import LearnerConfig
from rewards.config import RewardConfig
from rollout.config import RolloutConfig


def rl_config(kl_coef: float = 0.0) -> RLRunConfig:
    return RLRunConfig(rollout=RolloutConfig(n=2, workers=2, cpus_per_worker=1.0, gpus_per_worker=1.0),
                       reward=RewardConfig(num_actors=3, actor_cpus=1.0),
                       learner=LearnerConfig(ranks=4, cpus_per_rank=2.0, gpus_per_rank=1.0),
                       grpo=GRPOConfig(kl_coef=kl_coef))


def test_a_group_per_role_with_a_bundle_per_actor():
    plans = {p.key: p for p in group_plans(roles(rl_config()))}
    assert set(plans) == {"rollout", "reward", "learner"}
    assert plans["learner"].bundles == [{"CPU": 2.0, "GPU": 1.0}] * 4
    assert plans["learner"].strategy == "PACK"
    assert plans["rollout"].bundles == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert plans["reward"].bundles == [{"CPU": 1.0}] * 3 and plans["reward"].strategy == "SPREAD"


def test_strict_pack_and_the_reference_model():
    plans = {p.key: p for p in group_plans(roles(rl_config(kl_coef=0.1)), "STRICT_PACK")}
    assert plans["learner"].strategy == "STRICT_PACK"
    assert plans["reference"].bundles == [{"CPU": 2.0, "GPU": 1.0}]


def test_roles_that_reserve_nothing_get_no_group():
    plans = group_plans([Role("free", 2, 0.0, 0.0, "reward"), Role("none", 0, 1.0, 0.0, "rollout")])
    assert plans == []
    assert "no role reserves" in plan_text(plans)


def test_sft_roles_have_keys():
    cfg = SFTRunConfig()
    assert [r.key for r in sft_roles(cfg)][0] == "learner"


def test_a_bundle_larger_than_every_node_is_named():
    plans = group_plans([Role("learner rank", 2, 8.0, 0.0, "learner"), Role("reward actor", 1, 1.0, 0.0, "reward")])
    problems = unplaceable(plans, [{"CPU": 4.0}, {"CPU": 6.0, "learner": 2.0}])
    assert len(problems) == 1 and problems[0].startswith("learner rank bundle 0 (8 CPU) is larger than every node")
    assert unplaceable(plans, [{"CPU": 8.0}]) == []


def test_a_gpu_bundle_needs_a_node_with_that_many_gpus():
    plans = group_plans([Role("rollout worker", 1, 1.0, 2.0, "rollout")])
    assert unplaceable(plans, [{"CPU": 16.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 1.0}])
    assert not unplaceable(plans, [{"CPU": 16.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 2.0}])


def test_strict_pack_needs_the_whole_group_on_one_node_pack_does_not():
    learners = [Role("learner rank", 2, 3.0, 0.0, "learner")]
    nodes = [{"CPU": 4.0}, {"CPU": 4.0}]
    assert unplaceable(group_plans(learners, "PACK"), nodes) == []
    problems = unplaceable(group_plans(learners, "STRICT_PACK"), nodes)
    assert len(problems) == 1 and "STRICT_PACK needs 6 CPU on one node" in problems[0]


def test_plan_text_shows_bundle_resources_strategy_and_node():
    plans = group_plans([Role("learner rank", 2, 1.0, 0.0, "learner")])
    text = plan_text(plans, {"learner": ["10.0.0.1", "10.0.0.2"]})
    assert "learner rank     bundle 1: 1 CPU (PACK) on node 10.0.0.2" in text


def test_learner_strategy_is_checked():
    assert RayConfig(learner_strategy="STRICT_PACK").learner_strategy == "STRICT_PACK"
    with pytest.raises(ValueError, match="ray.learner_strategy must be one of PACK, STRICT_PACK"):
        RayConfig(learner_strategy="SPREAD")
    with pytest.raises(ValueError, match="learner placement strategy"):
        group_plans([], "SPREAD")


def tp_config(tp: int = 2, workers: int = 2) -> RLRunConfig:
    return RLRunConfig(rollout=RolloutConfig(n=2, workers=workers, cpus_per_worker=1.0, tensor_parallel_size=tp),
                       reward=RewardConfig(num_actors=1, actor_cpus=1.0))


def test_a_tensor_parallel_engine_gets_its_own_strict_pack_group_of_one_gpu_bundles():
    plans = group_plans(roles(tp_config(tp=3)), role_resources={"rollout": {"rollout_node": 1}})
    engines = [p for p in plans if p.key == "rollout"]
    assert [(p.name, p.group, p.engine, p.strategy) for p in engines] == [
        ("rollout worker 0", "rollout/0", 0, "STRICT_PACK"), ("rollout worker 1", "rollout/1", 1, "STRICT_PACK")]
    # bundle 0: the worker actor's CPUs and the role's custom resource, and the first shard's GPU; then a GPU each
    assert engines[0].bundles == [{"CPU": 1.0, "GPU": 1.0, "rollout_node": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}]
    assert [p.key for p in plans if p.engine is None] == ["reward", "learner"]  # the other roles as before


def test_an_engine_whose_gpus_fit_on_no_single_node_is_refused_by_name():
    plans = group_plans(roles(tp_config(tp=2, workers=1)))
    one_gpu_each = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    problems = unplaceable(plans, one_gpu_each)  # 2 GPUs in the cluster, but not on one node
    assert len(problems) == 1
    assert problems[0].startswith("rollout worker 0: STRICT_PACK needs 1 CPU, 2 GPU on one node, and no node has")
    assert "lower the tensor-parallel size" in problems[0]
    assert unplaceable(plans, one_gpu_each + [{"CPU": 1.0, "GPU": 2.0}]) == []


def test_tensor_parallel_engines_count_their_gpus_in_the_plan():
    rl_roles = roles(tp_config(tp=2, workers=2))
    rollout = next(r for r in rl_roles if r.key == "rollout")
    assert (rollout.tp, rollout.gpus, rollout.total_gpus) == (2, 0.0, 4.0)
    assert "rollout worker   2 x (1 CPU, 2 GPU: a tensor-parallel engine" in ray_plan_text(rl_roles)
    with pytest.raises(RuntimeError, match="4 GPU needed, 3 in the cluster"):
        check_fits(rl_roles, {"CPU": 16.0, "GPU": 3.0})
    check_fits(rl_roles, {"CPU": 16.0, "GPU": 4.0})


def test_an_engines_plan_lines_show_each_bundle_on_its_node():
    plans = group_plans(roles(tp_config(tp=2, workers=2)))
    text = plan_text(plans, {"rollout/0": ["A", "A"], "rollout/1": ["B", "B"]})
    assert "rollout worker 1 bundle 1: 1 GPU (STRICT_PACK) on node B" in text
    assert "rollout worker 0 bundle 0: 1 CPU, 1 GPU (STRICT_PACK) on node A" in text


def test_a_tensor_parallel_worker_actor_reserves_no_gpu_of_its_own():
    with pytest.raises(ValueError, match="rollout.gpus_per_worker must be 0 with tensor_parallel_size 2"):
        RolloutConfig(tensor_parallel_size=2, gpus_per_worker=1.0)
    with pytest.raises(ValueError, match="must reserve none"):
        group_plans([Role("rollout worker", 1, 1.0, 1.0, "rollout", tp=2)])
