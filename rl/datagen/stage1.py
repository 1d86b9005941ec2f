"""Stage 1: rewrite sequential traces into parallel responses, and keep those that still check.

For every input record (a JSONL line with ``prompt``, ``answer`` and a
sequential response in ``response_field``, reasoning inside ``<think>``):

0. read the trace (:func:`rl.datagen.trace.trace_from_record`);
1-4. rewrite it with a :class:`~rl.datagen.trace.Rewriter`: the teacher
   (:class:`~rl.datagen.rewrite.TeacherRewriter`) or the rule-based one
   for the synthetic task (:class:`~rl.datagen.rules.RuleRewriter`);
5. **validate** (:func:`validate_step`): the response must be format-valid
   (``rollout.format.validate``), hold at least one block, and its final
   ``\\boxed{}`` answer must still match the reference (``rewards.answer`` and
   ``rewards.checker``, math-verify under a hard time limit).

Traces are processed ``teacher.concurrency`` at a time (one at a time for the
rule-based rewriter) under a progress bar. Outputs, next to ``out``:

* ``out``: one kept record per line: the input's fields except its
  ``response*`` fields, ``response`` (the parallel response, what
  ``threadweaver check`` and the SFT stage read), ``response_sequential``
  (the trace it came from) and ``provenance`` (stage, rewriter, teacher model,
  input file, config hash);
* ``<out stem>.rejected.jsonl``: ``id``, ``step``, ``code``, ``detail`` of each
  dropped trace;
* ``<out stem>.stats.json``: counts kept/total, rejections per step and code,
  teacher requests/cache hits/retries, seconds, and the full config (which
  names the API key's environment variable, never the key, and shows
  ``teacher.base_url`` without its credentials).

Records are written in input order. A teacher that refuses every call (wrong
address, key or model) stops the run with :class:`TeacherConfigError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol

from rewards.answer import extract_answer
from rewards.checker import Verdict
from rollout.check import InputError, read_jsonl
from rollout.config import check_ranges
from rl.datagen.rewrite import RewriteConfig, TeacherRewriter
from rl.datagen.rules import RuleRewriter
from rl.datagen.teacher import TeacherClient, TeacherConfig, redact_url
from rl.datagen.trace import STEPS, Reject, Rejection, Rewriter, Trace, trace_from_record
from rollout.files import atomic_write, write_text
from rollout.format import PARALLEL_OPEN, validate


class Checker(Protocol):
    def check(self, pred: str, gold: str) -> Verdict: ...


@dataclass
class Stage1Config:
    """Stage 1: input, output, which rewriter, its limits, the teacher, and how answers are checked."""

    input: str = field(default="", metadata={"help": "JSONL file of sequential traces (required)"})
    out: str = field(default="", metadata={"help": "JSONL file to write the kept parallel records to (required)"})
    response_field: str = field(default="response_sequential", metadata={
        "help": "input field holding the sequential response (<think>reasoning</think> then the answer)"})
    limit: int | None = field(default=None, metadata={
        "help": "use only the first LIMIT records (null: all)", "range": ">= 1"})
    rewriter: Literal["teacher", "rule"] = field(default="teacher", metadata={
        "help": "steps 1-4 by a teacher LLM ('teacher') or by the synthetic task's rules ('rule')"})
    rewrite: RewriteConfig = field(default_factory=RewriteConfig, metadata={"help": "limits of every rewrite"})
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={"help": "the teacher endpoint"})
    answer_region: Literal["after_think", "whole"] = field(default="after_think", metadata={
        "help": "where the final \\boxed{} answer is read: after </think>, or the whole response"})
    checker_timeout_s: float = field(default=5.0, metadata={
        "help": "math-verify time limit per answer (seconds)", "range": "> 0"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class Outcome:
    """Stage 1's result for one input record: the parallel response kept, or why it was dropped."""

    index: int
    trace_id: str
    record: dict
    trace_text: str | None = None
    response: str | None = None
    rejection: Rejection | None = None


