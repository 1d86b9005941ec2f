"""Memory planner against measurement: peak CPU memory of one learner step, measured and estimated, side by side.

For each random Qwen3-architecture model (hidden 128, 512, 1024; 32,768-token
vocabulary, tied embeddings) and each row length, a fresh child process
builds the model in fp32, packs synthetic parallel trajectories (a prompt,
a sequential head, three threads, a join tail; a sequential one fills the
rest) into one trie row, and runs
the learner's step on it: tree attention (sdpa), target log-probabilities in
chunks (``rl.attention.tree_predictions``), the SFT loss, backward, one AdamW
step. A first step on a short row creates the optimizer states, so the
measured step is a steady-state one. Measured = the process's peak resident
memory (``ru_maxrss``) minus its resident memory before the model was built
(after one step of a tiny model, which takes the one-time library
initialisation out of the measurement; the children run with glibc's mmap
threshold fixed, see ``MALLOC``);
estimate = the sum of :func:`rl.memory_plan.learner_items` for the same
config (one rank, ZeRO stage 0, fp32; this is the learner's own step without
DeepSpeed's engine around it). Prints estimate, measured and their ratio.

  python scripts/bench_memory.py                  # every size, rows 1024 and 4096, checkpointing on and off
  python scripts/bench_memory.py --sizes 128 --rows 512 --checkpointing on
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VOCAB = 32768
#: glibc keeps freed heap memory resident (the peak then depends on the order of frees, ~100 MiB of noise);
#: with a fixed mmap threshold every buffer over 64 KiB is its own mapping, returned when the tensor is freed,
#: so the resident peak follows the tensors' peak
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
#: hidden -> (layers, heads, kv heads, head dim, MLP width)
SIZES = {128: (4, 4, 2, 32, 384), 512: (4, 8, 4, 64, 1536), 1024: (4, 8, 4, 128, 3072)}


def synthetic_row(tokens: int, vocab: int, seed: int = 0):
    """One packed row of at most ``tokens`` tokens: whole parallel trajectories, each its own trie."""
    import torch

    from rl.trie import build_trie, make_row
    from rollout.units import SEQ, THREAD, Unit

    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=gen).tolist()

    tries, total = [], 0
    while True:
        prompt, head = ids(48), ids(64)
        units = [Unit(prompt, head)]
        joined = prompt + head
        for t in range(3):
            seed_ids, body = [3, 4 + t], ids(96)
            units.append(Unit(prompt + head + seed_ids, body, role=THREAD, block=1, thread=t + 1, n_inserted=2))
            joined += seed_ids + body
        units.append(Unit(joined + [9], ids(64), role=SEQ, n_inserted=1))
        trie = build_trie(units)
        if total + len(trie) > tokens:
            break
        tries.append(trie)
        total += len(trie)
    if tokens - total >= 32:  # fill the row with one sequential trajectory
        tries.append(build_trie([Unit(ids(16), ids(tokens - total - 16))]))
    return make_row(tries)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def one(hidden: int, tokens: int, checkpointing: bool, chunk: int, threads: int) -> dict:
    """Run in a child process: build, step twice, report measured and estimated MiB."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rl.attention import tree_predictions
    from rl.learner_config import LearnerConfig
    from rl.losses import sft_loss
    from rl.memory_plan import ModelShape, learner_items

    torch.set_num_threads(threads)
    layers, heads, kv, head_dim, mlp = SIZES[hidden]
    row, warm = synthetic_row(tokens, VOCAB), synthetic_row(700, VOCAB, seed=1)

    def build(hidden_: int, layers_: int, heads_: int, kv_: int, head_dim_: int, mlp_: int, vocab: int):
        config = Qwen3Config(vocab_size=vocab, hidden_size=hidden_, num_hidden_layers=layers_,
                             num_attention_heads=heads_, num_key_value_heads=kv_, head_dim=head_dim_,
                             intermediate_size=mlp_, tie_word_embeddings=True, max_position_embeddings=max(tokens, 2048))
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).to(torch.float32)
        model.config._attn_implementation = "sdpa"
        model.config.use_cache = False
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.train(), torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step(model, optimizer, r) -> None:
        optimizer.zero_grad(set_to_none=True)
        pred = tree_predictions(model, r, "sdpa", chunk_tokens=chunk, max_dense_tokens=len(r))
        loss, _ = sft_loss(pred, r, float(r.n_targets.sum()))
        loss.backward()
        optimizer.step()

    # one-time library initialisation (lazy imports and kernel set-up of the first checkpointed, chunked
    # step, ~150 MiB) is not the step's memory: run it on a tiny model before the baseline is taken
    tiny = synthetic_row(700, 1024, seed=2)
    train_step(*build(32, 1, 2, 1, 16, 64, 1024), tiny)
    base = rss_mib()
    model, optimizer = build(hidden, layers, heads, kv, head_dim, mlp, VOCAB)
    config = model.config
    for r in (warm, row):
        train_step(model, optimizer, r)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = LearnerConfig(row_tokens=len(row), gradient_checkpointing=checkpointing, logprob_chunk_tokens=chunk)
    shape = ModelShape.from_config(config.to_dict())
    estimate = sum(i.bytes for i in learner_items(shape, cfg)) / 2**20
    return {"hidden": hidden, "params": shape.parameters, "tokens": len(row), "checkpointing": checkpointing,
            "estimate_mib": estimate, "measured_mib": peak - base}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=sorted(SIZES), choices=sorted(SIZES),
                   help="hidden sizes of the random models")
    p.add_argument("--rows", type=int, nargs="+", default=[1024, 4096], help="row lengths (tokens)")
    p.add_argument("--checkpointing", choices=["on", "off", "both"], default="both",
                   help="gradient checkpointing of the measured steps")
    p.add_argument("--chunk", type=int, default=1024, help="log-prob chunk (positions; 0: full logits)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each child (count)")
    p.add_argument("--one", nargs=3, metavar=("HIDDEN", "TOKENS", "CKPT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        hidden, tokens, ckpt = args.one
        print(json.dumps(one(int(hidden), int(tokens), ckpt == "on", args.chunk, args.threads)))
        return 0
    modes = {"on": ["on"], "off": ["off"], "both": ["on", "off"]}[args.checkpointing]
    print(f"{'hidden':>6} {'params':>8} {'tokens':>6} {'ckpt':>4} {'estimate MiB':>12} {'measured MiB':>12} "
          f"{'ratio':>6}", flush=True)
    worst = []
    for hidden in args.sizes:
        for tokens in args.rows:
            for mode in modes:
                out = subprocess.run([sys.executable, __file__, "--one", str(hidden), str(tokens), mode,
                                      "--chunk", str(args.chunk), "--threads", str(args.threads)],
                                     capture_output=True, text=True, check=False, env=dict(os.environ, **MALLOC))
                if out.returncode != 0:
                    print(f"child failed ({hidden}, {tokens}, {mode}):\n{out.stderr[-2000:]}", file=sys.stderr)
                    return 1
                r = json.loads(out.stdout.strip().splitlines()[-1])
                ratio = r["estimate_mib"] / r["measured_mib"]
                worst.append(ratio)
                print(f"{hidden:>6} {r['params'] / 1e6:>7.1f}M {r['tokens']:>6} {mode:>4} {r['estimate_mib']:>12.0f} "
                      f"{r['measured_mib']:>12.0f} {ratio:>6.2f}", flush=True)
    print(f"ratio estimate/measured: min {min(worst):.2f}, max {max(worst):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
