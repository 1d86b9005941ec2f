"""Resuming a run: damaged checkpoints passed over.

Fast tests on hand-made files. ``_FakeGroup`` stands in for the learner ranks
(it writes a few files where they write theirs), so :func:`rl.checkpoint.save`
runs as it does in training. The RL and SFT integration tests
(``test_driver.py``, ``test_sft.py``) resume real runs with a damaged newest
checkpoint and a half-written last line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl import checkpoint


# --------------------------------------------------------------------------- checkpoints


class _FakeGroup:
    """Writes what the learner ranks write (an HF folder, a DeepSpeed shard, an RNG file); loads the step back."""

    def save_hf(self, out: Path) -> None:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"w" * 100)
        (out / "config.json").write_text("{}")

    def save_state(self, path: Path, client_state: dict) -> None:
        (path / "deepspeed" / "state").mkdir(parents=True)
        (path / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_text(json.dumps(client_state))
        (path / "rng").mkdir()
        (path / "rng" / "rank_0.pt").write_bytes(b"r" * 10)

    def load_state(self, path: Path) -> dict:
        return json.loads((path / "deepspeed" / "state" / "mp_rank_00_model_states.pt").read_text())


def _saved(root: Path, steps=(2, 4)) -> None:
    for step in steps:
        checkpoint.save(_FakeGroup(), root, step, {"data": {"offset": step}})


def test_save_records_every_file_and_moves_latest_last(tmp_path):
    root = tmp_path / "checkpoints"
    _saved(root)
    assert (root / "latest").read_text() == "step_00000004" and not list(root.glob("*.tmp"))
    saved = json.loads((root / "step_00000004" / "trainer_state.json").read_text())
    assert saved["step"] == 4 and saved["data"] == {"offset": 4}
    assert saved["files"] == {"deepspeed/state/mp_rank_00_model_states.pt": 11, "hf/config.json": 2,
                              "hf/model.safetensors": 100, "rng/rank_0.pt": 10}
    assert checkpoint.latest(root) == root / "step_00000004"
    assert checkpoint.load(_FakeGroup(), root / "step_00000004") == {"step": 4, "data": {"offset": 4}}


@pytest.mark.parametrize("damage, reason", [
    (lambda p: (p / "trainer_state.json").write_text('{"step": 4, "da'), "unreadable trainer_state.json"),
    (lambda p: (p / "trainer_state.json").unlink(), "no trainer_state.json"),
    (lambda p: (p / "deepspeed" / "state" / "mp_rank_00_model_states.pt").unlink(),
     "deepspeed/state/mp_rank_00_model_states.pt is missing"),
    (lambda p: (p / "hf" / "model.safetensors").write_bytes(b"w" * 60), "hf/model.safetensors holds 60 bytes, 100"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys, damage, reason):
    root = tmp_path / "checkpoints"
    _saved(root)
    damage(root / "step_00000004")
    assert reason in checkpoint.problem(root / "step_00000004")
    assert checkpoint.resume_point("auto", root, "resume=auto") == root / "step_00000002"
    err = capsys.readouterr().err
    assert "step_00000004" in err and reason in err and "using step_00000002, the newest complete one" in err
    with pytest.raises(ValueError, match="already holds checkpoints; pass resume=auto"):
        checkpoint.resume_point(None, root, "resume=auto")
    with pytest.raises(ValueError, match="is not usable: " + reason.split(" ")[0]):
        checkpoint.resume_point(str(root / "step_00000004"), root, "resume=auto")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpoint.load(_FakeGroup(), root / "step_00000004")


def test_no_usable_checkpoint_is_an_error_and_none_at_all_a_fresh_start(tmp_path):
    root = tmp_path / "checkpoints"
    assert checkpoint.resume_point("auto", root, "--resume") is None
    assert checkpoint.resume_point(None, root, "--resume") is None
    _saved(root, steps=(2,))
    (root / "step_00000002" / "rng" / "rank_0.pt").unlink()
    (root / "step_00000004").mkdir()  # a save killed before it wrote anything
    with pytest.raises(ValueError, match="no usable checkpoint under .*step_00000004 .*no trainer_state.json.*"
                                         "rng/rank_0.pt is missing.*Move them away"):
        checkpoint.resume_point("auto", root, "--resume")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.resume_point(str(tmp_path / "nowhere"), root, "--resume")


def test_checkpoints_written_before_file_sizes_were_recorded_still_load(tmp_path):
    root = tmp_path / "checkpoints"
    _saved(root, steps=(2,))
    state_file = root / "step_00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["files"]
    state_file.write_text(json.dumps(state))
    assert checkpoint.latest(root) == root / "step_00000002"
    assert checkpoint.load(_FakeGroup(), root / "step_00000002")["step"] == 2
