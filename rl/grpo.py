"""P-GRPO: group-relative advantages and the policy-gradient loss on trie-packed rows (DESIGN section 6).

The estimator: GRPO, but mean-centred (no division by the group's standard
deviation unless ``advantage = "std"``), on-policy by default, no KL unless
``kl_coef > 0``.

* Advantage of trajectory ``i`` of a group of ``k`` samples of one prompt:
  ``A_i = r_i - mean(r)`` (:func:`group_advantages`); with ``"std"``,
  ``A_i = (r_i - mean(r)) / max(std(r), std_floor)`` (population std); with
  ``"std_verl"``, verl's GRPO (``core_algos.compute_grpo_outcome_advantage``):
  ``(r_i - mean(r)) / (std(r) + 1e-6)`` with the *unbiased* std (divides by
  ``k - 1``), and a group of one sample gets ``A = r / (1 + 1e-6)`` (verl takes
  mean 0 and std 1 there; the other modes give 0).
* ``A_i`` is broadcast to every completion token of every unit of trajectory
  ``i``: it is the unit weight given to the trie (:func:`rl_tries`), which sums
  the weights of every occurrence of a node (``weight``) and keeps the
  positive and negative sums apart (``weight_pos``, ``weight_neg``).
* Loss over a batch (:func:`pgrpo_loss`, registered as ``"pgrpo"`` in
  :mod:`rl.losses`): ``-sum(A * logprob) / N`` with ``N`` the number of
  completion tokens of the whole batch (every unit of every trajectory,
  zero-advantage groups included), so row losses add up to the batch loss.
* Several optimizer steps on one batch (``updates_per_batch > 1``), or a
  batch sampled by older weights than the learner's (``rl.max_staleness = 1``,
  :mod:`rl.overlap`), use the
  PPO-clipped ratio ``rho = exp(logprob - behavior_logprob)`` against the
  rollout engine's own log-probabilities (the policy that sampled the batch):
  per node ``weight_pos * min(rho, 1 + eps) + weight_neg * max(rho, 1 - eps)``,
  which is the sum over occurrences of ``min(rho * A, clip(rho) * A)``.
  At ``rho = 1`` its gradient equals the on-policy loss's.
* Optional KL to a reference model: ``kl_coef * sum(k3) / N`` with the
  per-token estimator ``k3 = exp(ref - logprob) - (ref - logprob) - 1``
  (non-negative, unbiased for KL(policy || reference)), counted once per
  occurrence. The reference log-probabilities ride in :class:`RLRow` and are
  computed by :class:`ReferenceModel` from the packed rows themselves.

Against verl 0.9.1's ``core_algos`` (``tests/test_verl_parity.py``, on an
expanded batch of one row per unit): the loss equals ``compute_policy_loss_vanilla``
with ``loss_agg_mode="token-mean"`` and the KL term ``kl_penalty(...,
"low_var_kl")``, except where verl clamps and this code does not: verl clamps
the log-ratio to +-20 before ``exp``, caps a negative-advantage token's loss at
``-A * clip_ratio_c`` (dual clip, 3), clamps the KL log-ratio to +-20 and the k3
estimate to 10. The advantages equal ``compute_grpo_outcome_advantage`` with
``norm_adv_by_std_in_grpo=False`` (``"mean"``) or ``True`` (``"std_verl"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from rl.attention import IMPLEMENTATION, tree_predictions
from rl.logprobs import TokenPredictions, as_predictions
from rl.trie import PackedRow, Trie, group_tries
from rollout.config import check_ranges
from rollout.storage import ShippedFolder, fetch_folder
from rollout.units import Unit

ADVANTAGES = ("mean", "std", "std_verl")
#: verl's epsilon added to the group's std (compute_grpo_outcome_advantage)
VERL_STD_EPSILON = 1e-6


@dataclass
class GRPOConfig:
    """The P-GRPO objective: advantages, reuse of a batch, KL to a reference."""

    advantage: Literal["mean", "std", "std_verl"] = field(default="mean", metadata={
        "help": "'mean': A = r - mean(r) over the group (the default, DESIGN section 6); "
                "'std': also divided by max(std(r), std_floor); 'std_verl': verl's GRPO, divided by the "
                "unbiased std + 1e-6 (a one-sample group keeps r)"})
    std_floor: float = field(default=0.01, metadata={
        "help": "floor of the group's reward std when advantage='std' (reward units)", "range": "> 0"})
    updates_per_batch: int = field(default=1, metadata={
        "help": "optimizer steps on each rollout batch; 1 is on-policy, more use PPO-clipped ratios (count)",
        "range": ">= 1"})
    clip_eps: float = field(default=0.2, metadata={
        "help": "PPO clip range of the ratio to the rollout policy, used when updates_per_batch > 1",
        "range": "(0, 1)"})
    kl_coef: float = field(default=0.0, metadata={
        "help": "weight of the k3 KL estimate to the reference model (the starting checkpoint); 0: no KL, "
                "no reference model", "range": ">= 0"})
    skip_zero_advantage: bool = field(default=True, metadata={
        "help": "do not forward tries whose every weight is 0 (their loss and gradient are 0; they still "
                "count in the token normaliser); a batch with none left takes no optimizer step, so Adam's "
                "momentum does not move the weights without a signal. Ignored when kl_coef > 0"})

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {ADVANTAGES}, got {self.advantage!r}")

    def loss_options(self, off_policy: bool = False) -> dict:
        """Keyword options of :func:`pgrpo_loss` for this config; ``off_policy``: the batch was sampled by older
        weights than the learner's (the ratio is then clipped even for one update)."""
        clipped = self.updates_per_batch > 1 or off_policy
        return {"clip_eps": self.clip_eps if clipped else None, "kl_coef": self.kl_coef}


