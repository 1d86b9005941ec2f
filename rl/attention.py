"""Tree attention for trie-packed rows, behind one interface (DESIGN section 5).

Token ``q`` of a packed row may attend to token ``k`` iff ``k`` is ``q`` or
one of its ancestors: ``k <= q <= tout[k]`` (the flat index is the entry time
of the depth-first walk, see :mod:`rl.trie`). Three backends build that mask
in the form their transformers attention implementation expects and pass it
to the model as a prepared 4D mask, which transformers uses as is:

* ``"eager"`` -- an additive float mask ``[1, 1, L, L]`` (0 or the dtype's
  minimum); the reference, slowest.
* ``"sdpa"`` -- a boolean mask ``[1, 1, L, L]`` (True = attend) for
  ``torch.nn.functional.scaled_dot_product_attention``; forward and backward
  on CPU and GPU. The mask, and sdpa's math kernel on CPU, take memory that
  grows as L squared, so rows must stay within a configured length
  (:data:`DENSE_MAX_TOKENS` by default).
* ``"flex"`` -- a block-sparse ``BlockMask`` built from ``tout`` for torch's
  flex attention; memory grows linearly with L. For GPUs: torch 2.13 runs it
  on CPU forward only (compiled), without a backward.

The model must have been loaded (or switched with
``model.set_attn_implementation``) to the matching implementation; see
:data:`IMPLEMENTATION`. One row is one forward pass (batch size 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from rl.logprobs import TokenPredictions, chunked_predictions, token_predictions
from rl.trie import PackedRow
from rollout.config import check_ranges

BACKENDS = ("eager", "sdpa", "flex")
#: transformers' ``attn_implementation`` for each backend.
IMPLEMENTATION = {"eager": "eager", "sdpa": "sdpa", "flex": "flex_attention"}
#: Default row-length cap for the dense-mask backends (tokens).
DENSE_MAX_TOKENS = 8192


@dataclass
class PackingConfig:
    """How training batches are packed into rows and attended."""

    backend: Literal["eager", "sdpa", "flex"] = field(default="sdpa", metadata={
        "help": "tree attention backend: eager (reference), sdpa (dense boolean mask, CPU and GPU, memory grows "
                "as row_tokens^2), flex (block-sparse, GPU training; forward only on CPU)"})
    row_tokens: int = field(default=4096, metadata={
        "help": "token budget of one packed row; larger groups are split into tries of whole trajectories (tokens)",
        "range": ">= 2"})

    def __post_init__(self) -> None:
        check_ranges(self)


def ancestor_mask(tout: torch.Tensor) -> torch.Tensor:
    """Boolean ``[L, L]``: entry ``[q, k]`` is True iff ``k`` is ``q`` or an ancestor of ``q``."""
    idx = torch.arange(tout.shape[0], device=tout.device)
    q, k = idx[:, None], idx[None, :]
    return (k <= q) & (q <= tout[None, :])


def tree_mask_mod(tout: torch.Tensor):
    """Flex attention ``mask_mod`` for the ancestor relation of a row with exit times ``tout``."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx <= tout[kv_idx])

    return mask_mod


def tree_block_mask(tout: torch.Tensor, block_size: int = 128):
    """Flex attention ``BlockMask`` for the ancestor relation, built from ``tout`` block by block.

    torch's ``create_block_mask`` evaluates the mask on all L x L pairs; this
    computes, for every (query block, key block) tile, whether some pair may
    attend (a key ``k`` of the tile with ``k <= q1`` and ``tout[k] >= q0``,
    from a running maximum of ``tout`` inside each key block) and whether all
    pairs may (``max k <= q0`` and ``min tout >= q1``, complete tiles only),
    in memory that grows with the number of tiles, (L / block_size)^2.
    """
    from torch.nn.attention.flex_attention import BlockMask

    n, bs = int(tout.shape[0]), block_size
    nb = -(-n // bs)
    device = tout.device
    tiles = torch.arange(nb, device=device)
    start = tiles * bs
    q0, q1 = start, torch.clamp(start + bs - 1, max=n - 1)
    padded = torch.nn.functional.pad(tout, (0, nb * bs - n), value=-1).view(nb, bs)
    running_max = padded.cummax(dim=1).values  # [key block, offset]: max tout of the block's first keys
    last = q1[:, None] - start[None, :]  # [q block, key block]: offset of the last key <= q1
    some = (last >= 0) & (running_max[tiles[None, :], last.clamp(0, bs - 1)] >= q0[:, None])
    complete = start + bs <= n
    min_tout = padded.min(dim=1).values
    full = ((start + bs - 1)[None, :] <= q0[:, None]) & (min_tout[None, :] >= q1[:, None])
    full &= complete[None, :] & complete[:, None]
    partial = some & ~full

    def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dense = dense.to(torch.int32)[None, None]
        return dense.sum(-1).to(torch.int32), torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs,
                                    mask_mod=tree_mask_mod(tout), seq_lengths=(n, n))


