"""The three evaluators (SFT held-out, RL held-out, ``threadweaver eval``) report the same measures under the
same names, with the same values, on the same trajectories (``rl.evaluation.measures``)."""

from __future__ import annotations

import math

from rewards.checker import Verdict
from rewards.config import RewardConfig
from rewards.score import score_many
from rl.evaluation import MEASURE_KEYS, evaluate_benchmark, evaluate_heldout, judge, summarize
from rollout.config import RolloutConfig
from rollout.orchestrator import FINISH_REASONS, Trajectory
from rollout.units import replay


class ByteTokenizer:
    def encode(self, text, add_special_tokens=False):
        return list(text.encode())


class ExactChecker:
    def check(self, pred: str, gold: str) -> Verdict:
        return Verdict(pred == gold, False, "same_text", 0.0)


def traj(problem: int, response: str, finish: str, L_total: int, L_crit: int, blocks: int) -> Trajectory:
    return Trajectory(problem, 0, [0], replay([0], response, ByteTokenizer()), [], response, finish, "",
                      L_total, L_crit, 1 - L_crit / L_total, L_total / L_crit, blocks, [2] * blocks, 1.0)


PAR = ("<think>\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\n"
       "<Thread>\n1: x\n</Thread>\n<Thread>\n2: y\n</Thread>\n</Parallel>\n</think>\n\\boxed{{{}}}")
SEQ = "<think>\nzz\n</think>\n\\boxed{{{}}}"
ANSWERS = ["1", "2", "3"]
PARALLEL = [traj(0, PAR.format("1"), "eos", 120, 100, 1), traj(1, PAR.format("7"), "eos", 120, 100, 1),
            traj(2, SEQ.format("3"), "budget", 40, 40, 0)]
SEQUENTIAL = [traj(0, SEQ.format("1"), "eos", 30, 30, 0), traj(1, SEQ.format("2"), "eos", 30, 30, 0),
              traj(2, "<think>\nno answer", "context", 20, 20, 0)]
KEYS = set(MEASURE_KEYS) | {f"finish/{r}" for r in FINISH_REASONS}


class FakeRollouts:
    def generate(self, prompts, rc):
        return SEQUENTIAL if rc.sequential else PARALLEL


class FakeRewardPool:
    def score_batch(self, items):
        return score_many(items, RewardConfig(), ExactChecker())


def under(metrics: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b)


def test_sft_rl_and_benchmark_evaluators_report_the_same_measures(tmp_path):
    rl, _ = evaluate_heldout(RolloutConfig(), ["parallel", "sequential"], FakeRollouts(), FakeRewardPool(),
                             [[0]] * 3, ANSWERS, 0, tmp_path)
    report, _ = evaluate_benchmark(PARALLEL, SEQUENTIAL, ANSWERS, ExactChecker(), name="tiny")
    bench = report.metrics()
    for mode, trajectories in (("parallel", PARALLEL), ("sequential", SEQUENTIAL)):
        sft = summarize([judge(t, ANSWERS[t.prompt_index], ExactChecker()) for t in trajectories])
        reported = [sft, under(rl, f"eval/{mode}/"), under(bench, f"eval/tiny/{mode}/")]
        for metrics in reported:
            assert KEYS <= set(metrics), KEYS - set(metrics)
        for key in KEYS:
            assert same(reported[0][key], reported[1][key]) and same(reported[0][key], reported[2][key]), key
    assert under(bench, "eval/tiny/parallel/")["finish/budget"] == 1 / 3  # finish/<reason> in the report too
    assert under(rl, "eval/parallel/")["accuracy"] == 1 / 3  # the cut one is incorrect, the wrong one too
    assert under(rl, "eval/parallel/")["parallel_valid"] == 2 / 3


def test_rl_heldout_and_benchmark_report_the_same_latency_efficiency(tmp_path):
    rl, _ = evaluate_heldout(RolloutConfig(), ["parallel", "sequential"], FakeRollouts(), FakeRewardPool(),
                             [[0]] * 3, ANSWERS, 0, tmp_path)
    bench = evaluate_benchmark(PARALLEL, SEQUENTIAL, ANSWERS, ExactChecker(), name="tiny")[0].metrics()
    # every wall time is 1 s, so per problem efficiency = 1 / (L_crit sequential / L_crit parallel)
    expected = (100 / 30 + 100 / 30 + 40 / 20) / 3
    assert math.isclose(rl["eval/latency_efficiency"], expected)
    assert math.isclose(bench["eval/tiny/latency_efficiency"], expected)
    assert rl["eval/wall_speedup"] == bench["eval/tiny/wall_speedup"] == 1.0
    one_mode, _ = evaluate_heldout(RolloutConfig(), ["parallel"], FakeRollouts(), FakeRewardPool(),
                                   [[0]] * 3, ANSWERS, 0, tmp_path)
    assert "eval/latency_efficiency" not in one_mode
