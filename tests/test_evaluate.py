"""Benchmark evaluation: reading benchmark layouts, the measures (hand-computed), the report, and one real run.

The fast tests build trajectories by hand: units come from ``rollout.units.replay``
over a byte tokenizer, so every length is a byte count known in advance. The
integration test teaches the tiny model two parallel answers by rote and runs
``threadweaver eval`` on them end to end (vLLM, math-verify, MLflow).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.evaluate import BenchEvalConfig, parse_data_arg, read_benchmark
from cluster.report import change_table, histogram, main_table, report_markdown, stage_table
from rewards.checker import Verdict
from rl.evaluation import Sample, latency_efficiency, problem_speedups, score_mode
from rl.evaluation import evaluate_benchmark as evaluate
from rollout.config import RolloutConfig
from rollout.orchestrator import Trajectory
from rollout.units import replay

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


class ByteTokenizer:
    def encode(self, text, add_special_tokens=False):
        return list(text.encode())


class ExactChecker:
    def check(self, pred: str, gold: str) -> Verdict:
        return Verdict(pred == gold, False, "same_text", 0.0)


def traj(problem: int, sample: int, response: str, latency_s: float = 1.0) -> Trajectory:
    """A trajectory of ``response`` with its measures counted by hand (see MEASURES)."""
    L_total, L_crit, blocks = MEASURES[response]
    return Trajectory(problem, sample, [0], replay([0], response, ByteTokenizer()), [], response, "eos", "",
                      L_total, L_crit, 1 - L_crit / L_total, L_total / L_crit, blocks, [2] * blocks, latency_s)


def par(answer: str, thread: str = "x" * 20) -> str:
    return (f"<think>\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\n"
            f"<Thread>\n1: {thread}\n</Thread>\n<Thread>\n2: y\n</Thread>\n</Parallel>\n</think>\n\\boxed{{{answer}}}")


def seq(answer: str, body: str = "z" * 60) -> str:
    return f"<think>\n{body}\n</think>\n\\boxed{{{answer}}}"


# Bytes of model-generated text (the byte tokenizer, no EOS):
# par: head "<think>\n" 8 + "<Parallel>\n" 11 + "<Outlines>\n" 11 + 2 x "<Outline>N: a</Outline>\n" 24 +
#      "</Outlines>" 11 = 89; thread 1 " " + thread + "\n</Thread>" = len(thread) + 11; thread 2 " y\n</Thread>" 12;
#      tail "</Parallel>\n</think>\n\\boxed{A}" 12 + 9 + 9 = 30.
#      20 x's: L_total = 89 + 31 + 12 + 30 = 162, L_crit = 89 + 31 + 30 = 150; 40 x's: 182 and 170.
# seq: "<think>\n" 8 + body + "\n</think>\n" 10 + "\\boxed{A}" 9: 60 z's -> 87; 10 q's -> 37.
MEASURES = {par(a): (162, 150, 1) for a in "14579"}
MEASURES.update({par("4", "x" * 40): (182, 170, 1), seq("7", "q" * 10): (37, 37, 0)})
MEASURES.update({seq(a): (87, 87, 0) for a in "1579"})


def test_benchmark_layouts_math500_and_aime():
    math = read_benchmark(FIXTURES / "math500_sample.jsonl")
    assert [p.answer for p in math] == ["5", "\\frac{3}{4}", "42"] and math[0].problem == "What is $2+3$?"
    aime = read_benchmark(FIXTURES / "aime_sample.jsonl", limit=1)
    assert len(aime) == 1 and aime[0].answer == "24" and aime[0].problem.startswith("Find the remainder")
    with pytest.raises(ValueError, match=r"aime_sample.jsonl:1: none of the problem fields \['problem'\].*question"):
        read_benchmark(FIXTURES / "aime_sample.jsonl", problem_fields=["problem"])
    with pytest.raises(ValueError, match="no string or number answer field 'solution'"):
        read_benchmark(FIXTURES / "aime_sample.jsonl", answer_field="solution")
    assert parse_data_arg("aime=/x/y.jsonl") == ("aime", Path("/x/y.jsonl"))
    assert parse_data_arg(str(FIXTURES / "aime_sample.jsonl"))[0] == "aime_sample"


def test_config_checks():
    with pytest.raises(ValueError, match="prompt_template"):
        BenchEvalConfig(prompt_template="no placeholder")
    assert BenchEvalConfig().rollout_config(True).temperature == 0.0  # greedy by default
    assert BenchEvalConfig().rollout_config(True).seed is None  # greedy: unseeded
    sampled = BenchEvalConfig(rollout=RolloutConfig(n=4, temperature=1.0, seed=3))
    assert (sampled.rollout_config(True).seed, sampled.rollout_config(True).sequential) == (3, True)
    assert (sampled.rollout_config(False).n, sampled.rollout_config(False).sequential) == (4, False)
    with pytest.raises(ValueError, match="rollout.n=4 greedy samples"):
        BenchEvalConfig(rollout=RolloutConfig(n=4, temperature=0.0))


def test_speedups_per_problem_over_all_and_correct_samples():
    s = lambda p, ok, crit: Sample(p, 0, ok, True, crit, crit, 0, 1.0, "eos")  # noqa: E731
    parallel = [s(0, True, 10), s(0, False, 30), s(1, False, 50), s(2, True, 0)]
    sequential = [s(0, True, 40), s(0, True, 80), s(1, True, 100), s(2, True, 9)]
    ratios, undefined = problem_speedups(parallel, sequential, correct_only=False)
    assert ratios == {0: pytest.approx(60 / 20), 1: pytest.approx(2.0)} and undefined == 1
    correct, _ = problem_speedups(parallel, sequential, correct_only=True)
    assert correct == {0: pytest.approx(60 / 10)}  # problem 1 has no correct parallel sample; 2 has L_crit 0
    assert 2 not in correct


def test_evaluate_measures_by_hand(tmp_path):
    answers = ["5", "7"]
    p = [traj(0, 0, par("5"), 0.5), traj(0, 1, par("4", "x" * 40), 0.7),  # one correct of two
         traj(1, 0, seq("7", "q" * 10), 0.2), traj(1, 1, par("7"), 0.4)]
    s = [traj(0, 0, seq("5"), 2.0), traj(0, 1, seq("5"), 1.0), traj(1, 0, seq("1"), 0.8), traj(1, 1, seq("7"), 0.6)]
    report, scores = evaluate(p, s, answers, ExactChecker(), name="tiny", latency="isolated")
    assert [x.correct for x in scores["parallel"]] == [True, False, True, True]
    assert report.k == 2 and report.parallel.accuracy == pytest.approx(0.75)
    assert report.sequential.accuracy == pytest.approx(0.75)
    assert report.parallel.activation == pytest.approx(0.75)
    assert report.parallel.L_total == pytest.approx((162 + 182 + 37 + 162) / 4)
    assert report.parallel.L_crit == pytest.approx((150 + 170 + 37 + 150) / 4)
    assert (report.sequential.L_total, report.sequential.L_crit) == (pytest.approx(87), pytest.approx(87))
    # wall-clock per problem = slowest sample of the problem, averaged over problems
    assert report.parallel.wall_s == pytest.approx((0.7 + 0.4) / 2)
    assert report.sequential.wall_s == pytest.approx((2.0 + 0.8) / 2)
    assert report.wall_speedup == pytest.approx((2.0 / 0.7 + 0.8 / 0.4) / 2)
    # per problem: mean sequential L_crit / mean parallel L_crit
    # problem 0: 87 / ((150 + 170) / 2) = 87 / 160; problem 1: 87 / ((37 + 150) / 2) = 87 / 93.5
    expected0, expected1 = 87 / 160, 87 / 93.5
    assert report.speedups == pytest.approx([expected0, expected1])
    assert report.speedup == pytest.approx((expected0 + expected1) / 2)
    # latency efficiency: per problem wall-clock speedup / token-latency speedup, then the mean
    assert report.latency_efficiency == pytest.approx((2.0 / 0.7 / expected0 + 0.8 / 0.4 / expected1) / 2)
    # correct only: problem 0 -> both sequential samples (87) vs parallel sample 0 (150);
    # problem 1 -> sequential sample 1 (87) vs both parallel samples (37 and 150)
    c0, c1 = 87 / 150, 87 / 93.5
    assert report.speedups_correct == pytest.approx([c0, c1])
    # self speedup: the mean of L_total / L_crit over the samples
    assert report.parallel.self_speedup == pytest.approx((162 / 150 + 182 / 170 + 1 + 162 / 150) / 4)
    metrics = report.metrics()
    assert metrics["eval/tiny/parallel/accuracy"] == pytest.approx(0.75)
    assert metrics["eval/tiny/speedup_correct"] == pytest.approx((c0 + c1) / 2)
    assert metrics["eval/tiny/latency_efficiency"] == pytest.approx(report.latency_efficiency)

    table = main_table([report, report])
    lines = table.splitlines()
    assert lines[0].count("tiny acc (avg@2)") == 2 and len(lines) == 4
    assert lines[2].startswith("| sequential baseline | 75.0% |") and "1.00x" in lines[2]
    assert lines[3].startswith("| parallel | 75.0% |") and f"{report.speedup:.2f}x" in lines[3]
    md = report_markdown([report])
    assert "isolated decoding" in md and "| tiny | parallel |" in md
    png = histogram([report], tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_earlier_checkpoints_rows_changes_and_metrics():
    answers = ["5", "7"]
    final = [traj(0, 0, par("5"), 0.5), traj(1, 0, par("7"), 0.4)]
    earlier = [traj(0, 0, seq("5"), 2.0), traj(1, 0, par("4", "x" * 40), 0.7)]  # one sequential, one wrong
    base = [traj(0, 0, seq("5"), 2.0), traj(1, 0, seq("7"), 0.8)]
    base_earlier = [traj(0, 0, seq("1"), 2.0), traj(1, 0, seq("7"), 0.8)]
    names = ("TW (SFT + P-GRPO)", "seq (SFT + RL)")
    report, _ = evaluate(final, base, answers, ExactChecker(), name="tiny", models=names)
    report.before, _ = evaluate(earlier, base, answers, ExactChecker(), name="tiny", models=("TW (SFT)", names[1]))
    report.sequential_before, scores = score_mode("sequential", "seq (SFT)", base_earlier, answers, ExactChecker())
    assert [x.correct for x in scores] == [False, True] and report.sequential_before.accuracy == 0.5
    assert report.before.speedup == pytest.approx((87 / 87 + 87 / 170) / 2)
    rows = stage_table(report, ceiling=2.0).splitlines()
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| seq (SFT + RL)", "| TW (SFT)", "| TW (SFT + P-GRPO)"]
    assert rows[3].split(" | ")[1:3] == ["50.0%", "128.5"] and rows[3].endswith(f"| 50.0% | {100 * report.before.speedup / 2:.1f}% |")
    assert f"{report.speedup:.2f}x ({report.speedup_median:.2f}x)" in rows[4]
    assert (f"{report.wall_speedup:.2f}x ({report.wall_speedup_median:.2f}x) | {report.latency_efficiency:.2f} "
            f"({report.latency_efficiency_median:.2f}) | 100.0% |") in rows[4]
    changes = change_table(report).splitlines()
    assert changes[2] == "| seq (SFT) -> seq (SFT + RL) | 50.0% -> 100.0% | 0.0% -> 0.0% | 87.0 -> 87.0 | 87.0 -> 87.0 |"
    assert changes[3].startswith("| TW (SFT) -> TW (SFT + P-GRPO) | 50.0% -> 100.0% | 50.0% -> 100.0% | 128.5 -> 150.0 |")
    metrics = report.metrics()
    assert metrics["eval/tiny/before/parallel/activation"] == 0.5
    assert metrics["eval/tiny/before/speedup"] == pytest.approx(report.before.speedup)
    assert metrics["eval/tiny/before/sequential/accuracy"] == 0.5  # the earlier baseline, not the final one
    assert metrics["eval/tiny/sequential/accuracy"] == 1.0
    report.sequential_before.wall_s = float("nan")  # decoded in a batch: no latency logged
    assert "eval/tiny/before/sequential/wall_s" not in report.metrics()
    assert main_table([report]).splitlines()[3].startswith("| TW (SFT) | 50.0% | 128.5 |")
    assert "## What the later training changed (tiny)" in report_markdown([report])


def test_latency_efficiency_is_the_mean_of_per_problem_ratios():
    wall = {0: 1.2, 1: 0.9, 2: 1.0}
    token = {0: 1.5, 1: 1.0}  # problem 2 has no token speedup (undefined): left out
    assert latency_efficiency(wall, token) == pytest.approx((1.2 / 1.5 + 0.9 / 1.0) / 2)
    assert latency_efficiency({}, token) is None


def test_isolated_decoding_takes_turns_with_each_models_weights(monkeypatch, tmp_path):
    """Every model decodes every problem with its own weights loaded, two problems a turn, the models' order
    reversed each round; the results come back per model in problem order."""
    import cluster.evaluate as ev

    class Switch:  # EngineSwitch's bookkeeping: the "engine" is the folder loaded
        reloads, reload_s, loaded = 0, 0.0, None

        def load(self, model_dir, verbose=True):
            self.reloads += model_dir != self.loaded
            self.loaded = model_dir
            return model_dir

    calls = []
    monkeypatch.setattr(ev, "VLLMEngine", lambda llm: llm)
    monkeypatch.setattr(ev, "warm_up", lambda engine, *args: calls.append(("warm", engine.name)))

    def generate(engine, tokenizer, prompts, rollout, prompt_indices, eos_token_id):
        assert prompts == [[prompt_indices[0]]]
        calls.append((engine.name, prompt_indices[0]))
        return [(engine.name, prompt_indices[0])]

    monkeypatch.setattr(ev, "generate", generate)
    decoders = {k: ev._Decoder(tmp_path / k, None, [[i] for i in range(5)], [0], RolloutConfig()) for k in "abc"}
    switch = Switch()
    out = ev.decode_interleaved(switch, decoders, 2)
    assert out == {k: [(k, i) for i in range(5)] for k in "abc"}
    assert calls == [("warm", "a"), ("warm", "b"), ("warm", "c"),
                     ("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1),
                     ("c", 2), ("c", 3), ("b", 2), ("b", 3), ("a", 2), ("a", 3),
                     ("a", 4), ("b", 4), ("c", 4)]
    assert switch.reloads == 3 + 7  # the warm-ups, then a b c | b a | b c: a round's last model starts the next


def test_only_models_of_one_architecture_take_turns(tmp_path):
    from cluster.evaluate import interleaved_keys

    dirs = {}
    for key, layers in (("parallel", 2), ("sequential", 2), ("parallel_before", 2), ("sequential_before", 3)):
        dirs[key] = tmp_path / key
        dirs[key].mkdir()
        (dirs[key] / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    cfg = BenchEvalConfig(model="m", data=["d.jsonl"])
    # the batched baseline_before is not timed, so its other architecture does not matter
    assert interleaved_keys(cfg, dirs) == ["parallel", "sequential", "parallel_before"]
    assert interleaved_keys(BenchEvalConfig(model="m", data=["d.jsonl"], interleave=0), dirs) == []
    assert interleaved_keys(BenchEvalConfig(model="m", data=["d.jsonl"], latency="batched"), dirs) == []
    (dirs["sequential"] / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))
    assert interleaved_keys(cfg, dirs) == []  # one engine cannot serve both: each decodes in one pass
    both = BenchEvalConfig(model="m", data=["d.jsonl"], baseline_before_batched=False)
    assert interleaved_keys(both, {k: dirs[k] for k in ("sequential", "sequential_before")}) == [
        "sequential", "sequential_before"]


def test_medians_over_problems_shrug_off_one_problem_a_burst_of_load_slowed():
    """Three problems of equal work; the third one's sequential decode ran under a burst of load (6 s, not 0.6):
    the means follow it, the medians do not."""
    answers = ["5", "5", "5"]
    p = [traj(i, 0, par("5"), 1.0) for i in range(3)]
    s = [traj(0, 0, seq("5"), 0.6), traj(1, 0, seq("5"), 0.6), traj(2, 0, seq("5"), 6.0)]
    report, _ = evaluate(p, s, answers, ExactChecker(), name="tiny")
    token = 87 / 150
    assert report.wall_speedup == pytest.approx((0.6 + 0.6 + 6.0) / 3)
    assert report.wall_speedup_median == pytest.approx(0.6)
    assert report.latency_efficiency == pytest.approx((0.6 + 0.6 + 6.0) / 3 / token)
    assert report.latency_efficiency_median == pytest.approx(0.6 / token)
    metrics = report.metrics()
    assert metrics["eval/tiny/latency_efficiency_median"] == pytest.approx(0.6 / token)
    assert metrics["eval/tiny/wall_speedup_median"] == pytest.approx(0.6)
    assert f"{0.6 / token:.2f}" in report_markdown([report])


def test_evaluate_refuses_an_empty_mode():
    with pytest.raises(ValueError, match="no sequential trajectories"):
        evaluate([traj(0, 0, par("1"))], [], ["1"], ExactChecker())


# --------------------------------------------------------------------------- end to end

TAUGHT = [("Add 2+3+4.", "9", "<think>\n<Parallel>\n<Outlines>\n<Outline>1: two plus three</Outline>\n"
           "<Outline>2: four</Outline>\n</Outlines>\n<Thread>\n1: 2+3=5, five, done here\n</Thread>\n"
           "<Thread>\n2: 4\n</Thread>\n</Parallel>\n5+4=9\n</think>\n\n\\boxed{9}"),
          ("Add 1+1+5.", "7", "<think>\n<Parallel>\n<Outlines>\n<Outline>1: one plus one</Outline>\n"
           "<Outline>2: five</Outline>\n</Outlines>\n<Thread>\n1: 1+1=2, two, done here\n</Thread>\n"
           "<Thread>\n2: 5\n</Thread>\n</Parallel>\n2+5=7\n</think>\n\n\\boxed{7}")]


@pytest.fixture(scope="module")
def taught_model(tiny_model_dir, tokenizer, tmp_path_factory):
    from rollout.rote import teach
    from rollout.units import chat_prompt_ids

    out = tmp_path_factory.mktemp("eval_taught") / "model"
    examples = [(chat_prompt_ids(tokenizer, q), r) for q, _, r in TAUGHT]
    taught = teach(tiny_model_dir, out, examples, tokenizer)  # until every taught token is greedy by a margin
    assert taught.learned, f"the tiny model did not learn the answers by rote: {taught}"
    return out


@pytest.mark.integration
def test_eval_cli_reports_parallel_and_sequential_side_by_side(taught_model, tiny_model_dir, tmp_path, capsys):
    from mlflow import MlflowClient

    from cluster.cli import main

    bench = tmp_path / "taught.jsonl"
    bench.write_text("".join(json.dumps({"question": q, "answer": int(a)}) + "\n" for q, a, _ in TAUGHT))
    out = tmp_path / "eval"
    rc = main(["eval", f"model={taught_model}", f"data=[rote={bench}]", "rollout.max_tokens=160",
               "rollout.max_context=512", "rollout.max_thread_tokens=48", f"out={out}", "pages=2",
               f"model_before={tiny_model_dir}", f"baseline_before={tiny_model_dir}",
               f"tracking.uri=sqlite:///{tmp_path.resolve()}/mlflow.db"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| rote acc (avg@1) |" in printed
    summary = json.loads((out / "summary.json").read_text())[0]
    par, seq = summary["parallel"], summary["sequential"]
    assert par["accuracy"] == 1.0 and seq["accuracy"] == 1.0  # the rote answers, decoded both ways
    assert par["activation"] == 1.0 and seq["activation"] == 0.0  # no spawning in sequential mode
    records = [json.loads(x) for x in (out / "rote_parallel.jsonl").read_text().splitlines()]
    seq_records = [json.loads(x) for x in (out / "rote_sequential.jsonl").read_text().splitlines()]
    # the same text decoded as one sequence: there the model writes what the orchestrator inserts in parallel
    # mode, two seeds "\n<Thread>\nN:" (5 tokens each) and the join newline (1), so L_total is 11 tokens longer
    assert [s["L_total"] - p["L_total"] for s, p in zip(seq_records, records)] == [11, 11]
    # k = 1: a problem's wall-clock time is its one sample's; the report averages it over the problems
    assert par["wall_s"] == pytest.approx(sum(r["latency_s"] for r in records) / 2)
    assert seq["wall_s"] == pytest.approx(sum(r["latency_s"] for r in seq_records) / 2)
    assert [r["correct"] for r in records] == [True, True] and records[0]["extracted_answer"] == "9"
    assert [r["n_blocks"] for r in seq_records] == [0, 0] and "<Parallel>" in seq_records[0]["response"]
    # k = 1: a problem's speedup is the sequential sample's length over the parallel sample's critical path
    assert summary["speedups"] == pytest.approx([s["L_total"] / p["L_crit"] for s, p in zip(seq_records, records)])
    assert all(p["L_crit"] < p["L_total"] for p in records) and summary["speedup"] > 1.1
    assert summary["speedup_correct"] == pytest.approx(summary["speedup"])
    assert "critical path" in (out / "rote_parallel.html").read_text()
    # the earlier checkpoints (here the untaught model) decoded on the same engine, weights reloaded in place
    before = summary["before"]["parallel"]
    assert before["accuracy"] == 0.0 and summary["sequential_before"]["accuracy"] == 0.0
    assert len((out / "rote_parallel_before.jsonl").read_text().splitlines()) == 2
    assert "## What the later training changed (rote)" in (out / "report.md").read_text()
    assert (out / "speedup_hist.png").stat().st_size > 5000
    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("threadweaver-eval").experiment_id])[0]
    assert run.data.metrics["eval/rote/parallel/accuracy"] == 1.0
    assert run.data.metrics["eval/rote/speedup"] == pytest.approx(summary["speedup"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "speedup_hist.png", "pages", "eval"} <= artifacts
