"""Named losses the learner can train with, in one registry.

A loss is a function ``loss(pred, row, denominator, **options) -> (loss,
metrics)`` for ONE packed row: ``pred`` is what the tree forward pass of
``row`` (:class:`rl.trie.PackedRow`) predicted, as
:class:`rl.logprobs.TokenPredictions` (per-token log-probabilities, computed
in chunks by the learner) or as the full ``[L, vocab]`` logits, ``denominator`` the
normaliser of the whole global batch (the learner passes the number of target
occurrences over every row of every rank), and ``options`` come from the
caller of ``train_step``. Row losses must *add up* to the batch loss, so the
learner can accumulate gradients row by row and over data-parallel ranks.
``metrics`` are sums over the row (floats) that also add up over rows.

Register a loss with ``@register("name")``; :func:`get` looks one up.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from rl.logprobs import TokenPredictions, as_predictions, weighted_loss
from rl.trie import PackedRow


class LossFn(Protocol):
    def __call__(self, pred: TokenPredictions | torch.Tensor, row: PackedRow, denominator: float,
                 **options) -> tuple[torch.Tensor, dict[str, float]]: ...


LOSSES: dict[str, LossFn] = {}


def register(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator adding a loss function to :data:`LOSSES` under ``name``."""
    def add(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"a loss named '{name}' is already registered")
        LOSSES[name] = fn
        return fn
    return add


def get(name: str) -> LossFn:
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; registered losses: {sorted(LOSSES)}")
    return LOSSES[name]


@register("sft")
def sft_loss(pred: TokenPredictions | torch.Tensor, row: PackedRow,
             denominator: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted token NLL: ``-sum(weight * logprob) / denominator``.

    With SFT weights (1 per occurrence) and the batch's number of target
    occurrences as ``denominator``, the batch loss is the mean NLL per
    target token. Metrics: ``nll_sum`` (unnormalised) and ``correct`` (target
    occurrences whose greedy prediction is the target).
    """
    pred = as_predictions(pred, row)
    loss = weighted_loss(pred.logprob, row, denominator)
    with torch.no_grad():
        device = pred.logprob.device
        metrics = {
            "nll_sum": float(-(row.weight.to(device) * pred.logprob.detach()).sum()),
            "correct": float((pred.greedy * row.n_targets.to(device)).sum()),
        }
    return loss, metrics


from rl.grpo import pgrpo_loss  # noqa: E402  (rl.grpo does not import this module)

register("pgrpo")(pgrpo_loss)
