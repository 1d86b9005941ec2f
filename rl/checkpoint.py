"""Checkpoints that a run resumes from exactly, and that vLLM loads.

Layout of one checkpoint, ``ROOT/step_00000100/``:

* ``hf/`` -- the weights, config and tokenizer in Hugging Face format (what
  vLLM and ``from_pretrained`` load);
* ``deepspeed/`` -- DeepSpeed's checkpoint of every rank: weights, optimizer
  and learning-rate scheduler states (ZeRO partitions included);
* ``rng/rank_R.pt`` -- each rank's Python, NumPy and torch generator states;
* ``trainer_state.json`` -- the driver's state: the step, the data position,
  metrics, whatever the stage needs to continue; and under ``files`` the size
  of every file above, so a damaged checkpoint is recognised before loading.

``ROOT`` is a storage location (``rollout.storage``): a local folder (every
rank writes its files in place and syncs them to disk, ``rl.durable``) or a
URI (every rank writes into its node's scratch and uploads its own files:
rank 0 the ``hf/`` folder and its shard, every other rank its shard and RNG
file). The driver never reads a rank's files: it lists the sizes in storage,
writes ``trainer_state.json`` there last, then rewrites ``ROOT/latest``
(locally synced and renamed) to name the new checkpoint, so a run killed
while saving -- or a machine that crashed -- leaves the previous checkpoint
as the newest complete one. Loading, every rank reads the checkpoint from
storage (a URI: downloads the files it needs into its node's scratch).

Resuming (:func:`latest`) takes the newest step folder that is complete: one
whose ``trainer_state.json`` is missing or unreadable, or whose files are
missing or of another size than when saved, is passed over with a warning for
the one before it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rl.learner import LearnerGroup
from rollout.storage import Storage

LATEST = "latest"
STATE_FILE = "trainer_state.json"
#: key of the file sizes in ``trainer_state.json`` (checkpoints written before it have none)
FILES = "files"


class Stop(Exception):
    """Raised by a training loop's ``on_step`` hook to end the run at once, as if the process were killed:
    no final checkpoint, no final evaluation (the RL and SFT stages)."""


#: a checkpoint or checkpoint root: a local folder or a storage URI (``rollout.storage``)
Location = "str | Path | Storage"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_dir(root: Location, step: int) -> Path | str:
    """Checkpoint ``step`` under ``root``: a ``Path`` when local, a URI otherwise."""
    return Storage.of(root).child(step_name(step)).location


def save(group: LearnerGroup, root: Location, step: int, trainer_state: dict, keep_last: int = 0) -> Path | str:
    """Write checkpoint ``step`` under ``root`` and point ``root/latest`` at it; returns the checkpoint.

    ``trainer_state`` must be JSON-serialisable. ``keep_last > 0`` deletes
    all but the newest ``keep_last`` checkpoints afterwards.
    """
    root = Storage.of(root)
    path = root.child(step_name(step))
    path.delete()  # a partial checkpoint of a run that died while saving it
    path.make()
    group.save_hf(path.child("hf").location)  # every rank stores (and syncs) what it writes
    group.save_state(path.location, {"step": step})
    files = path.sizes()  # listed in storage: the driver never opens a file a rank wrote on its own node
    path.write_text(STATE_FILE, json.dumps({"step": step, **trainer_state, FILES: files}, indent=2))
    root.write_text(LATEST, path.name)
    if keep_last > 0:
        for old in [d for d in root.dirs() if d.startswith("step_")][:-keep_last]:
            if old != path.name:
                root.child(old).delete()
    return path.location


def _saved(path: Storage) -> dict:
    """``trainer_state.json`` of ``path`` as written; ValueError saying what is wrong with it."""
    try:
        saved = json.loads(path.read_text(STATE_FILE))
    except FileNotFoundError:
        raise ValueError(f"no {STATE_FILE}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable {STATE_FILE} ({type(e).__name__}: {e})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("step"), int):
        raise ValueError(f"{STATE_FILE} holds no step")
    if not isinstance(saved.get(FILES, {}), dict):
        raise ValueError(f"{STATE_FILE} holds no file sizes")
    return saved


def read_state(path: Location) -> dict:
    """The trainer state saved in checkpoint ``path`` (without the file sizes); ValueError if unreadable."""
    state = _saved(Storage.of(path))
    state.pop(FILES, None)
    return state


def problem(path: Location) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is one."""
    path = Storage.of(path)
    try:
        sizes = _saved(path).get(FILES, {})
    except ValueError as e:
        return str(e)
    stored = path.sizes()
    for name, size in sizes.items():
        if name not in stored:
            return f"{name} is missing"
        if stored[name] != size:
            return f"{name} holds {stored[name]} bytes, {size} when saved"
    return None