# --------------------------------------------------------------------------- advantages


def group_advantages(rewards: Sequence[float], advantage: str = "mean", std_floor: float = 0.01) -> list[float]:
    """Advantages of one group: ``r - mean(r)``, divided by ``max(std(r), std_floor)`` for ``"std"``.

    ``std`` is the population standard deviation (divides by ``k``). ``"std_verl"`` is verl's
    definition (see the module doc): unbiased std plus ``1e-6``, and ``r`` itself for a group of one.
    """
    if advantage not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {ADVANTAGES}, got {advantage!r}")
    if not rewards:
        raise ValueError("a group needs at least one reward")
    values = [float(r) for r in rewards]
    if not all(math.isfinite(r) for r in values):
        raise ValueError(f"rewards must be finite, got {values}")
    if advantage == "std_verl" and len(values) == 1:
        return [values[0] / (1.0 + VERL_STD_EPSILON)]
    mean = sum(values) / len(values)
    centred = [r - mean for r in values]
    if advantage == "mean":
        return centred
    if advantage == "std_verl":
        unbiased = math.sqrt(sum(c * c for c in centred) / (len(centred) - 1))
        return [c / (unbiased + VERL_STD_EPSILON) for c in centred]
    std = math.sqrt(sum(c * c for c in centred) / len(centred))
    scale = max(std, std_floor)
    return [c / scale for c in centred]


def batch_advantages(rewards: Sequence[float], group_size: int, advantage: str = "mean",
                     std_floor: float = 0.01) -> list[float]:
    """Advantages of consecutive groups of ``group_size`` rewards (prompt-major order)."""
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    out: list[float] = []
    for start in range(0, len(rewards), group_size):
        out += group_advantages(rewards[start:start + group_size], advantage, std_floor)
    return out


def completion_tokens(units: Sequence[Unit]) -> int:
    """Completion tokens of one trajectory: its loss-normaliser contribution."""
    return sum(len(u.completion_ids) for u in units)


def rl_tries(groups: Sequence[Sequence[Sequence[Unit]]], advantages: Sequence[Sequence[float]],
             max_tokens: int) -> list[Trie]:
    """One trie per group (split into tries of whole trajectories above ``max_tokens``), weights = advantages.

    ``groups[g][i]`` is the list of units of trajectory ``i`` of group ``g``.
    """
    if len(groups) != len(advantages):
        raise ValueError(f"{len(groups)} groups but {len(advantages)} advantage lists")
    tries: list[Trie] = []
    for trajectories, adv in zip(groups, advantages):
        tries += group_tries([list(t) for t in trajectories], list(adv), max_tokens=max_tokens)
    return tries


def has_weight(trie: Trie) -> bool:
    """Whether some target of ``trie`` carries a non-zero weight (positive or negative)."""
    return any(p != 0.0 or n != 0.0 for p, n in zip(trie.weight_pos, trie.weight_neg))


# --------------------------------------------------------------------------- the loss


@dataclass
class RLRow(PackedRow):
    """A packed row plus the reference model's log-probabilities (``[L]``, 0 at roots), for the KL term."""

    ref_logprob: torch.Tensor | None = None


