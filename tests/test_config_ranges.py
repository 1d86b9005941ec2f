"""Range checks of config values (``rollout.config.check_ranges``): every numeric field has one, the loader names
the dotted key, and configs built in memory are checked the same way."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from cluster.cmd_rl import RLRunConfig
from cluster.config import ConfigError, describe, load_config
from cluster.evaluate import BenchEvalConfig
from cluster.pipeline import PipelineConfig
from cluster.sweep import SweepConfig
from rewards.config import RewardConfig
from rl.attention import PackingConfig
from rl.datagen.stage1 import Stage1Config
from rl.learner import LearnerConfig
from rl.sft import SFTConfig
from rollout.config import RolloutConfig, check_range, check_ranges, range_problem
from rollout.task import TaskConfig

TOP_LEVEL = (PipelineConfig, SweepConfig, Stage1Config, PackingConfig, BenchEvalConfig)


def config_classes() -> set[type]:
    """Every config dataclass reachable from the commands' top-level configs."""
    seen: set[type] = set()
    todo = list(TOP_LEVEL)
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for tp in typing.get_type_hints(cls).values():
            for member in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(member):
                    todo.append(member)
    return seen


def numeric(tp) -> bool:
    """int, float, or a type made of them (``int | None``, ``list[float]``)."""
    return tp in (int, float) or any(numeric(a) for a in typing.get_args(tp))


def test_every_numeric_field_of_every_config_has_a_range_its_default_fits():
    classes = config_classes()
    assert {RLRunConfig, SFTConfig, RolloutConfig, RewardConfig, LearnerConfig, TaskConfig} <= classes
    missing = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if numeric(hints[f.name]) and "range" not in f.metadata:
                missing.append(f"{cls.__name__}.{f.name}")
        defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(cls)}
        check_ranges(cls, defaults)  # the defaults fit (and every spec parses)
    assert missing == []


def test_range_problem_reads_as_a_sentence():
    assert range_problem(0.5, "[0, 1]") is None
    assert range_problem(1, "[0, 1)") == "must be an integer in [0, 1), got 1"
    assert range_problem(0, "(0, 1]") == "must be an integer in (0, 1], got 0"
    assert range_problem(float("nan"), "> 0") == "must be a finite number > 0, got nan"
    assert range_problem(math.inf, "finite") == "must be a finite number, got inf"
    assert range_problem(-math.inf, ">= 0") == "must be a finite number >= 0, got -inf"
    assert range_problem(-1.0, "finite") is None
    assert range_problem(True, ">= 0") == "must be a finite number >= 0, got True"
    assert range_problem(2, "<= 1") == "must be an integer <= 1, got 2"
    assert range_problem(10**400, ">= 1") is None
    assert range_problem(-(10**400), ">= 1").startswith("must be an integer >= 1, got -1000")
    with pytest.raises(ValueError, match="--limit must be an integer >= 1, got 0"):
        check_range("--limit", 0, ">= 1")
    with pytest.raises(ValueError, match="unknown range"):
        range_problem(1, "positive")


@pytest.mark.parametrize("cls, override, message", [
    (SFTConfig, "learner.lr=nan", "learner.lr must be a finite number > 0, got nan"),
    (SFTConfig, "learner.lr=-1e-3", "learner.lr must be a finite number > 0, got -0.001"),
    (PipelineConfig, "sft.learner.lr=nan", "sft.learner.lr must be a finite number > 0, got nan"),
    (RLRunConfig, "learner.cpus_per_rank=-1", "learner.cpus_per_rank must be a finite number >= 0, got -1.0"),
    (RLRunConfig, "rollout.cpus_per_worker=-1", "rollout.cpus_per_worker must be a finite number >= 0, got -1.0"),
    (RLRunConfig, "reward.actor_cpus=-0.5", "reward.actor_cpus must be a finite number >= 0, got -0.5"),
    (RLRunConfig, "rollout.temperature=.nan", "rollout.temperature must be a finite number >= 0, got nan"),
    (RLRunConfig, "reward.checker_timeout_s=nan", "reward.checker_timeout_s must be a finite number > 0, got nan"),
    (RLRunConfig, "reward.checker_timeout_s=.inf", "reward.checker_timeout_s must be a finite number > 0, got inf"),
    (RLRunConfig, "rollout.top_p=1.5", "rollout.top_p must be a finite number in (0, 1], got 1.5"),
    (RLRunConfig, "data.task.test_share=1", "data.task.test_share must be a finite number in (0, 1), got 1.0"),
    (PipelineConfig, "data.train_size=-5", "data.train_size must be an integer >= 1, got -5"),
    (PipelineConfig, "eval.checker_timeout_s=nan", "eval.checker_timeout_s must be a finite number > 0, got nan"),
    (PipelineConfig, "rl.grpo.kl_coef=-1", "rl.grpo.kl_coef must be a finite number >= 0, got -1.0"),
    (SweepConfig, "rho=[0.5, .nan]", "rho[1] must be a finite number >= 0, got nan"),
    (Stage1Config, "teacher.timeout_s=0", "teacher.timeout_s must be a finite number > 0, got 0.0"),
])
def test_the_loader_names_the_dotted_key(cls, override, message):
    overrides = [override] + (["rl_config=[x.yaml]"] if cls is SweepConfig else [])
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, overrides)
    assert str(e.value) == message


def test_configs_built_in_memory_are_checked_too():
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got nan"):
        LearnerConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="checker_timeout_s must be a finite number > 0, got nan"):
        RewardConfig(checker_timeout_s=float("nan"))
    with pytest.raises(ValueError, match="pages must be an integer >= 0, got -1"):
        dataclasses.replace(BenchEvalConfig(), pages=-1)
    with pytest.raises(ValueError, match="a_digits must be an integer in \\[1, 12\\], got 0"):
        TaskConfig(a_digits=0)


def test_show_config_states_the_range():
    text = describe(LearnerConfig)
    assert "peak learning rate of AdamW (must be > 0)" in text
    assert "AdamW beta1 (must be in [0, 1))" in text


def test_the_synthetic_task_fields_are_declared_once():
    from cluster.pipeline import TaskDataConfig
    from rl.driver import RLDataConfig
    from rl.sft import DataConfig
    from rl.sft_data import TaskData

    shared = [f.name for f in dataclasses.fields(TaskData)]
    assert shared == ["task", "train_size", "validation_size", "test_size", "seed"]
    for cls in (RLDataConfig, DataConfig, TaskDataConfig):
        assert issubclass(cls, TaskData) and {f.name for f in dataclasses.fields(cls)} >= set(shared)
        assert cls(train_size=5, validation_size=2, test_size=3).sizes == {"train": 5, "validation": 2, "test": 3}
    assert DataConfig(test_size=0).test_size == 0
    with pytest.raises(ValueError, match="test_size must be an integer >= 1, got 0"):  # the pipeline tests on it
        TaskDataConfig(test_size=0)
