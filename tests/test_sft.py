"""The SFT stage: data streaming, evaluation scoring, exact resumption, and a checkpoint vLLM loads."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rl.sft_data import StreamState, TrieStream, build_tries, response_units
from rewards.checker import Verdict
from rl.evaluation import judge, summarize
from rl.trie import build_trie
from rollout.config import RolloutConfig
from rollout.ray_init import start_ray
from rollout.task import TaskConfig, make_dataset
from rollout.units import Unit, chat_prompt_ids, latency


def _tries(sizes):
    return [build_trie([Unit([1], [2] * (n - 1))]) for n in sizes]


def test_stream_batches_fill_the_budget_and_resume_from_state():
    tries = _tries([10, 20, 30, 40, 50, 60, 70])
    a = TrieStream(tries, seed=3)
    batches = [a.next_batch(100) for _ in range(6)]
    for b in batches:
        assert sum(len(t) for t in b) <= 100 or len(b) == 1
    served = [id(t) for b in batches for t in b]
    assert sorted(served[:7]) == sorted(id(t) for t in tries)  # one epoch is a permutation
    assert a.state.epoch >= 1 and a.state.served == len(served)
    b = TrieStream(tries, seed=3)
    for _ in range(3):
        b.next_batch(100)
    c = TrieStream(tries, seed=3, state=StreamState(**vars(b.state)))
    assert [[id(t) for t in c.next_batch(100)] for _ in range(3)] == [[id(t) for t in x] for x in batches[3:]]
    assert [id(t) for t in TrieStream(tries, seed=4).next_batch(1000)] != [id(t) for t in
                                                                            TrieStream(tries, seed=3).next_batch(1000)]


def test_layouts_give_orchestrator_units_or_one_flattened_unit(tokenizer):
    rec = make_dataset(TaskConfig(b_digits=2, min_threads=3, max_threads=3), {"train": 1}, seed=0)["train"][0]
    prompt = chat_prompt_ids(tokenizer, rec["prompt"])
    par = response_units(prompt, rec["response_parallel"], tokenizer, tokenizer.eos_token_id, "parallel")
    seq = response_units(prompt, rec["response_parallel"], tokenizer, tokenizer.eos_token_id, "sequential")
    assert [u.role for u in par] == ["seq", "thread", "thread", "thread", "seq"]
    assert len(seq) == 1 and seq[0].context_ids == prompt
    assert tokenizer.decode(seq[0].completion_ids[:-1]) == rec["response_sequential"]
    assert seq[0].completion_ids[-1] == tokenizer.eos_token_id
    assert latency(par).L_crit < latency(seq).L_total
    with pytest.raises(ValueError, match="record 0"):
        build_tries([{"prompt": "x", "response_parallel": "<Parallel><Thread>1: a</Parallel>"}], tokenizer,
                    "parallel")


def test_a_sequential_share_flattens_the_same_records_every_time(tokenizer):
    from rl.sft_data import flattened_by_share

    records = make_dataset(TaskConfig(b_digits=2, min_threads=2, max_threads=2), {"train": 200}, seed=0)["train"]
    chosen = [flattened_by_share(r["prompt"], 0.3) for r in records]
    assert 40 <= sum(chosen) <= 80 and chosen == [flattened_by_share(r["prompt"], 0.3) for r in records]
    assert not any(flattened_by_share(r["prompt"], 0.0) for r in records)
    assert all(flattened_by_share(r["prompt"], 1.0) for r in records)
    tries = build_tries(records[:20], tokenizer, "parallel", sequential_share=0.3)
    plain = build_tries(records[:20], tokenizer, "parallel")
    flat = build_tries(records[:20], tokenizer, "sequential")
    for trie, par, seq, c in zip(tries, plain, flat, chosen):
        assert len(trie) == (len(seq) if c else len(par))
    assert len(set(map(len, tries))) > 1 and any(chosen[:20]) and not all(chosen[:20])
    with pytest.raises(ValueError, match="sequential_share"):
        build_tries(records[:1], tokenizer, "parallel", sequential_share=1.5)


def _trajectory(text, reason="eos", n_blocks=0):
    return SimpleNamespace(prompt_index=0, text=text, finish_reason=reason, L_total=10, L_crit=6, eta=0.4,
                           speedup=10 / 6, n_blocks=n_blocks, units=None)


class _IntChecker:
    def check(self, pred, gold):
        return Verdict(int(pred) == int(gold), False, "number", 0.0)


def test_judge_scores_answer_format_and_parallelism():
    """The shared definitions (``rl.evaluation``): a cut response is incorrect, and format-valid when its text
    breaks no rule (EOS is not required); finish reasons are ``finish/<reason>``."""
    parallel = ("<think>\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\n"
                "<Thread>\n1: x\n</Thread>\n<Thread>\n2: y\n</Thread>\n</Parallel>\nz\n</think>\n\n\\boxed{12}")
    good = judge(_trajectory(parallel, n_blocks=1), "12", _IntChecker())
    assert good.correct and good.format_valid and good.parallel_valid
    wrong = judge(_trajectory(parallel.replace("{12}", "{13}"), n_blocks=1), "12", _IntChecker())
    assert not wrong.correct and wrong.parallel_valid
    cut = judge(_trajectory(parallel, reason="budget", n_blocks=1), "12", _IntChecker())
    assert cut.format_valid and cut.parallel_valid and not cut.correct  # an answer before the cut: not done
    broken = judge(_trajectory(parallel.replace("<Outline>2: b", "<Outline>3: b"), n_blocks=1), "12", _IntChecker())
    assert not broken.format_valid
    seq = judge(_trajectory("<think>\nz\n</think>\n\n\\boxed{12}"), "12", _IntChecker())
    assert seq.correct and seq.format_valid and not seq.parallel_valid
    none = judge(_trajectory("<think>\nz\n</think>\n\nno answer"), "12", _IntChecker())
    assert not none.correct and none.predicted is None
    s = summarize([good, wrong, cut, seq])
    assert s["accuracy"] == 0.5 and s["parallel_valid"] == 0.75 and s["format_valid"] == 1.0
    assert s["finish/eos"] == 0.75 and s["finish/budget"] == 0.25 and s["finish/error"] == 0.0
    assert s["L_crit"] == 6 and s["prompts"] == 4 and s["activation"] == 0.75


# --------------------------------------------------------------------------- integration


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    start_ray(None, num_cpus=2, include_dashboard=False)  # as the commands start it
    yield ray
    ray.shutdown()


def _config(run_dir, data_dir, model_dir, cls=None, **kw):
    from cluster.config import load_config
    from rl.sft import SFTConfig

    overrides = [f"run_dir={run_dir}", f"model.path={model_dir}", f"data.dir={data_dir}", "data.train_size=12",
                 "data.validation_size=4", "data.test_size=4", "data.task.b_digits=2", "data.task.max_threads=3",
                 "steps=6", "tokens_per_step=900", "save_every=3", "keep_last=0", "progress=false",
                 "eval.at_end=false", "learner.lr=3e-3", "learner.warmup_steps=2", "learner.row_tokens=600",
                 "learner.cpus_per_rank=1", "learner.threads_per_rank=1"]
    overrides += [f"{k}={v}" for k, v in kw.items()]
    return load_config(cls or SFTConfig, None, overrides)


@pytest.fixture(scope="module")
def full_run(ray_cluster, tiny_model_dir, tmp_path_factory):
    """An uninterrupted 6-step run on 12 records (so it crosses an epoch boundary)."""
    from rl.sft import train

    base = tmp_path_factory.mktemp("sft")
    summary = train(_config(base / "full", base / "data", tiny_model_dir))
    return base, summary


@pytest.mark.integration
def test_killed_run_resumes_to_the_same_weights_past_a_damaged_checkpoint(full_run, tiny_model_dir, capsys):
    """Killed after step 5 (checkpoints at 2 and 4) in the middle of a metrics line, with the newest
    checkpoint then losing a DeepSpeed shard: the run resumes from step 2, logs every step once and ends
    with the weights of the uninterrupted run."""
    from safetensors.torch import load_file

    from rl.sft import Stop, train

    base, full = full_run
    assert full["steps"] == 6 and full["examples_seen"] > 12  # past one epoch: the reshuffle is covered

    def kill_after_5(step, metrics):
        if step == 5:
            raise Stop()

    cut = {"save_every": 2}
    with pytest.raises(Stop):  # checkpoints at steps 2 and 4, then step 5 is lost with the "process"
        train(_config(base / "cut", base / "data", tiny_model_dir, **cut), on_step=kill_after_5)
    with open(base / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "loss": 1.2')  # the kill came in the middle of a line
    with pytest.raises(ValueError, match="resume=auto"):
        train(_config(base / "cut", base / "data", tiny_model_dir, **cut))
    shard = base / "cut" / "checkpoints" / "step_00000004" / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    shard.unlink()
    capsys.readouterr()
    resumed = train(_config(base / "cut", base / "data", tiny_model_dir, resume="auto", **cut))
    assert resumed["steps"] == 6 and resumed["examples_seen"] == full["examples_seen"]
    out = capsys.readouterr()
    assert "resumed from" in out.out and "step_00000002 at step 2" in out.out
    assert "step_00000004" in out.err and "mp_rank_00_model_states.pt is missing" in out.err

    a = load_file(f"{full['checkpoint']}/model.safetensors")
    b = load_file(f"{resumed['checkpoint']}/model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    init = load_file(f"{tiny_model_dir}/model.safetensors")
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-3  # it trained

    lines = [json.loads(x) for x in open(base / "cut" / "metrics.jsonl")]
    losses_full = [json.loads(x)["loss"] for x in open(base / "full" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]  # steps 3-5 were redone and logged once
    assert [x["loss"] for x in lines] == pytest.approx(losses_full, rel=1e-6)


@pytest.mark.integration
def test_a_run_with_storage_checkpoints_there_and_resumes_from_it_on_a_new_driver(full_run, tiny_model_dir,
                                                                                   tmp_path):
    """``storage=file://...``: the checkpoints and run outputs go to storage, none to RUN_DIR; killed after step
    4 (checkpoint at 3), the run resumes from storage into an empty RUN_DIR (a new driver machine), takes the
    metrics of steps 1-3 from there, and ends with the weights of the uninterrupted run without storage."""
    from safetensors.torch import load_file

    from rl.sft import Stop, train
    from rollout.storage import Storage

    base, full = full_run
    store = f"file://{tmp_path / 'store'}"

    def kill_after_4(step, metrics):
        if step == 4:
            raise Stop()

    with pytest.raises(Stop):
        train(_config(tmp_path / "cut", base / "data", tiny_model_dir, storage=store), on_step=kill_after_4)
    storage = Storage.of(store)
    assert storage.read_text("checkpoints/latest") == "step_00000003"
    assert not (tmp_path / "cut" / "checkpoints").exists() and not (tmp_path / "cut" / "final").exists()
    resumed = train(_config(tmp_path / "new_driver", base / "data", tiny_model_dir, storage=store, resume="auto"))
    assert resumed["steps"] == 6
    assert resumed["checkpoint"] == f"{store}/checkpoints/step_00000006/hf"
    assert not (tmp_path / "new_driver" / "checkpoints").exists()
    a = load_file(f"{full['checkpoint']}/model.safetensors")
    b = load_file(tmp_path / "store" / "checkpoints" / "step_00000006" / "hf" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert [json.loads(x)["step"] for x in open(tmp_path / "new_driver" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= set(storage.sizes())
    assert json.loads(storage.read_text("summary.json"))["checkpoint"] == resumed["checkpoint"]


@pytest.mark.integration
def test_sft_checkpoint_loads_in_vllm_with_the_learner_logprobs(full_run, tiny_model_dir, tokenizer, llm):
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams, TokensPrompt

    from rl.sft_eval import EvalConfig, Evaluator
    from rollout.engine import VLLMEngine
    from rollout.weights import reload_in_place

    ckpt = full_run[1]["checkpoint"]
    prompt = chat_prompt_ids(tokenizer, "Compute 3*41 + 7*12.")
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    records = [json.loads(x) for x in open(full_run[0] / "data" / "validation.jsonl")]
    decoding = RolloutConfig(temperature=0.0, max_tokens=64, max_context=512)
    evaluator = Evaluator(EvalConfig(prompts=3, rollout=decoding), tiny_model_dir, tokenizer, records,
                          sequential=False, engine=VLLMEngine(llm))
    try:
        reload_in_place(llm, ckpt)  # make_llm's reload: refreshes the tied head too
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                           SamplingParams(temperature=0, max_tokens=8, logprobs=0), use_tqdm=False)[0].outputs[0]
        metrics, decoded = evaluator(None)  # the orchestrator on the same engine: wiring and scoring
    finally:
        evaluator.close()
        reload_in_place(llm, tiny_model_dir)
    ids = torch.tensor([prompt + list(out.token_ids)])
    with torch.no_grad():
        logp = hf(input_ids=ids).logits[0].log_softmax(-1)
    start = len(prompt)
    expected = [float(logp[start - 1 + i, t]) for i, t in enumerate(out.token_ids)]
    got = [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]
    assert got == pytest.approx(expected, abs=1e-3)
    assert list(out.token_ids) == [int(logp[start - 1 + i].argmax()) for i in range(len(out.token_ids))]
    untrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        before = untrained(input_ids=ids).logits[0].log_softmax(-1)
    untrained_lp = [float(before[start - 1 + i, t]) for i, t in enumerate(out.token_ids)]
    assert max(abs(g - u) for g, u in zip(got, untrained_lp)) > 1e-2  # the engine ran the trained weights

    assert [r.index for r in decoded] == [0, 1, 2] and metrics["prompts"] == 3
    assert all(r.L_total > 0 and r.answer == rec["answer"] for r, rec in zip(decoded, records))
    assert sum(v for k, v in metrics.items() if k.startswith("finish/")) == pytest.approx(1.0)


@pytest.mark.integration
def test_sft_command_logs_live_metrics_lineage_and_the_checkpoint_as_a_logged_model(ray_cluster, tiny_model_dir,
                                                                                     tmp_path):
    """Metrics are in MLflow while the run goes (read back from MLflow in the step hook), the data files are
    dataset inputs, the final checkpoint a logged model pointing at it with the final evaluation attached."""
    from mlflow import MlflowClient

    from cluster.cmd_sft import SFTRunConfig, run_sft
    from cluster.lineage import run_context, source_of
    from cluster.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _config(tmp_path / "run", tmp_path / "data", tiny_model_dir, cls=SFTRunConfig, steps=3, save_every=0,
                  **{"eval.at_end": "true", "eval.prompts": 2, "eval.rollout.max_tokens": 48, "tracking.uri": uri,
                     "tracking.experiment": "sft_live"})
    client = MlflowClient(uri)
    seen = {}

    def read_back(step, metrics):
        run = client.search_runs([client.get_experiment_by_name("sft_live").experiment_id])[0]
        seen[step] = (run.info.status, [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")])

    summary = run_sft(cfg, on_step=read_back, tracker=Tracker(cfg.tracking, cfg.run_dir,
                                                               tags=run_context("sft", [])))
    assert seen[2] == ("RUNNING", [1, 2])  # live: step 2's loss is in MLflow before step 3 starts
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == ["train", "validation"]
    assert "eval/accuracy" in run.data.metrics
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert model.model_id == summary["model_id"] and model.source_run_id == run.info.run_id
    assert model.tags["threadweaver.checkpoint"] == str(Path(summary["checkpoint"]).resolve())
    assert {m.key for m in model.metrics} >= {"eval/accuracy", "eval/L_crit"}
    assert source_of(summary["checkpoint"])["model_id"] == model.model_id
