"""One P-GRPO step without Ray (``rl.step``, ``rl.metrics.step_metrics``): hand-built trajectories, a fake
learner that records what it is given, numbers worked out by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace as T

import pytest
import torch

from rl.grpo import GRPOConfig, RLRow
from rl.metrics import StepTimes, step_metrics
from rl.step import build_batch, rl_step
from rollout.units import Unit

PROMPT_A, PROMPT_B = [1, 2], [7, 8, 9]


def trajectory(prompt: list[int], completion: list[int]) -> T:
    """A one-unit (sequential) trajectory as the rollout workers return it, with what the metrics read."""
    n = len(completion)
    return T(units=[Unit(list(prompt), list(completion), [-0.5] * n)], L_total=n, L_crit=n, eta=0.0, speedup=1.0,
             n_blocks=0, threads_per_block=[], finish_reason="eos")


def score(reward: float) -> T:
    return T(reward=reward, R_correct=reward, R_accel=0.0, format_penalty=0.0, correct=reward > 0,
             timed_out=False, format_valid=True, cut=False, error=None)


class FakeLearner:
    """Records every optimizer step; returns the numbers ``learner_metrics`` reads."""

    def __init__(self):
        self.calls = []

    def train_step(self, rows, loss, **options):
        self.calls.append((rows, loss, options))
        return {"loss": 0.25, "pg_sum": 3.0, "kl_sum": 0.0, "clipped": 0.0, "targets": 3.0, "grad_norm": 1.5,
                "lr": 1e-3, "tokens": 30.0, "lp_absdiff_sum": 0.3, "lp_count": 3.0, "ratio_dev_sum": 0.0,
                "ratio_absdev_sum": 0.0, "ratio_sqdev_sum": 0.0}


def batch_of_two_groups():
    """Group A (prompt 1 2): rewards 1 and 0, completions [3 4] and [5]. Group B (prompt 7 8 9): rewards 1 and 1."""
    trajectories = [trajectory(PROMPT_A, [3, 4]), trajectory(PROMPT_A, [5]),
                    trajectory(PROMPT_B, [6]), trajectory(PROMPT_B, [6, 4])]
    return trajectories, [score(1.0), score(0.0), score(1.0), score(1.0)]


def test_advantages_and_which_tokens_get_which_weight():
    trajectories, scores = batch_of_two_groups()
    batch = build_batch(trajectories, [s.reward for s in scores], 2, GRPOConfig(), row_tokens=64)
    # mean-centred: group A has mean 0.5 -> +0.5, -0.5; group B is all 1 -> 0, 0
    assert batch.advantages == [0.5, -0.5, 0.0, 0.0]
    assert batch.completion_tokens == 2 + 1 + 1 + 2  # every completion token, group B included
    assert len(batch.tries) == 2 and len(batch.trained) == 1  # group B's trie has no weight: not forwarded
    trie = batch.trained[0]
    # trie of group A: 1 2 shared, then 3 4 (trajectory 1) and 5 (trajectory 2)
    assert trie.input_ids == [1, 2, 3, 4, 5] and trie.position_ids == [0, 1, 2, 3, 2]
    assert trie.weight_pos == [0.0, 0.0, 0.5, 0.5, 0.0] and trie.weight_neg == [0.0, 0.0, 0.0, 0.0, -0.5]
    assert trie.n_targets == [0, 0, 1, 1, 1]  # the prompt is never a target
    assert len(batch.rows) == 1 and batch.rows[0].input_ids.tolist() == [1, 2, 3, 4, 5]
    # trie tokens of both groups: 5 (A) + 3 + 2 (B: 7 8 9, then 6, then 4 under 6)
    assert batch.stats.unique_tokens == 10 and batch.stats.expanded_tokens == 4 + 3 + 4 + 5


def test_std_advantages_and_zero_groups_kept_with_a_kl_term():
    trajectories, scores = batch_of_two_groups()
    grpo = GRPOConfig(advantage="std", std_floor=0.01, kl_coef=0.1)
    batch = build_batch(trajectories, [s.reward for s in scores], 2, grpo, row_tokens=64)
    # group A: centred +-0.5, population std 0.5 -> +-1; group B: 0 / max(0, 0.01) = 0
    assert batch.advantages == [1.0, -1.0, 0.0, 0.0]
    assert len(batch.trained) == 2  # with a KL term every trie is forwarded (its KL gradient is not 0)


def test_a_step_trains_once_per_update_with_the_batch_normaliser_and_logs_by_hand():
    trajectories, scores = batch_of_two_groups()
    learner = FakeLearner()
    grpo = GRPOConfig(updates_per_batch=2, clip_eps=0.2)
    result = rl_step(trajectories, [s.reward for s in scores], 2, grpo, 64, learner)
    assert len(learner.calls) == 2 and len(result.learn) == 2
    rows, loss, options = learner.calls[0]
    assert loss == "pgrpo" and options == {"denominator": 6.0, "clip_eps": 0.2, "kl_coef": 0.0}
    assert rows is result.batch.rows

    times = StepTimes(rollout_s=2.0, reward_s=0.5, learn_s=1.0, sync_s=0.5, step_s=4.0, sync_load_s=0.25)
    m = step_metrics(trajectories, scores, result, times, restarts=1, epoch=0, prompts_seen=2)
    assert m["adv/mean_abs"] == 0.25 and m["adv/zero_groups"] == 0.5 and m["adv/nonzero_share"] == 0.5
    assert m["batch/completion_tokens"] == 6.0 and m["batch/trained_tries"] == 1.0 and m["batch/rows"] == 1.0
    assert m["batch/trie_tokens"] == 10.0 and m["batch/tree_token_ratio"] == pytest.approx(16 / 10)
    assert m["batch/dropped_oversize"] == 0.0
    assert m["train/reward"] == 0.75 and m["train/L_total"] == 1.5 and m["train/finish/eos"] == 1.0
    assert m["loss/pg"] == 0.5 and m["loss/clip_frac"] == 0.0 and m["learner/skipped"] == 0.0
    assert m["learner/tokens_per_s"] == 60.0 and m["logprob/rollout_learner_absdiff"] == pytest.approx(0.1)
    assert m["rollout/generated_tokens"] == 6.0 and m["throughput/rollout_tokens_per_s"] == 3.0
    assert m["throughput/step_tokens_per_s"] == 1.5 and m["time/sync_load_s"] == 0.25
    assert (m["rollout/restarts"], m["data/epoch"], m["data/prompts_seen"]) == (1.0, 0.0, 2.0)
    no_block = {"train/correct_with_block", "train/threads_per_block"}  # means over no trajectory with a block
    assert all(math.isnan(m[k]) for k in no_block)
    assert all(isinstance(v, float) and not math.isnan(v) for k, v in m.items() if k not in no_block)


def test_a_batch_without_signal_takes_no_step():
    trajectories = [trajectory(PROMPT_A, [3]), trajectory(PROMPT_A, [4])]
    learner = FakeLearner()
    result = rl_step(trajectories, [1.0, 1.0], 2, GRPOConfig(), 64, learner)
    assert learner.calls == [] and result.learn == [] and result.batch.rows == []
    m = step_metrics(trajectories, [score(1.0), score(1.0)], result, StepTimes(), 0, 0, 1)
    assert m["learner/skipped"] == 1.0 and m["adv/zero_groups"] == 1.0 and m["batch/rows"] == 0.0


def test_a_trajectory_longer_than_a_row_is_dropped_counted_and_logged(capsys):
    """Row of 6 tokens: group A's [3 4] (trie 1 2 3 4 = 4) fits, a 5-token completion (trie 7) does not."""
    trajectories = [trajectory(PROMPT_A, [3, 4]), trajectory(PROMPT_A, [5, 5, 5, 5, 5]),
                    trajectory(PROMPT_B, [6, 6, 6, 6]), trajectory(PROMPT_B, [6])]
    learner = FakeLearner()
    result = rl_step(trajectories, [1.0, 0.0, 0.0, 1.0], 2, GRPOConfig(), 6, learner)
    batch = result.batch
    assert batch.dropped == [1, 2] and batch.advantages == [0.5, -0.5, -0.5, 0.5]  # the means saw every reward
    assert batch.completion_tokens == 2 + 1  # the normaliser counts the trajectories trained
    assert [t.input_ids for t in batch.trained] == [[1, 2, 3, 4], [7, 8, 9, 6]]
    assert learner.calls[0][2]["denominator"] == 3.0
    assert "dropped 2 trajectories (batch index [1, 2])" in capsys.readouterr().err
    m = step_metrics(trajectories, [score(1.0), score(0.0), score(0.0), score(1.0)], result, StepTimes(), 0, 0, 2)
    assert m["batch/dropped_oversize"] == 2.0
    whole = rl_step(trajectories, [1.0, 0.0, 0.0, 1.0], 2, GRPOConfig(), 2, FakeLearner())  # nothing fits
    assert whole.batch.dropped == [0, 1, 2, 3] and whole.learn == [] and whole.batch.rows == []


