"""``threadweaver export-verl``: prompts and answers as a Parquet file in verl's RL dataset layout.

Reads records (JSONL or Parquet with a prompt text and a reference answer, e.g. the
synthetic task's ``train.jsonl``) and writes one row per record with the columns
verl 0.9.1's ``RLHFDataset`` and reward loop read:

==================  ===========================================  =====================================
column              Arrow type                                   read by
==================  ===========================================  =====================================
``data_source``     ``string``                                   the reward function's first argument
``prompt``          ``list<struct<role: string, content: string>>``  the agent loop (``raw_prompt``)
``ability``         ``string``                                   informational
``reward_model``    ``struct<style: string, ground_truth: string>``  the reward function's ``ground_truth``
``extra_info``      ``struct<index: int64, ...>``                ``index`` is passed to the agent loop;
                                                                 the rest reaches the reward function
``agent_name``      ``string``                                   which agent loop runs the row
==================  ===========================================  =====================================

``extra_info`` also keeps ``extra_fields`` of the record when it has them (by default
the id and the reference responses), so the SFT, RL and eval readers of this project
(``rollout.records``) read the file back with everything they need.

``verify=true`` reads the file back with verl's own ``RLHFDataset`` (needs verl and a
tokenizer) and checks every row's prompt messages, ground truth, index and agent name.

    threadweaver export-verl input=runs/data/tiny/train.jsonl out=runs/verl/train.parquet
    threadweaver export-verl --show-config

Exit status 0, or 2 on bad input (a missing file or field, an unknown key, an
unwritable output, verl missing when ``verify=true``) with one line on stderr. The
file is written whole or not at all (``rollout.files.atomic_write``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cluster.command import add_config_arguments, resolve
from rl.verl import VerlUnavailable, require
from rollout.config import check_ranges
from rollout.files import atomic_write, check_output_file
from rollout.records import iter_records, to_verl_row


@dataclass
class ExportVerlConfig:
    """What to export, and the values of verl's per-row columns."""

    input: str = field(default="", metadata={
        "help": "records to export: a JSONL or Parquet file with a prompt text and an answer per record"})
    out: str = field(default="", metadata={"help": "Parquet file to write (its folder is created)"})
    data_source: str = field(default="threadweaver/tiny", metadata={
        "help": "the data_source column: verl groups validation metrics by it and passes it to the reward"})
    ability: str = field(default="math", metadata={"help": "the ability column (informational)"})
    agent_name: str | None = field(default="threadweaver", metadata={
        "help": "the agent_name column: the agent loop verl runs for each row (null: no column, verl's "
                "rollout.agent.default_agent_loop decides)"})
    prompt_field: str = field(default="prompt", metadata={"help": "record field holding the prompt text"})
    answer_field: str = field(default="answer", metadata={"help": "record field holding the reference answer"})
    extra_fields: list[str] = field(default_factory=lambda: ["id", "response_parallel", "response_sequential"],
                                    metadata={"help": "record fields copied into extra_info when present"})
    limit: int | None = field(default=None, metadata={
        "help": "export at most this many records (count; null: all)", "range": ">= 1"})
    verify: bool = field(default=False, metadata={
        "help": "read the file back with verl's RLHFDataset and check every row (needs verl and tokenizer)"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer folder for verify (RLHFDataset tokenizes the prompts to drop overlong ones)"})
    max_prompt_length: int = field(default=4096, metadata={
        "help": "verify: RLHFDataset's data.max_prompt_length (tokens); longer prompts are reported",
        "range": ">= 1"})

    def __post_init__(self) -> None:
        check_ranges(self)


def check_inputs(cfg: ExportVerlConfig) -> None:
    """Before reading anything: the required keys, the output's suffix and that its folder is writable."""
    if not cfg.input or not cfg.out:
        raise ValueError("input and out are required (input=FILE out=FILE.parquet)")
    if Path(cfg.out).suffix != ".parquet":
        raise ValueError(f"out must end in .parquet, got {cfg.out}")
    if cfg.verify and cfg.tokenizer is None:
        raise ValueError("verify=true needs tokenizer=DIR (RLHFDataset tokenizes the prompts)")
    check_output_file(cfg.out, "out")


def export(cfg: ExportVerlConfig) -> int:
    """Write ``cfg.out``; return the number of rows. ValueError / FileNotFoundError on bad input."""
    import pyarrow as pa  # large; only this command needs it
    import pyarrow.parquet as pq

    check_inputs(cfg)
    rows = []
    for line, rec in iter_records(cfg.input):
        try:
            rows.append(to_verl_row(rec, len(rows), data_source=cfg.data_source, ability=cfg.ability,
                                    agent_name=cfg.agent_name, prompt_field=cfg.prompt_field,
                                    answer_field=cfg.answer_field, extra_fields=tuple(cfg.extra_fields)))
        except ValueError as e:
            raise ValueError(f"{cfg.input}:{line}: {e}") from None
        if cfg.limit is not None and len(rows) >= cfg.limit:
            break
    if not rows:
        raise ValueError(f"{cfg.input}: no records")
    with atomic_write(cfg.out, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    return len(rows)


def verify_with_verl(cfg: ExportVerlConfig, n_rows: int) -> None:
    """Read ``cfg.out`` with verl's ``RLHFDataset``; ValueError if a row differs from what was written."""
    rl_dataset = require("verl.utils.dataset.rl_dataset")
    omegaconf = require("omegaconf")
    from rollout.tiny import load_tokenizer  # transformers: only verify needs it

    written = [rec for _, rec in iter_records(cfg.out)]
    config = omegaconf.OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": cfg.max_prompt_length,
                                         "filter_overlong_prompts": True, "truncation": "error"})
    dataset = rl_dataset.RLHFDataset(str(cfg.out), load_tokenizer(cfg.tokenizer), config)
    if len(dataset) != n_rows:
        raise ValueError(f"RLHFDataset reads {len(dataset)} of {n_rows} rows (prompts over max_prompt_length="
                         f"{cfg.max_prompt_length} tokens are dropped)")
    for i, rec in enumerate(written):
        row = dataset[i]
        got = (row["raw_prompt"], row["reward_model"]["ground_truth"], row["index"], row.get("agent_name"))
        want = ([{"role": "user", "content": rec["prompt"]}], rec["answer"], i, cfg.agent_name)
        if list(got[0]) != want[0] or got[1:] != want[1:]:
            raise ValueError(f"row {i}: RLHFDataset reads {got}, expected {want}")


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "input=runs/data/tiny/train.jsonl out=runs/verl/train.parquet")


def run(args: argparse.Namespace) -> int:
    cfg, code = resolve(ExportVerlConfig, args, "export-verl", check=check_inputs)
    if cfg is None:
        return code
    try:
        n = export(cfg)
        if cfg.verify:
            verify_with_verl(cfg, n)
    except (ValueError, OSError, VerlUnavailable) as e:
        print(f"threadweaver export-verl: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} rows to {cfg.out}" + (" (read back with verl's RLHFDataset)" if cfg.verify else ""))
    return 0
