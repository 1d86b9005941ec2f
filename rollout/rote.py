"""Teach a tiny model a few responses by rote, so a real engine has something to decode.

A randomly initialised model never writes ``<Parallel>`` blocks, so tests and
benchmarks of the spawn/join orchestrator that want real engine runs with
real blocks need a model that does. :func:`teach` fine-tunes a model (plain
transformers, AdamW, full batch, causal LM loss) on a handful of
``(prompt_ids, response)`` pairs until it reproduces them, i.e. until every
taught token is the model's greedy choice by a margin (its probability is
above ``exp(-max_token_loss)``, 0.99 by default), so greedy decoding on
another engine, whose floating-point sums differ in the last bits, still
reproduces them:

* on every unit of the response as the orchestrator would request it
  (``rollout.units.replay``; loss on completion tokens only), so greedy
  spawn/join decoding reproduces the response;
* and, unless ``sequential=False``, on the whole response as one sequence
  (prompt, response tokens, EOS), so sequential decoding reproduces it too.

The stopping rule is that behaviour, not a mean loss near a threshold: the
step at which the last hard token is learned depends on the CPU's
floating-point path, so callers give a generous ``max_steps`` and check
:attr:`Taught.learned`. At lr 1e-2 the tests' responses sat at a mean loss of
0.011 with two tokens not yet learned from step 200 to about 450, then
converged within 100 steps; the default lr 3e-3 learns every token in about
170-230 steps, without that plateau.

This is memorisation, not learning; it is a fixture for engine-level checks,
not a training method (that is the job of the SFT stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from rollout.units import encode, replay


def rote_sequences(examples: Sequence[tuple[list[int], str]], tokenizer, sequential: bool = True
                   ) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` pairs, labels -100 where no loss is taken."""
    eos = tokenizer.eos_token_id
    out = []
    for prompt_ids, response in examples:
        for u in replay(prompt_ids, response, tokenizer, eos):
            out.append((u.context_ids + u.completion_ids, [-100] * len(u.context_ids) + u.completion_ids))
        if sequential:
            body = encode(tokenizer, response) + [eos]
            out.append((list(prompt_ids) + body, [-100] * len(prompt_ids) + body))
    return out


@dataclass
class Taught:
    """How the teaching ended: optimizer steps taken, mean and largest token loss at the end (nats)."""

    steps: int
    loss: float
    max_token_loss: float
    target: float

    @property
    def learned(self) -> bool:
        """Every taught token is the greedy choice with probability above ``exp(-target)``."""
        return self.max_token_loss < self.target

    def __str__(self) -> str:
        return (f"{'learned' if self.learned else 'NOT learned'} after {self.steps} steps: mean token loss "
                f"{self.loss:.2e}, largest {self.max_token_loss:.2e} (target < {self.target:g})")


def teach(model_dir: str | Path, out_dir: str | Path, examples: Sequence[tuple[list[int], str]], tokenizer, *,
          sequential: bool = True, max_steps: int = 2000, lr: float = 3e-3, max_token_loss: float = 0.01,
          seed: int = 0, threads: int = 1) -> Taught:
    """Fine-tune the model in ``model_dir`` on ``examples`` and save it with the tokenizer to ``out_dir``.

    Trains full-batch until every taught token's loss is below
    ``max_token_loss`` or ``max_steps`` optimizer steps were taken; the caller
    checks ``.learned``. Runs on ``threads`` torch threads (restored
    afterwards): for a model this small one thread is fastest, and on a busy
    machine more threads are many times slower (OpenMP synchronisation).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _teach(model_dir, out_dir, examples, tokenizer, sequential, max_steps, lr, max_token_loss, seed)
    finally:
        torch.set_num_threads(previous_threads)


def _teach(model_dir, out_dir, examples, tokenizer, sequential, max_steps, lr, max_token_loss, seed) -> Taught:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    seqs = rote_sequences(examples, tokenizer, sequential)
    width = max(len(ids) for ids, _ in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in seqs])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in seqs])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in seqs])
    targets = labels[:, 1:]  # the token at position i + 1 is predicted from the logits at i
    taught = targets != -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = 0
    while True:
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        token_loss = torch.nn.functional.cross_entropy(logits[taught], targets[taught], reduction="none")
        loss = token_loss.mean()
        worst = token_loss.max().item()
        if worst < max_token_loss or steps == max_steps:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Taught(steps, loss.item(), worst, max_token_loss)