def test_the_reference_sees_rows_without_their_tries_and_its_logprobs_reach_the_learner():
    trajectories, scores = batch_of_two_groups()
    seen = []

    def reference(rows):
        seen.extend(rows)
        return [torch.full((len(r),), -1.0) for r in rows]

    learner = FakeLearner()
    rl_step(trajectories, [s.reward for s in scores], 2, GRPOConfig(kl_coef=0.1), 64, learner, reference)
    assert len(seen) == 1 and seen[0].tries == [] and len(seen[0]) == 10  # both groups (a KL term)
    rows = learner.calls[0][0]
    assert isinstance(rows[0], RLRow) and rows[0].ref_logprob.tolist() == [-1.0] * len(rows[0])


# --------------------------------------------------------------------------- the driver's step around rl_step


class FakeRollouts:
    """Returns the trajectories it is given and records weight syncs (``rl.services.Rollouts``'s interface)."""

    def __init__(self, trajectories):
        self.trajectories, self.synced, self.restarts = trajectories, [], 0

    def generate(self, prompts, config):
        for t in self.trajectories:
            t.prompt_index, t.text = (0 if t.units[0].context_ids == PROMPT_A else 1), "text"
        return self.trajectories

    def update_weights(self, weights):
        self.synced.append(weights)
        return T(load_s=0.25)


