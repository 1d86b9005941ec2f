"""Per-token log-probabilities of a trie-packed row and the weighted loss (DESIGN section 5).

In a packed row a token is predicted by the logits at its *parent's* flat
position, not at flat index - 1 (the previous flat token may be the end of a
sibling branch). Roots have no parent: their log-probability is 0 and they are
never targets.

Two ways to get them, equal up to rounding (tests/test_memory_equality.py):
:func:`token_predictions` reads the full ``[L, vocab]`` logits of a forward
pass; :func:`chunked_predictions` projects the last hidden states a chunk of
positions at a time (projection, logsumexp and gather per chunk, recomputed
chunk by chunk in the backward), so no ``[L, vocab]`` tensor ever exists --
for a 32k-token row and a 152k-token vocabulary that tensor alone is 20 GB in
fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# --------------------------------------------------------------------------- what a loss reads


@dataclass
class TokenPredictions:
    """Per-token results of one row's forward pass that the losses read (``[L]`` tensors).

    ``logprob``: log p(token | ancestors) read at the parent position, fp32,
    differentiable, 0 at roots. ``greedy``: whether the parent position's
    argmax is the token (False at roots; no gradient).
    """

    logprob: torch.Tensor
    greedy: torch.Tensor


def token_predictions(logits: torch.Tensor, row: PackedRow) -> TokenPredictions:
    """:class:`TokenPredictions` from the full ``[L, vocab]`` logits (the unchunked path)."""
    logprob = token_logprobs(logits, row)
    with torch.no_grad():
        parent = row.parent.to(logits.device)
        greedy = logits.detach().argmax(-1)[parent.clamp(min=0)] == row.input_ids.to(logits.device)
    return TokenPredictions(logprob, greedy & (parent >= 0))


def as_predictions(pred: TokenPredictions | torch.Tensor, row: PackedRow) -> TokenPredictions:
    """``pred`` itself, or :func:`token_predictions` of it when it is the ``[L, vocab]`` logits."""
    return pred if isinstance(pred, TokenPredictions) else token_predictions(pred, row)


class _PickedLogSoftmax(torch.autograd.Function):
    """``log_softmax(logits)[i, targets[i]]`` in fp32, whose backward allocates one fp32 ``[n, vocab]`` tensor.

    The gradient is ``g * (onehot(target) - softmax)``, built in place in a
    single buffer (autograd's own logsumexp and gather backward would hold
    three or four of them).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        lse = torch.logsumexp(x, dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return x.gather(1, targets[:, None])[:, 0] - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        g = logits.to(torch.float32, copy=True)
        g.sub_(lse[:, None]).exp_().mul_(-grad[:, None])
        g.scatter_add_(1, targets[:, None], grad[:, None])
        return g.to(logits.dtype), None


def _chunk(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden)
    return _PickedLogSoftmax.apply(logits, targets), logits.detach().argmax(-1) == targets


def chunked_predictions(hidden: torch.Tensor, head: torch.nn.Module, row: PackedRow,
                        chunk_tokens: int) -> TokenPredictions:
    """:class:`TokenPredictions` from the last hidden states ``[L, hidden]``, ``chunk_tokens`` positions at a time.

    ``head`` is the output projection module (``model.get_output_embeddings()``;
    called as a module so that ZeRO-3 gathers its weight). Every non-root
    token's hidden state is taken at its parent; per chunk the projection,
    logsumexp and gather run under activation checkpointing, so the forward
    keeps no chunk's logits and the backward recomputes one chunk at a time:
    the largest logits tensor alive is ``[chunk_tokens, vocab]``, never
    ``[L, vocab]``.
    """
    if hidden.shape[0] != len(row):
        raise ValueError(f"hidden states have {hidden.shape[0]} positions, the row has {len(row)} tokens")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    from torch.utils.checkpoint import checkpoint

    device = hidden.device
    parent = row.parent.to(device)
    index = (parent >= 0).nonzero()[:, 0]
    source = hidden.index_select(0, parent[index])
    targets = row.input_ids.to(device)[index]
    recompute = torch.is_grad_enabled() and source.requires_grad
    picked, hits = [], []
    for start in range(0, int(index.shape[0]), chunk_tokens):
        h, t = source[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        lp, hit = checkpoint(_chunk, head, h, t, use_reentrant=False) if recompute else _chunk(head, h, t)
        picked.append(lp)
        hits.append(hit)
    logprob = torch.zeros(len(row), dtype=torch.float32, device=device)
    greedy = torch.zeros(len(row), dtype=torch.bool, device=device)
    if picked:
        logprob = logprob.index_put((index,), torch.cat(picked))
        greedy[index] = torch.cat(hits)
    return TokenPredictions(logprob, greedy)


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
