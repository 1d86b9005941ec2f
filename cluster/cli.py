"""The ``threadweaver`` command line.

Each subcommand is a module with ``add_arguments(parser)`` and
``run(args) -> int`` (and optionally ``DESCRIPTION``, its ``--help`` text,
else its docstring): the commands of the tools on the lower floors live with
them (``rollout.check``, ``rollout.tiny``, ...), the commands with a config or that start Ray
here (``cluster.cmd_generate``, ``cmd_sft``, ``cmd_rl``, ``cmd_datagen``, ...). Only the
chosen subcommand's module is imported, so ``threadweaver check`` does not pay
for importing vLLM or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "init-model": ("rollout.tiny", "write the tiny Qwen3-architecture model, tokenizer and chat template"),
    "make-data": ("rollout.task", "generate the synthetic arithmetic dataset (train/validation/test JSONL)"),
    "check": ("rollout.check", "check the format of responses in a JSONL file and print latency measures"),
    "generate": ("cluster.cmd_generate", "sample parallel trajectories for a JSONL of prompts with Ray rollout workers"),
    "score": ("cluster.cmd_score", "score responses in a JSONL file: correctness, parallelism measures, reward"),
    "sft": ("cluster.cmd_sft", "SFT warm start on trie-packed units (or the sequential baseline), with held-out eval"),
    "plan": ("cluster.cmd_plan", "memory plan of an SFT or RL config per device (learner, rollout, reference); "
                                 "exit 1 naming the knob when it does not fit"),
    "rl": ("cluster.cmd_rl", "P-GRPO training on Ray: rollouts, rewards, group advantages, learner, weight sync, MLflow"),
    "demo": ("cluster.demo", "a one-minute tour: tiny model, data, vLLM decoding, statistics"),
    "bench": ("rl.bench", "benchmarks printed as side-by-side tables (bench trie: trie vs expanded vs padded rows)"),
    "view": ("cluster.viewer", "render trajectory JSONL as a static HTML page: threads side by side, critical path marked"),
    "eval": ("cluster.evaluate", "benchmark report: accuracy, L_crit, speedup vs the sequential baseline, wall clock"),
    "sweep": ("cluster.sweep", "reward-weight grid (rho, clip, incorrect reward): one RL run per point as Ray Tune trials, plot"),
    "run": ("cluster.pipeline", "the whole pipeline from one YAML: data, SFT, self-training, P-GRPO, eval (MLflow)"),
    "datagen": ("cluster.cmd_datagen", "parallel training data: stage1 rewrites traces, stage2 self-trains"),
    "export-verl": ("cluster.cmd_export_verl", "prompts and answers as Parquet in verl's RL dataset layout (agent "
                                           "loop 'threadweaver')"),
    "prepare-model": ("cluster.cmd_prepare_model", "a Hugging Face causal LM (folder or cached Hub name) with the control "
                                                   "tags as single tokens, its chat template and every EOS id"),
    "prepare-data": ("cluster.cmd_prepare_data", "a MATH/GSM8K-style dataset (JSONL, Parquet, verl's layout) as "
                                                 "prompt/answer files with train/validation/test splits"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: threadweaver COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'threadweaver COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"threadweaver: unknown command '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    description = getattr(module, "DESCRIPTION", None) or module.__doc__ or help_
    parser = argparse.ArgumentParser(prog=f"threadweaver {name}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    try:  # key=value overrides may come before and after the flags
        args = parser.parse_intermixed_args(rest)
    except TypeError:  # a command with its own subcommands (datagen STAGE) cannot intermix
        args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
