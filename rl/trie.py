"""Trie packing of units for training (DESIGN section 5).

All units of a trajectory, and all trajectories of one GRPO group (they share
the prompt), go into one token trie: each unit is inserted as the path
``context_ids + completion_ids``, so shared prefixes (the prompt, the text
before a block, thread 1, which is also the start of the join context) are
stored once. The trie is flattened depth-first (children in insertion order).
For every flat token it keeps:

* ``position_ids`` -- its depth, i.e. its index inside every unit that passes
  through it, so positions match inference exactly;
* ``parent`` -- the flat index of its parent, ``-1`` for a root;
* ``tout`` -- the exit time of the depth-first walk. The flattening *is* the
  pre-order walk, so a token's entry time is its own flat index and only
  ``tout`` (the last flat index of its subtree) is stored: token ``q`` may
  attend to ``k`` iff ``k <= q <= tout[k]`` (``k`` is ``q`` or an ancestor).

Targets: a node is a target once for every unit in which it is a *completion*
token (``n_targets`` counts these occurrences); its ``weight`` is the sum of
those units' weights (1 per occurrence for SFT, the trajectory's advantage for
RL), with the positive and negative sums also kept apart (``weight_pos``,
``weight_neg``) for clipped objectives. Context tokens -- the prompt,
orchestrator-inserted seeds and join newlines, and the copies of threads 2..k
inside a join context -- are targets only through the unit that generated them
(threads 2..k are completions of their own thread units, whose paths end in a
different branch; the join context's copies are separate, context-only nodes).
A root has no parent to predict it from, so a unit with an empty context and a
non-empty completion is refused.

A :class:`PackedRow` holds several tries side by side, up to a token budget,
with row-level ``parent``/``tout``; the subtrees of different tries occupy
disjoint index ranges, so the ancestor test above already keeps documents
apart (``doc`` records which trie each token came from).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from rollout.units import Unit

ROOT = -1


@dataclass
class Trie:
    """One flattened trie (lists of equal length, one entry per unique token).

    ``unit_nodes[u]`` is the flat index of every token of unit ``u``'s path
    (context then completion), so per-unit values can be read back from a
    packed forward pass. ``behavior_logprob`` is the mean of the engine's
    logprobs over the occurrences that carry one, NaN elsewhere.
    """

    input_ids: list[int]
    position_ids: list[int]
    parent: list[int]
    tout: list[int]
    weight: list[float]
    weight_pos: list[float]
    weight_neg: list[float]
    n_targets: list[int]
    behavior_logprob: list[float]
    unit_nodes: list[list[int]]
    unit_context_len: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_units(self) -> int:
        return len(self.unit_nodes)

    @property
    def expanded_tokens(self) -> int:
        """Tokens if every unit were its own row (context + completion each)."""
        return sum(len(p) for p in self.unit_nodes)

    @property
    def max_unit_tokens(self) -> int:
        return max((len(p) for p in self.unit_nodes), default=0)


def build_trie(units: Sequence[Unit], weights: Sequence[float] | None = None) -> Trie:
    """The flattened trie of ``units``; ``weights[i]`` is unit ``i``'s loss weight (default 1).

    Raises ValueError for a unit whose first completion token has no parent
    (empty context), a weight that is not finite, or mismatched lengths.
    """
    if weights is None:
        weights = [1.0] * len(units)
    if len(weights) != len(units):
        raise ValueError(f"{len(units)} units but {len(weights)} weights")
    # Build with node ids in creation order; children dicts keep insertion order.
    root_children: dict[int, int] = {}
    children: list[dict[int, int]] = []
    token: list[int] = []
    depth: list[int] = []
    parent: list[int] = []
    w_sum: list[float] = []
    w_pos: list[float] = []
    w_neg: list[float] = []
    count: list[int] = []
    lp_sum: list[float] = []
    lp_n: list[int] = []
    paths: list[list[int]] = []
    for u_index, (unit, w) in enumerate(zip(units, weights)):
        w = float(w)
        if not math.isfinite(w):
            raise ValueError(f"unit {u_index}: weight {w} is not finite")
        n_ctx = len(unit.context_ids)
        if n_ctx == 0 and unit.completion_ids:
            raise ValueError(f"unit {u_index}: empty context, its first completion token has no parent "
                             "position to be predicted from")
        if unit.completion_logprobs is not None and len(unit.completion_logprobs) != len(unit.completion_ids):
            raise ValueError(f"unit {u_index}: {len(unit.completion_logprobs)} logprobs for "
                             f"{len(unit.completion_ids)} completion tokens")
        node = ROOT
        path: list[int] = []
        for i, tok in enumerate(list(unit.context_ids) + list(unit.completion_ids)):
            table = root_children if node == ROOT else children[node]
            nxt = table.get(tok)
            if nxt is None:
                nxt = len(token)
                table[tok] = nxt
                children.append({})
                token.append(int(tok))
                depth.append(i)
                parent.append(node)
                w_sum.append(0.0)
                w_pos.append(0.0)
                w_neg.append(0.0)
                count.append(0)
                lp_sum.append(0.0)
                lp_n.append(0)
            node = nxt
            path.append(node)
            if i >= n_ctx:
                w_sum[node] += w
                if w > 0:
                    w_pos[node] += w
                elif w < 0:
                    w_neg[node] += w
                count[node] += 1
                if unit.completion_logprobs is not None:
                    lp_sum[node] += float(unit.completion_logprobs[i - n_ctx])
                    lp_n[node] += 1
        paths.append(path)

    # Pre-order walk (iterative: paths are thousands of tokens deep).
    order: list[int] = []
    stack = list(reversed(root_children.values()))
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(children[node].values()))
    flat = [0] * len(order)
    for i, node in enumerate(order):
        flat[node] = i
    flat_parent = [ROOT if parent[n] == ROOT else flat[parent[n]] for n in order]
    size = [1] * len(order)
    for i in range(len(order) - 1, -1, -1):
        if flat_parent[i] != ROOT:
            size[flat_parent[i]] += size[i]
    return Trie(
        input_ids=[token[n] for n in order],
        position_ids=[depth[n] for n in order],
        parent=flat_parent,
        tout=[i + size[i] - 1 for i in range(len(order))],
        weight=[w_sum[n] for n in order],
        weight_pos=[w_pos[n] for n in order],
        weight_neg=[w_neg[n] for n in order],
        n_targets=[count[n] for n in order],
        behavior_logprob=[lp_sum[n] / lp_n[n] if lp_n[n] else math.nan for n in order],
        unit_nodes=[[flat[n] for n in p] for p in paths],
        unit_context_len=[len(u.context_ids) for u in units],
    )


def group_trie(trajectories: Sequence[Sequence[Unit]], weights: Sequence[float] | None = None) -> Trie:
    """One trie for a group of trajectories; ``weights[i]`` (default 1) goes to every unit of trajectory i.

    For RL pass the group's advantages; for SFT leave the default (counts).
    """
    if weights is None:
        weights = [1.0] * len(trajectories)
    if len(weights) != len(trajectories):
        raise ValueError(f"{len(trajectories)} trajectories but {len(weights)} weights")
    units = [u for traj in trajectories for u in traj]
    unit_weights = [float(w) for traj, w in zip(trajectories, weights) for _ in traj]
    return build_trie(units, unit_weights)


def group_tries(trajectories: Sequence[Sequence[Unit]], weights: Sequence[float] | None = None,
                max_tokens: int | None = None) -> list[Trie]:
    """The group's trie, split into tries of consecutive trajectories when it exceeds ``max_tokens``.

    Rows of the dense attention backends are capped (memory grows as the
    square of their length), so a large group is cut greedily: each chunk
    takes trajectories in order while its trie fits. Only the prompt and other
    prefixes shared *across* chunks are then stored more than once. Raises
    ValueError when a single trajectory's trie exceeds ``max_tokens``.
    """
    if weights is None:
        weights = [1.0] * len(trajectories)
    if len(weights) != len(trajectories):
        raise ValueError(f"{len(trajectories)} trajectories but {len(weights)} weights")
    whole = group_trie(trajectories, weights)
    if max_tokens is None or len(whole) <= max_tokens:
        return [whole]
    out: list[Trie] = []
    start, current = 0, None
    for end in range(1, len(trajectories) + 1):
        candidate = group_trie(trajectories[start:end], weights[start:end])
        if len(candidate) <= max_tokens:
            current = candidate
            continue
        if current is None:
            raise ValueError(f"trajectory {end - 1} alone has a trie of {len(candidate)} tokens, more than "
                             f"max_tokens={max_tokens}")
        out.append(current)
        start, current = end - 1, group_trie(trajectories[end - 1:end], weights[end - 1:end])
        if len(current) > max_tokens:
            raise ValueError(f"trajectory {end - 1} alone has a trie of {len(current)} tokens, more than "
                             f"max_tokens={max_tokens}")
    out.append(current)
    return out


@dataclass
class PackedRow:
    """Several tries side by side in one row of one forward pass (1-D tensors of length L).

    ``parent`` and ``tout`` are row-level flat indices (``-1``: a root);
    ``doc`` is the index of the trie each token belongs to, and
    ``doc_offsets[d]`` the row index of trie ``d``'s first token.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    parent: torch.Tensor
    tout: torch.Tensor
    doc: torch.Tensor
    weight: torch.Tensor
    weight_pos: torch.Tensor
    weight_neg: torch.Tensor
    n_targets: torch.Tensor
    behavior_logprob: torch.Tensor
    doc_offsets: list[int] = field(default_factory=list)
    tries: list[Trie] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_target(self) -> torch.Tensor:
        return self.n_targets > 0

    def unit_positions(self, doc: int, unit: int) -> torch.Tensor:
        """Row indices of the path of unit ``unit`` of trie ``doc`` (context then completion)."""
        return torch.tensor(self.tries[doc].unit_nodes[unit], dtype=torch.long) + self.doc_offsets[doc]


