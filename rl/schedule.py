"""Learning-rate schedule: linear warm-up, then constant or cosine decay.

Step ``s`` (0-based, the optimizer step about to be taken) uses
``lr * factor(s)``:

* warm-up, ``s < warmup_steps``: ``(s + 1) / warmup_steps``;
* ``"constant"``: 1 afterwards;
* ``"cosine"``: from 1 down to ``min_ratio`` at ``total_steps`` along half a
  cosine, and ``min_ratio`` beyond it.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str = "cosine", min_ratio: float = 0.0) -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (see module doc)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule '{kind}'; choose one of {SCHEDULES}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must lie in [0, 1], got {min_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, kind: str = "cosine",
                   min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor`; call ``step()`` once after every optimizer step."""
    lr_factor(0, warmup_steps, total_steps, kind, min_ratio)  # validate the arguments now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, kind, min_ratio))
