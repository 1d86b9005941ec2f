"""A MATH/GSM8K-style dataset as this project's prompt/answer files (``threadweaver prepare-data``).

Input: one file, ``.jsonl``, ``.json`` (a list of objects) or ``.parquet``,
with records in one of two layouts (``layout=auto`` picks per record: verl's
when ``prompt`` is a list):

* *flat* (MATH, MATH-500, GSM8K, ...): the question is the first of
  ``prompt_fields`` that holds text (default ``problem``, ``question``,
  ``prompt``); the reference is the first of ``answer_fields`` that is present
  (default ``answer``, ``solution``);
* *verl's* (``RLHFDataset``): ``prompt`` is a list of chat messages, exactly
  one ``user`` message (its text is the question: the chat template is applied
  later, as for every prompt here), and the reference is
  ``reward_model.ground_truth``.

The answer text (``answer_format``):

* ``gsm8k``: what follows the last ``####``, thousands separators dropped
  (``1,000`` -> ``1000``);
* ``boxed``: the content of the last ``\\boxed{...}`` (MATH solutions);
* ``plain``: the value as it is (a number becomes its text);
* ``auto``: ``gsm8k`` when the text holds ``####``, else ``boxed`` when it
  holds ``\\boxed``, else ``plain`` for a single line of at most
  :data:`PLAIN_MAX_CHARS` characters; anything else is an error that says to
  choose (a worked solution is never taken for an answer).

Output: ``OUT/train.jsonl``, ``validation.jsonl``, ``test.jsonl`` (those that
get records) with ``id``, ``prompt``, ``answer`` (text), ``source_index`` (the
record's line or row in the input) and the ``keep_fields``, the layout that
``threadweaver make-data`` writes and ``sft``, ``rl``, ``generate``,
``datagen`` and ``eval`` read. ``split=hash`` sends a record to a split by a
hash of its question alone (``rollout.task.hash_split``), so a question lands
in the same split whatever the order or the seed; ``split=train`` (or
``validation``, ``test``) writes every record to that one file, for a dataset
that ships its own test file (run once per file into the same folder). A
question seen twice is written once (the count is reported). Every record is
checked before anything is written; an error names the file, the line and the
missing field.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rewards.answer import extract_answer
from rollout.config import check_ranges
from rollout.files import atomic_write, check_output_dir
from rollout.records import raw_records
from rollout.task import FILE_NAMES, SPLITS, hash_split

#: the longest one-line text ``answer_format=auto`` takes as a plain answer
PLAIN_MAX_CHARS = 100
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


@dataclass
class PrepareDataConfig:
    """Where the dataset is, how its fields are read, how it is split, where the files go."""

    src: str = field(default="", metadata={"help": "input file: .jsonl, .json (a list of objects) or .parquet "
                                                   "(required)"})
    out: str = field(default="", metadata={"help": "folder to write train/validation/test.jsonl into (required)"})
    layout: Literal["auto", "flat", "verl"] = field(default="auto", metadata={
        "help": "record layout: flat fields, verl's (prompt messages, reward_model.ground_truth), or auto "
                "(verl's when prompt is a list)"})
    prompt_fields: list[str] = field(default_factory=lambda: ["problem", "question", "prompt"], metadata={
        "help": "flat layout: fields tried in order for the question text"})
    answer_fields: list[str] = field(default_factory=lambda: ["answer", "solution"], metadata={
        "help": "flat layout: fields tried in order for the reference answer"})
    answer_format: Literal["auto", "plain", "gsm8k", "boxed"] = field(default="auto", metadata={
        "help": "how the answer is read from its field: as is, after '####', the last \\boxed{}, or auto"})
    split: Literal["hash", "train", "validation", "test"] = field(default="hash", metadata={
        "help": "hash: split by a hash of the question; train/validation/test: every record to that file"})
    validation_share: float = field(default=0.05, metadata={
        "help": "split=hash: share of questions hashed to validation", "range": "[0, 1)"})
    test_share: float = field(default=0.05, metadata={
        "help": "split=hash: share of questions hashed to test", "range": "[0, 1)"})
    keep_fields: list[str] = field(default_factory=list, metadata={
        "help": "input fields copied into every output record (each must be present; e.g. level, type)"})
    limit: int | None = field(default=None, metadata={
        "help": "use only the first LIMIT records (null: all)", "range": ">= 1"})
    overwrite: bool = field(default=False, metadata={"help": "replace output files that exist"})

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.validation_share + self.test_share >= 1:
            raise ValueError(f"validation_share + test_share must be < 1, got "
                             f"{self.validation_share} + {self.test_share}")
        if not self.prompt_fields or not self.answer_fields:
            raise ValueError("prompt_fields and answer_fields must name at least one field each")
        reserved = {"id", "prompt", "answer", "source_index"} & set(self.keep_fields)
        if reserved:
            raise ValueError(f"keep_fields must not name {sorted(reserved)}: the output sets them")


@dataclass
class Prepared:
    """What :func:`prepare_data` wrote: records per split, files, duplicates dropped, answer formats used."""

    counts: dict[str, int]
    paths: dict[str, Path]
    duplicates: int
    formats: dict[str, int]


def _fields(rec: dict) -> str:
    return ", ".join(sorted(rec)) or "none"


def question_and_reference(rec: dict, cfg: PrepareDataConfig) -> tuple[str, Any]:
    """The question text and the raw reference of one record; ValueError naming the missing field."""
    if cfg.layout == "verl" or (cfg.layout == "auto" and isinstance(rec.get("prompt"), list)):
        messages = rec.get("prompt")
        if not isinstance(messages, list):
            raise ValueError(f"layout=verl needs 'prompt' as a list of chat messages (fields: {_fields(rec)})")
        roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in messages]
        if roles != ["user"] or not isinstance(messages[0].get("content"), str):
            raise ValueError(f"a verl prompt must be one user message with text content; this one has the "
                             f"roles {roles}")
        reward_model = rec.get("reward_model")
        if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
            raise ValueError(f"no answer field 'reward_model.ground_truth' (fields: {_fields(rec)})")
        return messages[0]["content"], reward_model["ground_truth"]
    question = next((rec[k] for k in cfg.prompt_fields if isinstance(rec.get(k), str) and rec[k].strip()), None)
    if question is None:
        raise ValueError(f"no question field: none of {cfg.prompt_fields} holds text (fields: {_fields(rec)})")
    key = next((k for k in cfg.answer_fields if rec.get(k) is not None), None)
    if key is None:
        raise ValueError(f"no answer field: none of {cfg.answer_fields} is present (fields: {_fields(rec)})")
    return question, rec[key]


def answer_text(value: Any, answer_format: str) -> tuple[str, str]:
    """``(answer, format used)`` from a reference value (module docstring); ValueError saying why not."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"the answer must be text or a number, got {type(value).__name__}")
    text = str(value)
    fmt = answer_format
    if fmt == "auto":
        fmt = "gsm8k" if "####" in text else "boxed" if "\\boxed" in text else "plain"
        if fmt == "plain" and ("\n" in text.strip() or len(text.strip()) > PLAIN_MAX_CHARS):
            raise ValueError(f"the answer field holds {len(text)} characters of text with neither '####' nor "
                             f"\\boxed{{}}; set answer_format=plain to take it as it is, or name another field "
                             "in answer_fields")
    if fmt == "gsm8k":
        if "####" not in text:
            raise ValueError("answer_format=gsm8k, but the answer has no '####'")
        answer = _THOUSANDS.sub("", text.rsplit("####", 1)[1].strip())
    elif fmt == "boxed":
        extraction = extract_answer(text, region="whole")
        if extraction.answer is None:
            raise ValueError(f"answer_format=boxed, but the answer has no complete \\boxed{{}} ({extraction.status})")
        answer = extraction.answer.strip()
    else:
        answer = text.strip()
    if not answer:
        raise ValueError(f"the answer is empty (answer_format={fmt})")
    return answer, fmt


