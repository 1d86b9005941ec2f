"""The pipeline's self-training stage and stage 2's pool sampler.

Fast tests: ``pool_sampler`` over a fake rollout pool (what it starts, sends, returns and shuts
down); ``_stage_selftrain`` with a fake sampler that plays known responses through the real
orchestrator, the real stage 2 selection and the real SFT config wiring, only ``rl.sft.train``
faked (it records its config and the files it would train on); ``run_pipeline`` with every stage
faked, for which model each stage is given. The integration test runs the stage on the untrained
tiny model inside a Ray instance the pipeline started, as ``threadweaver run`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

import rl.datagen.stage2 as stage2
from cluster.config import load_config
from cluster.pipeline import PipelineConfig, Runs, _stage_selftrain, run_pipeline
from rollout.config import RolloutConfig
from rl.datagen.stage2 import Stage2Config, pool_sampler
from rollout.orchestrator import generate
from rollout.task import TaskConfig, make_dataset
from rollout.tiny import build_tokenizer
from tests.test_datagen_stage2 import PlayEngine  # a fake engine playing known responses

# --------------------------------------------------------------------------- pool_sampler with a fake pool


class FakePool:
    """Stands in for ``RolloutPool`` in ``rl.datagen.stage2``; logs to the test's ``log``."""

    log: list = []
    fail_init: BaseException | None = None
    fail_shutdown: BaseException | None = None

    def __init__(self, model_dir, config):
        FakePool.log.append(("pool", model_dir, config))
        if FakePool.fail_init is not None:
            raise FakePool.fail_init

    def generate(self, prompts, *, progress=None):
        FakePool.log.append(("generate", [list(p) for p in prompts]))
        out = [("trajectory", i, s) for i in range(len(prompts)) for s in range(3)]
        if progress is not None:
            progress(1)
            progress(len(out))
        return out

    def shutdown(self):
        FakePool.log.append(("pool shutdown",))
        if FakePool.fail_shutdown is not None:
            raise FakePool.fail_shutdown


