"""P-GRPO advantages and loss on hand-built batches, against values worked out by hand.

The hand-built batch: one prompt ``[1, 2]`` and two trajectories, ``[3, 4]``
(advantage +0.5) and ``[3, 5]`` (advantage -0.5). Their trie shares node 3
(weight 0, weight_pos 0.5, weight_neg -0.5, two occurrences). The logits are
log-probabilities chosen by hand, so every log-probability is a multiple of
ln 2: p(3) = 1/2, p(4 | 3) = 1/4, p(5 | 3) = 1/8.
"""

from __future__ import annotations

import math

import pytest
import torch

from rl import losses
from rl.grpo import (
    GRPOConfig, RLRow, batch_advantages, completion_tokens, group_advantages, has_weight, pgrpo_loss, rl_tries,
    with_reference,
)
from rl.trie import make_row, pack_tries
from rollout.units import SEQ, THREAD, Unit

LN2 = math.log(2.0)
VOCAB = 8


def test_mean_centred_advantages_by_hand():
    assert group_advantages([1.0, 1.0, 0.0, 0.0]) == pytest.approx([0.5, 0.5, -0.5, -0.5])
    assert group_advantages([1.2, 1.0, 0.0]) == pytest.approx([1.2 - 2.2 / 3, 1.0 - 2.2 / 3, -2.2 / 3])
    assert group_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    assert batch_advantages([1.0, 0.0, 1.1, 1.0], 2) == pytest.approx([0.5, -0.5, 0.05, -0.05])


def test_std_normalised_advantages_with_a_floor_by_hand():
    # std of [1, 1, 0, 0] is 0.5 -> +-1
    assert group_advantages([1.0, 1.0, 0.0, 0.0], "std") == pytest.approx([1.0, 1.0, -1.0, -1.0])
    # an all-correct group differing only by the acceleration bonus: std 0.05 is scaled to unit size...
    assert group_advantages([1.1, 1.0], "std", std_floor=0.01) == pytest.approx([1.0, -1.0])
    # ...unless the floor (0.1) is above it: 0.05 / 0.1
    assert group_advantages([1.1, 1.0], "std", std_floor=0.1) == pytest.approx([0.5, -0.5])
    assert group_advantages([0.0, 0.0], "std") == [0.0, 0.0]
    with pytest.raises(ValueError, match="advantage"):
        group_advantages([1.0], "rank")
    with pytest.raises(ValueError, match="groups of 3"):
        batch_advantages([1.0, 0.0], 3)


def test_config_checks_and_loss_options():
    assert GRPOConfig().loss_options() == {"clip_eps": None, "kl_coef": 0.0}
    assert GRPOConfig(updates_per_batch=2, clip_eps=0.1).loss_options() == {"clip_eps": 0.1, "kl_coef": 0.0}
    for bad in ({"advantage": "median"}, {"std_floor": 0.0}, {"updates_per_batch": 0}, {"clip_eps": 1.5},
                {"kl_coef": -1.0}):
        with pytest.raises(ValueError):
            GRPOConfig(**bad)


def _batch(behavior=(0.5, 0.25, 0.125)):
    """The hand-built batch as one packed row; ``behavior`` = rollout probabilities of tokens 3, 4, 5."""
    p3, p4, p5 = (math.log(p) for p in behavior)
    trajectories = [[Unit([1, 2], [3, 4], [p3, p4])], [Unit([1, 2], [3, 5], [p3, p5])]]
    (trie,) = rl_tries([trajectories], [group_advantages([1.0, 0.0])], max_tokens=64)
    assert trie.input_ids == [1, 2, 3, 4, 5]
    assert trie.weight == [0.0, 0.0, 0.0, 0.5, -0.5]
    assert (trie.weight_pos[2], trie.weight_neg[2], trie.n_targets[2]) == (0.5, -0.5, 2)
    return make_row([trie]), sum(completion_tokens(t) for t in trajectories)


def _logits(p4: float = 0.25, p5: float = 0.125) -> torch.Tensor:
    """Logits = log-probabilities: p(3 | 2) = 1/2 and p(4 | 3), p(5 | 3) as given (the rest spread evenly)."""
    probs = torch.full((5, VOCAB), 1.0 / VOCAB)
    probs[1] = torch.tensor([0.5 / 7] * VOCAB)
    probs[1, 3] = 0.5
    rest = (1.0 - p4 - p5) / (VOCAB - 2)
    probs[2] = rest
    probs[2, 4], probs[2, 5] = p4, p5
    return probs.log().requires_grad_(True)


