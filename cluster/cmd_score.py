"""``threadweaver score FILE [--tokenizer DIR] [--json] [--config F] [reward.key=value ...]``: score the
responses of a JSONL file: correctness, parallelism measures and reward, every component per record.

The reward is the one P-GRPO trains with (``rewards.config.RewardConfig``, the
same ``reward.*`` keys as ``threadweaver rl``: ``reward.preset``, ``reward.rho``,
``reward.checker_timeout_s``, ...); its service fields (``num_actors``,
``actor_cpus``, ``chunk_size``, ``max_attempts``) are unused here, since answers
are checked in this process (a math-verify server starts only if an answer needs
it; no Ray). The records and how units are found: ``rewards.scorefile``.
``--tokenizer DIR`` replays format-valid responses into units for the token
measures; ``reward.preset=official-code`` counts tokens on the token sequence by
tag (``rewards.tag_count``) and so always needs it.

Prints one row per record and a line of means, or with ``--json`` one JSON
object per record and a final ``{"summary": ...}`` object.

Exit status: 0 on success, 2 on bad input or usage (a bad config key or value,
unreadable file, a line that is not JSON or nested too deeply, a string that is
not Unicode text, a missing or mistyped field, a prompt over the size limit, a
tokenizer that cannot be used).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

from cluster.command import add_config_arguments, resolve
from rewards.checker import AnswerChecker
from rewards.config import RewardConfig
from rewards.score import item_tags, score
from rewards.scorefile import print_table, read_records, summarize, to_item
from rollout.check import InputError, open_tokenizer


@dataclass
class ScoreConfig:
    """How responses are scored: the reward."""

    reward: RewardConfig = field(default_factory=RewardConfig, metadata={
        "help": "the reward P-GRPO trains with (preset, weights, answer region, checker time limit); the service "
                "fields are unused: answers are checked in this process"})


#: deprecated flags -> the override each one stands for (the value replaces {})
_OLD_FLAGS = {"preset": "reward.preset={}", "timeout": "reward.checker_timeout_s={}"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", help="JSONL file, one record per line with 'response' and 'answer'")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder; replays format-valid responses into units for the token measures "
                             "(records that carry 'units' use those)")
    parser.add_argument("--json", action="store_true", help="one JSON object per record, then a summary object")
    add_config_arguments(parser, "reward.preset=official-code reward.rho=0.3")
    old = parser.add_argument_group("deprecated (the reward.* keys instead)")
    old.add_argument("--preset", default=None, help="the same as reward.preset=NAME")
    old.add_argument("--timeout", default=None, help="the same as reward.checker_timeout_s=SECONDS")
    old.add_argument("--whole-response", action="store_true", help="the same as reward.answer_region=whole")


def _old_flag_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides the deprecated flags stand for, with a deprecation line on stderr for each."""
    out = []
    for name, template in _OLD_FLAGS.items():
        if getattr(args, name) is not None:
            out.append(template.format(getattr(args, name)))
    if args.whole_response:
        out.append("reward.answer_region=whole")
    for item in out:
        print(f"threadweaver score: deprecated flag; give {item.split('=')[0]}=... on its own", file=sys.stderr)
    return out


def run(args: argparse.Namespace) -> int:
    cfg, code = resolve(ScoreConfig, args, "score", extra_overrides=_old_flag_overrides(args))
    if cfg is None:
        return code
    if args.file is None:
        print("threadweaver score: name the JSONL file to score", file=sys.stderr)
        return 2
    reward = cfg.reward
    try:
        rows = read_records(args.file)
        tokenizer = open_tokenizer(args.tokenizer) if args.tokenizer is not None else None
        if tokenizer is None and reward.token_count == "tag_stream":
            raise InputError(f"reward.preset={reward.preset} counts tokens on the token sequence by tag "
                             "(token_count=tag_stream): pass --tokenizer DIR")
        tags = item_tags(reward, tokenizer) if tokenizer is not None else None
        items = [to_item(line, rec, tokenizer, tags) for line, rec in rows]
    except (InputError, ValueError) as e:
        print(f"threadweaver score: {e}", file=sys.stderr)
        return 2

    with AnswerChecker(reward.checker_timeout_s, reward.memory_limit_mb, eager=False,
                       cache_size=reward.verdict_cache) as checker:
        records = [score(item, reward, checker) for item in items]
    summary = summarize(records)
    lines = [line for line, _ in rows]
    if args.json:
        for line, r in zip(lines, records):
            print(json.dumps({"line": line, **r.to_dict()}))
        print(json.dumps({"summary": summary}))
    else:
        print_table(lines, records, summary)
    return 0
