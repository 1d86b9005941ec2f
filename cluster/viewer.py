"""``threadweaver view``: trajectories as one static HTML page.

The page is self-contained (inline CSS, no script, no network; its
Content-Security-Policy forbids both) and holds one section per trajectory:

* a header with the trajectory's place (prompt, sample, decoding mode) and
  its measures: finish reason, ``L_total``, ``L_crit``, ``eta``, speedup,
  blocks, threads per block, wall-clock latency;
* the reward components when the record carries them (or ``scores`` are
  given): reward, ``R_correct``, ``R_accel``, format penalty, correct,
  format-valid, the extracted answer against the reference;
* the prompt, then the response in document order: sequential text as it
  is, and each parallel block as one row of columns, one per thread, each
  under its outline. In every block the longest thread -- the one on the
  critical path -- is marked (class ``critical``, a red frame and the words
  "critical path"); ties go to the first;
* a table of the trajectory's units (one engine request each: role, block,
  thread, context and completion tokens, inserted tokens).

Lengths: with units, or their token counts (``unit_tokens``, which the RL and
SFT evaluations write into ``eval/step_N.jsonl`` instead of the units' ids:
``rollout.units.UnitTokens``), every thread and sequential request shows its
count of model-generated tokens (``len(completion_ids)``, the measure of
``L_crit``); the sequential request that ends a block's outlines is shown on
the text before that block, and says so. Without either, threads are compared
by characters, and the page says "chars". A response cut off inside a block (by a budget or length
limit) is shown with the missing closing tags added, under a note that says
which; any other response that does not parse into blocks, or that breaks a
structural limit of the format (``rollout.format.limit_reasons``: a hostile
response is never parsed), is shown as raw text under the reason.

Input records are JSON objects, one a line, as ``threadweaver generate``
writes them (the input fields, the trajectory of
``rollout.orchestrator.Trajectory.to_dict`` and ``response``), as the demo
writes them (a bare trajectory: ``text``), or as the RL and SFT stages write
their evaluations (``text`` plus score fields). The response is read from
``response``, else ``text``. Every value taken from a record is HTML-escaped,
and ``units`` and ``unit_tokens`` are checked (``rollout.units.units_from_json``,
``unit_tokens_from_json``) before use.
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Sequence

from rollout.check import InputError, json_objects, open_tokenizer
from rollout.config import check_range
from rollout.files import check_output_file, write_text
from rollout.format import (
    BLOCK_TAGS, OUTLINE_CLOSE, OUTLINE_OPEN, OUTLINES_CLOSE, OUTLINES_OPEN, PARALLEL_CLOSE, PARALLEL_OPEN,
    THREAD_CLOSE, THREAD_OPEN, Block, FormatError, limit_reasons, parse,
)
from rollout.units import SEQ, THREAD, Unit, UnitTokens, latency, units_from_json, unit_tokens_from_json

#: score fields shown in the reward panel, in this order (those present in a record)
SCORE_KEYS = ("reward", "R_correct", "R_accel", "format_penalty", "correct", "format_valid", "format_error",
              "extracted_answer", "extraction", "check_method", "timed_out")
#: trajectory measures shown in the header, in this order (those present)
MEASURE_KEYS = ("finish_reason", "finish_detail", "L_total", "L_crit", "eta", "speedup", "n_blocks",
                "threads_per_block", "latency_s", "n_requests")


@dataclass
class PageItem:
    """One trajectory as the page shows it."""

    title: str
    text: str
    prompt: str | None = None
    answer: str | None = None
    units: list[Unit] | None = None
    measures: dict[str, Any] = field(default_factory=dict)
    score: dict[str, Any] = field(default_factory=dict)
    #: the token counts of each unit: from ``units``, else from the record's ``unit_tokens`` (None: neither)
    tokens: list[UnitTokens] | None = None


def _as_dict(obj: Any) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    raise TypeError(f"expected a dict, a Trajectory or a ScoreRecord, got {type(obj).__name__}")


def to_item(record: Any, score: Any = None, index: int = 0, tokenizer=None) -> PageItem:
    """The :class:`PageItem` of one record (a dict or a ``Trajectory``) and its optional score.

    Raises ValueError when the record has no string ``response`` or ``text``,
    or units that are not unit objects.
    """
    rec = _as_dict(record)
    text = rec.get("response", rec.get("text"))
    if not isinstance(text, str):
        raise ValueError(f"record {index}: no string field 'response' or 'text' (fields: {', '.join(sorted(rec))})")
    units = None
    if rec.get("units") is not None:
        units = rec["units"]
        if not (isinstance(units, list) and all(isinstance(u, Unit) for u in units)):
            try:
                units = units_from_json(units)
            except ValueError as e:
                raise ValueError(f"record {index}: field 'units': {e}") from None
    tokens = [UnitTokens.of(u) for u in units] if units is not None else None
    if tokens is None and rec.get("unit_tokens") is not None:
        try:
            tokens = unit_tokens_from_json(rec["unit_tokens"])
        except ValueError as e:
            raise ValueError(f"record {index}: field 'unit_tokens': {e}") from None
    measures = {k: rec[k] for k in MEASURE_KEYS if rec.get(k) is not None}
    if units and "L_crit" not in measures:
        lat = latency(units)
        measures.update(L_total=lat.L_total, L_crit=lat.L_crit, eta=lat.eta, speedup=lat.speedup,
                        n_blocks=lat.n_blocks, threads_per_block=lat.threads_per_block)
    merged = dict(rec)
    merged.update(_as_dict(score))
    score_fields = {k: merged[k] for k in SCORE_KEYS if k in merged}
    place = []
    prompt_index = rec.get("prompt_index", rec.get("index"))
    if prompt_index is not None:
        place.append(f"prompt {prompt_index}")
    if rec.get("sample_index") is not None:
        place.append(f"sample {rec['sample_index']}")
    for key in ("mode", "step"):
        if rec.get(key) is not None:
            place.append(f"{key} {rec[key]}" if key == "step" else str(rec[key]))
    prompt = rec.get("prompt") if isinstance(rec.get("prompt"), str) else None
    if prompt is None and tokenizer is not None and rec.get("prompt_ids"):
        ids = rec["prompt_ids"]
        if not (isinstance(ids, list) and all(type(t) is int and 0 <= t < len(tokenizer) for t in ids)):
            raise ValueError(f"record {index}: field 'prompt_ids' must be a list of token ids of the tokenizer")
        prompt = tokenizer.decode(ids, skip_special_tokens=False)
    answer = rec.get("answer")
    return PageItem(title=f"#{index}" + (" · " + " · ".join(place) if place else ""), text=text, prompt=prompt,
                    answer=None if answer is None else str(answer), units=units, measures=measures,
                    score=score_fields, tokens=tokens)


# --------------------------------------------------------------------------- HTML

#: The page runs no script and loads nothing: a second wall behind the escaping.
CSP_META = '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'">'

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; }
section.trajectory { background: #fff; border: 1px solid #ccc; border-radius: 6px; padding: 1em; margin: 1.5em 0; }
section.trajectory h2 { font-size: 1.1em; margin: 0 0 .5em 0; }
table.kv { border-collapse: collapse; margin: .3em 0 .6em 0; font-size: .9em; }
table.kv th, table.kv td { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
table.kv th { background: #f0f0f0; font-weight: 600; }
table.units { border-collapse: collapse; font-size: .85em; }
table.units th, table.units td { border: 1px solid #ddd; padding: 1px 6px; text-align: right; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-family: ui-monospace, monospace;
      font-size: .88em; }
.prompt pre { background: #eef4ff; padding: .4em; border-radius: 4px; }
.seq { border-left: 3px solid #888; padding: .3em .6em; margin: .4em 0; background: #f7f7f7; }
.block { border: 1px solid #7a9cc6; border-radius: 5px; margin: .6em 0; padding: .4em; background: #f3f7fc; }
.block-head { font-weight: 600; font-size: .9em; margin-bottom: .4em; }
.threads { display: flex; flex-direction: row; gap: .6em; align-items: stretch; }
.thread { flex: 1 1 0; min-width: 0; border: 1px solid #bbb; border-radius: 4px; padding: .4em;
          background: #fff; }
.thread.critical { border: 2px solid #c0392b; background: #fff4f2; }
.outline { font-weight: 600; font-size: .88em; border-bottom: 1px dashed #bbb; margin-bottom: .3em;
           padding-bottom: .2em; color: #1d4f91; }
.tokens { font-size: .8em; color: #555; margin-top: .3em; }
.critical-mark { color: #c0392b; font-weight: 700; }
.error { color: #b00; font-weight: 600; }
.ok { color: #087f23; font-weight: 600; }
.bad { color: #b00; font-weight: 600; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


def _kv_table(pairs: dict[str, Any], cls: str) -> str:
    if not pairs:
        return ""
    head = "".join(f"<th>{_e(k)}</th>" for k in pairs)
    body = "".join(f'<td data-key="{_e(k)}">{_e(_fmt(v))}</td>' for k, v in pairs.items())
    return f'<table class="kv {cls}"><tr>{head}</tr><tr>{body}</tr></table>'


def _unit_lengths(tokens: list[UnitTokens] | None) -> tuple[list[int], dict[tuple[int, int], int]]:
    """Completion lengths of the sequential units in order, and of thread units by (block, thread)."""
    seq, threads = [], {}
    for u in tokens or []:
        if u.role == THREAD:
            threads[(u.block, u.thread)] = u.completion
        elif u.role == SEQ:
            seq.append(u.completion)
    return seq, threads


def critical_thread(lengths: Sequence[int]) -> int:
    """Index of the longest thread (the first one on ties); -1 for no threads."""
    return max(range(len(lengths)), key=lambda i: (lengths[i], -i)) if lengths else -1


def _block_html(block: Block, b: int, thread_tokens: dict[tuple[int, int], int]) -> str:
    numbers = block.thread_numbers
    counted = [thread_tokens.get((b, n)) if n is not None else None for n in numbers]
    by_tokens = bool(counted) and all(c is not None for c in counted)
    lengths = [int(c) for c in counted] if by_tokens else [len(block.thread_body(i)) for i in range(len(numbers))]
    unit = "tokens" if by_tokens else "chars"
    crit = critical_thread(lengths)
    cols = []
    for i, raw in enumerate(block.threads):
        outline = block.outlines[i] if i < len(block.outlines) else "(no outline)"
        mark = ' <span class="critical-mark">critical path</span>' if i == crit else ""
        cls = "thread critical" if i == crit else "thread"
        cols.append(
            f'<div class="{cls}" data-block="{b}" data-thread="{_e(numbers[i] if numbers[i] is not None else "?")}" '
            f'data-length="{lengths[i]}" data-unit="{unit}">'
            f'<div class="outline">{_e(outline.strip())}</div>'
            f'<pre class="thread-body">{_e(raw.strip())}</pre>'
            f'<div class="tokens">thread {_e(numbers[i] if numbers[i] is not None else "?")}: '
            f'{lengths[i]} {unit}{mark}</div></div>')
    extra = ""
    if len(block.outlines) > len(block.threads):
        missing = [o.strip() for o in block.outlines[len(block.threads):]]
        extra = f'<div class="error">outlines without a thread: {_e("; ".join(missing))}</div>'
    crit_text = (f"critical path: thread {_e(numbers[crit])} ({lengths[crit]} {unit})" if crit >= 0
                 else "no threads")
    return (f'<div class="block" data-block="{b}"><div class="block-head">block {b} · {len(block.threads)} '
            f'threads · {crit_text}</div><div class="threads">{"".join(cols)}</div>{extra}</div>')


_CLOSERS = {PARALLEL_OPEN: PARALLEL_CLOSE, OUTLINES_OPEN: OUTLINES_CLOSE, OUTLINE_OPEN: OUTLINE_CLOSE,
            THREAD_OPEN: THREAD_CLOSE}
_TAG_RE = re.compile("|".join(re.escape(t) for t in BLOCK_TAGS))


def missing_closers(text: str) -> str | None:
    """The closing tags a response cut off inside a block lacks (``""`` if none), or None when its tags
    are out of order in a way no cut explains."""
    stack: list[str] = []
    for m in _TAG_RE.finditer(text):
        tag = m.group()
        if tag in _CLOSERS:
            stack.append(tag)
        elif stack and _CLOSERS[stack[-1]] == tag:
            stack.pop()
        else:
            return None
    return "".join(_CLOSERS[t] for t in reversed(stack))


def _response_html(item: PageItem) -> str:
    note = ""
    too_big = limit_reasons(item.text)
    if too_big:  # not parsed: shown as it is
        return (f'<div class="error">the response breaks the format\'s limits: {_e("; ".join(too_big))}</div>'
                f'<div class="seq raw"><pre>{_e(item.text)}</pre></div>')
    try:
        response = parse(item.text)
    except FormatError as e:
        closers = missing_closers(item.text)
        try:
            if not closers:
                raise e
            response = parse(item.text + closers)
        except FormatError:
            return (f'<div class="error">the response does not parse into blocks: {_e(e)}</div>'
                    f'<div class="seq raw"><pre>{_e(item.text)}</pre></div>')
        note = (f'<div class="error">the response ends inside a block (cut off); shown with '
                f'{_e(closers)} added for display</div>')
    seq_tokens, thread_tokens = _unit_lengths(item.tokens)
    n_blocks = len(response.blocks)
    # Sequential request j ends at block j+1's </Outlines> (the last one at the end) when the units match.
    seq_known = item.tokens is not None and len(seq_tokens) == n_blocks + 1
    out, b, pending = [], 0, []

    def flush_seq(label: str) -> None:
        text = "".join(pending)
        pending.clear()
        if not text.strip() and not label:
            return
        out.append(f'<div class="seq"><pre>{_e(text)}</pre>{label}</div>')

    for part in response.parts:
        if isinstance(part, str):
            pending.append(part)
            continue
        label = (f'<div class="tokens">sequential request: {seq_tokens[b]} tokens (this text and the outlines '
                 f'of block {b + 1})</div>' if seq_known else "")
        flush_seq(label)
        b += 1
        out.append(_block_html(part, b, thread_tokens))
    flush_seq(f'<div class="tokens">sequential request: {seq_tokens[-1]} tokens</div>' if seq_known else "")
    return note + "".join(out)


def _units_html(tokens: list[UnitTokens] | None) -> str:
    if not tokens:
        return ""
    rows = "".join(
        f"<tr><td>{i}</td><td>{_e(u.role)}</td><td>{'' if u.block is None else _e(u.block)}</td>"
        f"<td>{'' if u.thread is None else _e(u.thread)}</td><td>{u.context}</td>"
        f"<td>{u.completion}</td><td>{_e(u.inserted)}</td></tr>" for i, u in enumerate(tokens))
    return (f'<details class="units"><summary>{len(tokens)} units (engine requests)</summary><table class="units">'
            "<tr><th>unit</th><th>role</th><th>block</th><th>thread</th><th>context tokens</th>"
            f"<th>completion tokens</th><th>inserted</th></tr>{rows}</table></details>")


def _item_html(item: PageItem, index: int) -> str:
    parts = [f'<section class="trajectory" id="t{index}"><h2>{_e(item.title)}</h2>',
             _kv_table(item.measures, "measures")]
    if item.score:
        verdict = ""
        if "correct" in item.score:
            ok = bool(item.score["correct"])
            verdict = f'<span class="{"ok" if ok else "bad"}">{"correct" if ok else "incorrect"}</span> '
        ref = f" (reference {_e(item.answer)})" if item.answer is not None else ""
        parts.append(f'<div class="reward">{verdict}reward components{ref}'
                     f'{_kv_table(item.score, "score")}</div>')
    elif item.answer is not None:
        parts.append(f'<div class="reward">reference answer: {_e(item.answer)}</div>')
    if item.prompt is not None:
        parts.append(f'<div class="prompt"><pre>{_e(item.prompt)}</pre></div>')
    parts.append(f'<div class="response">{_response_html(item)}</div>')
    parts.append(_units_html(item.tokens))
    parts.append("</section>")
    return "".join(parts)


def render(trajectories: Sequence[Any], scores: Sequence[Any] | None = None,
           title: str = "ThreadWeaver trajectories", tokenizer=None) -> str:
    """The HTML page of ``trajectories`` (dicts as the JSONL files hold them, or ``Trajectory`` objects).

    ``scores``, if given, has one entry per trajectory (a ``ScoreRecord``, a
    dict or None); its fields are shown beside those the record itself holds.
    ``tokenizer`` decodes ``prompt_ids`` for records without a ``prompt``.
    """
    if scores is not None and len(scores) != len(trajectories):
        raise ValueError(f"{len(scores)} scores for {len(trajectories)} trajectories")
    items = [to_item(t, scores[i] if scores is not None else None, i, tokenizer) for i, t in enumerate(trajectories)]
    correct = [bool(it.score["correct"]) for it in items if "correct" in it.score]
    summary = f"{len(items)} trajectories"
    if correct:
        summary += f" · accuracy {sum(correct) / len(correct):.3f}"
    crit = [v for it in items if isinstance(v := it.measures.get("L_crit"), (int, float)) and not isinstance(v, bool)]
    if crit:
        summary += f" · mean L_crit {sum(crit) / len(crit):.1f}"
    body = "".join(_item_html(it, i) for i, it in enumerate(items))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">" + CSP_META +
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f'<h1>{_e(title)}</h1><p class="summary">{_e(summary)}</p>{body}</body></html>\n')


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL file; ValueError naming the line for anything else."""
    return [rec for _, rec in json_objects(path)]


