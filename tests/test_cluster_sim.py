"""P-GRPO on a simulated cluster without a shared filesystem (``ray.cluster_utils.Cluster``: raylets on one machine).

The head offers no CPUs and no role resources. Two worker "nodes": a rollout
node (1 CPU, ``{"rollout": 1}``) and a learner node (3 CPUs, ``{"learner": 2,
"reward": 1}``); ``ray.role_resources`` puts each role's bundles on the node
that offers its resource. Every node, the head included, gets its own scratch
folder through its environment (``THREADWEAVER_SCRATCH``), and every process
of the job (the Ray workers through the job's worker set-up hook, and this
test's process, the driver on the head) runs an audit hook that makes opening,
listing or copying a path under another node's scratch raise: a file written
on one node and read on another fails the test, as it would on a real cluster.
The model is given as a folder in the head's scratch, so actors must get it
shipped; checkpoints go to a ``file://`` storage URI (a folder standing for
remote storage, reached only through pyarrow's filesystem API).

The test runs the uninterrupted 2-step job ("full", a checkpoint per step),
then replaces the rollout node (``remove_node``, then a new node with a fresh
scratch folder), wipes the learner node's scratch, and resumes a second run
from ``full``'s step-1 checkpoint: a copy of ``full``'s storage cut back to
step 1 (``latest`` rewritten) and a new, empty run folder (a new driver
machine). It must reach ``full``'s step-2 weights. One vLLM engine at a time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

#: the folder holding every node's scratch folder (in the nodes' and the driver's environment)
ROOT_ENV = "THREADWEAVER_TEST_SCRATCH_ROOT"
#: audit events whose path arguments the guard checks
GUARDED_EVENTS = ("open", "os.listdir", "os.scandir", "os.rename", "os.remove", "os.rmdir", "shutil.copyfile",
                  "shutil.copytree", "shutil.rmtree", "os.mkdir")


def node_guard(flag: dict | None = None):
    """A set-up hook installing an audit hook: a path under ``$THREADWEAVER_TEST_SCRATCH_ROOT`` but outside this
    process's own ``$THREADWEAVER_SCRATCH`` raises RuntimeError (checked while ``flag["on"]``, when given; each
    such path is also recorded in ``flag["seen"]``). Not PermissionError: pathlib's ``glob`` swallows that one.

    A closure (shipped by value to the workers): running it imports nothing from this test module.
    """

    def install() -> None:
        import os
        import sys

        root, own = os.environ.get("THREADWEAVER_TEST_SCRATCH_ROOT"), os.environ.get("THREADWEAVER_SCRATCH")
        if not root or not own:
            return
        root = os.path.realpath(root) + os.sep
        own = os.path.realpath(own) + os.sep

        def hook(event, args):
            if event not in GUARDED_EVENTS or (flag is not None and not flag.get("on")):
                return
            for a in args[:2]:
                if isinstance(a, (str, bytes, os.PathLike)):
                    path = os.path.realpath(os.fsdecode(a)) + os.sep
                    if path.startswith(root) and not path.startswith(own):
                        if flag is not None:
                            flag.setdefault("seen", []).append(f"{event} {os.fsdecode(a)}")
                        raise RuntimeError(f"{event} {os.fsdecode(a)}: a file of another node's scratch "
                                           f"(this process's node scratch is {own})")

        sys.addaudithook(hook)

    return install


def _job_hook():
    """The project's worker set-up hook (project code first on the path) plus the node guard."""
    from rollout.ray_init import project_first

    first, guard = project_first(), node_guard()

    def hook() -> None:
        first()
        guard()

    return hook


