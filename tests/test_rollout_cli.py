"""``threadweaver generate``: options and input checks (the end-to-end run needs Ray and vLLM; see the README)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from cluster.cli import main
from rollout import cli
from rollout.config import RolloutConfig


def parse(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(["--model", "m", "--prompts", "p.jsonl", "--out", "o.jsonl", *argv])


def test_every_config_field_has_an_option_with_its_default():
    args = parse()
    for f in dataclasses.fields(RolloutConfig):
        assert getattr(args, f.name) == f.default
    args = parse("-n", "4", "--sequential", "--workers", "2", "--max-thread-tokens", "64", "--no-enforce-eager",
                 "--seed", "5", "--temperature", "0.5")
    assert (args.n, args.sequential, args.workers, args.max_thread_tokens, args.enforce_eager, args.seed,
            args.temperature) == (4, True, 2, 64, False, 5, 0.5)


def test_bad_input_is_reported_before_anything_starts(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--model", str(tmp_path), "--prompts", str(prompts), "--out", str(out)]) == 2
    assert "p.jsonl:2: needs a string field 'prompt'" in capsys.readouterr().err
    prompts.write_text('{"prompt": "a"}\n')
    assert main(["generate", "--model", str(tmp_path), "--prompts", str(prompts), "--out", str(out)]) == 2
    assert "holds no config.json" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--prompts", str(prompts), "--out", str(out),
                 "--max-tokens", "0"]) == 2
    assert "max_tokens must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not out.exists()


def test_read_prompts_limit(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "answer": 1}\n\n{"prompt": "b"}\n')
    assert cli.read_prompts(prompts, None) == [{"prompt": "a", "answer": 1}, {"prompt": "b"}]
    assert cli.read_prompts(prompts, 1) == [{"prompt": "a", "answer": 1}]
    with pytest.raises(ValueError, match="not valid JSON"):
        prompts.write_text("{oops\n")
        cli.read_prompts(prompts, None)
