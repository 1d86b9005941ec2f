"""cluster.config: defaults, YAML files, dotted overrides, type checks and error messages."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from cluster.config import ConfigError, describe, field_docs, load_config, to_dict
from rollout.config import check_ranges


@dataclass
class Sampling:
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature"})
    max_tokens: int = field(default=256, metadata={"help": "generated-token budget (tokens)"})
    stop: list[str] = field(default_factory=lambda: ["</Thread>"], metadata={"help": "stop strings"})


@dataclass
class Learner:
    lr: float = field(default=1e-5, metadata={"help": "learning rate"})
    zero_stage: Literal[0, 1, 2, 3] = field(default=2, metadata={"help": "DeepSpeed ZeRO stage"})
    optimizer: Literal["adamw", "sgd"] = field(default="adamw", metadata={"help": "optimizer"})


@dataclass
class Reference:
    beta: float = field(default=0.0, metadata={"help": "KL weight"})


@dataclass
class Top:
    name: str = field(default="tiny", metadata={"help": "run name"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    spawn: bool = field(default=True, metadata={"help": "spawn threads"})
    checkpoint: Optional[str] = field(default=None, metadata={"help": "checkpoint to resume from"})
    out: Path = field(default=Path("runs"), metadata={"help": "output folder"})
    sampling: Sampling = field(default_factory=Sampling)
    learner: Learner = field(default_factory=Learner)
    ref: Reference | None = field(default=None, metadata={"help": "reference model (null: no KL)"})
    weights: dict[str, float] = field(default_factory=dict, metadata={"help": "reward weights by name"})
    shape: tuple[int, int] = field(default=(1, 2), metadata={"help": "rows, columns"})


@dataclass
class Required:
    model: str = field(metadata={"help": "model path"})
    steps: int = field(default=1, metadata={"help": "steps"})


@dataclass
class Checked:
    workers: int = field(default=1, metadata={"help": "workers"})

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(cls, path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, overrides)
    return str(info.value)


def test_defaults_when_nothing_is_given():
    assert load_config(Top) == Top()


def test_yaml_then_overrides_later_wins(tmp_path):
    path = write(tmp_path, "name: a\nsampling:\n  temperature: 0.7\n  max_tokens: 64\nlearner: {lr: 3.0e-4}\n")
    cfg = load_config(Top, path, ["sampling.max_tokens=32", "seed=7"])
    assert (cfg.name, cfg.seed) == ("a", 7)
    assert (cfg.sampling.temperature, cfg.sampling.max_tokens) == (0.7, 32)
    assert cfg.sampling.stop == ["</Thread>"]  # untouched default
    assert cfg.learner.lr == 3.0e-4 and cfg.learner.zero_stage == 2


def test_several_files_merge_key_by_key(tmp_path):
    base = write(tmp_path, "sampling: {temperature: 0.5, max_tokens: 10}\n", "base.yaml")
    top = write(tmp_path, "sampling: {max_tokens: 20}\n", "top.yaml")
    cfg = load_config(Top, [base, top])
    assert (cfg.sampling.temperature, cfg.sampling.max_tokens) == (0.5, 20)


def test_empty_yaml_file_means_defaults(tmp_path):
    assert load_config(Top, write(tmp_path, "")) == Top()


def test_override_values_are_yaml():
    cfg = load_config(Top, overrides=["sampling.stop=[a, '</Outlines>']", "spawn=false", "checkpoint=null",
                                      "weights.accel=0.5", "shape=[3, 4]", "out=/tmp/x"])
    assert cfg.sampling.stop == ["a", "</Outlines>"]
    assert cfg.spawn is False and cfg.checkpoint is None
    assert cfg.weights == {"accel": 0.5}
    assert cfg.shape == (3, 4) and cfg.out == Path("/tmp/x")


def test_str_override_keeps_its_raw_text():
    cfg = load_config(Top, overrides=["name=2024", "checkpoint=1.10", "sampling.stop=[x]"])
    assert cfg.name == "2024" and cfg.checkpoint == "1.10"
    assert load_config(Top, overrides=["name="]).name == ""
    with pytest.raises(ConfigError, match="learner.optimizer: expected one of 'adamw', 'sgd', got int 5"):
        load_config(Top, overrides=["learner.optimizer=sgd", "learner={optimizer: 5}"])  # raw text replaced too


def test_coercions():
    cfg = load_config(Top, overrides=["sampling.temperature=1", "learner.lr=1e-5"])
    assert cfg.sampling.temperature == 1.0 and isinstance(cfg.sampling.temperature, float)
    assert cfg.learner.lr == 1e-5  # YAML 1.1 reads 1e-5 as a string; float fields accept it
    assert load_config(Top, overrides=["learner.zero_stage=3", "learner.optimizer=sgd"]).learner.zero_stage == 3


def test_optional_nested_dataclass():
    assert load_config(Top).ref is None
    assert load_config(Top, overrides=["ref.beta=0.1"]).ref == Reference(beta=0.1)
    assert load_config(Top, overrides=["ref={}"]).ref == Reference()


def test_unknown_key_in_yaml_names_file_path_and_nearest_key(tmp_path):
    path = write(tmp_path, "sampling:\n  temprature: 0.5\n")
    msg = error(Top, path)
    assert str(path) in msg
    assert "unknown key 'sampling.temprature'" in msg and "did you mean 'sampling.temperature'?" in msg


def test_unknown_override_names_nearest_key():
    msg = error(Top, overrides=["learner.lrr=3"])
    assert "override 'learner.lrr=3'" in msg and "did you mean 'learner.lr'?" in msg


def test_unknown_key_suggests_a_key_at_another_level():
    msg = error(Top, overrides=["max_tokens=3"])
    assert "unknown key 'max_tokens'; did you mean 'sampling.max_tokens'?" in msg


def test_unknown_key_without_a_near_match_lists_valid_keys():
    msg = error(Top, overrides=["learner.zzzzzz=1"])
    assert "valid keys at learner: lr, optimizer, zero_stage" in msg


def test_unknown_key_inside_a_mapping_override():
    msg = error(Top, overrides=["sampling={temprature: 1}"])
    assert "unknown key 'sampling.temprature'; did you mean 'sampling.temperature'?" in msg


@pytest.mark.parametrize("override, expected", [
    ("seed=abc", "seed: expected int, got str 'abc'"),
    ("seed=1.5", "seed: expected int, got float 1.5"),
    ("seed=true", "seed: expected int, got bool True"),
    ("spawn=1", "spawn: expected bool, got int 1"),
    ("sampling.temperature=hot", "sampling.temperature: expected float, got str 'hot'"),
    ("learner.zero_stage=4", "learner.zero_stage: expected one of 0, 1, 2, 3, got int 4"),
    ("learner.optimizer=adam", "learner.optimizer: expected one of 'adamw', 'sgd', got str 'adam'"),
    ("sampling.stop=x", "sampling.stop: expected a list (list[str]), got str 'x'"),
    ("sampling.stop=[1]", "sampling.stop.0: expected str, got int 1"),
    ("shape=[1]", "shape: expected 2 items (tuple[int, int]), got 1"),
    ("weights=3", "weights: expected a mapping (dict[str, float]), got int 3"),
    ("sampling=3", "sampling: expected a mapping of Sampling keys, got int 3"),
    ("seed", "override 'seed' is not of the form key.sub=value"),
    ("seed.x=1", "override 'seed.x=1': 'seed' is a int, it has no sub-key 'x'"),
    ("name=null", "name: expected str, got null"),
])
def test_type_errors_name_the_key(override, expected):
    assert expected in error(Top, overrides=[override])


def test_type_error_from_yaml(tmp_path):
    assert "sampling.max_tokens: expected int, got str 'many'" in error(Top, write(tmp_path, "sampling:\n  max_tokens: many\n"))


def test_required_key():
    assert "missing required key 'model'" in error(Required)
    assert load_config(Required, overrides=["model=m"]) == Required(model="m")


def test_post_init_errors_become_config_errors():
    assert "the top level: workers must be >= 1, got 0" in error(Checked, overrides=["workers=0"])


def test_bad_files(tmp_path):
    assert "does not exist" in error(Top, tmp_path / "missing.yaml")
    assert "top level must be a mapping" in error(Top, write(tmp_path, "- 1\n- 2\n"))
    assert "not valid YAML" in error(Top, write(tmp_path, "a: [1\n"))


def test_to_dict_nested_and_flat():
    cfg = load_config(Top, overrides=["ref.beta=0.2", "weights.accel=0.5"])
    nested = to_dict(cfg)
    assert nested["sampling"] == {"temperature": 1.0, "max_tokens": 256, "stop": ["</Thread>"]}
    assert nested["out"] == "runs" and nested["shape"] == [1, 2]
    flat = to_dict(cfg, flat=True)
    assert flat["learner.lr"] == 1e-5 and flat["ref.beta"] == 0.2 and flat["weights.accel"] == 0.5
    assert all(not isinstance(v, dict) for v in flat.values())
    assert load_config(Top, overrides=[f"{k}={json.dumps(v)}" for k, v in flat.items()]) == cfg  # round trip


def test_describe_lists_every_leaf_with_type_default_and_help():
    docs = {d.key: d for d in field_docs(Top)}
    assert docs["sampling.max_tokens"].type == "int"
    assert docs["sampling.max_tokens"].default == "256"
    assert docs["sampling.max_tokens"].help == "generated-token budget (tokens)"
    assert docs["learner.zero_stage"].type == "0 | 1 | 2 | 3"
    assert docs["checkpoint"].type == "str | None"
    assert docs["sampling.stop"].default == "['</Thread>']"
    assert "sampling" not in docs  # nested dataclasses are expanded
    text = describe(Top)
    lines = text.splitlines()
    assert lines[0].split() == ["key", "type", "default", "help"]
    assert len(lines) == 1 + len(docs)
    assert any(line.startswith("learner.lr") and "learning rate" in line for line in lines)
    assert "(required)" in describe(Required)


@dataclass
class Inner:
    lr: float = field(default=0.1, metadata={"help": "lr", "range": "> 0"})
    name: str = field(default="a", metadata={"help": "name"})


@dataclass
class Outer:
    steps: int = field(default=3, metadata={"help": "steps", "range": ">= 1"})
    inner: Inner = field(default_factory=Inner, metadata={"help": "inner"})

    def __post_init__(self) -> None:
        check_ranges(self)


def test_override_and_with_values_compose_configs_in_memory():
    from cluster.config import override, with_values

    base = Outer(steps=5, inner=Inner(name="b"))
    got = override(Outer, base, ["inner.lr=0.5"])
    assert got == Outer(steps=5, inner=Inner(lr=0.5, name="b")) and base.inner.lr == 0.1  # base untouched
    with pytest.raises(ConfigError, match="did you mean 'inner.lr'"):
        override(Outer, base, ["inner.lrr=1"])
    wired = with_values(got, {"inner.name": "2024", "steps": 9})
    assert wired == Outer(steps=9, inner=Inner(lr=0.5, name="2024")) and got.steps == 5
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        with_values(got, {"steps": 0})  # every section's checks run again


def test_a_section_given_in_part_keeps_the_fields_own_default_section():
    from cluster.evaluate import BenchEvalConfig

    cfg = load_config(BenchEvalConfig, None, ["rollout.max_tokens=160", "tracking.enabled=false"])
    assert (cfg.rollout.max_tokens, cfg.rollout.temperature, cfg.rollout.max_context) == (160, 0.0, 2048)
    assert cfg.tracking.enabled is False
    assert load_config(BenchEvalConfig, None, ["rollout.temperature=1"]).rollout.temperature == 1.0