#: the driver's guard, on while the runs go (the test itself then cleans the nodes' scratch)
DRIVER_GUARD = {"on": False}
_installed = []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("scratch")
    scratch = {name: root / name for name in ("head", "rollout_1", "rollout_2", "learner")}
    for d in scratch.values():
        d.mkdir()

    def env(name: str) -> dict:
        return {"env_vars": {"THREADWEAVER_SCRATCH": str(scratch[name]), ROOT_ENV: str(root)}}

    saved = {k: os.environ.get(k) for k in ("THREADWEAVER_SCRATCH", ROOT_ENV)}
    os.environ.update(THREADWEAVER_SCRATCH=str(scratch["head"]), **{ROOT_ENV: str(root)})  # the driver's node
    if not _installed:  # audit hooks cannot be removed: one per process, switched by DRIVER_GUARD
        node_guard(DRIVER_GUARD)()
        _installed.append(True)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **env("head")})
    nodes = {"rollout": c.add_node(num_cpus=1, resources={"rollout": 1}, **env("rollout_1")),
             "learner": c.add_node(num_cpus=3, resources={"learner": 2, "reward": 1}, **env("learner"))}
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env={"worker_process_setup_hook": _job_hook()}, log_to_driver=True)
    try:
        yield c, nodes, scratch, env
    finally:
        DRIVER_GUARD["on"] = False
        ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _config(tmp_path, run: str, model, storage: str, address: str, **kw):
    from cluster.cmd_rl import RLRunConfig
    from cluster.config import load_config

    overrides = [
        f"model={model}", f"run_dir={tmp_path / run}", f"storage={storage}", f"data.dir={tmp_path / 'data'}",
        "data.generate=true", "data.train_size=20", "data.validation_size=2", "data.test_size=2", "steps=2",
        "prompts_per_step=2", "save_every=1", "keep_last=0", "rollout.n=2", "rollout.max_tokens=32",
        "rollout.max_context=192", "rollout.max_thread_tokens=12", "rollout.weight_bucket_mb=0.5",
        "reward.format_penalty=1.0", "reward.num_actors=1", "reward.actor_cpus=1", "learner.ranks=2",
        "learner.zero_stage=1", "learner.lr=3e-3", "learner.row_tokens=512", "learner.threads_per_rank=1",
        "grpo.skip_zero_advantage=false",  # every step learns and syncs, whatever the untrained model samples
        "eval.at_start=false", "eval.every=0", "eval.at_end=false", "progress=false",
        "tracking.experiment=cluster-sim", f"ray.address={address}",
        "ray.role_resources={rollout: {rollout: 1}, learner: {learner: 1}, reward: {reward: 1}}",
    ]
    return load_config(RLRunConfig, None, overrides + [f"{k}={v}" for k, v in kw.items()])


def _weights(storage, checkpoint_rel: str) -> dict:
    from safetensors.torch import load

    return load(storage.read_bytes(f"{checkpoint_rel}/hf/model.safetensors"))


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _actor_nodes() -> dict[str, list[str]]:
    """Node id of every live actor of the job, by class name."""
    from ray._private.state import state

    out: dict[str, list[str]] = {}
    for info in state.actor_table(None).values():
        if info.get("State") == "ALIVE":
            out.setdefault(info["ActorClassName"], []).append(info["Address"]["NodeID"])
    return out


