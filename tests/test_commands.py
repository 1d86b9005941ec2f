"""One command style (``cluster.command``): every subcommand with a config takes ``--config FILE`` and dotted
overrides, answers ``--show-config`` and ``--print-config``, and refuses an unknown key with the nearest valid
one before anything starts (no Ray, no engine, no MLflow run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.cli import main

ROOT = Path(__file__).resolve().parent.parent

#: (argv prefix, a config file that resolves, a key of its config, a mistyped key and the suggestion)
COMMANDS = [
    (["sft"], "experiments/sft_tiny.yaml", "learner.lr", "stepz=3", "did you mean 'steps'"),
    (["rl"], "experiments/rl_tiny.yaml", "grpo.advantage", "grpo.advantag=std", "did you mean 'grpo.advantage'"),
    (["sweep"], "experiments/sweep_tiny.yaml", "rl_config", "max_concurent=2", "did you mean 'max_concurrent'"),
    (["run"], "experiments/pipeline_tiny.yaml", "sft.steps", "sft.stepz=3", "did you mean 'sft.steps'"),
    (["datagen", "stage1"], "experiments/datagen_stage1_rule.yaml", "rewriter", "rewritr=rule",
     "did you mean 'rewriter'"),
    (["datagen", "stage2"], "experiments/datagen_stage2_tiny.yaml", "rollout.max_tokens", "rollout.max_token=3",
     "did you mean 'rollout.max_tokens'"),
]


@pytest.fixture
def nothing_starts(monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("something started before the config was checked")

    monkeypatch.setattr(ray, "init", refuse)
    for module in ("rollout.engine", "rollout.workers", "cluster.demo", "cluster.evaluate"):  # every binding of it
        monkeypatch.setattr(f"{module}.make_llm", refuse)
    monkeypatch.setattr("cluster.tracking.Tracker.start", refuse)


@pytest.mark.parametrize("argv,config,key,bad,hint", COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS])
def test_show_print_and_unknown_keys(argv, config, key, bad, hint, capsys, nothing_starts):
    assert main(argv + ["--show-config"]) == 0
    listed = capsys.readouterr().out
    assert any(line.split()[:1] == [key] for line in listed.splitlines()), listed[:300]

    assert main(argv + ["--config", str(ROOT / config), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    value = printed
    for part in key.split("."):
        value = value[part]
    assert value == yaml.safe_load(yaml.safe_dump(value))  # a plain, resolved value

    assert main(argv + ["--config", str(ROOT / config), bad]) == 2
    err = capsys.readouterr().err.strip()
    assert hint in err and "\n" not in err and "Traceback" not in err


def test_overrides_win_over_the_config_file_in_print_config(capsys):
    assert main(["sft", "-c", str(ROOT / "experiments/sft_tiny.yaml"), "steps=7", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["steps"] == 7


def test_resume_is_resume_auto_where_a_run_can_resume_and_reuse_for_the_pipeline(capsys):
    for argv, key, value in ((["sft"], "resume", "auto"), (["rl", "rollout.n=2"], "resume", "auto"),
                             (["run"], "reuse", True)):
        assert main(argv + ["--resume", "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)[key] == value


def test_ray_is_configured_as_ray_address_in_every_command_that_starts_ray(capsys):
    for argv in (["sft"], ["rl", "rollout.n=2"], ["generate"], ["datagen", "stage2"], ["run"]):
        assert main(argv + ["ray.address=auto", "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["ray"]["address"] == "auto"


def test_eval_has_the_same_style(capsys, nothing_starts):
    assert main(["eval", "--show-config"]) == 0
    keys = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]
    assert "rollout.max_thread_tokens" in keys and "max_thread_tokens" not in keys  # nested, not restated
    assert main(["eval", "model=m", "data=[tiny=t.jsonl]", "rollout.n=4", "rollout.temperature=1",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["rollout"]["n"] == 4 and printed["data"] == ["tiny=t.jsonl"]
    assert main(["eval", "model=m", "rollout.max_token=3"]) == 2
    assert "did you mean 'rollout.max_tokens'" in capsys.readouterr().err


def test_generate_has_the_same_style_with_the_rollout_config_nested(capsys, nothing_starts):
    assert main(["generate", "--show-config"]) == 0
    keys = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]
    assert "rollout.max_thread_tokens" in keys and "ray.address" in keys
    assert main(["generate", "model=m", "rollout.n=3", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["rollout"]["n"] == 3


def test_the_answer_checker_timeout_has_one_name(capsys):
    for argv, key in ((["datagen", "stage1"], "checker_timeout_s"), (["datagen", "stage2"], "checker_timeout_s"),
                      (["sft"], "eval.checker_timeout_s"), (["rl", "rollout.n=2"], "reward.checker_timeout_s"),
                      (["eval"], "checker_timeout_s")):
        assert main(argv + [f"{key}=7", "--print-config"]) == 0, argv
        printed = yaml.safe_load(capsys.readouterr().out)
        for part in key.split(".")[:-1]:
            printed = printed[part]
        assert printed["checker_timeout_s"] == 7.0
    assert main(["datagen", "stage2", "check_timeout_s=3", "--print-config"]) == 2  # the old name: pointed to the new
    assert "it is now 'checker_timeout_s'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,old,new", [(["eval"], "k=3", "rollout.n"), (["sft"], "ray_address=auto", "ray.address"),
                                          (["sft"], "eval.timeout_s=3", "eval.checker_timeout_s"),
                                          (["sft"], "eval.max_tokens=3", "eval.rollout.max_tokens")])
def test_an_old_key_names_its_new_name(argv, old, new, capsys, nothing_starts):
    assert main(argv + [old, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"'{new}'" in err and "\n" not in err, err


def test_sft_eval_nests_the_rollout_config(capsys):
    assert main(["sft", "--show-config"]) == 0
    keys = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]
    assert "eval.rollout.max_thread_tokens" in keys and "eval.max_thread_tokens" not in keys
    assert main(["sft", "eval.rollout.max_tokens=99", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["eval"]["rollout"]["max_tokens"] == 99
    assert main(["sft", "eval.rollout.n=2", "--print-config"]) == 2  # one greedy trajectory per prompt
    assert "rollout.n=2" in capsys.readouterr().err


def test_overrides_may_come_before_and_after_flags(capsys):
    assert main(["sft", "steps=3", "--resume", "learner.lr=1", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["steps"], printed["resume"], printed["learner"]["lr"]) == (3, "auto", 1.0)
