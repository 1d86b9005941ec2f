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

Each rank syncs what it wrote to disk (``rl.durable``); ``trainer_state.json``
is written last, then ``ROOT/latest`` is rewritten (synced, renamed) to name
the new checkpoint, so a run killed while saving -- or a machine that crashed
-- leaves the previous checkpoint as the newest complete one.

Resuming (:func:`latest`) takes the newest step folder that is complete: one
whose ``trainer_state.json`` is missing or unreadable, or whose files are
missing or of another size than when saved, is passed over with a warning for
the one before it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from rl import durable
from rl.learner import LearnerGroup

LATEST = "latest"
STATE_FILE = "trainer_state.json"
#: key of the file sizes in ``trainer_state.json`` (checkpoints written before it have none)
FILES = "files"


class Stop(Exception):
    """Raised by a training loop's ``on_step`` hook to end the run at once, as if the process were killed:
    no final checkpoint, no final evaluation (the RL and SFT stages)."""


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
    group.save_hf(path / "hf")  # the ranks sync what they write
    group.save_state(path, {"step": step})
    files = {f.relative_to(path).as_posix(): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    durable.write_text(path / STATE_FILE, json.dumps({"step": step, **trainer_state, FILES: files}, indent=2))
    durable.fsync_path(root)
    durable.write_text(root / LATEST, path.name)
    if keep_last > 0:
        for old in sorted(root.glob("step_*"))[:-keep_last]:
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    return path


def _saved(path: Path) -> dict:
    """``trainer_state.json`` of ``path`` as written; ValueError saying what is wrong with it."""
    state_file = path / STATE_FILE
    try:
        saved = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no {STATE_FILE}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable {STATE_FILE} ({type(e).__name__}: {e})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("step"), int):
        raise ValueError(f"{STATE_FILE} holds no step")
    if not isinstance(saved.get(FILES, {}), dict):
        raise ValueError(f"{STATE_FILE} holds no file sizes")
    return saved


def read_state(path: str | Path) -> dict:
    """The trainer state saved in checkpoint ``path`` (without the file sizes); ValueError if unreadable."""
    state = _saved(Path(path))
    state.pop(FILES, None)
    return state


def problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is one."""
    path = Path(path)
    try:
        sizes = _saved(path).get(FILES, {})
    except ValueError as e:
        return str(e)
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} holds {f.stat().st_size} bytes, {size} when saved"
    return None


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``; None when ``root`` holds no step folder.

    Newer step folders that are not complete (see :func:`problem`) are passed
    over with a warning on stderr; ValueError when there are step folders but
    none is complete.
    """
    passed = []
    for path in sorted((p for p in Path(root).glob("step_*") if p.is_dir()), reverse=True):
        why = problem(path)
        if why is None:
            for damaged in passed:
                print(f"warning: checkpoint {damaged} is damaged or incomplete; using {path.name}, the newest "
                      "complete one", file=sys.stderr, flush=True)
            return path
        passed.append(f"{path} ({why})")
    if passed:
        raise ValueError(f"no usable checkpoint under {root}: " + "; ".join(passed)
                         + ". Move them away (or choose a new run_dir) to start afresh")
    return None


def resume_point(resume: str | None, root: str | Path, how: str) -> Path | None:
    """The checkpoint a stage continues from (None: a fresh start), from its ``resume`` setting.

    ``None``: start fresh, refused when ``root`` already holds checkpoints (``how``
    says how to continue them instead); ``"auto"``: :func:`latest`; a path: that
    checkpoint, which must be complete.
    """
    if resume is None:
        if latest(root) is not None:
            raise ValueError(f"{root} already holds checkpoints; pass {how} to continue that run "
                             "or choose a new run_dir")
        return None
    if resume == "auto":
        return latest(root)
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume checkpoint {path} does not exist")
    why = problem(path)
    if why is not None:
        raise ValueError(f"resume checkpoint {path} is not usable: {why}")
    return path


def resume_of_run(resume: str | None, run_dir: str | Path) -> Path | None:
    """:func:`resume_point` of a stage's ``resume`` setting over ``RUN_DIR/checkpoints`` (SFT and P-GRPO)."""
    return resume_point(resume, Path(run_dir) / "checkpoints", "--resume (resume=auto)")


def load(group: LearnerGroup, path: str | Path) -> dict:
    """Restore the learner from checkpoint ``path``; returns its trainer state."""
    path = Path(path)
    why = problem(path)
    if why is not None:
        raise ValueError(f"{path} is not a complete checkpoint: {why}")
    state = read_state(path)
    client = group.load_state(path)
    if client.get("step") != state["step"]:
        raise ValueError(f"{path}: DeepSpeed state is at step {client.get('step')}, "
                         f"{STATE_FILE} at step {state['step']}")
    return state
