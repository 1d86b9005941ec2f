"""The DeepSpeed learner: schedule, row splitting, and data-parallel equivalence on Ray.

The integration test trains the tiny model for 20 steps with one rank and with
two ranks on the same global batches (some with an odd number of rows, so one
rank also runs a dummy row) and requires the same loss and gradient norm at
every step, then checks the weight export (buckets, Hugging Face save). A second
one does the same with the P-GRPO loss and a KL term on three rows and on one
row (then a rank runs only the padding row), so the padding row, which has no
reference log-probabilities, must not count.
"""

from __future__ import annotations

import time

import pytest
import torch

from rl.learner import LearnerConfig, deepspeed_config, dummy_row, split_rows, strip_row
from rl.schedule import lr_factor
from rl.trie import build_trie, make_row, pack_tries
from rollout.ray_init import start_ray
from rollout.units import Unit


def _row(n: int) -> object:
    return make_row([build_trie([Unit([1] * (n - 1), [2])])])


def test_lr_factor_warmup_then_cosine_to_floor():
    assert lr_factor(0, 4, 20, "cosine", 0.1) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(20, 4, 20, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(99, 4, 20, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(10, 0, 20, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        lr_factor(0, 0, 10, "linear")


def test_split_rows_balances_tokens_and_keeps_every_row():
    rows = [_row(n) for n in (50, 10, 40, 30, 20)]
    parts = split_rows(rows, 2)
    assert sorted(len(r) for part in parts for r in part) == [10, 20, 30, 40, 50]
    loads = [sum(len(r) for r in part) for part in parts]
    assert abs(loads[0] - loads[1]) <= 10
    assert split_rows(rows[:1], 3)[1:] == [[], []]


def test_deepspeed_config_clips_itself_only_for_stage0_fp32():
    assert deepspeed_config(LearnerConfig(grad_clip=0.5), 2)["gradient_clipping"] == 0.0
    ds = deepspeed_config(LearnerConfig(grad_clip=0.5, zero_stage=2, dtype="bf16"), 4)
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]
    assert ds["train_batch_size"] == 4
    with pytest.raises(ValueError, match="zero_stage"):
        LearnerConfig(zero_stage=4)


def test_dummy_row_has_no_target():
    row = dummy_row(0)
    assert len(row) == 2 and int(row.n_targets.sum()) == 0 and float(row.weight.abs().sum()) == 0.0


# --------------------------------------------------------------------------- integration


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    start_ray(None, num_cpus=2, include_dashboard=False)  # as the commands start it
    yield ray
    ray.shutdown()


def _batches(tokenizer, steps: int) -> list[list]:
    """Global batches of packed rows from the synthetic task (2-5 rows each, parallel layout)."""
    from rollout.task import TaskConfig, make_dataset
    from rollout.units import chat_prompt_ids, replay

    records = make_dataset(TaskConfig(b_digits=2, max_threads=3), {"train": 3 * steps}, seed=1)["train"]
    tries = [build_trie(replay(chat_prompt_ids(tokenizer, r["prompt"]), r["response_parallel"], tokenizer,
                               tokenizer.eos_token_id)) for r in records]
    out = []
    for s in range(steps):
        group = tries[3 * s:3 * s + 3]
        out.append(pack_tries(group, 400 if s % 2 else 700))  # odd steps: 3 rows; even: 2 rows
    return out


@pytest.mark.integration
def test_one_and_two_ranks_train_identically(ray_cluster, tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from rl.learner import LearnerGroup

    steps = 20
    batches = _batches(tokenizer, steps)
    assert {len(b) for b in batches} == {2, 3}
    base = dict(lr=3e-3, warmup_steps=3, grad_clip=1.0, row_tokens=700, cpus_per_rank=0.5, threads_per_rank=1)
    one = LearnerGroup(LearnerConfig(ranks=1, **base), tiny_model_dir, total_steps=steps)
    two = LearnerGroup(LearnerConfig(ranks=2, **base), tiny_model_dir, total_steps=steps)
    try:
        m1 = [one.train_step(b) for b in batches]
        m2, wall = [], []
        for b in batches:
            t0 = time.perf_counter()
            m2.append(two.train_step(b))
            wall.append(time.perf_counter() - t0)
        for s, (a, b) in enumerate(zip(m1, m2)):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), f"step {s}"
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3, abs=1e-5), f"step {s}"
            assert a["tokens"] == b["tokens"] == sum(len(r) for r in batches[s])
            assert a["lr"] == pytest.approx(b["lr"])
        assert m1[-1]["loss"] < 0.7 * m1[0]["loss"]  # it learns
        assert m1[0]["lr"] == pytest.approx(1e-3) and m1[2]["lr"] == pytest.approx(3e-3)

        buckets = list(two.weight_buckets(bucket_mb=0.5))
        assert len(buckets) > 1
        assert all(sum(t.numel() * t.element_size() for _, t in b) <= 0.5 * 2**20 or len(b) == 1
                   for b in buckets)
        exported = {n: t for b in buckets for n, t in b}
        reference = one.state_dict()
        assert exported.keys() == reference.keys()
        assert max(float((exported[n] - reference[n]).abs().max()) for n in exported) < 1e-4

        out = two.save_hf(tmp_path / "hf")
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
        for name, tensor in exported.items():
            assert torch.equal(loaded[name], tensor), name
        assert torch.equal(loaded["lm_head.weight"], exported["model.embed_tokens.weight"])  # tied head
        assert (out / "tokenizer.json").exists()
    finally:
        one.shutdown()
        two.shutdown()

    zero2 = LearnerGroup(LearnerConfig(ranks=2, zero_stage=2, **base), tiny_model_dir, total_steps=steps)
    try:  # optimizer state and gradients sharded over the ranks: the same steps
        for s, b in enumerate(batches[:5]):
            assert zero2.train_step(b)["loss"] == pytest.approx(m1[s]["loss"], rel=1e-4, abs=1e-5), f"step {s}"
    finally:
        zero2.shutdown()
    # a step's time is the slowest rank's, measured inside the call; tokens_per_s follows from it
    for m, w in zip(m2, wall):
        assert 0 < m["seconds"] <= w
        assert m["tokens_per_s"] == pytest.approx(m["tokens"] / m["seconds"])


@pytest.mark.integration
def test_kl_loss_on_two_ranks_with_an_uneven_number_of_rows(ray_cluster, tiny_model_dir, tokenizer):
    """P-GRPO with a KL term on 3 rows, then on 1 row: on 2 ranks a rank pads with a row that has no
    reference log-probabilities (on 1 row, that is all it runs); the padding must not count anywhere,
    so both runs take the same steps."""
    from rl.grpo import ReferenceModel, with_reference
    from rl.learner import LearnerGroup
    from rollout.task import TaskConfig, make_dataset
    from rollout.units import chat_prompt_ids, replay

    records = make_dataset(TaskConfig(b_digits=2, max_threads=3), {"train": 3}, seed=2)["train"]
    tries = [build_trie(units, weights=[advantage] * len(units)) for advantage, units in zip((0.5, -0.25, 1.0), (
        replay(chat_prompt_ids(tokenizer, r["prompt"]), r["response_parallel"], tokenizer, tokenizer.eos_token_id)
        for r in records))]
    rows = [strip_row(r) for r in pack_tries(tries, 400)]
    assert len(rows) == 3 and sorted(len(part) for part in split_rows(rows, 2)) == [1, 2]
    rows = with_reference(rows, ReferenceModel(str(tiny_model_dir)).logprobs(rows))
    batches = [rows, rows[:1], rows, rows[:1]]

    base = dict(lr=3e-3, grad_clip=1.0, row_tokens=400, cpus_per_rank=0.5, threads_per_rank=1)
    results = {}
    for ranks in (1, 2):
        group = LearnerGroup(LearnerConfig(ranks=ranks, **base), tiny_model_dir, total_steps=len(batches))
        try:
            steps = [group.train_step(b, loss="pgrpo", kl_coef=0.5) for b in batches]
            results[ranks] = steps, group.state_dict()
        finally:
            group.shutdown()
    (one, w1), (two, w2) = results[1], results[2]
    assert one[0]["kl_sum"] == pytest.approx(0.0, abs=1e-6)  # the first step starts at the reference
    assert min(m["kl_sum"] for m in one[1:]) > 1e-4  # then the policy leaves it and the KL term counts
    for s, (a, b) in enumerate(zip(one, two)):
        for key in ("loss", "kl_sum", "pg_sum", "lp_count", "targets", "tokens", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), f"step {s}: {key}"
        assert a["targets"] == sum(int(r.n_targets.sum()) for r in batches[s])
    assert max(float((w1[n] - w2[n]).abs().max()) for n in w1) < 1e-4
