"""``threadweaver prepare-model SRC OUT``: a Hugging Face causal LM made ready for ThreadWeaver.

Adds the control tags as single tokens (new embedding rows from the mean of the
existing ones), keeps or sets the chat template and records the full EOS set in
``OUT/generation_config.json``; ``rollout/onboard.py`` says what each step does.
``SRC`` is a model folder or a Hub name found in the local Hugging Face cache
(nothing is downloaded).

    threadweaver prepare-model Qwen/Qwen3-8B runs/models/qwen3-8b
    threadweaver prepare-model /models/my-llm runs/models/my-llm chat_template=chat.jinja init=pieces
    threadweaver prepare-model --show-config

``SRC OUT`` are the config keys ``src`` and ``out`` given by position (either
form, not both). Exit status 0, or 2 on bad input (a missing model, a model
without a chat template, a tokenizer that cannot hold the tags, a non-empty
``OUT``) with one line on stderr.
"""

from __future__ import annotations

import argparse
import sys

from cluster.command import add_config_arguments, resolve
from rollout.onboard import PrepareModelConfig, prepare_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "SRC OUT init=pieces chat_template=chat.jinja (SRC and OUT: the model folder or "
                                 "cached Hub name, the folder to write; or src=, out=)")


def run(args: argparse.Namespace) -> int:
    cfg, code = resolve(PrepareModelConfig, args, "prepare-model", positional=("src", "out"))
    if cfg is None:
        return code
    try:
        record = prepare_model(cfg)
    except (ValueError, OSError) as e:
        print(f"threadweaver prepare-model: {e}", file=sys.stderr)
        return 2
    print(f"wrote {record.out} from {record.resolved}")
    print(f"  tags: {', '.join(f'{t}={i}' for t, i in record.tag_ids.items())}")
    print(f"  added: {', '.join(record.added_tags) or 'none (the tokenizer held every tag)'}; "
          f"new rows: {record.init}; embedding rows {record.vocab_rows_before} -> {record.vocab_rows_after}"
          f" ({'tied' if record.tied_head else 'untied'} output head)")
    print(f"  EOS ids (generation_config.json): {record.eos_token_ids}")
    return 0
