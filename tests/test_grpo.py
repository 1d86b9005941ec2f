"""P-GRPO advantages and loss on hand-built batches, against values worked out by hand.

The hand-built batch: one prompt ``[1, 2]`` and two trajectories, ``[3, 4]``
(advantage +0.5) and ``[3, 5]`` (advantage -0.5). Their trie shares node 3
(weight 0, weight_pos 0.5, weight_neg -0.5, two occurrences). The logits are
log-probabilities chosen by hand, so every log-probability is a multiple of
ln 2: p(3) = 1/2, p(4 | 3) = 1/4, p(5 | 3) = 1/8.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rl import losses
from rl.grpo import (
    GRPOConfig, RLRow, batch_advantages, completion_tokens, group_advantages, has_weight, pgrpo_loss, rl_tries,
    with_reference,
)
from rl.trie import group_trie, make_row, pack_tries
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
    # a stale batch (rl.max_staleness = 1) is clipped even with one update
    assert GRPOConfig(clip_eps=0.1).loss_options(off_policy=True) == {"clip_eps": 0.1, "kl_coef": 0.0}
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
    # the ratio's spread over the targets (1, 1.5, 0.5): deviations 0, +0.5, -0.5, with or without the clip
    spread = (m["ratio_dev_sum"], m["ratio_absdev_sum"], m["ratio_sqdev_sum"])
    assert spread == pytest.approx((0.0, 1.0, 0.5), abs=1e-6)
    m_unclipped = pgrpo_loss(_logits(), row, n)[1]
    assert (m_unclipped["ratio_dev_sum"], m_unclipped["ratio_absdev_sum"], m_unclipped["ratio_sqdev_sum"]) == \
        pytest.approx(spread, abs=1e-6) and m_unclipped["clipped"] == 0
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
        assert m == {"pg_sum": 0.0, "kl_sum": 0.0, "lp_absdiff_sum": 0.0, "lp_count": 0.0, "clipped": 0.0,
                     "ratio_dev_sum": 0.0, "ratio_absdev_sum": 0.0, "ratio_sqdev_sum": 0.0}
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


# --------------------------------------------------------------------------- shared nodes, unnormalised logits
#
# A group of four trajectories of the prompt [1, 2]: [3, 4] twice (reward 1) and [3, 5] twice (reward 0), so
# A = +0.5, +0.5, -0.5, -0.5. Trie nodes: 3 (4 occurrences, weight 0, weight_pos 1, weight_neg -1),
# 4 (2 occurrences, weight +1), 5 (2 occurrences, weight -1). N = 8 completion tokens.
# Policy: p(3 | 2) = 1/2, p(4 | 3) = 1/4, p(5 | 3) = 1/8; the logits are those log-probabilities plus a
# different constant at every position, so they are NOT normalised (logsumexp 3.0, -1.7, 0.4).
# Reference: p_ref(3) = 1/4, p_ref(4) = 1/2, p_ref(5) = 1/4.

SHIFTS = (0.4, 3.0, -1.7)


def _shared_batch(behavior=(0.5, 0.25, 0.125)):
    p3, p4, p5 = (math.log(p) for p in behavior)
    trajectories = [[Unit([1, 2], [3, 4], [p3, p4])], [Unit([1, 2], [3, 4], [p3, p4])],
                    [Unit([1, 2], [3, 5], [p3, p5])], [Unit([1, 2], [3, 5], [p3, p5])]]
    (trie,) = rl_tries([trajectories], [group_advantages([1.0, 1.0, 0.0, 0.0])], max_tokens=64)
    assert trie.input_ids == [1, 2, 3, 4, 5] and trie.n_targets == [0, 0, 4, 2, 2]
    assert trie.weight == [0.0, 0.0, 0.0, 1.0, -1.0]
    assert (trie.weight_pos[2], trie.weight_neg[2]) == (1.0, -1.0)
    row = make_row([trie])
    ref = torch.tensor([0.0, 0.0, math.log(0.25), math.log(0.5), math.log(0.25)])
    (rl_row,) = with_reference([row], [ref])
    return rl_row, sum(completion_tokens(t) for t in trajectories)


def _shared_logits() -> torch.Tensor:
    logits = _logits().detach()
    for position, shift in enumerate(SHIFTS):
        logits[position] += shift
    assert float(torch.logsumexp(logits[1], -1)) == pytest.approx(3.0, abs=1e-5)
    return logits.requires_grad_(True)


def test_kl_is_counted_once_per_occurrence_of_a_shared_node():
    row, n = _shared_batch()
    assert n == 8
    logits = _shared_logits()
    loss, m = pgrpo_loss(logits, row, n, kl_coef=0.1)
    # k3 = exp(d) - d - 1 with d = ref - logprob:
    #   node 3: d = log 1/4 - log 1/2 = -ln2 -> 1/2 + ln2 - 1 = ln2 - 1/2, 4 occurrences
    #   node 4: d = log 1/2 - log 1/4 = ln2  -> 2 - ln2 - 1 = 1 - ln2, 2 occurrences
    #   node 5: d = log 1/4 - log 1/8 = ln2  -> 1 - ln2, 2 occurrences
    # kl_sum = 4 (ln2 - 1/2) + 2 (1 - ln2) + 2 (1 - ln2) = 2   (once per node: 3/2 - ln2 = 0.807)
    assert m["kl_sum"] == pytest.approx(2.0, abs=1e-5)
    # on-policy term: -(0 * log 1/2 + 1 * log 1/4 - 1 * log 1/8) / 8 = -(-2 ln2 + 3 ln2) / 8 = -ln2 / 8
    assert m["pg_sum"] == pytest.approx(-LN2, abs=1e-5)
    assert float(loss.detach()) == pytest.approx(-LN2 / 8 + 0.1 * 2.0 / 8, abs=1e-6)
    assert (m["lp_count"], m["clipped"]) == (8.0, 0.0)
    loss.backward()
    # d loss / d logprob: pg: -weight / 8; KL: 0.1 * occurrences * (1 - exp(d)) / 8
    #   node 3: 0 + 0.1 * 4 * (1 - 1/2) / 8 = 0.025;  node 4: -1/8 + 0.1 * 2 * (1 - 2) / 8 = -0.15
    #   node 5: +1/8 + 0.1 * 2 * (1 - 2) / 8 = 0.1
    # d logprob(x) / d z = onehot(x) - softmax(z), whatever constant the logits carry:
    #   position 1 (predicts 3): grad[1, 3] = 0.025 * (1 - 1/2) = 0.0125
    #   position 2 (predicts 4, 5): grad[2, 4] = -0.15 * (1 - 1/4) + 0.1 * (-1/4) = -0.1375
    #                               grad[2, 5] = -0.15 * (-1/8) + 0.1 * (1 - 1/8) = 0.10625
    assert float(logits.grad[1, 3]) == pytest.approx(0.0125, abs=1e-6)
    assert float(logits.grad[2, 4]) == pytest.approx(-0.1375, abs=1e-6)
    assert float(logits.grad[2, 5]) == pytest.approx(0.10625, abs=1e-6)
    assert float(logits.grad[0].abs().max()) == 0.0  # position 0 predicts the root's child 2, never a target


def test_clipping_and_kl_on_shared_nodes_by_hand():
    # rollout probabilities: 3 -> 1/2 (ratio 1), 4 -> 1/6 (ratio 1.5 > 1.2, A > 0: clipped, 2 occurrences),
    # 5 -> 1/4 (ratio 0.5 < 0.8, A < 0: clipped, 2 occurrences)
    row, n = _shared_batch(behavior=(0.5, 0.25 / 1.5, 0.125 / 0.5))
    logits = _shared_logits()
    loss, m = pgrpo_loss(logits, row, n, clip_eps=0.2, kl_coef=0.1)
    # surrogate: node 3: 1 * 1 - 1 * 1 = 0; node 4: 1 * min(1.5, 1.2) = 1.2; node 5: -1 * max(0.5, 0.8) = -0.8
    # pg_sum = -(0 + 1.2 - 0.8) = -0.4; loss = -0.4 / 8 + 0.1 * 2 / 8 = -0.025
    assert m["pg_sum"] == pytest.approx(-0.4, abs=1e-5)
    assert m["kl_sum"] == pytest.approx(2.0, abs=1e-5)
    assert float(loss.detach()) == pytest.approx(-0.025, abs=1e-6)
    assert m["clipped"] == 4.0  # every occurrence of nodes 4 and 5 (per node it would be 2)
    # |learner - rollout| per occurrence: node 4 log 1.5 twice, node 5 ln2 twice, node 3 zero
    assert m["lp_absdiff_sum"] == pytest.approx(2 * math.log(1.5) + 2 * LN2, abs=1e-5)
    assert m["lp_count"] == 8.0
    loss.backward()
    # the clipped terms carry no gradient: only the KL part moves the logits
    #   d loss / d logprob: node 3 0.025, node 4 -0.025, node 5 -0.025 (0.1 * 2 * (1 - 2) / 8)
    #   grad[2, 4] = -0.025 * (1 - 1/4) - 0.025 * (-1/4) = -0.0125; grad[1, 3] = 0.025 * 1/2 = 0.0125
    assert float(logits.grad[2, 4]) == pytest.approx(-0.0125, abs=1e-6)
    assert float(logits.grad[1, 3]) == pytest.approx(0.0125, abs=1e-6)


def test_a_ratio_outside_the_range_on_the_unclipped_side_is_not_clipped():
    # node 4 (A > 0) at ratio 0.5 and node 5 (A < 0) at ratio 1.5: min(0.5, 1.2) = 0.5 and max(1.5, 0.8) = 1.5
    # are the unclipped values; surrogate = 1 * 0.5 - 1 * 1.5 = -1, loss = 1/8, nothing clipped
    row, n = _shared_batch(behavior=(0.5, 0.25 / 0.5, 0.125 / 1.5))
    logits = _shared_logits()
    loss, m = pgrpo_loss(logits, row, n, clip_eps=0.2)
    assert float(loss.detach()) == pytest.approx(1 / 8, abs=1e-6)
    assert (m["clipped"], m["kl_sum"]) == (0.0, 0.0)
    loss.backward()
    # d loss / d logprob = -weight * ratio / 8: node 4 -0.5/8, node 5 +1.5/8
    # grad[2, 4] = -0.0625 * (1 - 1/4) + 0.1875 * (-1/4) = -0.09375
    assert float(logits.grad[2, 4]) == pytest.approx(-0.09375, abs=1e-6)


def test_token_logprobs_and_sft_loss_normalise_the_logits():
    from rl.logprobs import token_logprobs, weighted_loss

    row, _ = _shared_batch()
    logits = _shared_logits()
    lp = token_logprobs(logits, row).detach()
    # roots 0; log p(2 | 1) = log 1/8 at position 0; then log 1/2, log 1/4, log 1/8
    assert lp.tolist() == pytest.approx([0.0, -3 * LN2, -LN2, -2 * LN2, -3 * LN2], abs=1e-5)
    # the batch's weights: -(1 * log 1/4 - 1 * log 1/8) / 8 = -ln2 / 8; default denominator: the 8 occurrences
    assert float(weighted_loss(lp, row)) == pytest.approx(-LN2 / 8, abs=1e-6)
    assert float(weighted_loss(lp, row, 2.0)) == pytest.approx(-LN2 / 2, abs=1e-6)
    with pytest.raises(ValueError, match="denominator"):
        weighted_loss(lp, row, 0.0)
    with pytest.raises(ValueError, match="positions"):
        token_logprobs(logits[:4], row)
    # SFT: every occurrence weighs 1 -> nll = -(4 log 1/2 + 2 log 1/4 + 2 log 1/8) / 8 = (4 + 4 + 6) ln2 / 8
    sft_row = make_row([group_trie([[Unit([1, 2], [3, 4])]] * 2 + [[Unit([1, 2], [3, 5])]] * 2)])
    sft_loss, sm = losses.get("sft")(_shared_logits(), sft_row, 8.0)
    assert float(sft_loss.detach()) == pytest.approx(14 * LN2 / 8, abs=1e-5)
    assert sm["nll_sum"] == pytest.approx(14 * LN2, abs=1e-5)
    # greedy prediction at position 2 is the most likely of the rest (1 - 1/4 - 1/8) / 6 = 0.104 < 1/4: token 4
    # is right for its 2 occurrences, token 5 wrong; at position 1 token 3 (p 1/2) is right 4 times
    assert sm["correct"] == 6.0


def test_loss_registry():
    with pytest.raises(ValueError, match=r"^unknown loss 'nope'; registered losses: \['pgrpo', 'sft'\]$"):
        losses.get("nope")
    with pytest.raises(ValueError, match=r"^a loss named 'sft' is already registered$"):
        losses.register("sft")(pgrpo_loss)
    assert losses.get("sft") is losses.sft_loss

    def mine(logits, row, denominator):
        return torch.zeros(()), {}

    try:
        assert losses.register("test-only")(mine) is mine
        assert losses.get("test-only") is mine
    finally:
        losses.LOSSES.pop("test-only", None)


def test_logprob_helpers_keep_to_the_logits_device_and_check_their_inputs():
    """On the meta device (shapes only) every row tensor must follow the logits: a CPU tensor mixed in fails,
    as it would on a GPU."""
    from rl.logprobs import sequence_logprobs, token_logprobs, weighted_loss

    row, _ = _shared_batch()
    lp = token_logprobs(torch.zeros(len(row), VOCAB, device="meta"), row)
    assert lp.device.type == "meta" and lp.shape == (len(row),)
    assert weighted_loss(lp, row).device.type == "meta"
    # a denominator of 1 is a valid one: -(1 * log 1/4 - 1 * log 1/8) / 1 = -ln2
    cpu_lp = token_logprobs(_shared_logits().detach(), row)
    assert float(weighted_loss(cpu_lp, row, 1.0)) == pytest.approx(-LN2, abs=1e-5)
    with pytest.raises(ValueError, match=r"^logits have 4 positions, the row has 5 tokens$"):
        token_logprobs(torch.zeros(4, VOCAB), row)
    with pytest.raises(ValueError, match=r"^start must be at least 1: the first token has no position"):
        sequence_logprobs(torch.nn.Linear(1, 1), [1, 2], 0)


def test_advantage_options_and_errors():
    # the floor is passed to every group: std 0.05 under a floor of 0.1 -> +-0.5; the default floor 0.01 -> +-1
    assert batch_advantages([1.1, 1.0, 0.0, 1.0], 2, "std", std_floor=0.1) == pytest.approx([0.5, -0.5, -1, 1])
    assert batch_advantages([1.1, 1.0], 2, "std") == pytest.approx([1.0, -1.0])
    assert group_advantages([1.1, 1.0], "std") == pytest.approx([1.0, -1.0])
    assert batch_advantages([1.0, 0.0], 1) == [0.0, 0.0]  # groups of one sample: nothing to compare with
    with pytest.raises(ValueError, match=r"^a group needs at least one reward$"):
        group_advantages([])
    with pytest.raises(ValueError, match=r"^rewards must be finite, got \[1.0, nan\]$"):
        group_advantages([1.0, math.nan])
    with pytest.raises(ValueError, match=r"^2 rewards do not split into groups of 0$"):
        batch_advantages([1.0, 0.0], 0)
    with pytest.raises(ValueError, match=r"^1 groups but 2 advantage lists$"):
        rl_tries([[[Unit([1], [2])]]], [[0.0], [0.0]], max_tokens=8)
    row, _ = _batch()
    with pytest.raises(ValueError, match=r"^1 rows but 0 reference log-probability tensors$"):
        with_reference([row], [])


def test_config_error_messages():
    for bad, message in [({"advantage": "median"}, "advantage must be one of ('mean', 'std', 'std_verl'), got 'median'"),
                         ({"std_floor": 0.0}, "std_floor must be a finite number > 0, got 0.0"),
                         ({"updates_per_batch": 0}, "updates_per_batch must be an integer >= 1, got 0"),
                         ({"clip_eps": 0.0}, "clip_eps must be a finite number in (0, 1), got 0.0"),
                         ({"clip_eps": 1.0}, "clip_eps must be a finite number in (0, 1), got 1.0"),
                         ({"kl_coef": -1.0}, "kl_coef must be a finite number >= 0, got -1.0")]:
        with pytest.raises(ValueError) as e:
            GRPOConfig(**bad)
        assert str(e.value) == message
    assert GRPOConfig(clip_eps=0.999).clip_eps == 0.999


def test_rl_tries_split_a_group_at_max_tokens():
    group = [[Unit([1, 2], [3, 4])], [Unit([1, 2], [5, 6])]]
    assert len(rl_tries([group], [[0.5, -0.5]], max_tokens=6)) == 1  # 1, 2, 3, 4, 5, 6
    assert [len(t) for t in rl_tries([group], [[0.5, -0.5]], max_tokens=5)] == [4, 4]


def _two_branch_row(behavior=None):
    """Prompt [1] and two trajectories [2] -> [3] (A = +0.5) and [7] -> [5] (A = -0.5), one target each."""
    units = [[Unit([1, 2], [3], None if behavior is None else [behavior[0]])],
             [Unit([1, 7], [5], None if behavior is None else [behavior[1]])]]
    (trie,) = rl_tries([units], [[0.5, -0.5]], max_tokens=16)
    assert trie.input_ids == [1, 2, 3, 7, 5]
    return make_row([trie])


def _certain_logits() -> torch.Tensor:
    """p(3 | 2) = p(5 | 7) = 1 exactly in float32 (the other logits -1e9): both log-probabilities are 0."""
    logits = torch.zeros(5, VOCAB)
    logits[1] = -1e9
    logits[1, 3] = 0.0
    logits[3] = -1e9
    logits[3, 5] = 0.0
    return logits


def test_ratios_exactly_at_the_clip_bounds_are_not_clipped():
    # exp(0 - log(0.8)) = 1.25 and exp(0 - log(4/3)) = 0.75 exactly in float32; clip_eps 0.25
    row = _two_branch_row(behavior=(-math.log(1.25), -math.log(0.75)))
    loss, m = pgrpo_loss(_certain_logits(), row, 2.0, clip_eps=0.25)
    # 0.5 * min(1.25, 1.25) - 0.5 * max(0.75, 0.75) = 0.25; loss -0.25 / 2
    assert float(loss) == pytest.approx(-0.125, abs=1e-7) and m["clipped"] == 0.0


def test_a_denominator_below_one_is_valid_and_zero_is_not():
    row = _two_branch_row()
    loss, m = pgrpo_loss(_certain_logits(), row, 0.5)
    assert float(loss) == 0.0 and m["lp_count"] == 0.0  # log-probabilities 0; the units carry no logprobs
    with pytest.raises(ValueError, match=r"^loss denominator must be positive, got 0.0$"):
        pgrpo_loss(_certain_logits(), row, 0.0)


def test_units_without_engine_logprobs_have_ratio_one_in_the_clipped_loss():
    row, n = _batch()
    row.behavior_logprob[:] = math.nan  # as if the rollout recorded no log-probabilities
    loss, m = pgrpo_loss(_logits(), row, n, clip_eps=0.2)
    # ratio 1 everywhere: 0.5 * 1 - 0.5 * 1 = 0 at node 3, 0.5 at node 4, -0.5 at node 5 -> 0
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7)
    assert (m["lp_count"], m["lp_absdiff_sum"], m["clipped"]) == (0.0, 0.0, 0.0)


def test_kl_ignores_context_tokens_even_when_the_policy_gives_them_no_mass():
    row = _two_branch_row()
    logits = _certain_logits()
    logits[0] = -1e9  # the prompt's second token (2 or 7) has probability 0 under the policy
    logits[0, 0] = 0.0
    (rl_row,) = with_reference([row], [torch.zeros(5)])
    loss, m = pgrpo_loss(logits, rl_row, 2.0, kl_coef=0.1)
    assert math.isfinite(float(loss)) and m["kl_sum"] == 0.0  # only the targets' (certain) tokens count
    with pytest.raises(ValueError, match=r"^kl_coef > 0 needs rows with reference log-probabilities "
                                         r"\(RLRow.ref_logprob\)$"):
        pgrpo_loss(logits, row, 2.0, kl_coef=0.1)


def test_the_loss_is_computed_on_the_logits_device():
    """On the meta device (shapes only) the whole loss graph is built there; the one failure is reading a number
    for the metrics. A row tensor left on the CPU would fail earlier, as it would on a GPU."""
    row, n = _batch()
    (rl_row,) = with_reference([row], [torch.zeros(len(row))])
    logits = torch.zeros(len(row), VOCAB, device="meta")
    for options in ({}, {"clip_eps": 0.2}, {"kl_coef": 0.1}, {"clip_eps": 0.2, "kl_coef": 0.1}):
        with pytest.raises(RuntimeError, match="meta tensors"):
            pgrpo_loss(logits, rl_row, n, **options)


def test_reference_model_options(tiny_model_dir):
    from rl.grpo import ReferenceModel

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ref = ReferenceModel(str(tiny_model_dir))  # the defaults: one thread, sdpa, fp32, CPU
        assert torch.get_num_threads() == 1
        assert ref.device == torch.device("cpu") and next(ref.model.parameters()).dtype == torch.float32
        assert ref.model.config._attn_implementation == "sdpa" and not ref.model.training
        bf16 = ReferenceModel(str(tiny_model_dir), attention="eager", dtype="bf16", threads=threads)
        assert next(bf16.model.parameters()).dtype == torch.bfloat16
        assert bf16.model.config._attn_implementation == "eager"
        meta = ReferenceModel(str(tiny_model_dir), device="meta", threads=threads)
        assert next(meta.model.parameters()).device.type == "meta"
    finally:
        torch.set_num_threads(threads)


class _TableModel(torch.nn.Module):
    """A causal 'model' whose logits at a position are a table row of the token there; records its calls."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.calls = []

    def forward(self, input_ids, **kwargs):
        self.calls.append(kwargs)
        return SimpleNamespace(logits=torch.nn.functional.embedding(input_ids, self.table))


def test_sequence_logprobs_by_hand():
    from rl.logprobs import sequence_logprobs

    # row t of the table: log-probabilities of the token after t (unnormalised: +2 everywhere)
    probs = torch.full((VOCAB, VOCAB), 1.0 / VOCAB)
    probs[1] = torch.tensor([0.5, 0.0625, 0.0625, 0.125, 0.0625, 0.0625, 0.0625, 0.0625])
    probs[3] = torch.tensor([0.25, 0.25, 0.25, 0.0625, 0.0625, 0.0625, 0.0625, 0.0])
    model = _TableModel(probs.log() + 2.0)
    lp = sequence_logprobs(model, [1, 3, 2], 1)
    # p(3 | 1) = 1/8, p(2 | 3) = 1/4
    assert lp.tolist() == pytest.approx([-3 * LN2, -2 * LN2], abs=1e-6)
    assert model.calls == [{"use_cache": False}]  # a scoring pass builds no KV cache
