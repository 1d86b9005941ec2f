"""The embedded default job, until the training stages are wired into one run.

1. create the tiny model and tokenizer (``runs/demo/model``; kept if present);
2. generate the synthetic dataset (``runs/demo/data``; kept if present) and
   print the latency measures of its reference responses (replayed units);
3. start one vLLM engine on the model and decode a few validation prompts with
   the spawn/join orchestrator, in parallel and in sequential mode;
4. print every trajectory with its statistics and write them to
   ``runs/demo/trajectories_{parallel,sequential}.jsonl``.

The model is untrained (random weights), so its responses are noise: this job
shows that every stage runs and what it reports, not a trained model. Train
with the SFT stage to get a model that uses the format.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rollout.config import RolloutConfig, check_range, set_runtime_defaults
from rollout.engine import VLLMEngine, make_llm, shutdown_llm
from rollout.files import atomic_write, check_output_dir
from rollout.orchestrator import generate
from rollout.task import TaskConfig, make_dataset, write_dataset
from rollout.units import chat_prompt_ids, latency, replay


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--prompts", type=int, default=4, help="validation prompts to decode (count, default 4)")
    p.add_argument("-n", "--samples", type=int, default=2, help="samples per prompt (count, default 2)")
    p.add_argument("--max-tokens", type=int, default=128,
                   help="generated-token budget per trajectory (tokens, default 128)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def reference_stats(records: list[dict], tokenizer) -> dict[str, dict[str, float]]:
    """Mean L_total, L_crit and eta of the dataset's reference responses."""
    out = {}
    for field in ("response_parallel", "response_sequential"):
        lats = [latency(replay(chat_prompt_ids(tokenizer, r["prompt"]), r[field], tokenizer,
                               tokenizer.eos_token_id)) for r in records]
        out[field] = {"L_total": _mean(x.L_total for x in lats), "L_crit": _mean(x.L_crit for x in lats),
                      "eta": _mean(x.eta for x in lats)}
    return out


def run(args: argparse.Namespace) -> int:
    set_runtime_defaults()
    out = Path(args.out)
    try:  # the options and the output folder before anything is written or started
        check_range("--prompts", args.prompts, ">= 1")
        configs = {mode: RolloutConfig(n=args.samples, max_tokens=args.max_tokens, max_context=1024,
                                       temperature=args.temperature, sequential=mode == "sequential")
                   for mode in ("parallel", "sequential")}
        check_output_dir(out, "--out")
    except ValueError as e:
        print(f"threadweaver demo: {e}", file=sys.stderr)
        return 2
    from rollout.tiny import init_model, load_tokenizer  # lazy: transformers takes seconds to import

    model_dir, data_dir = out / "model", out / "data"
    if not (model_dir / "config.json").exists():
        init_model(model_dir)
        print(f"[1/3] tiny model written to {model_dir}")
    else:
        print(f"[1/3] tiny model found in {model_dir}")
    if not (data_dir / "validation.jsonl").exists():
        write_dataset(make_dataset(TaskConfig(), {"train": 200, "validation": 20, "test": 20}, seed=0), data_dir)
        print(f"[2/3] synthetic dataset written to {data_dir}")
    else:
        print(f"[2/3] synthetic dataset found in {data_dir}")
    tokenizer = load_tokenizer(model_dir)
    records = [json.loads(line) for line in (data_dir / "validation.jsonl").read_text().splitlines()]
    for field, s in reference_stats(records, tokenizer).items():
        print(f"      reference {field:<20} L_total {s['L_total']:6.1f}  L_crit {s['L_crit']:6.1f}  "
              f"eta {s['eta']:.3f}")

    prompts = records[: args.prompts]
    prompt_ids = [chat_prompt_ids(tokenizer, r["prompt"]) for r in prompts]
    print(f"[3/3] starting vLLM on {model_dir} (30-100 s on CPU)")
    t0 = time.time()
    llm = make_llm(model_dir, max_model_len=1024)
    print(f"      engine ready in {time.time() - t0:.0f} s")
    summary = []
    try:
        engine = VLLMEngine(llm)
        for mode, cfg in configs.items():
            t0 = time.time()
            trajectories = generate(engine, tokenizer, prompt_ids, cfg, eos_token_id=tokenizer.eos_token_id)
            seconds = time.time() - t0
            path = out / f"trajectories_{mode}.jsonl"
            with atomic_write(path) as f:
                for t in trajectories:
                    f.write(json.dumps(t.to_dict()) + "\n")
            print(f"\n== {mode} decoding: {len(trajectories)} trajectories in {seconds:.1f} s -> {path}")
            for t in trajectories:
                print(f"prompt {t.prompt_index} sample {t.sample_index}: finish={t.finish_reason} "
                      f"L_total={t.L_total} L_crit={t.L_crit} eta={t.eta:.3f} blocks={t.n_blocks} "
                      f"threads={t.threads_per_block} requests={t.n_requests}")
                print(f"    {prompts[t.prompt_index]['prompt']}  ->  {t.text[:100]!r}")
            summary.append((mode, len(trajectories), seconds, _mean(t.L_total for t in trajectories),
                            _mean(t.L_crit for t in trajectories), _mean(t.eta for t in trajectories)))
    finally:
        shutdown_llm(llm)
    print(f"\n{'mode':<11}{'traj':>5}{'seconds':>9}{'L_total':>9}{'L_crit':>8}{'eta':>7}")
    for mode, n, s, lt, lc, eta in summary:
        print(f"{mode:<11}{n:>5}{s:>9.1f}{lt:>9.1f}{lc:>8.1f}{eta:>7.3f}")
    print("\nThe model is untrained, so its text is noise; train it with the SFT stage.")
    return 0
