"""Stage 2 (self-training): sample parallel trajectories from a model, keep the good ones.

For every prompt of ``prompts`` (JSONL with ``prompt`` and ``answer``), the
spawn/join orchestrator samples ``rollout.n`` trajectories (in the CLI: on the
Ray rollout pool, :class:`rollout.workers.RolloutPool`). A trajectory is kept
when all of these hold, checked in this order; the first that fails is its
drop reason:

1. it ended with EOS (``finish_<reason>`` otherwise: budget, context, ...);
2. no thread of it was cut at ``max_thread_tokens`` and closed by the
   orchestrator (``closed_thread``): training on it would teach a
   ``</Thread>`` the model never wrote;
3. its response is format-valid (``format``);
4. it has a final ``\\boxed{}`` answer (``no_answer``) that matches the
   reference (``incorrect``; ``check_timeout`` when math-verify ran out of
   time), decided by ``rewards.answer`` and ``rewards.checker``;
5. its acceleration ratio ``eta`` is at least ``min_eta``, when set
   (``low_eta``; ``eta`` is 0 for a response without blocks, so any
   ``min_eta > 0`` keeps parallel responses only);
6. with ``dedupe``, no earlier kept trajectory of the same prompt has the
   same text (``duplicate``).

Outputs, next to ``out``: ``out`` (one kept record per line: the prompt
record's fields except ``response*``, ``response`` = the trajectory's text,
its latency measures, and ``provenance`` = model, seed, config hash, time);
``<stem>.rejected.jsonl`` (prompt and sample index, reason, detail);
``<stem>.stats.json`` (kept/total, drops per reason, the full config).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

from rewards.answer import extract_answer
from rollout.config import RolloutConfig, check_ranges
from rl.datagen.stage1 import Checker, config_hash, read_records, sidecar
from rollout.files import atomic_write, write_text
from rollout.format import validate
from rollout.orchestrator import Trajectory
from rollout.ray_init import start_ray
from rollout.units import chat_prompt_ids
from rollout.workers import RolloutPool

#: Sampler: prompt token ids -> trajectories, prompt-major (``rollout.n`` per prompt).
Sampler = Callable[[list[list[int]]], list[Trajectory]]


@dataclass
class Stage2Config:
    """Stage 2: which model samples which prompts, how, and what is kept."""

    model: str = field(default="", metadata={"help": "model directory to sample from (required)"})
    prompts: str = field(default="", metadata={"help": "JSONL file with 'prompt' and 'answer' per line (required)"})
    out: str = field(default="", metadata={"help": "JSONL file to write the kept records to (required)"})
    limit: int | None = field(default=None, metadata={
        "help": "use only the first LIMIT prompts (null: all)", "range": ">= 1"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "sampling and the worker pool"})
    min_eta: float | None = field(default=None, metadata={
        "help": "keep only trajectories with eta >= this (null: no limit; > 0 drops sequential responses)",
        "range": "<= 1"})
    dedupe: bool = field(default=True, metadata={"help": "drop a trajectory whose text repeats a kept one of its "
                                                         "prompt"})
    answer_region: Literal["after_think", "whole"] = field(default="after_think", metadata={
        "help": "where the final \\boxed{} answer is read: after </think>, or the whole response"})
    checker_timeout_s: float = field(default=5.0, metadata={
        "help": "math-verify time limit per answer (seconds)", "range": "> 0"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class Decision:
    """Whether one trajectory is kept; ``reason``/``detail`` say why not."""

    trajectory: Trajectory
    kept: bool
    reason: str | None = None
    detail: str = ""


def judge(t: Trajectory, answer: str, cfg: Stage2Config, checker: Checker) -> Decision:
    """Rules 1-5 of the module docstring for one trajectory (dedupe is :func:`select`'s)."""
    if t.finish_reason != "eos":
        return Decision(t, False, f"finish_{t.finish_reason}", t.finish_detail)
    if t.closed_threads:
        cut = ", ".join(f"block {b} thread {n}" for b, n in t.closed_threads)
        return Decision(t, False, "closed_thread", f"cut at max_thread_tokens and closed by the orchestrator: {cut}")
    reasons = validate(t.text)
    if reasons:
        return Decision(t, False, "format", "; ".join(reasons)[:300])
    extraction = extract_answer(t.text, cfg.answer_region)
    if extraction.answer is None:
        return Decision(t, False, "no_answer", extraction.status)
    verdict = checker.check(extraction.answer, answer)
    if verdict.timed_out:
        return Decision(t, False, "check_timeout", f"checking {extraction.answer!r}")
    if not verdict.correct:
        return Decision(t, False, "incorrect", f"{extraction.answer!r} vs reference {answer!r}")
    if cfg.min_eta is not None and t.eta < cfg.min_eta:
        return Decision(t, False, "low_eta", f"eta {t.eta:.3f} < {cfg.min_eta}")
    return Decision(t, True)


def select(trajectories: Sequence[Trajectory], records: Sequence[dict], cfg: Stage2Config,
           checker: Checker) -> list[Decision]:
    """One decision per trajectory, in order (``prompt_index`` indexes ``records``)."""
    seen: set[tuple[int, str]] = set()
    out = []
    for t in trajectories:
        d = judge(t, str(records[t.prompt_index]["answer"]), cfg, checker)
        if d.kept and cfg.dedupe:
            key = (t.prompt_index, t.text)
            if key in seen:
                d = Decision(t, False, "duplicate", f"same text as a kept sample of prompt {t.prompt_index}")
            seen.add(key)
        out.append(d)
    return out


def check_prompt_records(records: list[dict], path: str) -> None:
    for i, r in enumerate(records, 1):
        if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise ValueError(f"{path}: record {i} has no non-empty string 'prompt'")
        if not isinstance(r.get("answer"), (str, int, float)) or isinstance(r.get("answer"), bool):
            raise ValueError(f"{path}: record {i} has no reference 'answer' (string or number)")


@dataclass
class Stage2Result:
    decisions: list[Decision]
    stats: dict
    paths: dict[str, Path]


def output_record(d: Decision, record: dict, provenance: dict) -> dict:
    t = d.trajectory
    rec = {k: v for k, v in record.items() if not k.startswith("response")}
    rec["id"] = f"{record.get('id', t.prompt_index)}-s{t.sample_index}"
    rec["answer"] = str(record["answer"])
    rec["response"] = t.text
    rec.update(prompt_index=t.prompt_index, sample_index=t.sample_index, L_total=t.L_total, L_crit=t.L_crit,
               eta=t.eta, n_blocks=t.n_blocks, threads_per_block=t.threads_per_block)
    rec["provenance"] = provenance
    return rec


def run_stage2(cfg: Stage2Config, sample: Sampler, tokenizer, checker: Checker) -> Stage2Result:
    """Read the prompts, sample with ``sample``, judge every trajectory, write the outputs."""
    if not cfg.prompts or not cfg.out or not cfg.model:
        raise ValueError("stage 2 needs 'model', 'prompts' and 'out'")
    records = read_records(cfg.prompts, cfg.limit)
    check_prompt_records(records, cfg.prompts)
    start = time.perf_counter()
    trajectories = sample([chat_prompt_ids(tokenizer, r["prompt"]) for r in records])
    sample_s = time.perf_counter() - start
    decisions = select(trajectories, records, cfg, checker)
    cfg_dict = dataclasses.asdict(cfg)
    chash = config_hash(cfg_dict)
    provenance = {"stage": "stage2", "model": cfg.model, "seed": cfg.rollout.seed, "config_sha": chash,
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    out = Path(cfg.out)
    paths = {"out": out, "rejected": sidecar(out, "rejected.jsonl"), "stats": sidecar(out, "stats.json")}
    with atomic_write(paths["out"]) as f:
        for d in decisions:
            if d.kept:
                rec = output_record(d, records[d.trajectory.prompt_index], provenance)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    with atomic_write(paths["rejected"]) as f:
        for d in decisions:
            if not d.kept:
                t = d.trajectory
                f.write(json.dumps({"prompt_index": t.prompt_index, "sample_index": t.sample_index,
                                    "reason": d.reason, "detail": d.detail, "text": t.text[:300]},
                                   ensure_ascii=False) + "\n")
    drops = Counter(d.reason for d in decisions if not d.kept)
    kept = [d for d in decisions if d.kept]
    stats = {
        "stage": "stage2", "model": cfg.model, "seed": cfg.rollout.seed, "prompts": len(records),
        "total": len(decisions), "kept": len(kept), "dropped": dict(drops.most_common()),
        "kept_mean_eta": sum(d.trajectory.eta for d in kept) / len(kept) if kept else None,
        "kept_parallel": sum(d.trajectory.n_blocks > 0 for d in kept),
        "sample_seconds": round(sample_s, 3), "out": str(out), "config_sha": chash, "config": cfg_dict,
        "provenance": provenance,
    }
    write_text(paths["stats"], json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return Stage2Result(decisions, stats, paths)


def summary(stats: dict) -> str:
    total, kept = stats["total"], stats["kept"]
    lines = [f"stage 2 ({stats['model']}): kept {kept} of {total} trajectories"
             + (f" ({100 * kept / total:.1f}%)" if total else "") + f" from {stats['prompts']} prompts"]
    if kept:
        lines.append(f"kept: {stats['kept_parallel']} parallel, mean eta {stats['kept_mean_eta']:.3f}")
    if stats["dropped"]:
        lines.append("dropped: " + ", ".join(f"{r} {n}" for r, n in stats["dropped"].items()))
    lines.append(f"sampling {stats['sample_seconds']:.1f} s; wrote {stats['out']} (+ .rejected.jsonl, .stats.json)")
    return "\n".join(lines)


def pool_sampler(cfg: Stage2Config, ray_address: str | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> tuple[Sampler, Callable[[], None]]:
    """A sampler over the Ray rollout pool, and the function that shuts the pool down;
    ``on_progress(done, total)`` is called as trajectories finish.

    Ray is started (or joined: ``ray_address``, else ``RAY_ADDRESS``) unless this process already has it
    (the commands start it from their ``ray`` section); only a Ray started here is shut down with the pool.
    """
    import ray
    from tqdm import tqdm

    started_ray = not ray.is_initialized()
    if started_ray:  # a local instance unless told: never join a `ray start` cluster found by accident
        start_ray(ray_address or os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    try:
        pool = RolloutPool(cfg.model, cfg.rollout)
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise

    def sample(prompt_ids: list[list[int]]) -> list[Trajectory]:
        with tqdm(total=len(prompt_ids) * cfg.rollout.n, desc="stage 2", unit="traj",
                  disable=not cfg.progress) as bar:
            total = len(prompt_ids) * cfg.rollout.n

            def progress(k: int) -> None:
                bar.update(k - bar.n)
                if on_progress is not None:
                    on_progress(k, total)

            out = pool.generate(prompt_ids, progress=progress)
            bar.update(len(out) - bar.n)
        return out

    def close() -> None:
        try:
            pool.shutdown()
        finally:
            if started_ray:
                ray.shutdown()

    return sample, close
