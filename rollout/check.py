"""Check the format of responses in a JSONL file.

For every record: whether its response is format-valid (DESIGN section 2), the
reasons if not, and the latency measures ``L_total``, ``L_crit`` and ``eta`` of
the units the orchestrator would have produced for it (replayed with the given
tokenizer; model-generated tokens only). Ends with a summary line.

Exit status: 0 when every record is valid, 1 when some are not, 2 on bad input
(unreadable file, a line that is not JSON, a missing field).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rollout.format import FormatError, validate
from rollout.units import chat_prompt_ids, latency, replay


@dataclass
class CheckResult:
    line: int
    valid: bool
    reasons: list[str] = field(default_factory=list)
    L_total: int | None = None
    L_crit: int | None = None
    eta: float | None = None


class InputError(Exception):
    """Bad input file; the message is one line for the user."""


def json_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSONL file, read lazily.

    ValueError naming the file and line for a line that is not JSON or not a
    JSON object. The readers of benchmarks, prompts, training records and
    viewer input share it.
    """
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            yield i, rec


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
        records.append((i, rec))
    return records


def check_record(line: int, record: dict, field_name: str, tokenizer) -> CheckResult:
    response = record.get(field_name)
    if not isinstance(response, str):
        raise InputError(f"line {line}: no string field '{field_name}' "
                         f"(fields: {', '.join(sorted(record)) or 'none'})")
    reasons = validate(response)
    result = CheckResult(line, not reasons, reasons)
    prompt = record.get("prompt")
    prompt_ids = chat_prompt_ids(tokenizer, prompt) if isinstance(prompt, str) else []
    try:
        lat = latency(replay(prompt_ids, response, tokenizer, tokenizer.eos_token_id))
    except FormatError:
        return result  # unparseable: no units, so no measures
    result.L_total, result.L_crit, result.eta = lat.L_total, lat.L_crit, lat.eta
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="JSONL file, one record per line")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (e.g. the tiny model's)")
    p.add_argument("--field", default="response", help="field that holds the response (default 'response')")
    p.add_argument("--json", action="store_true", help="print one JSON object per record and a summary object")


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def run(args: argparse.Namespace) -> int:
    try:
        records = read_jsonl(args.file)
        if not records:
            raise InputError(f"{args.file}: no records")
        from rollout.tiny import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        results = [check_record(i, rec, args.field, tokenizer) for i, rec in records]
    except (InputError, OSError) as e:
        print(f"threadweaver check: {e}", file=sys.stderr)
        return 2
    measured = [r for r in results if r.L_total is not None]
    n_valid = sum(r.valid for r in results)
    summary = {
        "records": len(results), "valid": n_valid, "invalid": len(results) - n_valid,
        "mean_L_total": sum(r.L_total for r in measured) / len(measured) if measured else None,
        "mean_L_crit": sum(r.L_crit for r in measured) / len(measured) if measured else None,
        "mean_eta": sum(r.eta for r in measured) / len(measured) if measured else None,
    }
    if args.json:
        for r in results:
            print(json.dumps(r.__dict__))
        print(json.dumps({"summary": summary}))
    else:
        print(f"{'line':>6} {'valid':>5} {'L_total':>8} {'L_crit':>7} {'eta':>6}  reasons")
        for r in results:
            print(f"{r.line:>6} {'yes' if r.valid else 'NO':>5} {_fmt(r.L_total):>8} {_fmt(r.L_crit):>7} "
                  f"{_fmt(r.eta):>6}  {'; '.join(r.reasons)}")
        print(f"summary: {n_valid}/{len(results)} valid, mean L_total {_fmt(summary['mean_L_total'])}, "
              f"mean L_crit {_fmt(summary['mean_L_crit'])}, mean eta {_fmt(summary['mean_eta'])}")
    return 0 if n_valid == len(results) else 1
