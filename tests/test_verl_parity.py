"""verl 0.9.1's core_algos as the reference for this project's GRPO advantages, KL term and clipped loss.

* Advantages (``rl.grpo.group_advantages``) against ``compute_grpo_outcome_advantage`` on random groups:
  mean-centred equals verl's ``norm_adv_by_std_in_grpo=False``; ``"std_verl"`` equals verl's std
  normalisation; ``"std"`` differs exactly by the std used (population std floored at ``std_floor``
  against verl's unbiased std plus 1e-6); a one-sample group gets 0 here and ``r`` in verl.
* KL (``pgrpo_loss``'s k3 term) against ``kl_penalty(..., "low_var_kl")``: equal until verl's clamp
  (the estimate is capped at 10; the log-ratio at +-20); this project does not clamp.
* The PPO-clipped loss on an expanded batch (one row per unit, weights = advantages) against
  ``compute_policy_loss_vanilla`` with ``token-mean``: equal values and gradients until verl's dual clip
  (a negative advantage's ratio is capped at ``clip_ratio_c`` = 3) or its log-ratio clamp (+-20); this
  project applies neither. On-policy (no clipping) the gradients are equal.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from rl.grpo import VERL_STD_EPSILON, group_advantages, pgrpo_loss, with_reference
from rl.trie import build_trie, make_row
from rl.verl import require
from rollout.units import Unit

# a missing verl fails the module with the install hint (rl.verl.require), never a skip
core_algos = require("verl.trainer.ppo.core_algos")
verl_config = require("verl.workers.config")

# --------------------------------------------------------------------------- advantages


def random_groups(rng: random.Random, n_groups: int = 40) -> list[list[float]]:
    groups = []
    for g in range(n_groups):
        k = rng.randint(2, 8)
        kind = g % 4
        if kind == 0:
            groups.append([rng.choice([0.0, 1.0]) + rng.choice([0.0, 0.05, 0.1, 0.2]) for _ in range(k)])
        elif kind == 1:
            groups.append([rng.uniform(-1, 1.2) for _ in range(k)])
        elif kind == 2:
            groups.append([1.1] * k)  # all equal
        else:
            groups.append([-1.0] * (k - 1) + [1.2])
    return groups


def verl_advantages(groups: list[list[float]], norm: bool, seed: int = 0) -> tuple[list[torch.Tensor], list[float]]:
    """verl's per-token advantages of every trajectory (rows of random length, score at the last token)."""
    gen = torch.Generator().manual_seed(seed)
    rewards = [r for g in groups for r in g]
    index = np.array([f"uid{gi}" for gi, g in enumerate(groups) for _ in g], dtype=object)
    width = 12
    lengths = torch.randint(1, width + 1, (len(rewards),), generator=gen)
    mask = (torch.arange(width)[None] < lengths[:, None]).float()
    token_rewards = torch.zeros(len(rewards), width)
    token_rewards[torch.arange(len(rewards)), lengths - 1] = torch.tensor(rewards)
    adv, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    return [adv[i, :lengths[i]] for i in range(len(rewards))], [float(a[0]) for a in adv]


@pytest.mark.parametrize("norm, ours", [(False, "mean"), (True, "std_verl")])
def test_group_advantages_equal_verls(norm, ours):
    groups = random_groups(random.Random(0))
    per_token, first = verl_advantages(groups, norm)
    expected = [a for g in groups for a in group_advantages(g, ours)]
    for tokens, a in zip(per_token, expected):
        assert torch.allclose(tokens, torch.full_like(tokens, a), atol=2e-6)  # broadcast to every token
    assert max(abs(x - y) for x, y in zip(first, expected)) < 2e-6
    assert any(abs(a) > 0.1 for a in expected)


