"""The evaluation report: markdown tables in the layout of the paper's main table, a detailed table, and the
histogram of per-problem speedups (``threadweaver eval``, the pipeline's final stage); the pipeline's
training curves (:func:`training_curves`) and the HTML rendering of a report (:func:`markdown_html`).

Rendering only: the numbers come from :mod:`rl.evaluation` (``BenchmarkReport``) and the stages'
``metrics.jsonl``.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Mapping, Sequence

from rl.evaluation import BenchmarkReport
from rl.metrics_log import read_records
from rollout.files import atomic_write

def _pct(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}{suffix}"


def main_table(reports: Sequence[BenchmarkReport]) -> str:
    """Markdown table in the layout of the paper's main table: one row per model, per benchmark the
    accuracy (avg@k), token latency (mean L_crit) and speedup over the sequential baseline."""
    head = "| model | " + " | ".join(f"{r.name} acc (avg@{r.k}) | {r.name} latency (L_crit tok) | {r.name} speedup"
                                      for r in reports) + " |"
    sep = "|---|" + "---:|---:|---:|" * len(reports)
    seq_name = reports[0].sequential.model
    par_name = reports[0].parallel.model
    seq = f"| {seq_name} | " + " | ".join(
        f"{_pct(r.sequential.accuracy)} | {_num(r.sequential.L_crit)} | 1.00x" for r in reports) + " |"
    par = f"| {par_name} | " + " | ".join(
        f"{_pct(r.parallel.accuracy)} | {_num(r.parallel.L_crit)} | {_num(r.speedup, 2, 'x')}" for r in reports) + " |"
    rows = [head, sep, seq, par]
    if all(r.before is not None for r in reports):  # the earlier parallel checkpoint, above the final one
        rows.insert(3, f"| {reports[0].before.parallel.model} | " + " | ".join(
            f"{_pct(r.before.parallel.accuracy)} | {_num(r.before.parallel.L_crit)} | {_num(r.before.speedup, 2, 'x')}"
            for r in reports) + " |")
    return "\n".join(rows)


def detail_table(reports: Sequence[BenchmarkReport]) -> str:
    """Every measure per benchmark and mode, as markdown."""
    lines = ["| benchmark | mode | model | problems | samples | accuracy | L_total | L_crit | activation | "
             "format-valid | wall s / problem | speedup mean (median) | speedup correct-only |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        rows = [(r.sequential_before, None), (r.sequential, None), (r.before and r.before.parallel, r.before),
                (r.parallel, r)]
        for s, pair in rows:
            if s is None:
                continue
            speed = f"{_num(pair.speedup, 2, 'x')} ({_num(pair.speedup_median, 2, 'x')})" if pair else "1.00x"
            correct = (f"{_num(pair.speedup_correct, 2, 'x')} ({len(pair.speedups_correct)} problems)" if pair
                       else "1.00x")
            lines.append(f"| {r.name} | {s.mode} | {s.model} | {s.problems} | {s.samples} | {_pct(s.accuracy)} | "
                         f"{_num(s.L_total)} | {_num(s.L_crit)} | {_pct(s.activation)} | {_pct(s.format_valid)} | "
                         f"{_num(s.wall_s, 3)} | {speed} | {correct} |")
    return "\n".join(lines)


def stage_table(r: BenchmarkReport, ceiling: float | None = None) -> str:
    """One benchmark's models as rows -- the baseline, the earlier parallel checkpoint (if decoded), the
    parallel model -- with accuracy, L_crit, token-latency speedup (mean and median over problems),
    wall-clock speedup and latency efficiency (both mean and median over problems: a burst of load that
    changed a few problems' times moves the median little), activation ratio, and the share of ``ceiling`` (the task's
    token-latency speedup ceiling) reached."""
    lines = ["| model | accuracy | L_crit | speedup mean (median) | wall-clock speedup mean (median) | "
             "latency efficiency mean (median) | "
             "activation |" + (" of ceiling |" if ceiling else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if ceiling else "")]

    def row(s, pair: BenchmarkReport | None) -> str:
        speed = f"{_num(pair.speedup, 2, 'x')} ({_num(pair.speedup_median, 2, 'x')})" if pair else "1.00x"
        wall = (f"{_num(pair.wall_speedup, 2, 'x')} ({_num(pair.wall_speedup_median, 2, 'x')})" if pair
                else "1.00x")
        efficiency = (f"{_num(pair.latency_efficiency, 2)} ({_num(pair.latency_efficiency_median, 2)})" if pair
                      else "-")
        share = (f" {_pct(pair.speedup / ceiling)} |" if pair else " |") if ceiling else ""
        return (f"| {s.model} | {_pct(s.accuracy)} | {_num(s.L_crit)} | {speed} | {wall} | {efficiency} | "
                f"{_pct(s.activation)} |" + share)

    lines.append(row(r.sequential, None))
    if r.before is not None:
        lines.append(row(r.before.parallel, r.before))
    lines.append(row(r.parallel, r))
    return "\n".join(lines)


def change_table(r: BenchmarkReport) -> str:
    """What the later training changed, model by model: accuracy, activation, L_crit and L_total of the earlier
    checkpoint and the final one (only the models whose earlier checkpoint was decoded)."""
    lines = ["| model | accuracy | activation | L_crit | L_total |", "|---|---:|---:|---:|---:|"]
    for old, new in ((r.sequential_before, r.sequential), (r.before and r.before.parallel, r.parallel)):
        if old is not None:
            lines.append(f"| {old.model} -> {new.model} | {_pct(old.accuracy)} -> {_pct(new.accuracy)} | "
                         f"{_pct(old.activation)} -> {_pct(new.activation)} | {_num(old.L_crit)} -> "
                         f"{_num(new.L_crit)} | {_num(old.L_total)} -> {_num(new.L_total)} |")
    return "\n".join(lines)


def turns_phrase(interleave: int) -> str:
    """How the models shared the machine during isolated decoding (``BenchmarkReport.interleave``)."""
    if interleave == 1:
        return "the models taking turns problem by problem, so that load changes hit them alike"
    if interleave > 1:
        return f"the models taking turns, {interleave} problems each, so that load changes hit them alike"
    return "each model decoding its problems in one pass"


def report_markdown(reports: Sequence[BenchmarkReport], title: str = "Evaluation") -> str:
    regime = {r.latency for r in reports}
    lines = [f"# {title}", "", main_table(reports), "",
             "Accuracy: mean over the k samples of every problem. Latency: mean critical-path length L_crit in "
             "model-generated tokens (a sequential answer's L_crit is its length). Speedup: mean over problems of "
             "mean L_crit(sequential baseline) / mean L_crit(parallel).", ""]
    for r in reports:
        if r.before is not None or r.sequential_before is not None:
            lines += [f"## What the later training changed ({r.name})", "", change_table(r), ""]
    lines += ["## Details", "", detail_table(reports), "",
             f"Wall-clock latency per problem ({', '.join(sorted(regime))} decoding): "
             + (f"each problem's samples decoded alone, {turns_phrase(reports[0].interleave)}."
                if regime == {"isolated"} else
                "problems decoded in one batch, so a problem's time includes waiting for the others "
                "(a throughput figure, not a single-problem latency)."),
             ""]
    for r in reports:
        lines.append(f"- {r.name}: wall-clock speedup {_num(r.wall_speedup, 2, 'x')} (median "
                     f"{_num(r.wall_speedup_median, 2, 'x')}), latency efficiency {_num(r.latency_efficiency, 2)} "
                     f"(median {_num(r.latency_efficiency_median, 2)}; wall-clock / token-latency speedup per "
                     "problem, mean and median over problems); "
                     f"{len(r.speedups)} problems in the speedup"
                     + (f", {r.undefined} left out (empty parallel answers)" if r.undefined else ""))
    return "\n".join(lines) + "\n"


def histogram(reports: Sequence[BenchmarkReport], path: str | Path) -> Path:
    """PNG of the per-problem speedup distributions (all samples, correct-only), one panel per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(5 * len(reports), 3.6), squeeze=False)
    for ax, r in zip(axes[0], reports):
        values = r.speedups + r.speedups_correct + [1.0]
        lo, hi = 0.95 * min(values), 1.05 * max(values)
        bins = [lo + (hi - lo) * i / 24 for i in range(25)]
        ax.hist(r.speedups, bins=bins, histtype="stepfilled", alpha=0.45, label=f"all samples ({len(r.speedups)})")
        if r.speedups_correct:
            ax.hist(r.speedups_correct, bins=bins, histtype="step", linewidth=2,
                    label=f"correct only ({len(r.speedups_correct)})")
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{r.name}: mean {_num(r.speedup, 2, 'x')}")
        ax.set_xlabel("speedup per problem (sequential L_crit / parallel L_crit)")
        ax.set_ylabel("problems")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (folders created) and free it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=100)
    plt.close(fig)
    return path


