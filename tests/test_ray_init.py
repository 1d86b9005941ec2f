"""Ray start-up: workers import the project, not folders of the same name in the working directory, and a
local instance listens on 127.0.0.1 only.

Ray puts the driver's working directory first on every worker's import path.
The integration test starts Ray the way the commands do
(:func:`rollout.ray_init.start_ray`) from a folder holding decoy ``rollout``,
``rewards``, ``rl`` and ``cluster`` packages that raise on import, runs a task
and a reward actor there, and checks the project's code ran and every socket
the instance's processes listen on is on the loopback interface; a plain
``ray.init`` from the same folder is the control: its worker imports a decoy.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.ray_setup import RayConfig, RuntimeEnvConfig
from rollout.ray_init import PROJECT_ROOT, job_runtime_env, project_first

DRIVER = """
import sys

import ray

from rollout.ray_init import start_ray

if sys.argv[1] == "plain":
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
else:
    start_ray(None, num_cpus=1, include_dashboard=False, runtime_env={"env_vars": {"TW_PROBE": "from-runtime-env"}})


@ray.remote
def where():
    try:
        import rollout.units
        return rollout.units.__file__
    except ImportError as e:
        return f"ImportError: {e}"


@ray.remote
def probe():
    import os
    return os.environ.get("TW_PROBE")


try:
    print("task:", ray.get(where.remote(), timeout=120), flush=True)
    print("runtime_env:", ray.get(probe.remote(), timeout=120), flush=True)
    if sys.argv[1] != "plain":
        from rewards.config import RewardConfig
        from rewards.score import RewardItem
        from rewards.service import RewardPool

        with RewardPool(RewardConfig(num_actors=1, actor_cpus=0.5, max_attempts=1)) as pool:
            (record,) = pool.score_batch([RewardItem("<think>x</think>\\\\boxed{4}", "4", finish_reason="eos")])
        print("reward actor: correct", record.correct, flush=True)
        import psutil

        listening = set()
        for p in [psutil.Process()] + psutil.Process().children(recursive=True):
            try:
                listening |= {(c.laddr.ip, p.name()) for c in p.net_connections("inet") if c.status == "LISTEN"}
            except psutil.Error:
                pass
        print("listening:", sorted(listening), flush=True)
finally:
    ray.shutdown()
"""


def test_the_hook_puts_the_project_first_at_its_first_import(monkeypatch):
    monkeypatch.setattr(sys, "path", ["/lib"])
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    project_first()()
    finder = sys.meta_path[0]
    sys.path.insert(0, "/driver/cwd")  # what Ray does after running the hook
    assert finder.find_spec("numpy") is None and sys.path[0] == "/driver/cwd"
    assert finder.find_spec("rollout.units", ["/x"]) is None and sys.path[0] == "/driver/cwd"  # not top-level
    assert finder.find_spec("rollout") is None and sys.path[:2] == [PROJECT_ROOT, "/driver/cwd"]
    finder.find_spec("rewards")
    assert sys.path.count(PROJECT_ROOT) == 1
    assert (Path(PROJECT_ROOT) / "rollout" / "ray_init.py").is_file()


def test_the_runtime_env_of_the_config_is_merged_with_the_hook():
    env = job_runtime_env(RayConfig(runtime_env=RuntimeEnvConfig(pip=["six"], env_vars={"A": "1"})).runtime_env
                          .as_dict())
    assert env["pip"] == ["six"] and env["env_vars"] == {"A": "1"} and "working_dir" not in env
    assert callable(env["worker_process_setup_hook"])
    assert set(job_runtime_env(None)) == {"worker_process_setup_hook"}
    with pytest.raises(ValueError, match="may not set worker_process_setup_hook"):
        job_runtime_env({"worker_process_setup_hook": "x"})


def test_runtime_env_and_log_to_driver_from_the_config():
    from cluster.config import load_config

    cfg = load_config(RayConfig, None, ["runtime_env.env_vars={HF_HOME: /mnt/hf}", "runtime_env.working_dir=/srv/tw"])
    assert cfg.runtime_env.as_dict() == {"env_vars": {"HF_HOME": "/mnt/hf"}, "working_dir": "/srv/tw"}
    assert cfg.log_to_driver  # actors' logs reach `ray job logs` unless turned off


def test_the_hook_beats_decoys_inserted_after_it(decoy_dir):
    """Ray's order in a worker, without Ray: the hook, then the driver's directory first, then imports."""
    code = ("import sys; from rollout.ray_init import project_first; project_first()(); "
            "[sys.modules.pop(m) for m in list(sys.modules) if m.split('.')[0] == 'rollout']; "
            "sys.path.insert(0, sys.argv[1]); import rollout.units, rewards.score; "
            "print(rollout.units.__file__, rewards.score.__file__, sys.path[0])")
    out = subprocess.run([sys.executable, "-P", "-c", code, str(decoy_dir)], cwd=decoy_dir, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=PROJECT_ROOT), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [f"{PROJECT_ROOT}/rollout/units.py", f"{PROJECT_ROOT}/rewards/score.py",
                                  PROJECT_ROOT]


@pytest.fixture
def decoy_dir(tmp_path) -> Path:
    for name in ("rollout", "rewards", "rl", "cluster"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text('raise ImportError("decoy package in the working directory")\n')
    return tmp_path


def run_driver(mode: str, cwd: Path) -> subprocess.CompletedProcess:
    # -P: the driver itself does not import from its working directory (as an installed command does not)
    env = dict(os.environ, PYTHONPATH=PROJECT_ROOT)
    return subprocess.run([sys.executable, "-P", "-c", DRIVER, mode], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.integration
def test_workers_import_the_project_from_a_folder_with_decoy_packages(decoy_dir):
    control = run_driver("plain", decoy_dir)
    assert control.returncode == 0, control.stderr[-3000:]
    assert "task: ImportError: decoy package" in control.stdout  # Ray's behaviour the fix is for

    fixed = run_driver("fixed", decoy_dir)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert f"task: {PROJECT_ROOT}/rollout/units.py" in fixed.stdout
    assert "runtime_env: from-runtime-env" in fixed.stdout  # the config's runtime_env next to the hook
    assert "reward actor: correct True" in fixed.stdout
    listening = ast.literal_eval(fixed.stdout.split("listening: ")[1].splitlines()[0])
    names = {name for _, name in listening}
    assert {"gcs_server", "raylet"} <= names and len(listening) >= 5, listening
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip, _ in listening), listening
