"""``threadweaver generate``: its typed config and input checks (the end-to-end run needs Ray and vLLM; see the
README)."""

from __future__ import annotations

import pytest

from cluster import cmd_generate
from cluster.cli import main
from cluster.config import load_config
from rollout.config import RolloutConfig


def test_the_rollout_config_is_nested_not_restated():
    cfg = load_config(cmd_generate.GenerateConfig, None, [
        "model=m", "prompts=p.jsonl", "out=o.jsonl", "rollout.n=4", "rollout.sequential=true", "rollout.workers=2",
        "rollout.max_thread_tokens=64", "rollout.enforce_eager=false", "rollout.seed=5", "rollout.temperature=0.5"])
    assert cfg.rollout == RolloutConfig(n=4, sequential=True, workers=2, max_thread_tokens=64, enforce_eager=False,
                                        seed=5, temperature=0.5)
    assert load_config(cmd_generate.GenerateConfig).rollout == RolloutConfig()  # the defaults are the rollout's


def test_bad_input_is_reported_before_anything_starts(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    out = tmp_path / "o.jsonl"
    base = ["generate", f"model={tmp_path}", f"prompts={prompts}", f"out={out}"]
    assert main(base) == 2
    assert "p.jsonl:2: needs a string field 'prompt'" in capsys.readouterr().err
    prompts.write_text('{"prompt": "a"}\n')
    assert main(base) == 2
    assert "holds no config.json" in capsys.readouterr().err
    assert main(base + ["rollout.max_tokens=0"]) == 2
    assert "max_tokens must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["generate", f"prompts={prompts}", f"out={out}"]) == 2
    assert "model is required" in capsys.readouterr().err
    assert main(base + ["rollout.max_token=3"]) == 2
    assert "did you mean 'rollout.max_tokens'" in capsys.readouterr().err
    assert not out.exists()


def test_read_prompts_limit(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "answer": 1}\n\n{"prompt": "b"}\n')
    assert cmd_generate.read_prompts(prompts, None) == [{"prompt": "a", "answer": 1}, {"prompt": "b"}]
    assert cmd_generate.read_prompts(prompts, 1) == [{"prompt": "a", "answer": 1}]
    with pytest.raises(ValueError, match="not valid JSON"):
        prompts.write_text("{oops\n")
        cmd_generate.read_prompts(prompts, None)