@pytest.fixture
def fake_ray(monkeypatch):
    """The fake pool, and start_ray / ray.shutdown / ray.is_initialized that only log (no Ray starts)."""
    log: list = []
    FakePool.log, FakePool.fail_init, FakePool.fail_shutdown = log, None, None
    state = {"initialized": False}
    monkeypatch.setattr(stage2, "RolloutPool", FakePool)
    monkeypatch.setattr(stage2, "start_ray", lambda address, **kw: log.append(("start_ray", address, kw)))
    monkeypatch.setattr(ray, "shutdown", lambda: log.append(("ray shutdown",)))
    monkeypatch.setattr(ray, "is_initialized", lambda: state["initialized"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return log, state


def s2cfg(**kw) -> Stage2Config:
    return Stage2Config(model="the-model", prompts="p.jsonl", out="o.jsonl", rollout=RolloutConfig(n=3),
                        progress=False, **kw)


@pytest.mark.parametrize("progress", [False, True])
def test_pool_sampler_starts_a_local_ray_sends_the_prompts_and_returns_the_pools_trajectories(fake_ray, progress):
    log, _ = fake_ray
    cfg = Stage2Config(model="the-model", prompts="p.jsonl", out="o.jsonl", rollout=RolloutConfig(n=3),
                       progress=progress)
    sample, close = pool_sampler(cfg)
    assert log == [("start_ray", None, {"include_dashboard": False}), ("pool", "the-model", cfg.rollout)]
    prompts = [[1, 2], [3, 4, 5]]
    out = sample(prompts)
    assert out == [("trajectory", i, s) for i in range(2) for s in range(3)]  # the pool's list, prompt-major
    assert log[2] == ("generate", prompts)
    close()
    assert log[3:] == [("pool shutdown",), ("ray shutdown",)]  # the pool first, then the Ray it started


def test_pool_sampler_joins_the_configured_address_before_the_environments(fake_ray, monkeypatch):
    log, _ = fake_ray
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    pool_sampler(s2cfg())
    pool_sampler(s2cfg(), ray_address="10.0.0.2:6379")
    assert [e[1] for e in log if e[0] == "start_ray"] == ["10.0.0.1:6379", "10.0.0.2:6379"]


def test_a_pool_that_cannot_start_shuts_ray_down_and_raises(fake_ray):
    log, _ = fake_ray
    FakePool.fail_init = RuntimeError("no engine")
    with pytest.raises(RuntimeError, match="no engine"):
        pool_sampler(s2cfg())
    assert log[-1] == ("ray shutdown",)


def test_close_shuts_ray_down_even_when_the_pool_shutdown_raises(fake_ray):
    log, _ = fake_ray
    _, close = pool_sampler(s2cfg())
    FakePool.fail_shutdown = TimeoutError("worker does not answer")
    with pytest.raises(TimeoutError):
        close()
    assert log[-2:] == [("pool shutdown",), ("ray shutdown",)]


def test_a_ray_already_running_in_the_process_is_used_and_left_running(fake_ray):
    """The pipeline starts Ray once for every stage; the self-training stage must neither start it
    again (``ray.init`` refuses a second call) nor shut it down for the stages after it."""
    log, state = fake_ray
    state["initialized"] = True
    sample, close = pool_sampler(s2cfg())
    assert sample([[1]]) == [("trajectory", 0, s) for s in range(3)]
    close()
    assert [e[0] for e in log] == ["pool", "generate", "pool shutdown"]


def test_a_pool_that_cannot_start_leaves_a_running_ray_alone(fake_ray):
    log, state = fake_ray
    state["initialized"] = True
    FakePool.fail_init = RuntimeError("no engine")
    with pytest.raises(RuntimeError, match="no engine"):
        pool_sampler(s2cfg())
    assert [e[0] for e in log] == ["pool"]


# --------------------------------------------------------------------------- the self-training stage


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A data folder (4 training prompts, 2 validation records), a tokenizer-only "model", a
    pipeline config with a selftrain section, and fakes for the pool sampler and ``rl.sft.train``."""
    tok = build_tokenizer()
    data = make_dataset(TaskConfig(), {"train": 4, "validation": 2}, seed=5)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for split, recs in data.items():
        (data_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    model = tmp_path / "sft_parallel_model"
    tok.save_pretrained(model)
    cfg = load_config(PipelineConfig, "experiments/pipeline_tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", "tracking.enabled=false",
        "selftrain={rollout: {n: 2, seed: 3}, limit: 3, min_eta: 0.01, progress: false}"])
    answers = {r["prompt"]: r["answer"] for r in data["train"]}
    responses = {r["prompt"]: r["response_parallel"] for r in data["train"]}
    seen = {"sampler_cfg": [], "closed": 0, "sft": []}

    def fake_pool_sampler(st_cfg):
        seen["sampler_cfg"].append(st_cfg)

        def sample(prompt_ids):
            texts = [tok.decode(p, skip_special_tokens=False) for p in prompt_ids]
            plays = []
            for p, text in zip(prompt_ids, texts):
                question = next(q for q in responses if q in text)
                plays.append((p, seen["play"](question, responses[question], answers[question])))
            return generate(PlayEngine(tok, plays), tok, prompt_ids, st_cfg.rollout)

        def close():
            seen["closed"] += 1

        return sample, close

    def fake_train(sft_cfg):
        d = Path(sft_cfg.data.dir)
        seen["sft"].append({"cfg": sft_cfg, "train": [json.loads(x) for x in (d / "train.jsonl").open()],
                            "validation": (d / "validation.jsonl").read_bytes()})
        return {"checkpoint": str(tmp_path / "selftrained"), "eval": {"accuracy": 1.0}, "steps": sft_cfg.steps,
                "train_s": 0.1, "tokens_seen": 10}

    monkeypatch.setattr("cluster.pipeline.pool_sampler", fake_pool_sampler)  # imported by name there
    monkeypatch.setattr("cluster.pipeline.run_sft", lambda sft_cfg, **kw: fake_train(sft_cfg))  # no Ray, no checks
    seen["play"] = lambda question, response, answer: response  # every sample right and parallel
    return cfg, data, data_dir, model, seen


def test_selftrain_samples_the_parallel_sft_model_and_trains_on_what_stage_2_kept(setup, tmp_path):
    cfg, data, data_dir, model, seen = setup
    stage_dir = tmp_path / "run" / "selftrain"
    out = _stage_selftrain(cfg, stage_dir, Runs(cfg, tmp_path / "run"), str(data_dir), str(model))

    st_cfg, = seen["sampler_cfg"]
    assert st_cfg.model == str(model)  # stage 2 samples the parallel SFT model
    assert st_cfg.prompts == str(data_dir / "train.jsonl") and st_cfg.out == str(stage_dir / "data" / "train.jsonl")
    assert st_cfg.limit == 3 and st_cfg.rollout.n == 2 and st_cfg.min_eta == 0.01  # the section as given
    assert seen["closed"] == 1

    # 3 prompts x 2 samples, all correct and parallel; the second sample of each repeats the first (dedupe)
    stats = json.loads((stage_dir / "data" / "train.stats.json").read_text())
    assert (stats["total"], stats["kept"], stats["dropped"]) == (6, 3, {"duplicate": 3})

    run, = seen["sft"]
    sft = run["cfg"]
    assert sft.model.path == str(model)  # SFT goes on from the parallel SFT checkpoint
    assert sft.data.dir == str(stage_dir / "data") and sft.data.response_field == "response"
    assert sft.data.layout == "parallel" and not sft.data.generate
    assert sft.run_dir == str(stage_dir / "sft")
    assert sft.steps == 50  # selftrain_sft's default override on top of the sft section
    assert sft.learner.lr == cfg.sft.learner.lr
    assert [r["prompt"] for r in run["train"]] == [r["prompt"] for r in data["train"][:3]]
    assert [r["response"] for r in run["train"]] == [r["response_parallel"] for r in data["train"][:3]]
    assert all(r["provenance"]["model"] == str(model) for r in run["train"])
    assert run["validation"] == (data_dir / "validation.jsonl").read_bytes()  # the task's validation split

    assert out == {"checkpoint": str(tmp_path / "selftrained"), "kept": 3, "eval": {"accuracy": 1.0}}


def test_selftrain_keeping_nothing_stops_the_pipeline_before_sft(setup, tmp_path):
    cfg, data, data_dir, model, seen = setup
    seen["play"] = lambda q, response, answer: response.replace(f"\\boxed{{{answer}}}", "\\boxed{0.5}")
    stage_dir = tmp_path / "run" / "selftrain"
    with pytest.raises(RuntimeError, match="self-training kept no trajectory"):
        _stage_selftrain(cfg, stage_dir, Runs(cfg, tmp_path / "run"), str(data_dir), str(model))
    assert seen["sft"] == [] and seen["closed"] == 1
    stats = json.loads((stage_dir / "data" / "train.stats.json").read_text())
    assert (stats["total"], stats["kept"], stats["dropped"]) == (6, 0, {"incorrect": 6})


def test_selftrain_closes_the_sampler_when_sampling_raises(setup, tmp_path):
    cfg, data, data_dir, model, seen = setup

    def crash(*args):
        raise OSError("worker lost")

    seen["play"] = crash
    with pytest.raises(OSError, match="worker lost"):
        _stage_selftrain(cfg, tmp_path / "run" / "selftrain", Runs(cfg, tmp_path / "run"), str(data_dir), str(model))
    assert seen["closed"] == 1 and seen["sft"] == []


# --------------------------------------------------------------------------- the stage in the pipeline


@pytest.fixture
def faked_stages(tmp_path, monkeypatch):
    """Every stage of ``run_pipeline`` replaced by a recorder; Ray not started."""
    import cluster.pipeline as pipeline

    calls: list[tuple] = []
    monkeypatch.setattr(pipeline, "init_ray", lambda *a, **k: False)  # imported by name there
    monkeypatch.setattr(pipeline, "_stage_data", lambda cfg, d, runs: calls.append(("data",)) or {"dir": "D"})
    monkeypatch.setattr(pipeline, "_stage_sft", lambda cfg, d, runs, data_dir, layout, extra: calls.append(
        ("sft", layout, data_dir)) or {"checkpoint": f"sft-{layout}"})
    monkeypatch.setattr(pipeline, "_stage_selftrain", lambda cfg, d, runs, data_dir, model: calls.append(
        ("selftrain", data_dir, model, d.name)) or {"checkpoint": "selftrained", "kept": 3})
    monkeypatch.setattr(pipeline, "_stage_rl", lambda cfg, d, runs, data_dir, model, extra: calls.append(
        ("rl", d.name, model)) or {"checkpoint": f"rl-{model}"})

    def fake_eval(cfg, d, runs, data_dir, par, seq, names, before=None, top=None):
        calls.append(("eval", par, seq))
        calls.append(("eval names", names, before))
        d.mkdir(parents=True)
        (d / "report.md").write_text("# Evaluation\n")
        return {"report": str(d / "report.md"), "metrics": {}}

    monkeypatch.setattr(pipeline, "_stage_eval", fake_eval)
    return calls


def test_without_a_selftrain_section_the_stage_is_skipped(faked_stages, tmp_path):
    cfg = load_config(PipelineConfig, "experiments/pipeline_tiny.yaml",
                      [f"run_dir={tmp_path / 'run'}", "tracking.enabled=false"])
    assert cfg.selftrain is None
    record = run_pipeline(cfg)
    assert list(record["stages"]) == ["data", "sft_parallel", "sft_sequential", "rl_parallel", "rl_sequential",
                                      "eval"]
    assert not any(c[0] == "selftrain" for c in faked_stages)
    assert ("rl", "rl_parallel", "sft-parallel") in faked_stages


def test_the_selftrained_model_replaces_the_parallel_sft_model_only(faked_stages, tmp_path):
    overrides = [f"run_dir={tmp_path / 'run'}", "tracking.enabled=false", "selftrain={limit: 3}"]
    record = run_pipeline(load_config(PipelineConfig, "experiments/pipeline_tiny.yaml", overrides))
    assert list(record["stages"]) == ["data", "sft_parallel", "sft_sequential", "selftrain", "rl_parallel",
                                      "rl_sequential", "eval"]
    assert ("selftrain", "D", "sft-parallel", "selftrain") in faked_stages  # the parallel SFT model, the task data
    assert ("rl", "rl_parallel", "selftrained") in faked_stages
    assert ("rl", "rl_sequential", "sft-sequential") in faked_stages  # the baseline does not self-train
    assert faked_stages[-2] == ("eval", "rl-selftrained", "rl-sft-sequential")
    # the RL stages' starting checkpoints are decoded too, under the paper's row names
    assert faked_stages[-1] == ("eval names", ("ThreadWeaver (SFT + self-training + P-GRPO)",
                                               "sequential baseline (SFT + RL)"),
                                {"models": ("selftrained", "sft-sequential"),
                                 "names": ("ThreadWeaver (SFT + self-training)", "sequential baseline (SFT)")})

    no_rl = [f"run_dir={tmp_path / 'run2'}", "tracking.enabled=false", "selftrain={limit: 3}", "rl=null"]
    faked_stages.clear()
    run_pipeline(load_config(PipelineConfig, "experiments/pipeline_tiny.yaml", no_rl))
    assert faked_stages[-2] == ("eval", "selftrained", "sft-sequential")
    assert faked_stages[-1] == ("eval names", ("ThreadWeaver (SFT + self-training)", "sequential baseline (SFT)"),
                                None)  # no RL: nothing earlier to decode


# --------------------------------------------------------------------------- integration


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_selftrain_stage_runs_inside_the_pipelines_ray_on_the_untrained_model(tiny_model_dir, tmp_path):
    """The real pool sampler (Ray rollout worker, vLLM) in the Ray instance ``run_pipeline`` starts.

    The untrained model writes no valid, correct response, so the stage stops with its clear error;
    the pipeline's Ray must still be running afterwards (the later stages use it)."""
    from cluster.ray_setup import RayConfig, Role, init_ray

    data = make_dataset(TaskConfig(), {"train": 2, "validation": 1}, seed=1)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for split, recs in data.items():
        (data_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = load_config(PipelineConfig, "experiments/pipeline_tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", "tracking.enabled=false",
        "selftrain={rollout: {n: 2, max_tokens: 24, max_context: 256, max_thread_tokens: 8, workers: 1, "
        "cpus_per_worker: 1}, progress: false}"])
    assert not ray.is_initialized()
    started = init_ray(RayConfig(num_cpus=2), [Role("rollout worker", 1, 1.0)])
    try:
        with pytest.raises(RuntimeError, match="self-training kept no trajectory"):
            _stage_selftrain(cfg, tmp_path / "run" / "selftrain", Runs(cfg, tmp_path / "run"), str(data_dir),
                             str(tiny_model_dir))
        assert ray.is_initialized()  # the pipeline's Ray, left running for the stages after this one
        stats = json.loads((tmp_path / "run" / "selftrain" / "data" / "train.stats.json").read_text())
        assert stats["total"] == 4 and stats["kept"] == 0 and sum(stats["dropped"].values()) == 4
    finally:
        if started:
            ray.shutdown()