def make_row(tries: Sequence[Trie]) -> PackedRow:
    """One row holding ``tries`` in order."""
    if not tries:
        raise ValueError("make_row needs at least one trie")
    offsets, ids, pos, par, tout, doc = [], [], [], [], [], []
    w, wp, wn, cnt, blp = [], [], [], [], []
    start = 0
    for d, t in enumerate(tries):
        offsets.append(start)
        ids += t.input_ids
        pos += t.position_ids
        par += [p if p == ROOT else p + start for p in t.parent]
        tout += [x + start for x in t.tout]
        doc += [d] * len(t)
        w += t.weight
        wp += t.weight_pos
        wn += t.weight_neg
        cnt += t.n_targets
        blp += t.behavior_logprob
        start += len(t)
    long, flt = torch.long, torch.float32
    return PackedRow(
        input_ids=torch.tensor(ids, dtype=long), position_ids=torch.tensor(pos, dtype=long),
        parent=torch.tensor(par, dtype=long), tout=torch.tensor(tout, dtype=long),
        doc=torch.tensor(doc, dtype=long), weight=torch.tensor(w, dtype=flt),
        weight_pos=torch.tensor(wp, dtype=flt), weight_neg=torch.tensor(wn, dtype=flt),
        n_targets=torch.tensor(cnt, dtype=long), behavior_logprob=torch.tensor(blp, dtype=flt),
        doc_offsets=offsets, tries=list(tries),
    )


