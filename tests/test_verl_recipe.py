"""experiments/verl/: the Qwen3-8B recipe composes against verl 0.9.1's own config schema and passes its checks.

The run itself needs 8 GPUs; here Hydra composes the recipe over verl's ppo_trainer config (an unknown
or misspelled key fails), verl's validate_config checks it, and the pieces it names load: the reward
function (through verl's loader) and the agent loop YAML (through verl's path resolution).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rl.verl import require

ROOT = Path(__file__).resolve().parents[1]
hydra = require("hydra")


@pytest.fixture(scope="module")
def recipe():
    with hydra.initialize_config_dir(config_dir=str(ROOT / "experiments" / "verl"), version_base=None):
        return hydra.compose(config_name="qwen3_8b_pgrpo", overrides=["actor_rollout_ref.model.path=/models/tw-8b"])


def test_recipe_composes_and_passes_verls_checks(recipe):
    from verl.trainer.main_ppo import validate_config
    from verl.trainer.ppo.utils import need_critic, need_reference_policy

    validate_config(config=recipe, use_reference_policy=need_reference_policy(recipe), use_critic=need_critic(recipe))
    assert recipe.trainer.use_v1 and recipe.algorithm.adv_estimator == "grpo"
    assert recipe.algorithm.norm_adv_by_std_in_grpo is False                 # mean-centred, DESIGN section 6
    assert recipe.actor_rollout_ref.actor.loss_agg_mode == "token-mean"
    assert not recipe.actor_rollout_ref.actor.use_kl_loss and not need_reference_policy(recipe)
    assert recipe.trainer.n_gpus_per_node * recipe.trainer.nnodes == 8


def test_recipe_names_pieces_that_load(recipe):
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.import_utils import resolve_config_path

    import rewards.verl_reward

    fn = get_custom_reward_fn(recipe)
    assert fn.args[0] is rewards.verl_reward.compute_score and fn.args[1] == {"preset": "paper", "timeout_s": 5.0}
    rollout = omega_conf_to_dataclass(recipe.actor_rollout_ref.rollout)
    assert rollout.calculate_log_probs and rollout.agent.default_agent_loop == "threadweaver"
    path = Path(resolve_config_path(rollout.agent.agent_loop_config_path))
    assert path.samefile(ROOT / "experiments" / "verl" / "agent_loop.yaml")
    assert rollout.response_length + rollout.prompt_length <= rollout.max_model_len