def latest(root: Location) -> Path | str | None:
    """The newest complete checkpoint under ``root``; None when ``root`` holds no step folder.

    Newer step folders that are not complete (see :func:`problem`) are passed
    over with a warning on stderr; ValueError when there are step folders but
    none is complete.
    """
    root = Storage.of(root)
    passed = []
    for name in sorted((d for d in root.dirs() if d.startswith("step_")), reverse=True):
        path = root.child(name)
        why = problem(path)
        if why is None:
            for damaged in passed:
                print(f"warning: checkpoint {damaged} is damaged or incomplete; using {name}, the newest "
                      "complete one", file=sys.stderr, flush=True)
            return path.location
        passed.append(f"{path} ({why})")
    if passed:
        raise ValueError(f"no usable checkpoint under {root}: " + "; ".join(passed)
                         + ". Move them away (or choose a new run_dir) to start afresh")
    return None


def resume_point(resume: str | None, root: Location, how: str) -> Path | str | None:
    """The checkpoint a stage continues from (None: a fresh start), from its ``resume`` setting.

    ``None``: start fresh, refused when ``root`` already holds checkpoints (``how``
    says how to continue them instead); ``"auto"``: :func:`latest`; a path: that
    checkpoint (a folder or a URI), which must be complete.
    """
    if resume is None:
        if latest(root) is not None:
            raise ValueError(f"{root} already holds checkpoints; pass {how} to continue that run "
                             "or choose a new run_dir")
        return None
    if resume == "auto":
        return latest(root)
    path = Storage.of(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume checkpoint {path} does not exist")
    why = problem(path)
    if why is not None:
        raise ValueError(f"resume checkpoint {path} is not usable: {why}")
    return path.location


def checkpoints_of(run_dir: Location, storage: str | None = None) -> Path | str:
    """Where a stage keeps its checkpoints: ``STORAGE/checkpoints``, or ``RUN_DIR/checkpoints`` without a storage."""
    base = storage if storage else run_dir
    return Storage.of(base).child("checkpoints").location


def resume_of_run(resume: str | None, run_dir: Location, storage: str | None = None) -> Path | str | None:
    """:func:`resume_point` of a stage's ``resume`` setting over its checkpoints (:func:`checkpoints_of`; SFT and
    P-GRPO)."""
    return resume_point(resume, checkpoints_of(run_dir, storage), "--resume (resume=auto)")


def load(group: LearnerGroup, path: Location) -> dict:
    """Restore the learner from checkpoint ``path``; returns its trainer state."""
    path = Storage.of(path)
    why = problem(path)
    if why is not None:
        raise ValueError(f"{path} is not a complete checkpoint: {why}")
    state = read_state(path)
    client = group.load_state(path.location)
    if client.get("step") != state["step"]:
        raise ValueError(f"{path}: DeepSpeed state is at step {client.get('step')}, "
                         f"{STATE_FILE} at step {state['step']}")
    return state


def store_outputs(run_dir: Location, storage: str | None) -> None:
    """Copy a stage's run outputs (``config*.yaml``, ``metrics.jsonl``, ``summary.json``, ``eval/``) from
    ``run_dir`` to ``storage`` when one is set (nothing otherwise: they are already in RUN_DIR)."""
    if not storage:
        return
    store, run_dir = Storage.of(storage), Path(run_dir)
    for f in sorted(run_dir.glob("config*.yaml")) + [run_dir / "metrics.jsonl", run_dir / "summary.json"]:
        if f.is_file():
            store.write_bytes(f.name, f.read_bytes())
    if (run_dir / "eval").is_dir():
        store.upload(run_dir / "eval", "eval")


def fetch_metrics(run_dir: Location, storage: str | None) -> None:
    """On resume with a ``storage``: ``metrics.jsonl`` from there when RUN_DIR lacks it (a new driver machine)."""
    local = Path(run_dir) / "metrics.jsonl"
    if storage and not local.exists() and Storage.of(storage).exists("metrics.jsonl"):
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(Storage.of(storage).read_bytes("metrics.jsonl"))