def test_our_std_option_differs_by_the_std_it_divides_by():
    groups = random_groups(random.Random(1))
    _, verl_std = verl_advantages(groups, True)
    ours = [a for g in groups for a in group_advantages(g, "std", std_floor=0.01)]
    i = 0
    for g in groups:
        k, mean = len(g), sum(g) / len(g)
        population = math.sqrt(sum((r - mean) ** 2 for r in g) / k)
        unbiased = population * math.sqrt(k / (k - 1))
        for r in g:
            # both are the centred reward over a scale: ours max(population std, floor), verl's unbiased std + 1e-6
            assert ours[i] * max(population, 0.01) == pytest.approx(r - mean, abs=1e-9)
            assert verl_std[i] * (unbiased + VERL_STD_EPSILON) == pytest.approx(r - mean, abs=1e-5)
            if population > 0.01:
                assert verl_std[i] == pytest.approx(ours[i] * math.sqrt((k - 1) / k), rel=1e-4, abs=1e-5)
            i += 1


def test_a_one_sample_group_keeps_its_reward_in_verl():
    _, mean_centred = verl_advantages([[0.7]], False)
    _, normed = verl_advantages([[0.7]], True)
    assert mean_centred == [pytest.approx(0.7)] and normed == [pytest.approx(0.7 / (1 + 1e-6))]
    assert group_advantages([0.7], "mean") == [0.0]                      # ours: r - mean(r)
    assert group_advantages([0.7], "std_verl") == [pytest.approx(normed[0])]


# --------------------------------------------------------------------------- an expanded batch


def expanded_batch(seed: int, n_units: int = 7, vocab: int = 50, ratio_spread: float = 0.5,
                   first: tuple[float, float] | None = None):
    """Units of random length, one row each (its own trie), weighted by its trajectory's advantage.

    The rollout log-probabilities are the current ones moved by up to ``ratio_spread``; ``first =
    (advantage, shift)`` fixes unit 0's advantage and moves its first rollout log-probability down by
    ``shift`` (ratio ``e^shift``). Returns the rows, per-row logits (leaf tensors) and the advantages.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    rows, logits, advantages = [], [], []
    for u in range(n_units):
        context = [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]
        completion = [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]
        row_logits = torch.randn(len(context) + len(completion), vocab, generator=gen)
        true = torch.log_softmax(row_logits, -1)
        current = [float(true[len(context) + j - 1, t]) for j, t in enumerate(completion)]
        rollout = [lp + rng.uniform(-ratio_spread, ratio_spread) for lp in current]
        a = rng.choice([-1.0, 1.0]) * rng.uniform(0.05, 1.0)
        if u == 0 and first is not None:
            a, rollout[0] = first[0], rollout[0] - first[1]
        rows.append(make_row([build_trie([Unit(context, completion, rollout)], [a])]))
        logits.append(row_logits.requires_grad_())
        advantages.append(a)
    return rows, logits, advantages


def verl_tensors(rows, logits, advantages, ref_shift: float = 0.0, seed: int = 0):
    """Padded [units, T] tensors verl's functions take: log_prob (from the same logits, causal), old, adv, mask."""
    width = max(int(r.n_targets.sum()) for r in rows)
    log_prob = torch.zeros(len(rows), width)
    old = torch.zeros(len(rows), width)
    mask = torch.zeros(len(rows), width)
    adv = torch.zeros(len(rows), width)
    for i, (row, lg, a) in enumerate(zip(rows, logits, advantages)):
        targets = torch.nonzero(row.n_targets > 0).flatten()
        lp = torch.log_softmax(lg, -1)[targets - 1, row.input_ids[targets]]  # causal: predicted one position back
        n = len(targets)
        log_prob = log_prob.index_put((torch.full((n,), i), torch.arange(n)), lp)
        old[i, :n] = row.behavior_logprob[targets]
        mask[i, :n] = 1
        adv[i, :n] = a
    gen = torch.Generator().manual_seed(seed)
    ref = log_prob.detach() + ref_shift * torch.randn(log_prob.shape, generator=gen)
    return log_prob, old, adv, mask, ref


def actor_config():
    return verl_config.FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2)


def our_loss(rows, logits, clip_eps, kl_coef=0.0, refs=None):
    denominator = float(sum(r.n_targets.sum() for r in rows))
    total = 0.0
    for i, (row, lg) in enumerate(zip(rows, logits)):
        if refs is not None:
            row = with_reference([row], [refs[i]])[0]
        loss, _ = pgrpo_loss(lg, row, denominator, clip_eps=clip_eps, kl_coef=kl_coef)
        total = total + loss
    return total


def grads(loss, logits):
    return torch.autograd.grad(loss, logits)


