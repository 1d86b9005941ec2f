"""``scripts/gpu_smoke.py`` runs with only PyTorch and transformers: vLLM, Ray and DeepSpeed hidden from the
import system (a ``sitecustomize`` that makes them not found), on CPU with its tiny shape."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

HIDE = '''import importlib.machinery
HIDDEN = ("vllm", "ray", "deepspeed")
_find_spec = importlib.machinery.PathFinder.find_spec


def find_spec(name, path=None, target=None):
    return None if name.split(".")[0] in HIDDEN else _find_spec(name, path, target)


importlib.machinery.PathFinder.find_spec = staticmethod(find_spec)
'''


def run_hidden(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(HIDE)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_hiding_works(tmp_path):
    for name in ("vllm", "ray", "deepspeed"):
        out = run_hidden(tmp_path, "-c", f"import {name}")
        assert out.returncode != 0 and "No module named" in out.stderr
    assert run_hidden(tmp_path, "-c", "import torch, transformers").returncode == 0


def test_gpu_smoke_runs_on_cpu_without_vllm_ray_or_deepspeed(tmp_path):
    out = run_hidden(tmp_path, str(ROOT / "scripts" / "gpu_smoke.py"), "--device", "cpu", "--small")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith("small ")]
    assert [(x[1], int(x[2]) <= 512) for x in lines] == [("sft", True), ("pgrpo", True)] * 2
    assert all(float(x[4]) > 0 and float(x[6]) > 0 for x in lines)  # a plan and a throughput for every step


def test_gpu_smoke_without_a_gpu_says_so(tmp_path):
    out = run_hidden(tmp_path, str(ROOT / "scripts" / "gpu_smoke.py"))
    assert out.returncode == 2 and out.stderr.strip() == "gpu_smoke: no CUDA device here; use --device cpu --small"


def test_decode_on_needs_vllm(tmp_path):
    out = run_hidden(tmp_path, str(ROOT / "scripts" / "gpu_smoke.py"), "--device", "cpu", "--small", "--decode", "on")
    assert out.returncode == 2 and "--decode on needs vLLM" in out.stderr


@pytest.mark.integration
def test_with_vllm_it_also_decodes_spawn_join_trajectories(tmp_path):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--device", "cpu", "--small",
                          "--decode", "on"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("decode: ")]
    assert line.endswith("; ok") and line.count("('eos', 1, [2])") == 4, line
