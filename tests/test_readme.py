"""Every ``threadweaver`` command of the README's shell blocks, in a fresh clone of the committed repository.

Cheap forms run as written (``--show-config``, ``--print-config``, ``--plan``); a command that would train or
decode runs with ``--print-config`` added (its config files exist in a clone and every key is valid) and,
where a command has no config (``view``, ``init-model``, ...: ``NO_CONFIG``), with ``--help``. Every ``runs/pipeline_tiny/...`` path a command
names must be one the pipeline of ``experiments/pipeline_tiny.yaml`` writes (``make run``), so the commands
work as written after it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.cmd_rl import RLRunConfig
from cluster.config import load_config, override
from cluster.pipeline import PipelineConfig

ROOT = Path(__file__).resolve().parent.parent
CHEAP = ("--show-config", "--print-config", "--plan", "--help")
#: commands outside the one command style (no config, so no --print-config): they run with --help
NO_CONFIG = ("init-model", "make-data", "check", "demo", "bench", "view")


def readme_commands(text: str) -> list[list[str]]:
    """The ``threadweaver`` commands of the README's bash blocks as argument lists (continuation lines joined,
    comments dropped, ``$PWD`` kept as written); a ``ray job submit ... --`` prefix is dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "threadweaver" in [Path(w).name for w in words]:
                start = [Path(w).name for w in words].index("threadweaver")
                out.append(words[start + 1:])
    return out


def pipeline_outputs() -> set[str]:
    """The paths under the run folder that ``threadweaver run --config experiments/pipeline_tiny.yaml`` writes."""
    cfg = load_config(PipelineConfig, ROOT / "experiments/pipeline_tiny.yaml")
    run = cfg.run_dir
    outs = {f"{run}/data", f"{run}/data/test.jsonl", f"{run}/data/train.jsonl", f"{run}/data/validation.jsonl",
            f"{run}/report.md", f"{run}/report.html"}
    rl = {"parallel": cfg.rl, "sequential": override(RLRunConfig, cfg.rl, cfg.rl_sequential)}  # its own steps
    for layout in ("parallel", "sequential"):
        outs.add(f"{run}/sft_{layout}/final/hf")
        step = rl[layout].steps  # save_every=0: the last step's checkpoint only
        outs.add(f"{run}/rl_{layout}/checkpoints/step_{step:08d}/hf")
    return outs


def test_readme_names_commands_for_every_documented_form():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert {c[0] for c in commands} >= {"run", "eval", "view", "sweep", "rl"}
    assert len(commands) >= 12


def test_paths_into_the_pipeline_run_are_what_make_run_writes():
    outputs = pipeline_outputs()
    named = [w for c in readme_commands((ROOT / "README.md").read_text()) for w in c]
    paths = [m for w in named for m in re.findall(r"(runs/pipeline_tiny/[\w./-]+)", w)]
    assert paths, "the README names no pipeline output"
    for path in paths:
        assert path.rstrip("/") in outputs, f"{path} is not written by the pipeline of experiments/pipeline_tiny.yaml"


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh clone of the committed repository (no runs/, no .venv)."""
    where = tmp_path_factory.mktemp("clone") / "repo"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(where)], check=True, timeout=120)
    return where


@pytest.mark.parametrize("command", readme_commands((ROOT / "README.md").read_text()),
                         ids=lambda c: " ".join(c)[:60])
def test_readme_command_in_a_fresh_clone(command, clone, monkeypatch, capsys):
    monkeypatch.chdir(clone)
    args = [w.replace("$PWD", str(clone)) for w in command]
    if not any(flag in args for flag in CHEAP):
        args.append("--help" if args[0] in NO_CONFIG else "--print-config")
    try:
        code = main(args)
    except SystemExit as e:  # argparse's --help
        code = e.code
    captured = capsys.readouterr()
    assert code == 0, f"threadweaver {' '.join(args)} -> {code}: {captured.err[-2000:]}"
    assert captured.out.strip()