def test_clipped_loss_equals_verls_vanilla_token_mean():
    rows, logits, advantages = expanded_batch(0)
    ours = our_loss(rows, logits, clip_eps=0.2)
    log_prob, old, adv, mask, _ = verl_tensors(rows, logits, advantages)
    theirs, metrics = core_algos.compute_policy_loss_vanilla(old, log_prob, adv, mask, "token-mean", actor_config())
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), abs=1e-6)
    assert 0 < metrics["actor/pg_clipfrac"] < 1                       # some tokens are clipped, some not
    for g_ours, g_theirs in zip(grads(ours, logits), grads(theirs, logits)):
        assert torch.allclose(g_ours, g_theirs, atol=1e-7)


def test_on_policy_gradients_equal_verls():
    rows, logits, advantages = expanded_batch(1)
    ours = our_loss(rows, logits, clip_eps=None)                      # -sum(A * logprob) / N
    log_prob, _, adv, mask, _ = verl_tensors(rows, logits, advantages)
    theirs, _ = core_algos.compute_policy_loss_vanilla(log_prob.detach(), log_prob, adv, mask, "token-mean",
                                                       actor_config())
    for g_ours, g_theirs in zip(grads(ours, logits), grads(theirs, logits)):
        assert torch.allclose(g_ours, g_theirs, atol=1e-7)


def test_verls_dual_clip_caps_what_ours_does_not():
    """A negative advantage with ratio e^1.5 > clip_ratio_c = 3: verl pays -A * 3 for the token, we pay -A * ratio."""
    rows, logits, advantages = expanded_batch(2, ratio_spread=0.0, first=(-0.5, 1.5))
    log_prob, old, adv, mask, _ = verl_tensors(rows, logits, advantages)
    theirs, m = core_algos.compute_policy_loss_vanilla(old, log_prob, adv, mask, "token-mean", actor_config())
    ours = our_loss(rows, logits, clip_eps=0.2)
    assert m["actor/pg_clipfrac_lower"] > 0
    assert float(ours.detach() - theirs.detach()) == pytest.approx(0.5 * (math.exp(1.5) - 3.0) / float(mask.sum()), abs=1e-6)


def test_kl_term_equals_verls_low_var_kl_until_its_clamp():
    rows, logits, advantages = expanded_batch(3)
    log_prob, _, _, mask, ref = verl_tensors(rows, logits, advantages, ref_shift=0.8)
    refs = []
    for i, row in enumerate(rows):
        targets = torch.nonzero(row.n_targets > 0).flatten()
        r = torch.zeros(len(row))
        r[targets] = ref[i, :len(targets)]
        refs.append(r)
    kld = core_algos.kl_penalty(log_prob, ref, "low_var_kl")
    theirs = core_algos.agg_loss(kld, mask, "token-mean")  # verl's kl_loss with loss_agg_mode token-mean
    pg_only = our_loss(rows, logits, None)
    with_kl = our_loss(rows, logits, None, kl_coef=1.0, refs=refs)
    assert float((with_kl - pg_only).detach()) == pytest.approx(float(theirs.detach()), rel=1e-5)
    assert float(kld.max()) < 10                                      # inside verl's clamp
    for g_ours, g_pg, g_kl in zip(grads(with_kl, logits), grads(pg_only, logits), grads(theirs, logits)):
        assert torch.allclose(g_ours - g_pg, g_kl, atol=1e-6)
    # beyond the clamp: ref - logprob = 13 on one token gives k3 = e^13 - 14; verl caps it at 10, we do not
    first = int(torch.nonzero(rows[0].n_targets > 0).flatten()[0])
    refs[0][first] = log_prob[0, 0].detach() + 13.0
    ref[0, 0] = log_prob[0, 0].detach() + 13.0
    theirs = core_algos.agg_loss(core_algos.kl_penalty(log_prob, ref, "low_var_kl"), mask, "token-mean")
    with_kl = our_loss(rows, logits, None, kl_coef=1.0, refs=refs)
    k3 = math.exp(13.0) - 13.0 - 1.0
    assert float((with_kl - pg_only - theirs).detach()) == pytest.approx((k3 - 10.0) / float(mask.sum()), rel=1e-4)