def convert(path: str | Path, cfg: PrepareDataConfig) -> tuple[dict[str, list[dict]], int, Counter]:
    """Every record of ``path`` converted and assigned a split (module docstring); nothing written."""
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    duplicates, formats, n = 0, Counter(), 0
    for line, rec in raw_records(path):
        if cfg.limit is not None and n >= cfg.limit:
            break
        n += 1
        try:
            question, reference = question_and_reference(rec, cfg)
            answer, fmt = answer_text(reference, cfg.answer_format)
            missing = [k for k in cfg.keep_fields if k not in rec]
            if missing:
                raise ValueError(f"no field {missing[0]!r} of keep_fields (fields: {_fields(rec)})")
        except ValueError as e:
            raise ValueError(f"{path}:{line}: {e}") from None
        if question in seen:
            duplicates += 1
            continue
        seen.add(question)
        formats[fmt] += 1
        split = hash_split(question, cfg.validation_share, cfg.test_share) if cfg.split == "hash" else cfg.split
        out[split].append({"id": f"{split}-{len(out[split])}", "prompt": question, "answer": answer,
                           "source_index": line, **{k: rec[k] for k in cfg.keep_fields}})
    if n == 0:
        raise ValueError(f"{path}: no records")
    return out, duplicates, formats


def prepare_data(cfg: PrepareDataConfig) -> Prepared:
    """Convert ``cfg.src`` and write the split files into ``cfg.out`` (module docstring).

    ValueError / OSError on bad input, before anything is written.
    """
    for key in ("src", "out"):
        if not getattr(cfg, key):
            raise ValueError(f"{key} is required ({key}=...)")
    data, duplicates, formats = convert(cfg.src, cfg)
    data = {s: records for s, records in data.items() if records}
    out = Path(cfg.out)
    paths = {s: out / FILE_NAMES[s] for s in data}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not cfg.overwrite:
        raise ValueError(f"{existing[0]} exists; set overwrite=true to replace it")
    check_output_dir(out)
    for split, records in data.items():
        with atomic_write(paths[split]) as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return Prepared({s: len(r) for s, r in data.items()}, paths, duplicates, dict(formats))