#: the panels of :func:`training_curves`: title, then (record kind, key, label) of every series it may hold
#: (RL records carry ``train/...`` and ``eval/MODE/...`` keys, SFT evaluation records bare ones)
CURVES = (
    ("reward", [("train", "train/reward", "train")]),
    ("accuracy", [("train", "train/correct", "train"), ("eval", "eval/parallel/accuracy", "held-out parallel"),
                  ("eval", "eval/sequential/accuracy", "held-out sequential"), ("eval", "accuracy", "held-out")]),
    ("activation (share with a parallel block)", [("train", "train/activation", "train"),
                                                  ("eval", "eval/parallel/activation", "held-out parallel"),
                                                  ("eval", "activation", "held-out")]),
    ("L_crit (tokens)", [("train", "train/L_crit", "train"), ("eval", "eval/parallel/L_crit", "held-out parallel"),
                         ("eval", "eval/sequential/L_crit", "held-out sequential"), ("eval", "L_crit", "held-out")]),
)


def training_curves(stages: Mapping[str, str | Path], path: str | Path) -> Path | None:
    """PNG of reward, accuracy, activation and ``L_crit`` over the training steps of each stage (name ->
    its ``metrics.jsonl``), one panel each; None when no stage has any of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = {name: read_records(f) for name, f in stages.items() if Path(f).is_file()}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    plotted = 0
    for ax, (title, series) in zip(axes.flat, CURVES):
        for name, recs in records.items():
            for kind, key, label in series:
                points = [(r["step"], r[key]) for r in recs if r.get("kind", "train") == kind
                          and isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker="o" if kind == "eval" or len(xs) < 20 else None, markersize=3,
                            linestyle="--" if kind == "eval" else "-", label=f"{name} {label}")
                    plotted += 1
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    if not plotted:
        plt.close(fig)
        return None
    return save_figure(fig, path)


def _inline(text: str) -> str:
    """Escaped text with markdown images, code spans and bold made HTML."""
    out = html.escape(text, quote=True)
    out = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", r'<img alt="\1" src="\2">', out)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def markdown_html(text: str, title: str) -> str:
    """A self-contained HTML page of a report's markdown (headings, tables, lists, images, paragraphs: what
    the reports use), every text escaped."""
    body, table = [], []

    def flush_table() -> None:
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|?[\s:|-]+\|?", r)]
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{_inline(c)}</th>" for c in cells[0])
            rest = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rest}</tbody></table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        heading = re.match(r"(#{1,6}) (.*)", line)
        if heading:
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}")
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
