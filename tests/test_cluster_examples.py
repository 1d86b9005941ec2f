"""The cluster examples (cluster/examples/) and the README's Ray Jobs example: they parse, and the commands
they run name real subcommands, config files and config keys."""

import json
import re
import shlex
from pathlib import Path

import jsonschema
import ray
import yaml

from cluster.cli import COMMANDS
from cluster.cmd_rl import RLRunConfig
from cluster.config import load_config
from cluster.ray_setup import RuntimeEnvConfig

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "cluster" / "examples"


def rl_command(line: str, app: str = "") -> RLRunConfig:
    """The config a ``threadweaver rl --config FILE key=value ...`` line resolves to (``app``: where the image
    holds the repository)."""
    words = shlex.split(line)
    assert words[:2] == ["threadweaver", "rl"] and words[1] in COMMANDS
    config = words[words.index("--config") + 1]
    path = ROOT / config.removeprefix(app).lstrip("/")
    assert path.is_file(), config
    overrides = [w for w in words[2:] if "=" in w]
    assert len(overrides) + 2 == len(words) - 2, words  # nothing but --config FILE and key=value overrides
    return load_config(RLRunConfig, path, overrides)


def test_ray_up_yaml_follows_the_cluster_launchers_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((EXAMPLES / "ray-up.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert any("scripts/setup.sh" in c for c in cfg["setup_commands"]) and (ROOT / "scripts" / "setup.sh").is_file()
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
               if " start " in c)


def test_rayjob_manifest_runs_a_real_command_on_real_keys():
    job = yaml.safe_load((EXAMPLES / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    cfg = rl_command(job["spec"]["entrypoint"], app="/app")
    assert cfg.model.startswith("/mnt/shared/") and cfg.run_dir.startswith("/mnt/shared/")
    assert cfg.tracking.uri.startswith("http://")  # a server every pod reaches, not a file on one of them
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert set(env) <= set(vars(RuntimeEnvConfig()))  # the same keys as ray.runtime_env
    # the worker group holds every role the config reserves
    limits = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus = cfg.rollout.workers * cfg.rollout.gpus_per_worker + cfg.learner.ranks * cfg.learner.gpus_per_rank
    cpus = (cfg.rollout.workers * cfg.rollout.cpus_per_worker + cfg.learner.ranks * cfg.learner.cpus_per_rank
            + cfg.reward.num_actors * cfg.reward.actor_cpus)
    assert float(limits["nvidia.com/gpu"]) >= gpus and float(limits["cpu"]) >= cpus


def test_readme_ray_jobs_example_gives_absolute_paths():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Ray Jobs", 1)[1].split("\n### ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    submit = block.split("ray job submit", 1)[1]
    line = submit.split(" -- ", 1)[1].replace("\\\n", " ")
    line = line.split("\n", 1)[0].replace("$PWD", "/clone")
    cfg = rl_command(line)
    for path in (cfg.model, cfg.data.dir, cfg.run_dir):
        assert path.startswith("/clone/"), path  # a job runs in a temporary copy: relative paths are lost
    model = cfg.model.removeprefix("/clone/")
    assert f"threadweaver init-model {model}" in block  # the example makes its model from a fresh clone
    assert cfg.data.generate or f"threadweaver make-data {cfg.data.dir.removeprefix('/clone/')}" in block
    assert "RAY_AUTH_MODE" in block
