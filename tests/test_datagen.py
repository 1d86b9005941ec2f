"""Stage 1 without a teacher: traces, assembly, the rule-based rewriter, step 5, outputs and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.config import load_config
from rewards.checker import AnswerChecker, Verdict
from rl.datagen.rewrite import RewriteConfig
from rl.datagen.rules import RuleRewriter
from rl.datagen.stage1 import Stage1Config, run_stage1, validate_step
from rl.datagen.trace import (
    BlockPlan, Reject, Rejection, Trace, assemble, split_steps, trace_from_record,
)
from rollout.format import is_valid, parse
from rollout.task import TaskConfig, make_dataset
from rollout.tiny import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SEQ = "<think>\n7*12: 7*2=014, 7*10=070, 014+070=084\n5*40: 5*40=200\n0084+0200=0284\n</think>\n\n\\boxed{284}"
REC = {"id": "r1", "prompt": "Compute 7*12 + 5*40.", "answer": "284", "response_sequential": SEQ}


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(eager=False) as c:  # integer answers: decided without the math-verify server
        yield c


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(path)
    return path


# ---------------------------------------------------------------------------- traces and assembly


@pytest.mark.parametrize("change, code", [
    ({"prompt": " "}, "no_prompt"),
    ({"answer": None}, "no_answer"),
    ({"answer": True}, "no_answer"),
    ({"response_sequential": None}, "no_response"),
    ({"response_sequential": "<think>\n<Parallel>x</think>\\boxed{1}"}, "already_parallel"),
    ({"response_sequential": "7*12=84 \\boxed{84}"}, "no_think"),
    ({"response_sequential": "</think> <think>"}, "no_think"),
    ({"response_sequential": "Sure. <think>a</think>\\boxed{1}"}, "text_before_think"),
    ({"response_sequential": "<think>a</think><think>b</think>\\boxed{1}"}, "several_think"),
    ({"response_sequential": "<think>\n \n</think>\\boxed{1}"}, "empty_reasoning"),
])
def test_records_that_are_not_traces_are_rejected_at_input(change, code):
    with pytest.raises(Reject) as e:
        trace_from_record({**REC, **change}, "response_sequential", 0)
    assert (e.value.rejection.step, e.value.rejection.code) == ("input", code)


def test_trace_parts_and_numeric_answers():
    t = trace_from_record({**REC, "answer": 284}, "response_sequential", 3)
    assert t.answer == "284" and t.id == "r1"
    assert t.reasoning.startswith("7*12:") and t.reasoning.endswith("=0284")
    assert t.final == "\n\n\\boxed{284}"
    assert trace_from_record({k: v for k, v in REC.items() if k != "id"}, "response_sequential", 3).id == "3"


def test_rejection_names_a_known_step():
    with pytest.raises(ValueError, match="unknown step"):
        Rejection("rewrite", "x", "y")


def test_steps_and_assembly_keep_everything_outside_blocks():
    reasoning = "Intro line.\n\nPart A: 2*3 = 6.\n\nPart B:\n4*5 = 20.\n\nSo 26."
    steps = split_steps(reasoning, "paragraph")
    assert steps == ["Intro line.", "Part A: 2*3 = 6.", "Part B:\n4*5 = 20.", "So 26."]
    assert split_steps("a\n\n b \nc  ", "line") == ["a", " b", "c"]
    trace = Trace("t", "Compute 2*3 + 4*5.", reasoning, "\n\n\\boxed{26}", "26")
    block = BlockPlan([(2, 2), (3, 3)], texts=["Part A: 2*3 = 6.", "Part B:\n4*5 = 20."], outlines=["2*3", "4*5"])
    text = assemble(trace, steps, [block], "paragraph")
    assert is_valid(text)
    assert text.startswith("<think>\nIntro line.\n\n<Parallel>\n<Outlines>\n<Outline>1: 2*3</Outline>\n")
    assert "<Thread>\n2: Part B:\n4*5 = 20.\n</Thread>\n</Parallel>\n\nSo 26.\n</think>\n\n\\boxed{26}" in text
    assert parse(text).blocks[0].thread_body(0) == " Part A: 2*3 = 6.\n"
    with pytest.raises(ValueError, match="texts and outlines"):
        assemble(trace, steps, [BlockPlan([(2, 2), (3, 3)])], "paragraph")
    with pytest.raises(ValueError, match="overlap"):
        assemble(trace, steps, [block, block], "paragraph")


# ---------------------------------------------------------------------------- the rule-based rewriter


@pytest.mark.parametrize("task", [TaskConfig(), TaskConfig(blocks=2, min_threads=2, max_threads=3, b_digits=2)])
def test_rule_rewriter_reproduces_the_task_reference_and_passes_step_5(task, checker):
    records = make_dataset(task, {"train": 40}, seed=3)["train"]
    rewriter = RuleRewriter(RewriteConfig())
    for i, rec in enumerate(records):
        trace = trace_from_record(rec, "response_sequential", i)
        out = rewriter.rewrite(trace)
        assert out == rec["response_parallel"], rec["id"]
        validate_step(trace, out, checker)


def test_rule_rewriter_rejections():
    rewriter = RuleRewriter(RewriteConfig())
    no_products = trace_from_record({**REC, "response_sequential": "<think>\n84+200=284\n</think>\\boxed{284}"},
                                    "response_sequential", 0)
    assert rewriter.rewrite(no_products) == Rejection("find", "no_runs", "no run of independent steps found")
    three = make_dataset(TaskConfig(min_threads=3, max_threads=3), {"train": 1})["train"][0]
    narrow = RuleRewriter(RewriteConfig(min_threads=2, max_threads=2))
    r = narrow.rewrite(trace_from_record(three, "response_sequential", 0))
    assert (r.step, r.code) == ("cut", "thread_count")
    with pytest.raises(ValueError, match="line by line"):
        RuleRewriter(RewriteConfig(step_unit="paragraph"))


# ---------------------------------------------------------------------------- step 5


class TimingOut:
    def check(self, pred, gold):
        return Verdict(False, True, "timeout", 5.0)


def test_validate_step_failure_paths(checker):
    trace = trace_from_record(REC, "response_sequential", 0)
    good = RuleRewriter(RewriteConfig()).rewrite(trace)
    validate_step(trace, good, checker)
    cases = [
        (good.replace("<Outline>2: 5*40</Outline>\n", ""), checker, "format"),
        (SEQ, checker, "not_parallel"),
        (good.replace("\\boxed{284}", "284"), checker, "no_answer"),
        (good.replace("</think>", ""), checker, "format"),
        (good, TimingOut(), "check_timeout"),
        (good.replace("\\boxed{284}", "\\boxed{285}"), checker, "wrong_answer"),
    ]
    for text, c, code in cases:
        with pytest.raises(Reject) as e:
            validate_step(trace, text, c)
        assert (e.value.rejection.step, e.value.rejection.code) == ("validate", code)


# ---------------------------------------------------------------------------- a whole run, by the CLI


def test_stage1_rule_run_writes_records_that_check(tmp_path, tokenizer_dir, capsys):
    records = make_dataset(TaskConfig(), {"train": 12}, seed=5)["train"]
    wrong = {**records[0], "id": "wrong", "answer": str(int(records[0]["answer"]) + 1)}
    broken = {**records[1], "id": "broken", "response_sequential": records[1]["response_sequential"][8:]}
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records[:6] + [wrong, broken] + records[6:]))
    out = tmp_path / "out" / "stage1.jsonl"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = main(["datagen", "stage1", "-c", str(ROOT / "experiments/datagen_stage1_rule.yaml"),
               f"input={src}", f"out={out}", "progress=false", f"tracking.uri={uri}"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "kept 12 of 14 traces" in printed and "wrong_answer 1" in printed and "no_think 1" in printed
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in kept] == [r["id"] for r in records]
    for got, ref in zip(kept, records):
        assert got["response"] == ref["response_parallel"] and got["response_sequential"] == ref["response_sequential"]
        assert got["prompt"] == ref["prompt"] and got["answer"] == ref["answer"] and "response_parallel" not in got
        assert got["provenance"]["stage"] == "stage1" and got["provenance"]["rewriter"] == "rule"
    rejected = [json.loads(x) for x in (tmp_path / "out" / "stage1.rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["step"], r["code"]) for r in rejected] == [("wrong", "validate", "wrong_answer"),
                                                                    ("broken", "input", "no_think")]
    stats = json.loads((tmp_path / "out" / "stage1.stats.json").read_text())
    assert (stats["total"], stats["kept"]) == (14, 12)
    assert stats["rejected"] == {"input": {"no_think": 1}, "validate": {"wrong_answer": 1}}
    assert stats["rejected_by_step"] == {"input": 1, "validate": 1}
    assert main(["check", str(out), "--tokenizer", str(tokenizer_dir)]) == 0
    assert "12/12 valid" in capsys.readouterr().out

    from mlflow import MlflowClient  # the run: live progress, final counts, input and output with their hashes

    from cluster.lineage import file_hash

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("datagen_stage1_rule").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "datagen_stage1"
    done = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "datagen/done")]
    assert done[0] == (1, 1.0) and done[-1] == (14, 14.0)  # the first record, then at most every 2 s, the last
    assert run.data.metrics["datagen/kept"] == 12
    assert run.data.tags["threadweaver.output_sha256"] == file_hash(out)
    (inp,) = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert json.loads(inp.dataset.profile)["sha256"] == file_hash(src)


def test_cli_config_errors_and_keys(tmp_path, capsys):
    assert main(["datagen", "stage1", "rewritr=rule"]) == 2
    assert "did you mean 'rewriter'" in capsys.readouterr().err
    assert main(["datagen", "stage1", "rewriter=rule", "out=x.jsonl", f"input={tmp_path / 'none.jsonl'}"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["datagen", "stage1", "rewriter=rule"]) == 2
    assert "needs 'input' and 'out'" in capsys.readouterr().err
    assert main(["datagen", "stage2", "--show-config"]) == 0
    assert "rollout.max_tokens" in capsys.readouterr().out
    assert main(["datagen", "stage2", "--keys"]) == 0  # deprecated alias
    out = capsys.readouterr()
    assert "rollout.max_tokens" in out.out and "deprecated" in out.err
    assert main(["datagen", "stage1", "-c", str(ROOT / "experiments/datagen_stage1_teacher.yaml"),
                 "teacher.concurrency=2", "--print-config"]) == 0
    assert "concurrency: 2" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["datagen_stage1_rule.yaml", "datagen_stage1_teacher.yaml", "datagen_stage2_tiny.yaml"])
def test_experiment_configs_load(name):
    from rl.datagen.stage2 import Stage2Config

    cfg = load_config(Stage2Config if "stage2" in name else Stage1Config, ROOT / "experiments" / name)
    assert cfg.out and (cfg.input if "stage1" in name else cfg.prompts and cfg.model)