def test_on_policy_loss_by_hand():
    row, n = _batch()
    assert n == 4  # every completion token of the batch, the shared one counted twice
    logits = _logits()
    loss, metrics = pgrpo_loss(logits, row, n)
    # -(0 * log 1/2 + 0.5 * log 1/4 - 0.5 * log 1/8) / 4 = -(-ln2 + 1.5 ln2) / 4 = -ln2 / 8
    assert float(loss.detach()) == pytest.approx(-LN2 / 8, abs=1e-6)
    assert metrics["pg_sum"] == pytest.approx(-LN2 / 2, abs=1e-6)
    assert metrics["lp_count"] == 4 and metrics["lp_absdiff_sum"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["kl_sum"] == 0.0 and metrics["clipped"] == 0.0
    loss.backward()
    # d log p(4) / d z4 = 1 - p4 = 0.75 and d log p(5) / d z4 = -p4 = -0.25, so
    # d loss / d z4 = -(0.5 * 0.75 - 0.5 * (-0.25)) / 4 = -0.125
    assert float(logits.grad[2, 4]) == pytest.approx(-0.125, abs=1e-6)
    # the shared token 3 has weight 0: no gradient at its parent's position
    assert float(logits.grad[1].abs().max()) == pytest.approx(0.0, abs=1e-7)
    assert losses.get("pgrpo") is pgrpo_loss


def test_clipped_loss_by_hand():
    # ratio 1 everywhere: the clipped surrogate has the on-policy gradient
    row, n = _batch()
    a, b = _logits(), _logits()
    pgrpo_loss(a, row, n)[0].backward()
    clipped_loss, m = pgrpo_loss(b, row, n, clip_eps=0.2)
    clipped_loss.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)
    assert float(clipped_loss.detach()) == pytest.approx(-(0.5 * 1 - 0.5 * 1) / 4, abs=1e-7) and m["clipped"] == 0

    # the rollout gave 4 probability 0.25/1.5 (ratio 1.5 > 1.2, A > 0: clipped at 1.2) and 5 probability
    # 0.125/0.5 (ratio 0.5 < 0.8, A < 0: clipped at 0.8); node 3 has ratio 1
    row, n = _batch(behavior=(0.5, 0.25 / 1.5, 0.125 / 0.5))
    logits = _logits()
    loss, m = pgrpo_loss(logits, row, n, clip_eps=0.2)
    # surrogate = 0.5 * 1 - 0.5 * 1 + 0.5 * 1.2 - 0.5 * 0.8 = 0.2  ->  loss -0.2 / 4
    assert float(loss.detach()) == pytest.approx(-0.05, abs=1e-6)
    assert m["clipped"] == 2
    assert m["lp_absdiff_sum"] == pytest.approx(math.log(1.5) + math.log(2.0), abs=1e-6)
    loss.backward()
    assert float(logits.grad.abs().max()) == pytest.approx(0.0, abs=1e-7)  # every non-zero term is clipped

    # inside the clip range (ratio 1.1 for token 4): 0.5 * 1.1 - 0.5 * 0.8 = 0.15
    row, n = _batch(behavior=(0.5, 0.25 / 1.1, 0.125 / 0.5))
    loss, m = pgrpo_loss(_logits(), row, n, clip_eps=0.2)
    assert float(loss.detach()) == pytest.approx(-0.15 / 4, abs=1e-6) and m["clipped"] == 1


def test_kl_term_by_hand():
    row, n = _batch()
    logits = _logits()
    ref = torch.tensor([0.0, 0.0, -LN2, -LN2, -3 * LN2])  # the reference gives token 4 probability 1/2
    (rl_row,) = with_reference([row], [ref])
    assert isinstance(rl_row, RLRow) and torch.equal(rl_row.input_ids, row.input_ids)
    loss, m = pgrpo_loss(logits, rl_row, n, kl_coef=0.1)
    # token 4: delta = log 1/2 - log 1/4 = ln2, k3 = 2 - ln2 - 1; the others have delta 0
    k3 = 2.0 - LN2 - 1.0
    assert m["kl_sum"] == pytest.approx(k3, abs=1e-6)
    assert float(loss.detach()) == pytest.approx(-LN2 / 8 + 0.1 * k3 / 4, abs=1e-6)
    with pytest.raises(ValueError, match="reference"):
        pgrpo_loss(logits, row, n, kl_coef=0.1)
    with pytest.raises(ValueError, match="shape"):
        with_reference([row], [ref[:3]])


