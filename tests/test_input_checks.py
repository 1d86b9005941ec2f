"""Bad input to every command: one line on stderr, exit code 2, before Ray, vLLM or MLflow start; result files
written whole or not at all, inside their folder; a failed pipeline stage never recorded as finished.

The ``nothing_starts`` fixture makes starting Ray, a vLLM engine or an MLflow run fail the test, so each case
proves that its check comes first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main
from rl import checkpoint
from rollout.files import atomic_write, check_name, check_output_file, write_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def nothing_starts(monkeypatch):
    import ray

    def refuse(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} started before the input was checked")
        return fail

    monkeypatch.setattr(ray, "init", refuse("Ray"))
    for module in ("rollout.engine", "rollout.workers", "cluster.demo", "cluster.evaluate"):  # every binding of it
        monkeypatch.setattr(f"{module}.make_llm", refuse("a vLLM engine"))
    monkeypatch.setattr("cluster.tracking.Tracker.start", refuse("an MLflow run"))


def refused(capsys, argv: list[str], message: str) -> str:
    """Run the command; assert exit code 2 and ``message`` in the one line it wrote to stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def fake_model(tmp_path) -> Path:
    """A folder that passes the model check (config.json only): the checks after it must fail first."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def blocked(tmp_path) -> Path:
    """A file where a folder is needed: nothing can be written below it, whoever runs the test (root too)."""
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Compute 2*3.", "answer": "6"}\n')
    return path


# --------------------------------------------------------------------------- generate


def test_generate_refuses_limit_and_output_before_starting_anything(tmp_path, capsys, nothing_starts, fake_model,
                                                                     blocked):
    prompts = prompts_file(tmp_path)
    out = tmp_path / "o.jsonl"
    out.write_text("earlier results\n")
    base = ["generate", f"model={fake_model}", f"prompts={prompts}", f"out={out}"]
    refused(capsys, base + ["limit=0"], "limit must be an integer >= 1, got 0")
    refused(capsys, base + ["limit=-3"], "limit must be an integer >= 1, got -3")
    refused(capsys, base + ["rollout.temperature=nan"], "temperature must be a finite number >= 0, got nan")
    refused(capsys, base + ["rollout.cpus_per_worker=-1"], "cpus_per_worker must be a finite number >= 0, got -1.0")
    assert out.read_text() == "earlier results\n"  # never truncated
    refused(capsys, ["generate", f"model={fake_model}", f"prompts={prompts}", f"out={blocked / 'o.jsonl'}"],
            f"cannot write out {blocked / 'o.jsonl'}: {blocked} is a file")
    refused(capsys, ["generate", f"model={fake_model}", f"prompts={prompts}", f"out={tmp_path}"], "is a folder")
    refused(capsys, ["generate", f"model={tmp_path / 'none'}", f"prompts={prompts}", f"out={out}"],
            f"model {tmp_path / 'none'} does not exist")


# --------------------------------------------------------------------------- eval


def test_eval_refuses_names_that_leave_the_output_folder(tmp_path, capsys, nothing_starts, fake_model):
    bench = tmp_path / "b.jsonl"
    bench.write_text('{"problem": "2*3", "answer": "6"}\n')
    out = tmp_path / "out"
    for name in ("sub/x", "../x", "..", "", "a\\b"):
        refused(capsys, ["eval", f"model={fake_model}", f"data=['{name}={bench}']", f"out={out}"],
                "must be a plain name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.jsonl", "model"]  # nothing written, out not made


def test_eval_refuses_bad_options_and_outputs_before_starting_anything(tmp_path, capsys, nothing_starts,
                                                                       fake_model, blocked):
    bench = tmp_path / "b.jsonl"
    bench.write_text('{"problem": "2*3", "answer": "6"}\n')
    base = ["eval", f"model={fake_model}", f"data=[tiny={bench}]"]
    refused(capsys, base + ["limit=0"], "limit must be an integer >= 1, got 0")
    refused(capsys, base + ["rollout.n=0"], "rollout.n must be an integer >= 1, got 0")
    refused(capsys, base + ["rollout.temperature=nan"], "rollout.temperature must be a finite number >= 0, got nan")
    refused(capsys, base + ["rollout.n=2"], "rollout.n=2 greedy samples (rollout.temperature=0) would all be")
    refused(capsys, base + ["pages=-1"], "pages must be an integer >= 0, got -1")
    refused(capsys, base + [f"out={blocked / 'out'}"], f"{blocked} is a file, not a folder")
    refused(capsys, base + [f"baseline_model={tmp_path}"], f"baseline model {tmp_path} holds no config.json")
    refused(capsys, ["eval", f"model={fake_model}", f"data=[a={bench}, a={bench}]"],
            "benchmark names repeat")


# --------------------------------------------------------------------------- rl and sft


def fake_checkpoint(run_dir: Path) -> None:
    """The files ``rl.checkpoint.latest`` looks for: a ``latest`` pointer to a step with a trainer state."""
    root = run_dir / "checkpoints"
    (root / "step_00000005").mkdir(parents=True)
    (root / "step_00000005" / checkpoint.STATE_FILE).write_text('{"step": 5}')
    (root / checkpoint.LATEST).write_text("step_00000005")


def test_rl_refuses_missing_inputs_before_starting_anything(tmp_path, capsys, nothing_starts, fake_model, blocked):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        (data / name).write_text('{"prompt": "Compute 2*3.", "answer": "6"}\n')
    run_dir = tmp_path / "run"
    ok = ["rollout.n=2", f"data.dir={data}", f"run_dir={run_dir}"]
    refused(capsys, ["rl", *ok, f"model={tmp_path / 'none'}"], f"model {tmp_path / 'none'} does not exist")
    refused(capsys, ["rl", *ok, f"model={data}"], f"model {data} holds no config.json")
    refused(capsys, ["rl", *ok], "model is required")
    assert not run_dir.exists()
    refused(capsys, ["rl", *ok, f"model={fake_model}", f"data.dir={tmp_path / 'none'}"],
            f"data.dir {tmp_path / 'none'} does not exist")
    refused(capsys, ["rl", *ok, f"model={fake_model}", "data.validation_file=val.jsonl"],
            f"data.validation_file {data / 'val.jsonl'} does not exist")
    refused(capsys, ["rl", *ok, f"model={fake_model}", f"run_dir={blocked / 'run'}"],
            f"cannot write run_dir {blocked / 'run'}: {blocked} is a file, not a folder")
    refused(capsys, ["rl", *ok, f"model={fake_model}", "learner.lr=nan"], "learner.lr must be a finite number > 0")
    fake_checkpoint(run_dir)
    refused(capsys, ["rl", *ok, f"model={fake_model}"], "already holds checkpoints; pass --resume")
    refused(capsys, ["rl", *ok, f"model={fake_model}", f"resume={tmp_path / 'none'}"],
            f"resume checkpoint {tmp_path / 'none'} does not exist")


def test_sft_refuses_missing_inputs_before_starting_anything(tmp_path, capsys, nothing_starts, fake_model, blocked):
    run_dir = tmp_path / "run"
    ok = [f"run_dir={run_dir}", f"data.dir={tmp_path / 'data'}"]
    refused(capsys, ["sft", *ok, f"model.path={tmp_path / 'none'}"], f"model.path {tmp_path / 'none'} does not exist")
    refused(capsys, ["sft", *ok, f"model.path={tmp_path}"], f"model.path {tmp_path} holds no config.json")
    refused(capsys, ["sft", *ok, "model.num_heads=5"], "hidden_size 128 is not a multiple of num_heads 5")
    assert not run_dir.exists()
    refused(capsys, ["sft", *ok, f"model.path={fake_model}", "data.generate=false"],
            f"data.dir {tmp_path / 'data'} does not exist")
    refused(capsys, ["sft", *ok, f"model.path={fake_model}", f"run_dir={blocked / 'run'}"],
            f"cannot write run_dir {blocked / 'run'}")
    refused(capsys, ["sft", *ok, "learner.lr=-1"], "learner.lr must be a finite number > 0, got -1.0")
    fake_checkpoint(run_dir)
    refused(capsys, ["sft", *ok, f"model.path={fake_model}"], "already holds checkpoints; pass --resume (resume=auto)")
    assert not (run_dir / "config.yaml").exists()


def test_sft_refuses_a_data_folder_made_with_other_settings(tmp_path, capsys, nothing_starts, fake_model):
    from rl.sft_data import ensure_task_data
    from rollout.task import TaskConfig

    ensure_task_data(tmp_path / "data", TaskConfig(), {"train": 5, "validation": 2, "test": 2}, 0)
    refused(capsys, ["sft", f"run_dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'data'}", "data.train_size=6",
                     f"model.path={fake_model}"], "holds the synthetic task made with other settings")


# --------------------------------------------------------------------------- the other commands


def test_view_refuses_a_bad_limit_and_output_and_keeps_the_old_page(tmp_path, capsys, blocked):
    src = tmp_path / "t.jsonl"
    src.write_text('{"response": "<think>x</think> \\\\boxed{1}"}\n')
    out = tmp_path / "page.html"
    out.write_text("old page")
    refused(capsys, ["view", str(src), "--out", str(out), "--limit", "0"], "--limit must be an integer >= 1, got 0")
    refused(capsys, ["view", str(src), "--out", str(blocked / "p.html")], f"{blocked} is a file, not a folder")
    src.write_text("{oops\n")
    refused(capsys, ["view", str(src), "--out", str(out)], "not valid JSON")
    assert out.read_text() == "old page"


def test_datagen_refuses_an_unwritable_output_before_the_teacher_or_ray(tmp_path, capsys, nothing_starts,
                                                                         fake_model, blocked):
    traces = tmp_path / "traces.jsonl"
    traces.write_text(json.dumps({"prompt": "p", "answer": "1", "response_sequential": "<think>a</think>"}) + "\n")
    refused(capsys, ["datagen", "stage1", "rewriter=teacher", "teacher.model=m", f"input={traces}",
                     f"out={blocked / 'o.jsonl'}"], f"{blocked} is a file, not a folder")
    refused(capsys, ["datagen", "stage1", "rewriter=rule", f"input={tmp_path / 'none.jsonl'}", "out=o.jsonl"],
            "none.jsonl")
    refused(capsys, ["datagen", "stage1", "rewriter=rule", f"input={traces}", "out=o.jsonl", "limit=0"],
            "limit must be an integer >= 1, got 0")
    prompts = prompts_file(tmp_path)
    refused(capsys, ["datagen", "stage2", f"model={fake_model}", f"prompts={prompts}", f"out={blocked / 'o.jsonl'}"],
            f"{blocked} is a file, not a folder")
    refused(capsys, ["datagen", "stage2", f"model={fake_model}", f"prompts={prompts}", "out=o.jsonl",
                     "rollout.temperature=nan"], "rollout.temperature must be a finite number >= 0, got nan")


def test_sweep_refuses_bad_values_and_used_point_folders_before_ray(tmp_path, capsys, nothing_starts, fake_model):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        (data / name).write_text('{"prompt": "Compute 2*3.", "answer": "6"}\n')
    rl_yaml = tmp_path / "rl.yaml"
    rl_yaml.write_text(f"model: {fake_model}\nrollout: {{n: 2}}\ndata: {{dir: {data}}}\n")
    base = ["sweep", f"rl_config=[{rl_yaml}]", f"run_dir={tmp_path / 'sweep'}", "tracking.enabled=false"]
    refused(capsys, base + ["rho=[0.5, -1]"], "rho[1] must be a finite number >= 0, got -1.0")
    refused(capsys, base + ["max_concurrent=0"], "max_concurrent must be an integer >= 1, got 0")
    refused(capsys, base + ["overrides=[reward.checker_timeout_s=nan]"],
            "reward.checker_timeout_s must be a finite number > 0")
    fake_checkpoint(tmp_path / "sweep" / "p00_rho0.5_clip0.2_inc0")
    refused(capsys, base, "p00_rho0.5_clip0.2_inc0/checkpoints already holds checkpoints")


def test_make_data_init_model_demo_and_bench_refuse_bad_values(tmp_path, capsys, nothing_starts, blocked):
    refused(capsys, ["make-data", str(tmp_path / "d"), "--train", "-5"], "the train size must be an integer >= 0")
    refused(capsys, ["make-data", str(tmp_path / "d"), "--test-share", "nan"], "test_share must be a finite number")
    refused(capsys, ["make-data", str(blocked / "d")], f"{blocked} is a file, not a folder")
    refused(capsys, ["init-model", str(blocked / "m")], f"cannot write {blocked / 'm'}")
    refused(capsys, ["init-model", str(tmp_path / "m"), "--seed", "-1"], "--seed must be an integer in")
    refused(capsys, ["demo", "--out", str(tmp_path / "demo"), "--prompts", "0"], "--prompts must be an integer >= 1")
    refused(capsys, ["demo", "--out", str(tmp_path / "demo"), "--temperature", "nan"], "temperature must be")
    refused(capsys, ["demo", "--out", str(blocked / "demo")], f"{blocked} is a file, not a folder")
    refused(capsys, ["bench", "trie", "--k", "0"], "--k must be an integer >= 1, got 0")
    refused(capsys, ["bench", "trie", "--noise", "nan"], "--noise must be a finite number in [0, 1], got nan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing was written


# --------------------------------------------------------------------------- the pipeline


def test_run_refuses_a_bad_size_before_ray_and_mlflow(tmp_path, capsys, nothing_starts):
    yaml_file = str(ROOT / "experiments/pipeline_tiny.yaml")
    run_dir = tmp_path / "run"
    refused(capsys, ["run", "--config", yaml_file, "data.train_size=-5", f"run_dir={run_dir}"],
            "data.train_size must be an integer >= 1, got -5")
    refused(capsys, ["run", "--config", yaml_file, "rl.learner.cpus_per_rank=-1", f"run_dir={run_dir}"],
            "rl.learner.cpus_per_rank must be a finite number >= 0, got -1.0")
    refused(capsys, ["run", "--config", yaml_file, "eval.data=[../x=b.jsonl]", f"run_dir={run_dir}"],
            "benchmark name '../x' must be a plain name")
    assert not run_dir.exists()
    run_dir.mkdir()
    (run_dir / "pipeline.json").write_text('{"stages": {"data": {"dir": "x"')
    refused(capsys, ["run", "--config", yaml_file, f"run_dir={run_dir}", "--resume"],
            "pipeline.json is not valid JSON")
    (run_dir / "pipeline.json").write_text(json.dumps({"stages": {"data": {"dir": str(tmp_path / "gone")}}}))
    refused(capsys, ["run", "--config", yaml_file, f"run_dir={run_dir}", "reuse=true"],
            "records stage data as finished, but its output")
    # the older form still works (--set is a deprecated alias), with a warning per deprecated part
    assert main(["run", yaml_file, "--set", "data.train_size=-5", "--set", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "deprecated: name the pipeline YAML with --config" in err and "deprecated: --set" in err
    assert "data.train_size must be an integer >= 1, got -5" in err


def test_a_failed_stage_is_never_recorded_as_finished(tmp_path, monkeypatch):
    from cluster.config import load_config
    from cluster.pipeline import PipelineConfig, run_pipeline

    monkeypatch.setattr("cluster.pipeline.init_ray", lambda *a, **k: False)

    def data_stage(cfg, stage_dir, runs):
        stage_dir.mkdir()
        return {"dir": str(stage_dir)}

    def failing_sft(*args, **kwargs):
        raise RuntimeError("the SFT stage died")

    monkeypatch.setattr("cluster.pipeline._stage_data", data_stage)
    monkeypatch.setattr("cluster.pipeline._stage_sft", failing_sft)
    cfg = load_config(PipelineConfig, ROOT / "experiments/pipeline_tiny.yaml",
                      [f"run_dir={tmp_path}", "tracking.enabled=false", "reuse=true"])
    with pytest.raises(RuntimeError, match="the SFT stage died"):
        run_pipeline(cfg)
    record = json.loads((tmp_path / "pipeline.json").read_text())
    assert sorted(record["stages"]) == ["data"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


# --------------------------------------------------------------------------- the file helpers


def test_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    write_text(path, "first\n")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write("half of the second")
            raise RuntimeError("killed")
    assert path.read_text() == "first\n"
    with atomic_write(path, "wb") as f:
        f.write(b"second\n")
    assert path.read_text() == "second\n"
    assert [p.name for p in path.parent.iterdir()] == ["r.jsonl"]  # no temporary file left


def test_names_and_outputs_are_checked(tmp_path, blocked):
    assert check_name("math500") == "math500"
    for bad in ("", ".", "..", "a/b", "../b", "a\\b"):
        with pytest.raises(ValueError, match="must be a plain name"):
            check_name(bad)
    assert check_output_file(tmp_path / "new" / "o.jsonl") == tmp_path / "new" / "o.jsonl"
    assert list((tmp_path / "new").iterdir()) == []  # the trial file is gone
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_file(blocked / "o.jsonl")