def write_page(path: str | Path, trajectories: Sequence[Any], scores: Sequence[Any] | None = None,
               title: str = "ThreadWeaver trajectories", tokenizer=None) -> Path:
    """Render and write the page (through a temporary file, parent folders created); returns its path."""
    return write_text(path, render(trajectories, scores, title, tokenizer))


#: trajectories of each evaluation shown on its viewer page
PAGE_TRAJECTORIES = 40


def eval_page(records_file: Path, title: str) -> Path | None:
    """The viewer page of an evaluation's first records, next to the file; None on failure.

    A page that cannot be rendered only costs a warning: it never stops training.
    """
    try:
        return write_page(records_file.with_suffix(".html"), read_jsonl(records_file)[:PAGE_TRAJECTORIES],
                          title=title)
    except Exception as e:  # noqa: BLE001
        print(f"rl: warning: no viewer page for {records_file}: {e}", file=sys.stderr, flush=True)
        return None


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="trajectory JSONL files (threadweaver generate, demo, or a stage's eval/step_N.jsonl)")
    parser.add_argument("--out", required=True, type=Path, help="HTML page to write")
    parser.add_argument("--limit", type=int, default=None, help="show only the first LIMIT records (default: all)")
    parser.add_argument("--title", default=None, help="page title (default: the file names)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer folder, to show the prompt of records that hold only prompt_ids")


def run(args: argparse.Namespace) -> int:
    try:
        if args.limit is not None:
            check_range("--limit", args.limit, ">= 1")
        check_output_file(args.out, "--out")
        records = [r for path in args.files for r in read_jsonl(path)]
        if args.limit is not None:
            records = records[:args.limit]
        if not records:
            raise ValueError("no records in " + ", ".join(str(p) for p in args.files))
        tokenizer = open_tokenizer(args.tokenizer) if args.tokenizer is not None else None
        title = args.title or "trajectories of " + ", ".join(p.name for p in args.files)
        out = write_page(args.out, records, title=title, tokenizer=tokenizer)
    except (OSError, ValueError, InputError) as e:
        print(f"threadweaver view: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(records)} trajectories to {out}")
    return 0
