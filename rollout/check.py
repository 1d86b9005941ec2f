"""Check the format of responses in a JSONL file.

For every record: whether its response is format-valid (DESIGN section 2), the
reasons if not, and for a valid one the latency measures ``L_total``, ``L_crit``
and ``eta`` of the units the orchestrator would have produced for it (replayed
with the given tokenizer over the chat-templated ``prompt``, if the record has
one; model-generated tokens only). A response that is not valid is never
replayed: ``validate`` checks its size, blocks, threads per block and numbers on
the text first, so a hostile record costs one scan of its text. Ends with a
summary line.

Exit status: 0 when every record is valid, 1 when some are not, 2 on bad input
(unreadable file, a line that is not JSON or nested too deeply, a string that is
not Unicode text, a missing or mistyped field, a prompt over the size limit, a
tokenizer that cannot be used).

The readers here (:func:`json_objects`, :func:`read_jsonl`) and
:func:`open_tokenizer` are shared by ``score``, ``view`` and the data readers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rollout.format import DEFAULT_MAX_BYTES, utf8_bytes, validate
from rollout.units import chat_prompt_ids, latency, replay

#: Deepest nesting of arrays and objects a JSONL record may have.
MAX_JSON_DEPTH = 64

_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")


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

    ValueError naming the file and line for a line that is not UTF-8, not
    JSON, not a JSON object, nested more than ``MAX_JSON_DEPTH`` deep, or
    holding a lone surrogate (``"\\ud800"``: valid JSON, but no Unicode text).
    The readers of benchmarks, prompts, training records and viewer input
    share it.
    """
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not UTF-8 text (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except RecursionError:
                raise ValueError(f"{path}:{i}: JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
            except ValueError as e:  # not JSON, or an integer of more than 4300 digits
                raise ValueError(f"{path}:{i}: not valid JSON ({getattr(e, 'msg', e)})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            problem = _json_problem(rec)
            if problem:
                raise ValueError(f"{path}:{i}: {problem}")
            yield i, rec


def _json_problem(value) -> str | None:
    """Why a parsed JSON value is refused (too deep, a lone surrogate), or None; walks it without recursion."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            m = _SURROGATE_RE.search(v)
            if m:
                return f"a string holds a lone surrogate (U+{ord(m.group()):04X}), which is not Unicode text"
            continue
        if depth > MAX_JSON_DEPTH:
            return f"JSON nested more than {MAX_JSON_DEPTH} levels deep"
        items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
        stack.extend((x, depth + 1) for x in items if isinstance(x, (str, list, dict)))
    return None


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """:func:`json_objects` as a list; InputError (one line) for anything it refuses or a file it cannot read."""
    try:
        return list(json_objects(path))
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise InputError(str(e)) from None


def open_tokenizer(path: str | Path):
    """``rollout.tiny.load_tokenizer(path)``; InputError (one line) for a folder that holds no usable tokenizer
    (none at all, or one whose control tags are not single tokens)."""
    from rollout.tiny import load_tokenizer  # lazy: transformers takes seconds to import

    if not Path(path).is_dir():
        raise InputError(f"tokenizer folder {path} does not exist")
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        message = " ".join(str(e).split())
        raise InputError(message if str(path) in message else f"no usable tokenizer in {path}: {message}") from None
    return tokenizer


def record_prompt(line: int, record: dict) -> str | None:
    """The record's ``prompt`` (None without one); InputError for a prompt that is not a string or longer
    than ``DEFAULT_MAX_BYTES`` in UTF-8."""
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise InputError(f"line {line}: field 'prompt' must be a string, got {type(prompt).__name__}")
    if prompt is not None and utf8_bytes(prompt) > DEFAULT_MAX_BYTES:
        raise InputError(f"line {line}: field 'prompt' has {utf8_bytes(prompt)} bytes (UTF-8), "
                         f"more than the limit of {DEFAULT_MAX_BYTES}")
    return prompt


def prompt_ids(tokenizer, prompt: str | None) -> list[int]:
    """Token ids of the chat-templated ``prompt`` (none for None); InputError for a tokenizer without a chat
    template."""
    if prompt is None:
        return []
    if tokenizer.chat_template is None:
        raise InputError("the tokenizer has no chat template, which the records' prompts need")
    return chat_prompt_ids(tokenizer, prompt)


def check_record(line: int, record: dict, field_name: str, tokenizer) -> CheckResult:
    """Validity and reasons of one record; the measures only for a valid response (never replays another)."""
    response = record.get(field_name)
    if not isinstance(response, str):
        raise InputError(f"line {line}: no string field '{field_name}' "
                         f"(fields: {', '.join(sorted(record)) or 'none'})")
    prompt = record_prompt(line, record)
    reasons = validate(response)
    result = CheckResult(line, not reasons, reasons)
    if reasons:
        return result
    lat = latency(replay(prompt_ids(tokenizer, prompt), response, tokenizer, tokenizer.eos_token_id))
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
        tokenizer = open_tokenizer(args.tokenizer)
        results = [check_record(i, rec, args.field, tokenizer) for i, rec in records]
    except InputError as e:
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
