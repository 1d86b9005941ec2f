"""Learner-side smoke test for a GPU machine: real-shaped rows, real-shaped models, peak memory against the plan.

Needs only Python (3.11+), PyTorch and transformers: no network, no vLLM, Ray
or DeepSpeed (the project is imported from this source tree, and none of the
modules on this path import them). For each random-initialised
Qwen3-shaped model built from its config (0.6B and 1.7B, nothing downloaded)
and each row length (8k and 16k tokens), it packs synthetic parallel
trajectories (one group of four sharing a prompt: a sequential head, four
threads, a join tail) into trie rows and runs

* one SFT loss step (weight 1 per target occurrence), and
* one P-GRPO loss step (mean-centred advantages broadcast to every
  completion token, PPO-clipped ratios against made-up rollout
  log-probabilities),

each a forward and backward pass with gradient checkpointing and chunked
log-probabilities (no optimizer step: the optimizer states are the plan's
arithmetic, not a measurement). It prints the peak memory of the step
(``torch.cuda.max_memory_allocated`` on a GPU; not measured on CPU) next to :mod:`rl.memory_plan`'s estimate for parameters,
gradients, activations and log-probabilities, and the tokens per second.
On one H100/H200 it takes a few minutes (flex attention compiles once).

With vLLM installed (``--decode auto``, the default, or ``on``) it also decodes
a few spawn/join trajectories through this project's orchestrator on vLLM: a
random model of the 0.6B body (``--small``: the tiny one) with the tiny
tokenizer, each request steered by vLLM's ``allowed_token_ids`` so that the
random weights write one block of two threads (digits, then ``</Thread>``) and
digits then EOS after the join; it prints the trajectories, their finish
reasons and the decoding throughput, and fails if one is not a spawn/join
trajectory ending in EOS.

  python scripts/gpu_smoke.py                      # cuda, bf16, flex attention, 0.6B and 1.7B, 8k and 16k rows
  python scripts/gpu_smoke.py --device cpu --small # a tiny model and short rows: the test suite's check
  python scripts/gpu_smoke.py --decode off         # the learner steps only
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rl.attention import IMPLEMENTATION, tree_predictions  # noqa: E402
from rl.grpo import pgrpo_loss, rl_tries  # noqa: E402
from rl.learner_config import TORCH_DTYPES, LearnerConfig  # noqa: E402
from rl.losses import sft_loss  # noqa: E402
from rl.memory_plan import DTYPE_BYTES, KNOWN_SHAPES, ModelShape, learner_items  # noqa: E402
from rl.trie import PackedRow, pack_tries  # noqa: E402
from rollout.units import SEQ, THREAD, Unit  # noqa: E402

#: the --small model: a few layers, a short vocabulary
SMALL = ModelShape(vocab=1024, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, tied=True)


def hf_config(shape: ModelShape, max_tokens: int):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                       num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                       intermediate_size=shape.intermediate, tie_word_embeddings=shape.tied,
                       max_position_embeddings=max(max_tokens, 4096))


def group(gen: torch.Generator, vocab: int, scale: int, k: int = 4) -> list[list[Unit]]:
    """``k`` trajectories of one prompt; ``scale`` sets the lengths (a thread is ``scale`` tokens)."""
    def ids(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=gen).tolist()

    prompt = ids(scale // 2)
    out = []
    for _ in range(k):
        head = ids(scale)
        units, joined = [Unit(prompt, head)], prompt + head
        for t in range(4):
            seed, body = [3, 4 + t], ids(scale)
            units.append(Unit(prompt + head + seed, body, [-1.0] * scale, role=THREAD, block=1, thread=t + 1,
                              n_inserted=2))
            joined += seed + body
        units.append(Unit(joined + [9], ids(scale), role=SEQ, n_inserted=1))
        out.append(units)
    return out


def rows_of(tokens: int, vocab: int, advantages: list[float] | None, seed: int = 0) -> PackedRow:
    """The first full row of ``tokens`` tokens packed from synthetic groups (SFT weights, or advantages)."""
    gen = torch.Generator().manual_seed(seed)
    scale = max(8, tokens // 40)  # a trajectory's trie is ~ 9.5 scale: about four per row
    groups = [group(gen, vocab, scale) for _ in range(4)]
    weights = [advantages or [1.0] * 4 for _ in groups]
    rows = pack_tries(rl_tries(groups, weights, tokens), tokens)
    return max(rows, key=len)


def make_model(shape: ModelShape, dtype: torch.dtype, device: torch.device, attention: str, max_tokens: int):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    with device:
        model = Qwen3ForCausalLM(hf_config(shape, max_tokens)).to(dtype)
    model.config._attn_implementation = IMPLEMENTATION[attention]
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def estimate_bytes(shape: ModelShape, dtype: str, attention: str, tokens: int, chunk: int) -> float:
    """Parameters + gradients (in the model's dtype) + activations + log-probs of the plan (no optimizer)."""
    cfg = LearnerConfig(dtype=dtype, attention=attention, row_tokens=tokens, gradient_checkpointing=True,
                        logprob_chunk_tokens=chunk)
    items = {i.what.split(" (")[0].split(",")[0]: i.bytes for i in learner_items(shape, cfg)}
    return items["parameters"] + shape.parameters * DTYPE_BYTES[dtype] + items["activations"] + items["log-probs"]


class Peak:
    """Seconds and peak memory of a block: CUDA's allocator statistics (weights included); None on CPU, where
    one process's high-water mark cannot separate steps (``scripts/bench_memory.py`` measures CPU peaks, one
    child process per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: float | None = None

    def __enter__(self) -> "Peak":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = float(torch.cuda.max_memory_allocated())
        self.seconds = time.perf_counter() - self.start


def step(model, row: PackedRow, loss: str, attention: str, chunk: int) -> None:
    denominator = float(row.n_targets.sum())
    pred = tree_predictions(model, row, attention, chunk_tokens=chunk, max_dense_tokens=len(row))
    if loss == "sft":
        value, _ = sft_loss(pred, row, denominator)
    else:
        value, _ = pgrpo_loss(pred, row, denominator, clip_eps=0.2)
    value.backward()
    model.zero_grad(set_to_none=True)


def decode(device: torch.device, small: bool, prompts: int = 4) -> bool:
    """Spawn/join trajectories through the orchestrator on vLLM (see the module doc); True when all are."""
    from rollout.config import RolloutConfig
    from rollout.engine import VLLMEngine, make_llm, shutdown_llm  # vLLM is imported inside, on first use
    from rollout.orchestrator import generate
    from rollout.tiny import init_model, load_tokenizer
    from rollout.units import chat_prompt_ids, encode

    sizes = {} if small else dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                                  intermediate_size=3072)
    with tempfile.TemporaryDirectory() as tmp:
        init_model(tmp, **sizes)
        tokenizer = load_tokenizer(tmp)
        ids = tokenizer.convert_tokens_to_ids
        outlines_close, thread_close, eos = ids("</Outlines>"), ids("</Thread>"), tokenizer.eos_token_id
        digits = [ids(d) for d in "0123456789"]

        class Steered(VLLMEngine):
            """Each request may sample only what keeps the trajectory one spawn/join block."""

            def _params(self, r):
                if thread_close in r.stop_token_ids:  # a thread: digits, then its close
                    allowed = digits + [thread_close]
                elif thread_close in r.prompt_ids:  # after the join: digits, then EOS
                    allowed = digits + [eos]
                else:  # the prompt's outline: close it, and the threads start
                    allowed = [outlines_close]
                self.sampling_overrides = {"allowed_token_ids": allowed}
                return super()._params(r)

        head = "<think>\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n"
        batch = [chat_prompt_ids(tokenizer, f"Compute {i + 2}*{i + 7} + 3*41.") + encode(tokenizer, head)
                 for i in range(prompts)]
        cfg = RolloutConfig(temperature=1.0, seed=0, max_tokens=256, max_context=1024, max_thread_tokens=64)
        t0 = time.perf_counter()
        llm = make_llm(tmp, max_model_len=1024, dtype="float32" if device.type == "cpu" else "bfloat16",
                       enforce_eager=device.type == "cpu")
        start_s = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            trajectories = generate(Steered(llm), tokenizer, batch, cfg, eos_token_id=eos)
            seconds = time.perf_counter() - t0
        finally:
            shutdown_llm(llm)
    tokens = sum(len(u.completion_ids) for t in trajectories for u in t.units)
    shapes = [(t.finish_reason, t.n_blocks, list(t.threads_per_block)) for t in trajectories]
    ok = all(shape == ("eos", 1, [2]) for shape in shapes)
    print(f"decode: vLLM engine up in {start_s:.0f} s; {len(trajectories)} trajectories in {seconds:.2f} s, "
          f"{tokens} generated tokens ({tokens / seconds:.0f} tok/s); (finish, blocks, threads): {shapes}; "
          f"{'ok' if ok else 'NOT all spawn/join trajectories ending in EOS'}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--small", action="store_true", help="a tiny model and 256/512-token rows (seconds, on CPU)")
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b", "qwen3-1.7b"], choices=sorted(KNOWN_SHAPES),
                   help="shapes of the random models")
    p.add_argument("--rows", type=int, nargs="+", default=[8192, 16384], help="row lengths (tokens)")
    p.add_argument("--chunk", type=int, default=2048, help="log-prob chunk (positions)")
    p.add_argument("--attention", choices=["flex", "sdpa", "eager"], default=None,
                   help="tree attention backend (default: flex on cuda, sdpa on cpu)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--decode", choices=["auto", "on", "off"], default="auto",
                   help="spawn/join trajectories on vLLM after the learner steps (auto: when vLLM is installed)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here; use --device cpu --small", file=sys.stderr)
        return 2
    has_vllm = importlib.util.find_spec("vllm") is not None
    if args.decode == "on" and not has_vllm:
        print("gpu_smoke: --decode on needs vLLM, which is not installed", file=sys.stderr)
        return 2
    attention = args.attention or ("flex" if device.type == "cuda" else "sdpa")
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    shapes = {"small": SMALL} if args.small else {name: KNOWN_SHAPES[name] for name in args.models}
    row_lengths = [256, 512] if args.small else args.rows
    chunk = 64 if args.small else args.chunk
    advantages = [0.5, -0.5, 0.25, -0.25]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_smoke on {name}: torch {torch.__version__}, {dtype}, {attention} attention, gradient "
          f"checkpointing, log-prob chunk {chunk}", flush=True)
    print(f"{'model':<11} {'loss':<6} {'tokens':>6} {'peak GiB':>9} {'plan GiB':>9} {'ratio':>6} {'tok/s':>9} "
          f"{'s':>6}", flush=True)
    total = time.perf_counter()
    for label, shape in shapes.items():
        model = make_model(shape, TORCH_DTYPES[dtype], device, attention, max(row_lengths))
        for tokens in row_lengths:
            rows = {"sft": rows_of(tokens, shape.vocab, None), "pgrpo": rows_of(tokens, shape.vocab, advantages)}
            step(model, rows["sft"], "sft", attention, chunk)  # warm-up: kernels, compilation, allocator
            for loss, row in rows.items():
                with Peak(device) as peak:
                    step(model, row, loss, attention, chunk)
                plan = estimate_bytes(shape, dtype, attention, len(row), chunk)
                if peak.bytes is None:
                    measured_text, ratio_text = f"{'-':>9}", f"{'-':>6}"
                else:
                    measured_text, ratio_text = f"{peak.bytes / 2**30:>9.3f}", f"{plan / peak.bytes:>6.2f}"
                print(f"{label:<11} {loss:<6} {len(row):>6} {measured_text} {plan / 2**30:>9.3f} {ratio_text} "
                      f"{len(row) / peak.seconds:>9.0f} {peak.seconds:>6.2f}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    decoded = decode(device, args.small) if args.decode == "on" or (args.decode == "auto" and has_vllm) else True
    print(f"done in {time.perf_counter() - total:.0f} s")
    return 0 if decoded else 1


if __name__ == "__main__":
    sys.exit(main())
