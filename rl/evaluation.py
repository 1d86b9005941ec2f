"""Evaluation of a model's decoded trajectories: one module, one meaning per measure, used by the SFT stage's
held-out evaluation (``rl.sft_eval``), the P-GRPO held-out evaluation (:func:`evaluate_heldout`) and
``threadweaver eval`` (:func:`evaluate_benchmark`, rendered by ``cluster.report``).

Definitions (per trajectory, from ``rewards.score.score``):

* ``correct`` (its mean is ``accuracy``): the last ``\\boxed{}`` after
  ``</think>`` matches the reference (``rewards.answer`` finds it,
  ``rewards.checker`` decides); a response cut by a limit is incorrect unless
  ``reward.reward_cut_responses``;
* ``format_valid``: ``rollout.format.validate`` finds no broken rule in the
  text. EOS is **not** required: a response cut by a limit can be
  format-valid; cut responses are counted apart (``cut``, ``finish/<reason>``);
* ``parallel_valid``: format-valid and holding at least one block;
  ``activation``: the share holding at least one block (valid or not);
* ``L_total``, ``L_crit``, ``eta``, ``speedup`` (= ``L_total / L_crit``):
  model-generated tokens (``rollout.units.latency``);
* ``finish/<reason>``: the share of trajectories that ended for each reason
  of ``rollout.orchestrator.FINISH_REASONS``.

:func:`measures` computes these (``MEASURE_KEYS`` and ``finish/<reason>``) for all three evaluators, so
each reports them under the same names (``eval/<mode>/<key>`` during RL, ``eval/NAME/<mode>/<key>`` for a
benchmark, ``<key>`` in the SFT evaluator's metrics); each adds its own keys next to them.

Across modes (benchmarks, and the RL held-out evaluation when it decodes both modes): the per-problem
speedup is ``mean L_crit(sequential samples) / mean L_crit(parallel samples)``; the per-problem wall-clock
speedup is the slowest sequential sample's wall time / the slowest parallel sample's; **latency efficiency**
is the mean over problems of wall-clock speedup / token-latency speedup (1: the whole critical-path gain
reaches the clock); benchmark reports also give the medians over problems of both ratios. The SFT evaluator decodes one mode only and has no cross-mode measures.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from rewards.config import RewardConfig
from rewards.score import RewardItem, ScoreRecord, score, score_many
from rewards.tag_count import TagTokens
from rl.metrics import finish_shares, mean, trajectory_metrics
from rollout.config import RolloutConfig
from rollout.files import atomic_write
from rollout.units import unit_tokens

MODES = ("parallel", "sequential")

#: the measures every evaluator reports (plus ``finish/<reason>``), as :func:`measures` names them
MEASURE_KEYS = ("accuracy", "format_valid", "parallel_valid", "activation", "L_total", "L_crit", "eta", "speedup",
                "n_blocks")


def measures(trajectories: Sequence[Any], scores: Sequence[Any]) -> dict[str, float]:
    """The evaluation measures of decoded ``trajectories`` and their ``scores`` (``ScoreRecord``s, or anything
    with ``correct`` and ``format_valid``), one meaning each (module doc): means over the trajectories."""
    if len(trajectories) != len(scores):
        raise ValueError(f"{len(scores)} scores for {len(trajectories)} trajectories")
    pairs = list(zip(trajectories, scores))
    out = {
        "accuracy": mean([float(bool(s.correct)) for _, s in pairs]),
        "format_valid": mean([float(bool(s.format_valid)) for _, s in pairs]),
        "parallel_valid": mean([float(bool(s.format_valid) and t.n_blocks > 0) for t, s in pairs]),
        "activation": mean([float(t.n_blocks > 0) for t, _ in pairs]),
        "L_total": mean([float(t.L_total) for t, _ in pairs]),
        "L_crit": mean([float(t.L_crit) for t, _ in pairs]),
        "eta": mean([float(t.eta) for t, _ in pairs]),
        "speedup": mean([float(t.speedup) for t, _ in pairs]),
        "n_blocks": mean([float(t.n_blocks) for t, _ in pairs]),
    }
    out.update(finish_shares([t.finish_reason for t, _ in pairs], ""))
    return out


# --------------------------------------------------------------------------- one trajectory (SFT)


@dataclass
class EvalRecord:
    """One decoded validation prompt, judged (see the module doc for each field's meaning)."""

    index: int
    answer: str
    predicted: str | None
    correct: bool
    format_valid: bool
    parallel_valid: bool
    finish_reason: str
    L_total: int
    L_crit: int
    eta: float
    speedup: float
    n_blocks: int
    text: str
    unit_tokens: list[dict] | None = None  # per unit: rollout.units.UnitTokens (viewer pages); None: no units


def judge(trajectory, answer: str, checker, reward_cfg: RewardConfig | None = None) -> EvalRecord:
    """Score one trajectory against its reference ``answer`` (``checker``: ``rewards.checker.AnswerChecker``)."""
    rec: ScoreRecord = score(RewardItem(trajectory.text, answer, trajectory.units, trajectory.finish_reason),
                             reward_cfg or RewardConfig(), checker)
    return EvalRecord(
        index=trajectory.prompt_index, answer=answer, predicted=rec.extracted_answer, correct=bool(rec.correct),
        format_valid=rec.format_valid, parallel_valid=rec.format_valid and trajectory.n_blocks > 0,
        finish_reason=trajectory.finish_reason, L_total=trajectory.L_total, L_crit=trajectory.L_crit,
        eta=trajectory.eta, speedup=trajectory.speedup, n_blocks=trajectory.n_blocks, text=trajectory.text,
        unit_tokens=None if trajectory.units is None else unit_tokens(trajectory.units),
    )


def summarize(records: Sequence[EvalRecord]) -> dict[str, float]:
    """:func:`measures` of judged records (a record holds its trajectory's and its score's fields), and
    ``prompts``."""
    out = measures(records, records)
    out["prompts"] = float(len(records))
    return out


# --------------------------------------------------------------------------- held-out evaluation during RL


def records_file(run_dir: Path, step: int) -> Path:
    """Where an evaluation at ``step`` writes its decoded trajectories."""
    return run_dir / "eval" / f"step_{step:08d}.jsonl"


def evaluate_heldout(rollout: RolloutConfig, modes: Sequence[str], rollouts, reward_pool,
                     prompts: list[list[int]], answers: list[str], step: int,
                     run_dir: Path, tags: TagTokens | None = None) -> tuple[dict[str, float], Path]:
    """Greedy decoding of the held-out prompts in each mode; metrics ``eval/<mode>/...`` and the records file.

    ``tags``: the tokenizer's tag ids when the reward counts tokens by tag (``rewards.score.item_tags``).
    """
    metrics: dict[str, float] = {}
    samples: dict[str, list[Sample]] = {}
    start = time.perf_counter()
    out = records_file(run_dir, step)
    with atomic_write(out) as f:
        for mode in modes:
            rc = replace(rollout, temperature=0.0, n=1, sequential=mode == "sequential", seed=0)
            t0 = time.perf_counter()
            trajectories = rollouts.generate(prompts, rc)
            decode_s = time.perf_counter() - t0
            scores = reward_pool.score_batch([RewardItem(t.text, answers[t.prompt_index], t.units, t.finish_reason,
                                                         tags) for t in trajectories])
            m = trajectory_metrics(trajectories, scores, f"eval/{mode}/")  # reward and its parts, too
            del m[f"eval/{mode}/correct"]  # named accuracy, in measures
            m.update({f"eval/{mode}/{k}": v for k, v in measures(trajectories, scores).items()})
            m[f"eval/{mode}/decode_s"] = decode_s
            metrics.update(m)
            samples[mode] = to_samples(trajectories, scores)
            for t, s in zip(trajectories, scores):
                f.write(json.dumps({"step": step, "mode": mode, "index": t.prompt_index,
                                    "answer": answers[t.prompt_index], "text": t.text,
                                    "finish_reason": t.finish_reason, "L_total": t.L_total, "L_crit": t.L_crit,
                                    "eta": t.eta, "n_blocks": t.n_blocks, "unit_tokens": unit_tokens(t.units),
                                    **s.to_dict()}) + "\n")
    if "eval/parallel/L_crit" in metrics and "eval/sequential/L_total" in metrics:
        metrics["eval/crit_over_sequential"] = metrics["eval/parallel/L_crit"] / metrics["eval/sequential/L_total"]
    if len(samples) == 2:  # the prompts were decoded as one batch per mode: a throughput-regime figure
        metrics.update(cross_mode_latency(samples["parallel"], samples["sequential"], "eval/"))
    metrics["eval/seconds"] = time.perf_counter() - start
    return metrics, out


# --------------------------------------------------------------------------- benchmarks (threadweaver eval)


@dataclass
class Sample:
    """One scored sample."""

    problem: int
    sample: int
    correct: bool
    format_valid: bool
    L_total: int
    L_crit: int
    n_blocks: int
    latency_s: float
    finish_reason: str


@dataclass
class ModeSummary:
    """Means over all samples of one decoding mode (wall-clock: mean over problems)."""

    mode: str
    model: str
    samples: int
    problems: int
    accuracy: float
    L_total: float
    L_crit: float
    activation: float
    format_valid: float
    wall_s: float
    self_speedup: float  # mean L_total / L_crit of the samples
    measures: dict[str, float] = field(default_factory=dict)  # :func:`measures` of the samples


@dataclass
class BenchmarkReport:
    """Everything measured on one benchmark; ``speedups*`` hold one value per problem."""

    name: str
    k: int
    latency: str
    parallel: ModeSummary
    sequential: ModeSummary
    speedups: list[float]
    speedups_correct: list[float]
    speedup: float
    speedup_median: float
    speedup_correct: float | None
    wall_speedup: float  # mean over problems of sequential wall time / parallel wall time
    undefined: int  # problems left out of the speedups because a mean L_crit was 0
    latency_efficiency: float | None = None  # mean over problems of wall-clock speedup / token-latency speedup
    wall_speedup_median: float | None = None  # medians over problems of the same ratios: a problem whose times a
    latency_efficiency_median: float | None = None  # burst of load changed moves them little
    interleave: int = 0  # isolated latency: problems per turn of the models taking turns (0: one pass each)
    before: BenchmarkReport | None = None  # an earlier checkpoint of the parallel model against the same baseline
    sequential_before: ModeSummary | None = None  # an earlier checkpoint of the baseline

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat ``eval/NAME/...`` metrics for MLflow (None and NaN values left out); the earlier checkpoints'
        under ``eval/NAME/before/...``."""
        out: dict[str, float] = {}
        base = f"eval/{self.name}/{prefix}"
        for s in (self.parallel, self.sequential):
            out.update({f"{base}{s.mode}/{k}": v for k, v in _mode_metrics(s).items()})
        for key in ("speedup", "speedup_median", "speedup_correct", "wall_speedup", "wall_speedup_median",
                    "latency_efficiency", "latency_efficiency_median"):
            if getattr(self, key) is not None:
                out[f"{base}{key}"] = getattr(self, key)
        if self.before is not None:  # its sequential samples are this report's: logged once, above
            out.update({k: v for k, v in self.before.metrics("before/").items() if "/before/sequential/" not in k})
        if self.sequential_before is not None:
            out.update({f"{base}before/sequential/{k}": v for k, v in _mode_metrics(self.sequential_before).items()})
        return out


def _mode_metrics(s: ModeSummary) -> dict[str, float]:
    out = dict(s.measures)
    for key in ("accuracy", "L_total", "L_crit", "activation", "format_valid", "wall_s", "self_speedup"):
        out[key] = getattr(s, key)
    return {k: v for k, v in out.items() if not (isinstance(v, float) and v != v)}  # NaN: not measured


def to_samples(trajectories: Sequence[Any], scores: Sequence[Any]) -> list[Sample]:
    """Pair trajectories with their ``ScoreRecord``s."""
    if len(trajectories) != len(scores):
        raise ValueError(f"{len(scores)} scores for {len(trajectories)} trajectories")
    return [Sample(t.prompt_index, t.sample_index, bool(s.correct), bool(s.format_valid), t.L_total, t.L_crit,
                   t.n_blocks, t.latency_s, t.finish_reason) for t, s in zip(trajectories, scores)]


def summarize_mode(mode: str, model: str, samples: Sequence[Sample]) -> ModeSummary:
    by_problem: dict[int, list[Sample]] = {}
    for s in samples:
        by_problem.setdefault(s.problem, []).append(s)
    return ModeSummary(
        mode=mode, model=model, samples=len(samples), problems=len(by_problem),
        accuracy=mean([float(s.correct) for s in samples]), L_total=mean([s.L_total for s in samples]),
        L_crit=mean([s.L_crit for s in samples]), activation=mean([float(s.n_blocks > 0) for s in samples]),
        format_valid=mean([float(s.format_valid) for s in samples]),
        wall_s=mean([max(s.latency_s for s in group) for group in by_problem.values()]),
        self_speedup=mean([s.L_total / s.L_crit for s in samples if s.L_crit > 0]),
    )


def problem_speedups(parallel: Sequence[Sample], sequential: Sequence[Sample], correct_only: bool
                     ) -> tuple[dict[int, float], int]:
    """Per problem ``mean L_crit(sequential) / mean L_crit(parallel)``; and how many problems had a zero mean.

    With ``correct_only`` only correct samples count, and problems without a
    correct sample in either mode are left out (not counted as undefined).
    """
    def group(samples: Sequence[Sample]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for s in samples:
            if s.correct or not correct_only:
                out.setdefault(s.problem, []).append(s.L_crit)
        return out

    par, seq = group(parallel), group(sequential)
    ratios, undefined = {}, 0
    for p in sorted(set(par) & set(seq)):
        crit = mean(par[p])
        if crit <= 0:
            undefined += 1
            continue
        ratios[p] = mean(seq[p]) / crit
    return ratios, undefined


def wall_speedups(parallel: Sequence[Sample], sequential: Sequence[Sample]) -> dict[int, float]:
    """Per problem: wall time of its slowest sequential sample / that of its slowest parallel sample."""
    def slowest(samples: Sequence[Sample]) -> dict[int, float]:
        out: dict[int, float] = {}
        for s in samples:
            out[s.problem] = max(out.get(s.problem, 0.0), s.latency_s)
        return out

    par, seq = slowest(parallel), slowest(sequential)
    return {p: seq[p] / par[p] for p in sorted(par) if p in seq and par[p] > 0}


def efficiencies(wall_speedups: dict[int, float], token_speedups: dict[int, float]) -> list[float]:
    """Per problem, wall-clock speedup / token-latency speedup; problems missing from either, or with a zero
    token speedup, are left out."""
    return [wall_speedups[p] / token_speedups[p] for p in wall_speedups if token_speedups.get(p)]


def latency_efficiency(wall_speedups: dict[int, float], token_speedups: dict[int, float]) -> float | None:
    """Mean over problems of wall-clock speedup / token-latency speedup (1: the whole critical-path gain
    reaches the clock); see :func:`efficiencies`."""
    ratios = efficiencies(wall_speedups, token_speedups)
    return mean(ratios) if ratios else None


def cross_mode_latency(parallel: Sequence[Sample], sequential: Sequence[Sample], prefix: str) -> dict[str, float]:
    """``wall_speedup`` and ``latency_efficiency`` (when defined) of the same problems decoded in both modes."""
    token, _ = problem_speedups(parallel, sequential, correct_only=False)
    wall = wall_speedups(parallel, sequential)
    out = {f"{prefix}wall_speedup": mean(list(wall.values()))}
    efficiency = latency_efficiency(wall, token)
    if efficiency is not None:
        out[f"{prefix}latency_efficiency"] = efficiency
    return out


def score_mode(mode: str, model: str, trajectories: Sequence[Any], answers: Sequence[str], checker,
               reward_cfg: RewardConfig | None = None) -> tuple[ModeSummary, list[ScoreRecord]]:
    """One decoding mode's trajectories scored against ``answers`` (by ``prompt_index``) and summarised."""
    if not trajectories:
        raise ValueError(f"no {mode} trajectories")
    scores = score_many([RewardItem(t.text, answers[t.prompt_index], t.units, t.finish_reason)
                         for t in trajectories], reward_cfg or RewardConfig(), checker)  # unscorable: incorrect
    summary = replace(summarize_mode(mode, model, to_samples(trajectories, scores)),
                      measures=measures(trajectories, scores))
    return summary, scores


def evaluate_benchmark(parallel: Sequence[Any], sequential: Sequence[Any], answers: Sequence[str], checker,
                       reward_cfg: RewardConfig | None = None, name: str = "benchmark", latency: str = "isolated",
                       models: tuple[str, str] = ("parallel", "sequential baseline")
                       ) -> tuple[BenchmarkReport, dict[str, list]]:
    """Score both modes' trajectories against ``answers`` (by ``prompt_index``) and measure them.

    ``checker`` has ``check(pred, gold) -> Verdict`` (``rewards.checker.AnswerChecker``).
    Returns the report and the ``ScoreRecord``s of each mode, in trajectory order.
    """
    cfg = reward_cfg or RewardConfig()
    scores = {}
    samples = {}
    for mode, trajectories in (("parallel", parallel), ("sequential", sequential)):
        if not trajectories:
            raise ValueError(f"no {mode} trajectories")
        scores[mode] = score_many([RewardItem(t.text, answers[t.prompt_index], t.units, t.finish_reason)
                                   for t in trajectories], cfg, checker)  # an unscorable one: incorrect, warned
        samples[mode] = to_samples(trajectories, scores[mode])
    ks = {len([s for s in samples["parallel"] if s.problem == p]) for p in {s.problem for s in samples["parallel"]}}
    ratios, undefined = problem_speedups(samples["parallel"], samples["sequential"], correct_only=False)
    correct_ratios, _ = problem_speedups(samples["parallel"], samples["sequential"], correct_only=True)
    par_summary = replace(summarize_mode("parallel", models[0], samples["parallel"]),
                          measures=measures(parallel, scores["parallel"]))
    seq_summary = replace(summarize_mode("sequential", models[1], samples["sequential"]),
                          measures=measures(sequential, scores["sequential"]))
    wall_ratios = wall_speedups(samples["parallel"], samples["sequential"])
    effs = efficiencies(wall_ratios, ratios)
    report = BenchmarkReport(
        name=name, k=max(ks), latency=latency, parallel=par_summary, sequential=seq_summary,
        speedups=[ratios[p] for p in sorted(ratios)],
        speedups_correct=[correct_ratios[p] for p in sorted(correct_ratios)],
        speedup=mean(list(ratios.values())),
        speedup_median=statistics.median(ratios.values()) if ratios else float("nan"),
        speedup_correct=mean(list(correct_ratios.values())) if correct_ratios else None,
        wall_speedup=mean(list(wall_ratios.values())), undefined=undefined,
        latency_efficiency=mean(effs) if effs else None,
        wall_speedup_median=statistics.median(wall_ratios.values()) if wall_ratios else None,
        latency_efficiency_median=statistics.median(effs) if effs else None,
    )
    return report, scores
