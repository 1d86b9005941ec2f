"""The evaluation report: markdown tables in the layout of the paper's main table, a detailed table, and the
histogram of per-problem speedups (``threadweaver eval``, the pipeline's final stage).

Rendering only: the numbers come from :mod:`rl.evaluation` (``BenchmarkReport``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from rl.evaluation import BenchmarkReport
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
    return "\n".join([head, sep, seq, par])


def detail_table(reports: Sequence[BenchmarkReport]) -> str:
    """Every measure per benchmark and mode, as markdown."""
    lines = ["| benchmark | mode | model | problems | samples | accuracy | L_total | L_crit | activation | "
             "format-valid | wall s / problem | speedup mean (median) | speedup correct-only |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        for s in (r.sequential, r.parallel):
            par = s.mode == "parallel"
            speed = f"{_num(r.speedup, 2, 'x')} ({_num(r.speedup_median, 2, 'x')})" if par else "1.00x"
            correct = (f"{_num(r.speedup_correct, 2, 'x')} ({len(r.speedups_correct)} problems)" if par else "1.00x")
            lines.append(f"| {r.name} | {s.mode} | {s.model} | {s.problems} | {s.samples} | {_pct(s.accuracy)} | "
                         f"{_num(s.L_total)} | {_num(s.L_crit)} | {_pct(s.activation)} | {_pct(s.format_valid)} | "
                         f"{_num(s.wall_s, 3)} | {speed} | {correct} |")
    return "\n".join(lines)


def report_markdown(reports: Sequence[BenchmarkReport], title: str = "Evaluation") -> str:
    regime = {r.latency for r in reports}
    lines = [f"# {title}", "", main_table(reports), "",
             "Accuracy: mean over the k samples of every problem. Latency: mean critical-path length L_crit in "
             "model-generated tokens (a sequential answer's L_crit is its length). Speedup: mean over problems of "
             "mean L_crit(sequential baseline) / mean L_crit(parallel).", "", "## Details", "",
             detail_table(reports), "",
             f"Wall-clock latency per problem ({', '.join(sorted(regime))} decoding): "
             + ("each problem's samples decoded alone." if regime == {"isolated"} else
                "problems decoded in one batch, so a problem's time includes waiting for the others "
                "(a throughput figure, not a single-problem latency)."),
             ""]
    for r in reports:
        lines.append(f"- {r.name}: wall-clock speedup {_num(r.wall_speedup, 2, 'x')}, latency efficiency "
                     f"{_num(r.latency_efficiency, 2)} (wall-clock / token-latency speedup per problem); "
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