def test_pgrpo_on_nodes_without_a_shared_filesystem_places_stores_and_resumes(cluster, tiny_model_dir, tmp_path,
                                                                              monkeypatch):
    from ray.core.generated.common_pb2 import Address
    from safetensors.torch import load_file

    from rollout.workers import RolloutPool

    from cluster.cmd_rl import run_rl
    from rollout.storage import Storage

    c, nodes, scratch, env = cluster
    model = scratch["head"] / "model"  # on the driver's node only: actors get it shipped
    shutil.copytree(tiny_model_dir, model)
    bucket = tmp_path / "bucket"  # stands for remote storage: only reached through the file:// URI
    full_uri, resumed_uri = f"file://{bucket / 'full'}", f"file://{bucket / 'resumed'}"
    placed: dict[str, list[str]] = {}

    def record_placement(step, metrics):
        placed.update(_actor_nodes())

    # every weight sync hands the workers references to buckets that the learner put: record their owners' nodes
    owners: list[set[str]] = []
    update_weights = RolloutPool.update_weights

    def recording_update(pool, weights):
        owners.append({Address.FromString(ref.owner_address()).node_id.hex() for ref in weights.refs})
        return update_weights(pool, weights)

    monkeypatch.setattr(RolloutPool, "update_weights", recording_update)

    def held_by_the_driver(*args, **kwargs):
        raise AssertionError("the driver fetched the weights")

    for name in ("rl.learner.LearnerGroup.state_dict", "rl.learner.LearnerGroup.weight_buckets",
                 "rollout.weights.publish_state_dict"):
        monkeypatch.setattr(name, held_by_the_driver)

    # --- the uninterrupted run: 2 steps, a checkpoint after each
    DRIVER_GUARD["on"] = True
    full = run_rl(_config(tmp_path, "full", model, full_uri, c.address), on_step=record_placement)
    DRIVER_GUARD["on"] = False
    assert full["steps"] == 2 and full["checkpoint"] == f"{full_uri}/checkpoints/step_00000002/hf"
    # roles sit where their placement groups put them
    assert placed["RolloutWorker"] == [nodes["rollout"].node_id]
    assert placed["Learner"] == [nodes["learner"].node_id] * 2
    # each step's weights went from the learner's node to the rollout worker: the buckets are the learner's
    # objects (not the driver's, whose node is the head), and the driver never fetched a state dict
    assert len(owners) == 2 and all(o == {nodes["learner"].node_id} for o in owners), owners

    # the checkpoints are in storage, every rank's shard and RNG state with them; latest names step 2
    stored = Storage.of(full_uri).child("checkpoints")
    assert stored.read_text("latest") == "step_00000002" and stored.dirs() == ["step_00000001", "step_00000002"]
    files = stored.child("step_00000002").sizes()
    assert {"hf/model.safetensors", "hf/config.json", "rng/rank_0.pt", "rng/rank_1.pt", "trainer_state.json",
            "deepspeed/state/mp_rank_00_model_states.pt"} <= set(files)
    assert {f"deepspeed/state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(files)
    assert Storage.of(full_uri).exists("metrics.jsonl") and Storage.of(full_uri).exists("summary.json")
    # the nodes kept no staged checkpoint; each node got the shipped model in its own scratch
    learner_files = _files(scratch["learner"])
    assert not [f for f in learner_files if f.startswith("threadweaver/staging/") and not f.endswith("/")]
    assert any(f.startswith("threadweaver/inputs/model-") for f in learner_files)
    assert any(f.startswith("threadweaver/inputs/model-") for f in _files(scratch["rollout_1"]))

    # --- the rollout node goes away and a new one (fresh disk) joins; the learner node's scratch is wiped
    c.remove_node(nodes["rollout"])
    nodes["rollout"] = c.add_node(num_cpus=1, resources={"rollout": 1}, **env("rollout_2"))
    c.wait_for_nodes()
    shutil.rmtree(scratch["learner"] / "threadweaver", ignore_errors=True)

    # --- resume: a copy of the storage cut back to step 1, a new (empty) run folder
    resumed_store = Storage.of(resumed_uri)
    for name in Storage.of(full_uri).sizes():
        if not name.startswith("checkpoints/step_00000002/"):
            resumed_store.write_bytes(name, Storage.of(full_uri).read_bytes(name))
    resumed_store.write_text("checkpoints/latest", "step_00000001")
    DRIVER_GUARD["on"] = True
    resumed = run_rl(_config(tmp_path, "resumed", model, resumed_uri, c.address, resume="auto",
                             **{"tracking.enabled": "false"}), on_step=record_placement)
    DRIVER_GUARD["on"] = False
    assert DRIVER_GUARD.get("seen", []) == []  # nothing swallowed a refused read either
    assert resumed["steps"] == 2 and placed["RolloutWorker"] == [nodes["rollout"].node_id]
    assert any(f.startswith("threadweaver/inputs/model-") for f in _files(scratch["rollout_2"]))
    # the resumed run loaded the restored weights into the new rollout node, then synced step 2, both from the
    # learner's node
    assert len(owners) == 4 and all(o == {nodes["learner"].node_id} for o in owners), owners

    a = _weights(Storage.of(full_uri), "checkpoints/step_00000002")
    b = _weights(resumed_store, "checkpoints/step_00000002")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    init = load_file(model / "model.safetensors")
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-5  # it trained