def pgrpo_loss(pred: TokenPredictions | torch.Tensor, row: PackedRow, denominator: float,
               clip_eps: float | None = None, kl_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The P-GRPO loss of one row (see module doc); row losses add up to the batch loss.

    ``pred``: the row's :class:`rl.logprobs.TokenPredictions`, or its ``[L, vocab]`` logits.

    ``clip_eps=None``: on-policy, ``-sum(weight * logprob) / denominator``.
    Otherwise the PPO-clipped surrogate against ``row.behavior_logprob``.
    ``kl_coef > 0`` needs ``row.ref_logprob`` (an :class:`RLRow`) unless the
    row has no targets (the learner's padding rows).

    Metrics (sums over the row's target occurrences): ``pg_sum`` and
    ``kl_sum`` (unnormalised terms), ``lp_absdiff_sum`` and ``lp_count``
    (``|learner - rollout|`` log-probability, where the rollout recorded one),
    ``clipped`` (occurrences at nodes where a clip bound is active), and the
    spread of the ratio ``rho`` to the rollout policy over those occurrences
    (computed with or without clipping): ``ratio_dev_sum`` (``rho - 1``),
    ``ratio_absdev_sum`` (``|rho - 1|``) and ``ratio_sqdev_sum`` (``(rho - 1)^2``).
    """
    if denominator <= 0:
        raise ValueError(f"loss denominator must be positive, got {denominator}")
    logprobs = as_predictions(pred, row).logprob
    device = logprobs.device
    n_targets = row.n_targets.to(device)
    target = n_targets > 0
    behavior = row.behavior_logprob.to(device)
    known = target & torch.isfinite(behavior)
    old = torch.where(known, behavior, logprobs.detach())  # ratio 1 where the rollout gave no logprob
    clipped = torch.zeros((), device=device)
    if clip_eps is None:
        surrogate = row.weight.to(device) * logprobs
    else:
        ratio = torch.exp(logprobs - old)
        w_pos, w_neg = row.weight_pos.to(device), row.weight_neg.to(device)
        surrogate = w_pos * torch.clamp(ratio, max=1.0 + clip_eps) + w_neg * torch.clamp(ratio, min=1.0 - clip_eps)
        with torch.no_grad():
            active = ((w_pos > 0) & (ratio > 1.0 + clip_eps)) | ((w_neg < 0) & (ratio < 1.0 - clip_eps))
            clipped = (active * n_targets).sum()
    pg = -surrogate.sum()
    loss = pg / denominator
    kl = torch.zeros((), device=device)
    ref = getattr(row, "ref_logprob", None)
    if kl_coef > 0 and ref is None and bool(target.any()):
        raise ValueError("kl_coef > 0 needs rows with reference log-probabilities (RLRow.ref_logprob)")
    if kl_coef > 0 and ref is not None:  # a row without targets (the learner's padding) has no KL term
        delta = torch.where(target, ref.to(device) - logprobs, torch.zeros_like(logprobs))
        kl = ((torch.exp(delta) - delta - 1.0) * n_targets).sum()
        loss = loss + kl_coef * kl / denominator
    with torch.no_grad():
        diff = torch.where(known, (logprobs - old).abs(), torch.zeros_like(logprobs))
        dev = torch.where(known, torch.exp(logprobs.detach() - old) - 1.0, torch.zeros_like(logprobs))
        metrics = {
            "pg_sum": float(pg.detach()),
            "kl_sum": float(kl.detach()),
            "lp_absdiff_sum": float((diff * n_targets).sum()),
            "lp_count": float((known * n_targets).sum()),
            "clipped": float(clipped),
            "ratio_dev_sum": float((dev * n_targets).sum()),
            "ratio_absdev_sum": float((dev.abs() * n_targets).sum()),
            "ratio_sqdev_sum": float((dev * dev * n_targets).sum()),
        }
    return loss, metrics


# --------------------------------------------------------------------------- reference model


class ReferenceModel:
    """The frozen starting policy, computing per-token log-probabilities of packed rows (for the KL term).

    Used as a Ray actor by the driver. ``threads`` sets torch's intra-op
    threads; ``device`` is ``"cpu"`` or ``"cuda"``; weights are loaded in
    ``dtype``. ``chunk_tokens > 0`` computes the log-probabilities from the
    last hidden states that many positions at a time, as the learner does
    (:func:`rl.attention.tree_predictions`); 0 from the full logits.
    """

    def __init__(self, model_dir: "str | ShippedFolder", attention: str = "sdpa", threads: int = 1, device: str = "cpu",
                 dtype: str = "fp32", chunk_tokens: int = 0):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(max(1, threads))
        self.attention = attention
        self.chunk_tokens = chunk_tokens
        self.device = torch.device(device)
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(fetch_folder(model_dir), dtype=torch_dtype,
                                                          attn_implementation=IMPLEMENTATION[attention])
        self.model.to(self.device).eval()

    @torch.no_grad()
    def logprobs(self, rows: list[PackedRow]) -> list[torch.Tensor]:
        """``[L]`` log-probabilities of every row's tokens (0 at roots), on the CPU."""
        return [tree_predictions(self.model, row, self.attention, self.chunk_tokens,
                                 max_dense_tokens=max(len(row), 1)).logprob.float().cpu() for row in rows]


def with_reference(rows: Sequence[PackedRow], ref_logprobs: Sequence[torch.Tensor]) -> list[RLRow]:
    """``rows`` as :class:`RLRow` carrying ``ref_logprobs`` (same order and lengths)."""
    if len(rows) != len(ref_logprobs):
        raise ValueError(f"{len(rows)} rows but {len(ref_logprobs)} reference log-probability tensors")
    out = []
    for row, ref in zip(rows, ref_logprobs):
        if ref.shape != row.input_ids.shape:
            raise ValueError(f"reference log-probabilities of shape {tuple(ref.shape)} for a row of {len(row)}")
        fields = {name: getattr(row, name) for name in row.__dataclass_fields__}
        fields["ref_logprob"] = ref
        out.append(RLRow(**fields))
    return out
