"""Per-token log-probabilities of a trie-packed row and the weighted loss (DESIGN section 5).

In a packed row a token is predicted by the logits at its *parent's* flat
position, not at flat index - 1 (the previous flat token may be the end of a
sibling branch). Roots have no parent: their log-probability is 0 and they are
never targets.
"""

from __future__ import annotations

import torch

from rl.trie import PackedRow


def token_logprobs(logits: torch.Tensor, row: PackedRow) -> torch.Tensor:
    """``[L]``: log p(token | ancestors), read at each token's parent position (0 at roots).

    Computed in fp32 whatever the logits' dtype.
    """
    if logits.shape[0] != len(row):
        raise ValueError(f"logits have {logits.shape[0]} positions, the row has {len(row)} tokens")
    parent = row.parent.to(logits.device)
    ids = row.input_ids.to(logits.device)
    source = parent.clamp(min=0)
    lse = torch.logsumexp(logits.float(), dim=-1)  # one normaliser per position, no [L, vocab] gather copy
    picked = logits[source, ids].float() - lse[source]
    return torch.where(parent >= 0, picked, torch.zeros_like(picked))


def weighted_loss(logprobs: torch.Tensor, row: PackedRow, denominator: float | None = None) -> torch.Tensor:
    """``-sum(weight * logprob) / denominator`` over the row's target tokens.

    ``weight`` already sums the unit weights of every occurrence of a token
    (counts for SFT, advantages for RL), and non-targets weigh 0. The default
    ``denominator`` is the row's number of target occurrences (a per-token mean
    for SFT); for a batch of several rows pass the batch total (DESIGN
    section 6 divides by all completion tokens of the batch).
    """
    weight = row.weight.to(logprobs.device)
    if denominator is None:
        denominator = float(row.n_targets.sum())
    if denominator <= 0:
        raise ValueError(f"loss denominator must be positive, got {denominator} (a row without targets?)")
    return -(weight * logprobs).sum() / denominator


def sequence_logprobs(model: torch.nn.Module, ids: list[int], start: int) -> torch.Tensor:
    """Log-probs of ``ids[start:]`` under an ordinary causal pass over ``ids`` (the unpacked reference)."""
    if start < 1:
        raise ValueError("start must be at least 1: the first token has no position to be predicted from")
    device = next(model.parameters()).device
    x = torch.tensor(ids, dtype=torch.long, device=device)[None]
    logits = model(input_ids=x, use_cache=False).logits[0].float()
    targets = x[0, start:]
    pred = logits[start - 1:-1]
    return pred.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(pred, dim=-1)
