"""``threadweaver prepare-data SRC OUT``: a MATH/GSM8K-style dataset as this project's prompt/answer files.

Reads ``SRC`` (JSONL, JSON or Parquet; flat fields or verl's layout with
``prompt`` messages and ``reward_model.ground_truth``) and writes
``OUT/train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` with ``prompt``
and ``answer`` per line; ``rl/prepare_data.py`` says how each field is read.

    threadweaver prepare-data gsm8k/train.parquet data/gsm8k split=train
    threadweaver prepare-data gsm8k/test.parquet data/gsm8k split=test
    threadweaver prepare-data math/train.jsonl data/math keep_fields=[level,type]
    threadweaver prepare-data verl/train.parquet data/verl layout=verl

``SRC OUT`` are the config keys ``src`` and ``out`` given by position (either
form, not both). Exit status 0, or 2 on bad input (a missing file, a record
without a question or answer field, an answer that cannot be read, an output
file that exists) with one line on stderr naming the file, line and field;
nothing is written then.
"""

from __future__ import annotations

import argparse
import sys

from cluster.command import add_config_arguments, resolve
from rl.prepare_data import PrepareDataConfig, prepare_data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "SRC OUT split=test answer_fields=[answer] (SRC: the dataset file, OUT: the "
                                 "folder to write; or src=, out=)")


def run(args: argparse.Namespace) -> int:
    cfg, code = resolve(PrepareDataConfig, args, "prepare-data", positional=("src", "out"))
    if cfg is None:
        return code
    try:
        result = prepare_data(cfg)
    except (ValueError, OSError) as e:
        print(f"threadweaver prepare-data: {e}", file=sys.stderr)
        return 2
    for split, path in result.paths.items():
        print(f"{split:<10} {result.counts[split]:>7} records -> {path}")
    formats = ", ".join(f"{k} {v}" for k, v in sorted(result.formats.items()))
    print(f"answers read as: {formats}; duplicate questions dropped: {result.duplicates}")
    return 0
