"""Data generation (DESIGN section 1): turn sequential traces into parallel ones.

* Stage 1 (:mod:`rl.datagen.stage1`): rewrite sequential traces
  ``(prompt, reasoning, answer)`` into parallel responses in five steps: find
  runs of independent steps, cut them into threads, remove references between
  threads, write outlines, validate. Steps 1-4 are a :class:`Rewriter`: a
  teacher LLM behind any OpenAI-compatible endpoint
  (:mod:`rl.datagen.rewrite`, over :mod:`rl.datagen.teacher`) or a
  rule-based rewriter for the synthetic task (:mod:`rl.datagen.rules`).
  Step 5 is shared (:mod:`rl.datagen.stage1`).
* Stage 2 (:mod:`rl.datagen.stage2`): self-training; roll out a model with
  the spawn/join orchestrator and keep the trajectories that are format-valid
  and correct.

Both stages write JSONL records with ``prompt``, ``answer`` and ``response``
(the parallel response), which ``threadweaver check`` and the SFT stage read.
``threadweaver datagen stage1|stage2`` runs them (:mod:`cluster.cmd_datagen`).
"""