def tree_attention_mask(row: PackedRow, backend: str, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None, max_dense_tokens: int = DENSE_MAX_TOKENS):
    """The mask object ``backend`` passes to the model for ``row``.

    Raises ValueError for an unknown backend, or a row longer than
    ``max_dense_tokens`` for the dense backends.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}'; choose one of {BACKENDS}")
    tout = row.tout.to(device) if device is not None else row.tout
    if backend == "flex":
        return tree_block_mask(tout)
    if len(row) > max_dense_tokens:
        raise ValueError(f"row of {len(row)} tokens is longer than max_dense_tokens={max_dense_tokens} for the "
                         f"dense '{backend}' backend (memory grows as L^2); pack shorter rows or use 'flex'")
    allowed = ancestor_mask(tout)[None, None]
    if backend == "sdpa":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=tout.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _tree_inputs(model: torch.nn.Module, row: PackedRow, backend: str, max_dense_tokens: int) -> dict:
    """Keyword arguments of a transformers forward pass of ``row`` under the tree mask (checks the backend)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}'; choose one of {BACKENDS}")
    have = model.config._attn_implementation
    if have != IMPLEMENTATION[backend]:
        raise ValueError(f"backend '{backend}' needs the model's attn_implementation to be "
                         f"'{IMPLEMENTATION[backend]}', it is '{have}'; load the model with "
                         f"attn_implementation='{IMPLEMENTATION[backend]}' or call model.set_attn_implementation")
    param = next(model.parameters())
    mask = tree_attention_mask(row, backend, dtype=param.dtype, device=param.device,
                               max_dense_tokens=max_dense_tokens)
    return {"input_ids": row.input_ids.to(param.device)[None], "position_ids": row.position_ids.to(param.device)[None],
            "attention_mask": mask, "use_cache": False}


def tree_forward(model: torch.nn.Module, row: PackedRow, backend: str,
                 max_dense_tokens: int = DENSE_MAX_TOKENS) -> torch.Tensor:
    """Logits ``[L, vocab]`` of one packed row under the tree mask.

    The model's ``config._attn_implementation`` must be
    ``IMPLEMENTATION[backend]``; a mismatch raises ValueError rather than
    switching the model behind the caller's back.
    """
    return model(**_tree_inputs(model, row, backend, max_dense_tokens)).logits[0]


def tree_predictions(model: torch.nn.Module, row: PackedRow, backend: str, chunk_tokens: int = 0,
                     max_dense_tokens: int = DENSE_MAX_TOKENS) -> TokenPredictions:
    """The row's per-token log-probabilities (:class:`rl.logprobs.TokenPredictions`) under the tree mask.

    ``chunk_tokens > 0``: the decoder's last hidden states go through the
    output projection ``chunk_tokens`` positions at a time
    (:func:`rl.logprobs.chunked_predictions`); 0: from the full logits of
    :func:`tree_forward`. ``model`` is a transformers causal LM
    (``get_decoder()`` and ``get_output_embeddings()``); gradient
    checkpointing, when enabled on it, applies to the decoder layers.
    """
    if chunk_tokens <= 0:
        return token_predictions(tree_forward(model, row, backend, max_dense_tokens), row)
    inputs = _tree_inputs(model, row, backend, max_dense_tokens)
    hidden = model.get_decoder()(**inputs).last_hidden_state[0]
    return chunked_predictions(hidden, model.get_output_embeddings(), row, chunk_tokens)