@dataclass
class Stage1Result:
    """What a run produced: outcomes in input order, counts, and where the files are."""

    outcomes: list[Outcome]
    stats: dict
    paths: dict[str, Path]

    @property
    def kept(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.response is not None]


def sidecar(out: str | Path, suffix: str) -> Path:
    """``runs/x/data.jsonl`` -> ``runs/x/data.<suffix>``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + "." + suffix)


def config_hash(config_dict: dict) -> str:
    return hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest()[:16]


def validate_step(trace: Trace, response: str, checker: Checker, answer_region: str = "after_think") -> None:
    """Step 5; raises Reject when the response is malformed, sequential, or its answer no longer checks."""
    reasons = validate(response)
    if reasons:
        raise Reject("validate", "format", "; ".join(reasons)[:300])
    if PARALLEL_OPEN not in response:
        raise Reject("validate", "not_parallel", "the response has no parallel block")
    extraction = extract_answer(response, answer_region)
    if extraction.answer is None:
        raise Reject("validate", "no_answer", f"no final answer ({extraction.status})")
    verdict = checker.check(extraction.answer, trace.answer)
    if verdict.timed_out:
        raise Reject("validate", "check_timeout", f"checking {extraction.answer!r} timed out")
    if not verdict.correct:
        extra = f" ({verdict.error})" if verdict.error else ""
        raise Reject("validate", "wrong_answer", f"answer {extraction.answer!r} does not match the reference "
                                                 f"{trace.answer!r}{extra}")


def process(index: int, record: dict, cfg: Stage1Config, rewriter: Rewriter, checker: Checker) -> Outcome:
    """Steps 0-5 for one record; model output and bad records give a rejection, never an exception."""
    out = Outcome(index, str(record.get("id", index)), record)
    try:
        trace = trace_from_record(record, cfg.response_field, index)
        out.trace_text = record[cfg.response_field]
        result = rewriter.rewrite(trace)
        if isinstance(result, Rejection):
            out.rejection = result
            return out
        validate_step(trace, result, checker, cfg.answer_region)
        out.response = result
    except Reject as r:
        out.rejection = r.rejection
    return out


def read_records(path: str, limit: int | None) -> list[dict]:
    try:
        records = [rec for _, rec in read_jsonl(path)]
    except InputError as e:
        raise ValueError(str(e)) from None
    if not records:
        raise ValueError(f"{path}: no records")
    return records[:limit] if limit is not None else records


def output_record(o: Outcome, cfg: Stage1Config, rewriter: Rewriter, chash: str) -> dict:
    rec = {k: v for k, v in o.record.items() if not k.startswith("response")}
    rec.setdefault("id", o.trace_id)
    rec["response"] = o.response
    rec["response_sequential"] = o.trace_text
    rec["provenance"] = {"stage": "stage1", "rewriter": rewriter.name, "input": cfg.input, "config_sha": chash,
                         "teacher_model": cfg.teacher.model if rewriter.name == "teacher" else None}
    return rec


def count_rejections(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """``{step: {code: count}}`` in step order."""
    by_step: dict[str, Counter] = {}
    for o in outcomes:
        if o.rejection is not None:
            by_step.setdefault(o.rejection.step, Counter())[o.rejection.code] += 1
    return {s: dict(by_step[s].most_common()) for s in STEPS if s in by_step}


def run_stage1(cfg: Stage1Config, rewriter: Rewriter, checker: Checker, *,
               client: TeacherClient | None = None,
               on_progress: Callable[[int, int, int], None] | None = None) -> Stage1Result:
    """Process every record of ``cfg.input`` and write the outputs (see the module docstring);
    ``on_progress(done, kept, total)`` is called after every record."""
    from tqdm import tqdm

    if not cfg.input or not cfg.out:
        raise ValueError("stage 1 needs 'input' and 'out'")
    records = read_records(cfg.input, cfg.limit)
    start = time.perf_counter()
    workers = cfg.teacher.concurrency if rewriter.name == "teacher" else 1
    outcomes: list[Outcome | None] = [None] * len(records)
    with tqdm(total=len(records), desc="stage 1", unit="trace", disable=not cfg.progress) as bar:
        kept = n_done = 0

        def done(o: Outcome) -> None:
            nonlocal kept, n_done
            outcomes[o.index] = o
            kept += o.response is not None
            n_done += 1
            bar.update(1)
            bar.set_postfix(kept=kept, refresh=False)
            if on_progress is not None:
                on_progress(n_done, kept, len(records))

        if workers == 1:
            for i, rec in enumerate(records):
                done(process(i, rec, cfg, rewriter, checker))
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stage1") as pool:
                futures = {pool.submit(process, i, rec, cfg, rewriter, checker) for i, rec in enumerate(records)}
                while futures:
                    finished, futures = wait(futures, return_when=FIRST_EXCEPTION)
                    for f in finished:
                        if f.exception() is not None:  # infrastructure/configuration error: stop the run
                            for other in futures:
                                other.cancel()
                            raise f.exception()
                        done(f.result())
    seconds = time.perf_counter() - start
    cfg_dict = dataclasses.asdict(cfg)
    cfg_dict["teacher"]["base_url"] = redact_url(cfg.teacher.base_url)  # never store credentials
    chash = config_hash(cfg_dict)
    out = Path(cfg.out)
    paths = {"out": out, "rejected": sidecar(out, "rejected.jsonl"), "stats": sidecar(out, "stats.json")}
    final = [o for o in outcomes if o is not None]
    with atomic_write(paths["out"]) as f:
        for o in final:
            if o.response is not None:
                f.write(json.dumps(output_record(o, cfg, rewriter, chash), ensure_ascii=False) + "\n")
    with atomic_write(paths["rejected"]) as f:
        for o in final:
            if o.rejection is not None:
                f.write(json.dumps({"id": o.trace_id, **dataclasses.asdict(o.rejection)}, ensure_ascii=False) + "\n")
    rejected = count_rejections(final)
    stats = {
        "stage": "stage1", "rewriter": rewriter.name, "input": cfg.input, "out": str(out),
        "total": len(final), "kept": sum(o.response is not None for o in final),
        "rejected_by_step": {s: sum(c.values()) for s, c in rejected.items()}, "rejected": rejected,
        "teacher": client.stats.to_dict() if client is not None else None,
        "seconds": round(seconds, 3), "config_sha": chash, "config": cfg_dict,
    }
    write_text(paths["stats"], json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return Stage1Result(final, stats, paths)


def summary(stats: dict) -> str:
    """The end-of-run report: kept/total, rejections per step and code, teacher traffic."""
    total, kept = stats["total"], stats["kept"]
    lines = [f"stage 1 ({stats['rewriter']}): kept {kept} of {total} traces"
             + (f" ({100 * kept / total:.1f}%)" if total else "")]
    if stats["rejected"]:
        lines.append("rejected by step:")
        for step, codes in stats["rejected"].items():
            detail = ", ".join(f"{code} {n}" for code, n in codes.items())
            lines.append(f"  {step:<9}{stats['rejected_by_step'][step]:>6}   {detail}")
    if stats["teacher"] is not None:
        t = stats["teacher"]
        lines.append(f"teacher: {t['requests']} requests, {t['cache_hits']} cache hits, {t['retries']} retries, "
                     f"{t['failed_calls']} failed calls")
    lines.append(f"{stats['seconds']:.1f} s; wrote {stats['out']} (+ .rejected.jsonl, .stats.json)")
    return "\n".join(lines)


def make_rewriter(cfg: Stage1Config, **client_kwargs) -> tuple[Rewriter, TeacherClient | None]:
    """The configured rewriter and, for the teacher, its client (preflighted if ``teacher.preflight``)."""
    if cfg.rewriter == "rule":
        return RuleRewriter(cfg.rewrite), None
    client = TeacherClient(cfg.teacher, **client_kwargs)
    try:
        if cfg.teacher.preflight:
            client.preflight()
    except BaseException:
        client.close()
        raise
    return TeacherRewriter(client, cfg.rewrite), client
