"""Teach a tiny model a few responses by rote, so a real engine has something to decode.

A randomly initialised model never writes ``<Parallel>`` blocks, so tests and
benchmarks of the spawn/join orchestrator that want real engine runs with
real blocks need a model that does. :func:`teach` fine-tunes a model (plain
transformers, AdamW, full batch, causal LM loss) on a handful of
``(prompt_ids, response)`` pairs until it reproduces them:

* on every unit of the response as the orchestrator would request it
  (``rollout.units.replay``; loss on completion tokens only), so greedy
  spawn/join decoding reproduces the response;
* and, unless ``sequential=False``, on the whole response as one sequence
  (prompt, response tokens, EOS), so sequential decoding reproduces it too.

This is memorisation, not learning; it is a fixture for engine-level checks,
not a training method (that is the job of the SFT stage).
"""

from __future__ import annotations

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


def teach(model_dir: str | Path, out_dir: str | Path, examples: Sequence[tuple[list[int], str]], tokenizer, *,
          sequential: bool = True, max_steps: int = 600, lr: float = 3e-3, target_loss: float = 2e-3,
          seed: int = 0, threads: int = 1) -> float:
    """Fine-tune the model in ``model_dir`` on ``examples`` and save it with the tokenizer to ``out_dir``.

    Trains full-batch until the mean token loss is below ``target_loss`` or
    ``max_steps`` is reached; returns the last loss (the caller decides
    whether it is low enough). Runs on ``threads`` torch threads (restored
    afterwards): for a model this small one thread is fastest, and on a busy
    machine more threads are many times slower (OpenMP synchronisation).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _teach(model_dir, out_dir, examples, tokenizer, sequential, max_steps, lr, target_loss, seed)
    finally:
        torch.set_num_threads(previous_threads)


def _teach(model_dir, out_dir, examples, tokenizer, sequential, max_steps, lr, target_loss, seed) -> float:
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss_value = float("inf")
    for _ in range(max_steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss_value = loss.item()
        if loss_value < target_loss:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return loss_value