class FakeTracker:
    run_id, uri = "run", "file:fake"

    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


def driver_run(tmp_path, rewards: list[float]):
    """A ``rl.driver.Run`` over fakes: two prompts, two samples each, the batch of ``batch_of_two_groups``."""
    from collections import Counter

    from rl.driver import PromptStream, RLConfig, Run
    from rl.metrics_log import MetricsLog
    from rollout.config import RolloutConfig

    trajectories, _ = batch_of_two_groups()
    learner = FakeLearner()
    learner.weights = lambda cfg, lock=None: {"published with bucket_mb": cfg.weight_bucket_mb}
    scored = [score(r) for r in rewards]
    services = T(rewards=T(score_batch=lambda items: scored), reference=None)
    cfg = RLConfig(model="m", run_dir=str(tmp_path), steps=1, prompts_per_step=2, rollout=RolloutConfig(n=2))
    tokenizer = T()  # the prompts are not encoded: the fake rollouts ignore them
    run = Run(cfg, FakeTracker(), learner, services, FakeRollouts(trajectories), PromptStream(2, 0), tokenizer,
              [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}], [], [], None, Counter(),
              log=MetricsLog(tmp_path / "metrics.jsonl", None))
    return run, learner


def test_the_driver_step_learns_then_syncs_the_weights_once(tmp_path, monkeypatch):
    monkeypatch.setattr("rl.driver.chat_prompt_ids", lambda tok, text: [ord(text)])
    run, learner = driver_run(tmp_path, [1.0, 0.0, 1.0, 1.0])
    m = run.train_step()
    assert run.step == 1 and len(learner.calls) == 1 and run.rollouts.synced == [{"published with bucket_mb": 16.0}]
    assert m["time/sync_load_s"] == 0.25 and m["learner/skipped"] == 0.0
    assert run.tracker.logged == [(1, m)] and run.totals["generated_tokens"] == 6


def test_a_driver_step_without_signal_neither_learns_nor_syncs(tmp_path, monkeypatch):
    monkeypatch.setattr("rl.driver.chat_prompt_ids", lambda tok, text: [ord(text)])
    run, learner = driver_run(tmp_path, [1.0, 1.0, 0.0, 0.0])  # every group has equal rewards
    m = run.train_step()
    assert run.step == 1 and learner.calls == [] and run.rollouts.synced == []
    assert m["learner/skipped"] == 1.0 and m["time/sync_load_s"] == 0.0 and m["adv/zero_groups"] == 1.0