def pack_tries(tries: Sequence[Trie], max_tokens: int) -> list[PackedRow]:
    """Rows of at most ``max_tokens`` tokens, first-fit by decreasing trie size.

    Every trie lands whole in one row (a trie is never split); raises
    ValueError when one is longer than ``max_tokens``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    for i, t in enumerate(tries):
        if len(t) > max_tokens:
            raise ValueError(f"trie {i} has {len(t)} tokens, more than the row budget {max_tokens}; "
                             "raise the row length or put fewer trajectories in one trie")
    bins: list[list[Trie]] = []
    free: list[int] = []
    for t in sorted(tries, key=len, reverse=True):
        for b, room in enumerate(free):
            if len(t) <= room:
                bins[b].append(t)
                free[b] -= len(t)
                break
        else:
            bins.append([t])
            free.append(max_tokens - len(t))
    return [make_row(b) for b in bins]


@dataclass
class TreeStats:
    """Token counts of one batch in three layouts.

    ``unique_tokens``: trie nodes (the trie-packed layout). ``expanded_tokens``:
    every unit as its own row, context included (the layout the published RL
    code trains on). ``padded_tokens``: those rows padded to the longest unit.
    ``target_tokens``: completion-token occurrences (the loss normaliser).
    """

    n_units: int
    unique_tokens: int
    expanded_tokens: int
    padded_tokens: int
    target_tokens: int

    @property
    def expanded_ratio(self) -> float:
        return self.expanded_tokens / self.unique_tokens if self.unique_tokens else 0.0

    @property
    def padded_ratio(self) -> float:
        return self.padded_tokens / self.unique_tokens if self.unique_tokens else 0.0


def tree_stats(tries: Sequence[Trie]) -> TreeStats:
    """Unique, expanded and padded token counts of ``tries`` taken as one batch."""
    n_units = sum(t.n_units for t in tries)
    longest = max((t.max_unit_tokens for t in tries), default=0)
    return TreeStats(
        n_units=n_units,
        unique_tokens=sum(len(t) for t in tries),
        expanded_tokens=sum(t.expanded_tokens for t in tries),
        padded_tokens=n_units * longest,
        target_tokens=sum(sum(t.n_targets) for t in tries),
    )