def test_learner_padding_row_adds_nothing_to_any_loss_term():
    """The dummy row a rank with fewer rows runs (no reference log-probabilities) under every loss option."""
    from rl.learner import dummy_row

    pad = dummy_row(3)
    assert len(pad) == 2 and int(pad.n_targets.sum()) == 0 and float(pad.weight.abs().sum()) == 0.0
    for options in ({}, {"kl_coef": 0.1}, {"kl_coef": 0.1, "clip_eps": 0.2}):
        logits = torch.randn(2, VOCAB, requires_grad=True)
        loss, m = pgrpo_loss(logits, pad, 4.0, **options)
        assert float(loss.detach()) == 0.0, options
        assert m == {"pg_sum": 0.0, "kl_sum": 0.0, "lp_absdiff_sum": 0.0, "lp_count": 0.0, "clipped": 0.0}
        loss.backward()  # still a backward pass through the model, as the ranks' collectives need
        assert float(logits.grad.abs().max()) == 0.0
    loss, m = losses.get("sft")(torch.randn(2, VOCAB, requires_grad=True), pad, 4.0)
    assert float(loss.detach()) == 0.0 and m == {"nll_sum": 0.0, "correct": 0.0}


def test_advantage_reaches_every_completion_token_of_every_unit(tiny_model_dir):
    """Batch loss from trie-packed rows = -sum_i A_i * sum over trajectory i's completion tokens / N,
    with the right side computed by running every unit as an ordinary causal sequence."""
    from transformers import AutoModelForCausalLM

    from rl.attention import tree_forward
    from rl.logprobs import sequence_logprobs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    prompt = [5, 6, 7]

    def parallel(x: int) -> list[Unit]:  # a sequential head, two threads sharing their context, a join tail
        head = Unit(prompt, [x, 20, 21])
        base = prompt + [x, 20, 21]
        return [head, Unit(base + [30], [x + 1, 31], role=THREAD, block=1, thread=1, n_inserted=1),
                Unit(base + [32], [x + 2, 33], role=THREAD, block=1, thread=2, n_inserted=1),
                Unit(base + [30, x + 1, 31, 32, x + 2, 33, 9], [40, 41], role=SEQ, n_inserted=1)]

    groups = [[parallel(10), parallel(11), [Unit(prompt, [12, 13, 14])]],
              [[Unit([8, 9], [15, 16])], [Unit([8, 9], [15, 17, 18])]]]
    rewards = [[1.2, 1.0, 0.0], [1.0, 1.0]]
    advantages = [group_advantages(r) for r in rewards]
    tries = rl_tries(groups, advantages, max_tokens=64)
    assert [has_weight(t) for t in tries] == [True, False]  # the second group has all-equal rewards
    rows = pack_tries(tries, max_tokens=40)
    n = sum(completion_tokens(t) for g in groups for t in g)
    packed = sum(pgrpo_loss(tree_forward(model, row, "sdpa"), row, n)[0] for row in rows)

    expected = 0.0
    for trajectories, adv in zip(groups, advantages):
        for units, a in zip(trajectories, adv):
            for u in units:
                lp = sequence_logprobs(model, u.context_ids + u.completion_ids, len(u.context_ids))
                expected -= a * float(lp.detach().sum())
    assert float(packed.detach()) == pytest.approx(expected / n, rel=1e-4, abs=1e-6)


def test_reference_model_gives_the_unpacked_logprobs_and_rows_keep_them_on_the_way(tiny_model_dir):
    import pickle

    from rl.grpo import ReferenceModel
    from rl.learner import strip_row
    from rl.logprobs import sequence_logprobs

    ref = ReferenceModel(str(tiny_model_dir))
    row, _ = _batch()
    (lp,) = ref.logprobs([row])
    unpacked = sequence_logprobs(ref.model, [1, 2, 3, 4], 1)
    assert lp[[1, 2, 3]].tolist() == pytest.approx(unpacked.tolist(), abs=1e-5) and float(lp[0]) == 0.0
    (rl_row,) = with_reference([row], [lp])
    shipped = pickle.loads(pickle.dumps(strip_row(rl_row)))  # what the learner ranks receive
    assert isinstance(shipped, RLRow) and torch.equal(shipped.ref_logprob, lp) and shipped.tries == []
