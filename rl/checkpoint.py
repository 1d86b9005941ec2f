"""Checkpoints that a run resumes from exactly, and that vLLM loads.

Layout of one checkpoint, ``ROOT/step_00000100/``:

* ``hf/`` -- the weights, config and tokenizer in Hugging Face format (what
  vLLM and ``from_pretrained`` load);
* ``deepspeed/`` -- DeepSpeed's checkpoint of every rank: weights, optimizer
  and learning-rate scheduler states (ZeRO partitions included);
* ``rng/rank_R.pt`` -- each rank's Python, NumPy and torch generator states;
* ``trainer_state.json`` -- the driver's state: the step, the data position,
  metrics, whatever the stage needs to continue.

``ROOT/latest`` names the newest *complete* checkpoint: it is rewritten
(atomically, by rename) only after everything above is on disk, so a run
killed while saving resumes from the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rl.learner import LearnerGroup

LATEST = "latest"
STATE_FILE = "trainer_state.json"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def save(group: LearnerGroup, root: str | Path, step: int, trainer_state: dict, keep_last: int = 0) -> Path:
    """Write checkpoint ``step`` under ``root`` and point ``root/latest`` at it.

    ``trainer_state`` must be JSON-serialisable. ``keep_last > 0`` deletes
    all but the newest ``keep_last`` checkpoints afterwards.
    """
    root = Path(root)
    path = step_dir(root, step)
    if path.exists():
        shutil.rmtree(path)  # a partial checkpoint of a run that died while saving it
    path.mkdir(parents=True)
    group.save_hf(path / "hf")
    group.save_state(path, {"step": step})
    (path / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(path.name)
    os.replace(tmp, root / LATEST)
    if keep_last > 0:
        for old in sorted(root.glob("step_*"))[:-keep_last]:
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    return path


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None if there is none."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{pointer} names {path}, which has no {STATE_FILE}")
    return path


def load(group: LearnerGroup, path: str | Path) -> dict:
    """Restore the learner from checkpoint ``path``; returns its trainer state."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        raise FileNotFoundError(f"{path} is not a checkpoint (no {STATE_FILE})")
    state = json.loads(state_file.read_text())
    client = group.load_state(path)
    if client.get("step") != state["step"]:
        raise ValueError(f"{path}: DeepSpeed state is at step {client.get('step')}, "
                         f"{STATE_FILE} at step {state['step']}")
    return state
