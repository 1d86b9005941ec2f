"""Storage locations (``rollout.storage``) and checkpoints kept in one (``rl.checkpoint``), on hand-made files.

A ``file://`` URI to a folder stands for remote storage: it goes through
pyarrow's filesystem API like ``s3://`` would, and nothing is written there
except through it. Each fake learner rank gets its own scratch folder (the
``THREADWEAVER_SCRATCH`` of its "node"); after a save, the ranks' scratch is
empty and the driver has read nothing but storage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main
from rl import checkpoint
from rollout.storage import SCRATCH_ENV, Storage, fetch_folder, is_uri, scratch_dir


def test_a_local_folder_and_a_file_uri_read_and_write_alike(tmp_path):
    for location in (tmp_path / "local", f"file://{tmp_path / 'remote'}"):
        s = Storage.of(location)
        assert s.is_local == (not is_uri(location))
        s.child("a/b").write_text("x.txt", "hello")
        s.write_bytes("top.bin", b"12345")
        assert s.read_text("a/b/x.txt") == "hello"
        assert s.sizes() == {"a/b/x.txt": 5, "top.bin": 5}
        assert s.dirs() == ["a"] and s.is_dir("a") and not s.is_dir("top.bin") and s.exists("top.bin")
        assert s.child("a").sizes() == {"b/x.txt": 5}
        s.delete("a")
        assert s.sizes() == {"top.bin": 5} and not s.exists("a")
        assert not list(Path(str(s.location).removeprefix("file://")).glob(".*.tmp"))


def test_stage_and_commit_write_in_place_locally_and_through_scratch_remotely(tmp_path, monkeypatch):
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "node"))
    local = Storage.of(tmp_path / "ckpt")
    staged = local.stage()
    assert staged == tmp_path / "ckpt"  # written in place: no copy
    remote = Storage.of(f"file://{tmp_path / 'remote'}")
    staged = remote.stage()
    assert staged.is_relative_to(tmp_path / "node")
    (staged / "sub").mkdir()
    (staged / "sub" / "w.bin").write_bytes(b"w" * 7)
    remote.commit(staged)
    assert remote.sizes() == {"sub/w.bin": 7} and not staged.exists()
    fetched = remote.fetch(keep=lambda name: name != "nothing")
    assert fetched.is_relative_to(tmp_path / "node") and (fetched / "sub" / "w.bin").read_bytes() == b"w" * 7
    remote.release(fetched)
    assert not fetched.exists()
    # a model given as a URI is copied once per node into its scratch
    model = Storage.of(f"file://{tmp_path / 'model'}")
    model.write_text("config.json", "{}")
    first = fetch_folder(model.root)
    assert first.is_relative_to(scratch_dir()) and (first / "config.json").read_text() == "{}"
    assert fetch_folder(model.root) == first
    assert fetch_folder(str(tmp_path / "plain")) == tmp_path / "plain"  # a path: as it is


def test_bad_uris_and_missing_packages_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^storage nosuch://x: cannot open it \(.*\)$") as e:
        Storage.of("nosuch://x").check()
    assert "\n" not in str(e.value)
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"storage gcs://bucket/x: a package is missing for 'gcs://' \(.*gcsfs"):
            Storage.of("gcs://bucket/x").check()
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(ValueError, match="cannot write storage"):
        Storage.of(f"file://{blocked}/sub").check()


def test_rl_refuses_a_bad_storage_before_starting_anything(tmp_path, capsys, monkeypatch, bare_rl_inputs):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray started")))
    model, data = bare_rl_inputs
    ok = ["rollout.n=2", f"data.dir={data}", f"run_dir={tmp_path / 'run'}", f"model={model}"]
    assert main(["rl", *ok, "storage=nosuch://bucket/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "storage nosuch://bucket/run: cannot open it" in err and "\n" not in err and "Traceback" not in err
    assert main(["rl", *ok[:-1], f"model=file://{tmp_path / 'none'}"]) == 2
    assert f"model file://{tmp_path / 'none'} holds no config.json" in capsys.readouterr().err



def test_sft_refuses_a_bad_storage_before_starting_anything(tmp_path, capsys, monkeypatch, bare_rl_inputs):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray started")))
    _, data = bare_rl_inputs
    ok = [f"data.dir={data}", "data.generate=false", f"run_dir={tmp_path / 'run'}"]
    assert main(["sft", *ok, "storage=nosuch://bucket/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "storage nosuch://bucket/run: cannot open it" in err and "\n" not in err and "Traceback" not in err


# --------------------------------------------------------------------------- checkpoints in storage


class _RanksOnTwoNodes:
    """Two learner ranks, each on its own "node" (scratch folder), writing and reading checkpoints as the
    real ranks do: into ``Storage.stage()`` then ``commit``; loading through ``fetch``."""

    def __init__(self, tmp_path: Path, monkeypatch):
        self.scratch = [tmp_path / "node0", tmp_path / "node1"]
        self.monkeypatch = monkeypatch

    def _on(self, rank: int) -> None:
        self.monkeypatch.setenv(SCRATCH_ENV, str(self.scratch[rank]))

    def save_hf(self, out) -> None:
        self._on(0)
        dest = Storage.of(out)
        staged = dest.stage()
        (staged / "model.safetensors").write_bytes(b"w" * 100)
        (staged / "config.json").write_text("{}")
        dest.commit(staged)

    def save_state(self, path, client_state: dict) -> None:
        for rank in (0, 1):
            self._on(rank)
            dest = Storage.of(path)
            staged = dest.stage()
            (staged / "deepspeed" / "state").mkdir(parents=True)
            shard = staged / "deepspeed" / "state" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            shard.write_text(json.dumps(client_state))
            (staged / "rng").mkdir()
            (staged / "rng" / f"rank_{rank}.pt").write_bytes(b"r" * 10)
            dest.commit(staged)

    def load_state(self, path) -> dict:
        states = []
        for rank in (0, 1):
            self._on(rank)
            source = Storage.of(path)
            fetched = source.fetch()
            states.append(json.loads((fetched / "deepspeed" / "state" /
                                      f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").read_text()))
            source.release(fetched)
        assert states[0] == states[1]
        return states[0]


def test_checkpoints_in_a_uri_storage_every_rank_uploads_its_own_shard(tmp_path, monkeypatch):
    group = _RanksOnTwoNodes(tmp_path, monkeypatch)
    uri = f"file://{tmp_path / 'bucket' / 'run'}"
    root = checkpoint.checkpoints_of(tmp_path / "run_dir", uri)
    assert root == f"{uri}/checkpoints"
    for step in (2, 4, 6):
        assert checkpoint.save(group, root, step, {"data": {"offset": step}}, keep_last=2) \
            == f"{root}/step_{step:08d}"
    stored = Storage.of(root)
    assert stored.dirs() == ["step_00000004", "step_00000006"] and stored.read_text("latest") == "step_00000006"
    saved = json.loads(stored.read_text("step_00000006/trainer_state.json"))
    assert saved["files"] == {"deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt": 11,
                              "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt": 11,
                              "hf/config.json": 2, "hf/model.safetensors": 100,
                              "rng/rank_0.pt": 10, "rng/rank_1.pt": 10}
    for node in group.scratch:  # staged files were uploaded and removed: nothing the driver could read
        assert not [p for p in node.rglob("*") if p.is_file()]
    assert checkpoint.latest(root) == f"{root}/step_00000006"
    assert checkpoint.resume_of_run("auto", tmp_path / "run_dir", uri) == f"{root}/step_00000006"
    assert checkpoint.load(group, checkpoint.latest(root)) == {"step": 6, "data": {"offset": 6}}
    # a shard cut short in storage is seen from the sizes listed there
    stored.write_bytes("step_00000006/rng/rank_1.pt", b"r")
    assert checkpoint.problem(f"{root}/step_00000006") == "rng/rank_1.pt holds 1 bytes, 10 when saved"
    assert checkpoint.latest(root) == f"{root}/step_00000004"
    with pytest.raises(ValueError, match="already holds checkpoints"):
        checkpoint.resume_of_run(None, tmp_path / "run_dir", uri)
    assert not (tmp_path / "run_dir").exists()  # without a storage they would be here
