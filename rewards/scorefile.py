"""Scoring the records of a JSONL file (``threadweaver score``, ``cluster.cmd_score``): records into
:class:`rewards.score.RewardItem`, the summary of their scores and the printed table.

Each record needs ``response`` (the assistant text) and ``answer`` (the
reference; a JSON number is read as its text). Token measures (``L_total``,
``L_crit``, ``eta``) and so ``R_accel`` need units: either the record carries
``units`` (a list of unit dicts, as ``rollout.units.Unit.to_dict`` writes them),
or a tokenizer replays a format-valid response into units over the
chat-templated ``prompt`` field (an empty prompt when the record has none). Without
either, and for a response that is not format-valid (never replayed: it gets no
``R_accel`` anyway), the measures print as ``-``. A record whose ``finish_reason``
says it was cut (anything but ``eos``/``stop``; see ``RewardConfig.reward_cut_responses``)
is not checked and scores as incorrect.
"""

from __future__ import annotations

from rewards.score import RewardItem, ScoreRecord
from rollout.check import InputError, prompt_ids, read_jsonl, record_prompt
from rollout.format import validate
from rollout.units import replay, units_from_json


def read_records(path: str) -> list[tuple[int, dict]]:
    """``(line number, record)`` for every non-blank line of a JSONL file; InputError if there is none."""
    records = read_jsonl(path)
    if not records:
        raise InputError(f"{path}: no records")
    return records


def to_item(line: int, rec: dict, tokenizer, tags=None) -> RewardItem:
    """The :class:`RewardItem` of one record; raises InputError naming the field.

    ``tags``: the tokenizer's tag ids, for ``token_count = "tag_stream"`` (``rewards.score.item_tags``).
    """
    response = rec.get("response")
    if not isinstance(response, str):
        raise InputError(f"line {line}: no string field 'response' (fields: {', '.join(sorted(rec)) or 'none'})")
    answer = rec.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise InputError(f"line {line}: no string or number field 'answer' (fields: {', '.join(sorted(rec))})")
    units = None
    if rec.get("units") is not None:
        try:
            units = units_from_json(rec["units"])
        except ValueError as e:
            raise InputError(f"line {line}: field 'units': {e}") from None
    elif tokenizer is not None:
        prompt = record_prompt(line, rec)
        if not validate(response):  # an invalid response is never replayed: no units, no measures
            units = replay(prompt_ids(tokenizer, prompt), response, tokenizer, tokenizer.eos_token_id)
    finish = rec.get("finish_reason")  # generate/eval records carry it: a cut response is not rewarded
    return RewardItem(response, answer, units, finish if isinstance(finish, str) else None, tags)


def summarize(records: list[ScoreRecord]) -> dict:
    """Means of every numeric component (over the records where it is measured) and counts."""
    keys = ["reward", "R_correct", "R_accel", "format_penalty", "correct", "timed_out", "format_valid",
            "parallel", "L_total", "L_crit", "eta", "speedup"]
    out: dict = {"records": len(records)}
    for key in keys:
        values = [float(getattr(r, key)) for r in records if getattr(r, key) is not None]
        out[f"mean_{key}"] = sum(values) / len(values) if values else None
    out["measured"] = sum(r.accel_measured for r in records)
    return out


def _fmt(v, width: int) -> str:
    if v is None:
        text = "-"
    elif isinstance(v, bool):
        text = "yes" if v else "no"
    elif isinstance(v, float):
        text = f"{v:.3f}"
    else:
        text = str(v)
    return f"{text:>{width}}"


_COLUMNS = [("correct", 7), ("timed_out", 9), ("format_valid", 12), ("R_correct", 9), ("R_accel", 7),
            ("format_penalty", 14), ("reward", 7), ("L_total", 7), ("L_crit", 6), ("eta", 6), ("parallel", 8)]


def _clip(text: str | None, n: int = 24) -> str:
    if text is None:
        return "-"
    text = text.replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


def print_table(lines: list[int], records: list[ScoreRecord], summary: dict) -> None:
    print(f"{'line':>6} " + " ".join(f"{name:>{w}}" for name, w in _COLUMNS) + "  answer (check)")
    for line, r in zip(lines, records):
        cells = " ".join(_fmt(getattr(r, name), w) for name, w in _COLUMNS)
        how = r.check_method if r.extraction == "ok" else r.extraction
        print(f"{line:>6} {cells}  {_clip(r.extracted_answer)} ({how})")
    means = " ".join(_fmt(summary[f"mean_{name}"], w) for name, w in _COLUMNS)
    print(f"{'mean':>6} {means}")
    if summary["measured"] < summary["records"]:
        print(f"token measures for {summary['measured']}/{summary['records']} records "
              "(others have no units; pass --tokenizer or give 'units')")
