"""A rule-based rewriter for the synthetic task (``rollout.task``): steps 1-4 without a teacher.

The task's sequential response has one line per product (``a*b: partial
products and their sums``) followed by running-sum lines. The rules:

1. **find**: every run of at least ``min_threads`` consecutive product lines;
2. **cut**: one thread per product line;
3. **decouple**: nothing to remove (a product line never refers to another);
4. **outline**: ``a*b``, the product's factors, which the prompt states.

The choices then go through the same checks as the teacher's
(:mod:`rl.datagen.rewrite`), so both rewriters obey one set of rules. On
the task's own data the result is the task's reference parallel response,
character for character.
"""

from __future__ import annotations

import re

from rl.datagen.rewrite import RewriteConfig, check_cuts, check_outlines, check_runs, check_texts
from rl.datagen.trace import Reject, Rejection, Trace, assemble, split_steps

_PRODUCT_RE = re.compile(r"^(\d+)\*(\d+): ")


def product_runs(steps: list[str], min_len: int) -> list[tuple[int, int]]:
    """1-based inclusive ranges of consecutive product lines, each at least ``min_len`` long."""
    runs, start = [], None
    for i, step in enumerate(steps + [""], 1):
        if _PRODUCT_RE.match(step):
            start = i if start is None else start
        elif start is not None:
            if i - start >= min_len:
                runs.append((start, i - 1))
            start = None
    return runs


class RuleRewriter:
    """Steps 1-4 for the synthetic task by rule (see the module docstring)."""

    name = "rule"

    def __init__(self, cfg: RewriteConfig):
        if cfg.step_unit != "line":
            raise ValueError("the rule-based rewriter reads the synthetic task line by line (step_unit: line)")
        self.cfg = cfg

    def rewrite(self, trace: Trace) -> str | Rejection:
        try:
            return self._rewrite(trace)
        except Reject as r:
            return r.rejection

    def _rewrite(self, trace: Trace) -> str:
        steps = split_steps(trace.reasoning, "line")
        runs = check_runs([list(r) for r in product_runs(steps, self.cfg.min_threads)], len(steps), self.cfg)
        blocks = check_cuts([[[i, i] for i in range(a, b + 1)] for a, b in runs], runs, self.cfg)
        check_texts([[steps[a - 1] for a, _ in b.threads] for b in blocks], blocks, steps, self.cfg)
        outlines = [["{}*{}".format(*_PRODUCT_RE.match(steps[a - 1]).groups()) for a, _ in b.threads]
                    for b in blocks]
        check_outlines(outlines, blocks, trace, steps, self.cfg)
        return assemble(trace, steps, blocks, "line")
