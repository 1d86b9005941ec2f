"""Resuming a run: the metrics file trimmed to the checkpoint, and damaged checkpoints passed over.

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
from rl.metrics_log import MetricsLog, read_records, trim


def _write_log(path: Path, steps: list[int], tail: str = "") -> None:
    path.write_text("".join(json.dumps({"kind": "train", "step": s, "loss": 1.0 / s}) + "\n" for s in steps) + tail)


def test_resume_trims_later_steps_and_a_cut_off_last_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    _write_log(path, [1, 2, 3, 4, 5], tail='{"kind": "train", "step": 6, "lo')  # killed while writing step 6
    with MetricsLog(path, resume_step=3) as log:
        log.write({"kind": "train", "step": 4, "loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_records(path)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.5)]
    err = capsys.readouterr().err
    assert "resuming at step 3: removed 2 record(s) of later steps" in err and "1 line(s) that are not JSON" in err
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_eval_records_of_the_checkpoint_step_stay_and_a_fresh_run_starts_empty(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    _write_log(path, [1, 2])
    with open(path, "a") as f:
        f.write(json.dumps({"kind": "eval", "step": 2, "accuracy": 0.5}) + "\n")
    assert trim(path, 2) == 3 and capsys.readouterr().err == ""  # nothing to drop: the file is left alone
    with MetricsLog(path, resume_step=None) as log:
        log.write({"kind": "eval", "step": 0, "accuracy": 0.0})
    assert read_records(path) == [{"kind": "eval", "step": 0, "accuracy": 0.0}]
    assert "a fresh run: removed 3 record(s)" in capsys.readouterr().err
    path.write_text(json.dumps({"step": 1}))  # complete, but its newline was cut off: kept, newline added
    with MetricsLog(path, resume_step=1) as log:
        log.write({"step": 2})
    assert read_records(path) == [{"step": 1}, {"step": 2}]
    with MetricsLog(tmp_path / "new.jsonl", resume_step=5) as log:  # no file yet
        log.write({"step": 6})
    assert read_records(tmp_path / "new.jsonl") == [{"step": 6}]


def test_reader_skips_a_cut_off_line_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    _write_log(path, [1, 2], tail='{"kind": "tr')
    assert [r["step"] for r in read_records(path)] == [1, 2]
    assert "skipped 1 line(s) that are not JSON objects (line 3" in capsys.readouterr().err


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
