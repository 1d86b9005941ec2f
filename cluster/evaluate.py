"""``threadweaver eval``: accuracy, token latency, speedup and wall-clock latency on JSONL or Parquet benchmarks.

What it really does, per benchmark file (one JSON object a line with a
problem and an answer field; MATH500's ``problem``/``answer`` and AIME's
``problem`` or ``question``/``answer`` layouts included):

1. wraps each problem in ``prompt_template`` and the tokenizer's chat
   template, and decodes ``k`` samples per problem with the spawn/join
   orchestrator (``rollout``: ``rollout.n`` samples, temperature, limits):
   the model in *parallel* mode, and the *sequential baseline*
   (``baseline_model``, default the same model) with spawning off;
2. scores every sample with the reward code (``rewards.score``: the last
   ``\\boxed{}`` after ``</think>`` checked against the reference by the
   fast rules, then math-verify under a time limit);
3. reports per mode: accuracy averaged over the k samples of every problem
   (avg@k, k = ``rollout.n``), mean ``L_total`` and ``L_crit`` (model-generated tokens),
   activation ratio (share of samples with at least one parallel block),
   format validity, and the wall-clock latency per problem (the time until
   the last of its k samples finished);
4. per problem, the token-latency speedup of the parallel model over the
   baseline: ``mean L_crit(sequential samples) / mean L_crit(parallel
   samples)`` (a sequential sample's ``L_crit`` is its ``L_total``); once over
   all samples and once over the correct samples only (problems with at
   least one correct sample in both modes). The report gives the mean and
   median over problems, and a histogram of their distribution.

Wall-clock latency: with ``latency: isolated`` (the default) each problem's
k samples are decoded alone, one problem after another, so a problem's time
is its own. The models measured that way take turns (``interleave`` problems
each, 1 by default): problem i is decoded by every model before problem i+1,
their weights reloaded in place between turns, so a change of the machine's
load during the evaluation hits every model alike instead of whichever model
was decoding then (``interleave: 0``: each model decodes all its problems in
one pass). With ``batched`` every problem of a mode is decoded in one batch
(fast) and a problem's time is the time from the batch start to its last
sample's end, which includes waiting for the others: a throughput figure,
labelled as such in the report.

Outputs in ``out``: ``report.md`` (the main table in the layout of the
paper's main table -- accuracy, latency, speedup per benchmark, one row per
model -- then a detailed table), ``speedup_hist.png``, ``summary.json``,
``NAME_{parallel,sequential}.jsonl`` (every sample with its score) and
``NAME_{parallel,sequential}.html`` (``threadweaver view`` pages of the first
``pages`` samples), and ``NAME_{parallel,sequential}_before.*`` of the earlier
checkpoints (``model_before``, ``baseline_before``: e.g. the RL stages' starting
points, decoded on the same engine with their weights reloaded in place; the
report then has a table of what the later training changed); metrics ``eval/NAME/...`` and these files go to one MLflow
run (``cluster.tracking``), or to the tracker the caller passes.

Usage: ``threadweaver eval [--config FILE] model=DIR 'data=[NAME=FILE.jsonl]' [key=value ...]``
(``rollout.n=4 rollout.temperature=1.0``, ``latency=batched``,
``rollout.dtype=bfloat16 rollout.enforce_eager=false`` on GPUs,
``tracking.enabled=false``; ``--show-config`` lists every key).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

from cluster.command import add_config_arguments, resolve
from cluster.config import to_dict
from cluster.lineage import log_source, run_context, source_of
from cluster.report import histogram, main_table, report_markdown
from cluster.tracking import Tracker, TrackingConfig
from cluster.viewer import write_page
from rewards.checker import AnswerChecker
from rewards.config import RewardConfig
from rl.evaluation import BenchmarkReport, evaluate_benchmark, score_mode
from rollout.config import RolloutConfig, check_ranges, set_runtime_defaults
from rollout.engine import VLLMEngine, make_llm, shutdown_llm
from rollout.files import atomic_write, check_model_dir, check_name, check_output_dir, write_text
from rollout.orchestrator import generate
from rollout.records import iter_records
from rollout.units import chat_prompt_ids
from rollout.weights import reload_in_place, same_architecture

@dataclass
class BenchEvalConfig:
    """Benchmarks, models and decoding of ``threadweaver eval``."""

    model: str | None = field(default=None, metadata={"help": "model folder decoded in parallel mode (required)"})
    baseline_model: str | None = field(default=None, metadata={
        "help": "sequential baseline model folder, decoded with spawning off (null: the same model)"})
    model_before: str | None = field(default=None, metadata={
        "help": "an earlier checkpoint of model (e.g. before RL), also decoded in parallel mode and compared with "
                "the same baseline; the report then shows what the later training changed (null: none)"})
    baseline_before: str | None = field(default=None, metadata={
        "help": "an earlier checkpoint of baseline_model (e.g. before RL), also decoded with spawning off "
                "(null: none)"})
    baseline_before_batched: bool = field(default=True, metadata={
        "help": "decode baseline_before in one batch whatever latency says: only its accuracy, activation and "
                "lengths are reported (its wall clock is compared with nothing)"})
    data: list[str] = field(default_factory=list, metadata={
        "help": "benchmark JSONL or Parquet files (verl's layout too); 'NAME=PATH' names one (default name: "
                "the file's stem)"})
    problem_fields: list[str] = field(default_factory=lambda: ["problem", "question", "prompt"], metadata={
        "help": "record fields holding the problem text, tried in order (the first string one is used)"})
    answer_field: str = field(default="answer", metadata={"help": "record field holding the reference answer"})
    prompt_template: str = field(default="{problem}", metadata={
        "help": "user-turn text around the problem ('{problem}' is replaced), before the chat template"})
    limit: int | None = field(default=None, metadata={
        "help": "first LIMIT problems of each benchmark (null: all)", "range": ">= 1"})
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(temperature=0.0, max_tokens=1024,
                                                                           max_context=2048), metadata={
        "help": "decoding of both modes: rollout.n samples per problem (accuracy is avg@n; n > 1 needs a "
                "temperature > 0), sampling, limits, engine dtype and tensor parallelism; rollout.sequential is "
                "set per mode, and the pool fields (workers, cpus/gpus_per_worker, weight_bucket_mb, weight_transfer) are unused: "
                "one engine runs in this process"})
    latency: Literal["isolated", "batched"] = field(default="isolated", metadata={
        "help": "isolated: decode each problem alone (true per-problem wall clock); batched: all at once (fast)"})
    interleave: int = field(default=1, metadata={
        "help": "isolated latency: problems each model decodes per turn, the models taking turns with their weights "
                "reloaded in place, so that load changes hit all alike (1: problem by problem; a reload costs "
                "nothing for a tiny model, seconds for a large one: raise it there; 0: each model decodes all its "
                "problems in one pass)", "range": ">= 0"})
    checker_timeout_s: float = field(default=5.0, metadata={
        "help": "math-verify time limit per answer (s)", "range": "> 0"})
    pages: int = field(default=20, metadata={
        "help": "samples per mode shown on the HTML viewer pages (0: none)", "range": ">= 0"})
    names: list[str] | None = field(default=None, metadata={
        "help": "row names of the model and the baseline in the tables, [MODEL, BASELINE] (null: folder names)"})
    out: str = field(default="runs/eval", metadata={"help": "output folder"})
    tracking: TrackingConfig = field(default_factory=TrackingConfig,
                                     metadata={"help": "MLflow (the pipeline passes its own run instead)"})

    def __post_init__(self) -> None:
        check_ranges(self)
        if not self.problem_fields:
            raise ValueError("problem_fields must name at least one field")
        if "{problem}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{problem}}', got {self.prompt_template!r}")
        if self.latency not in ("isolated", "batched"):
            raise ValueError(f"latency must be 'isolated' or 'batched', got {self.latency!r}")
        if self.names is not None and len(self.names) != 2:
            raise ValueError(f"names must be [MODEL, BASELINE], got {self.names}")
        if self.rollout.n > 1 and self.rollout.temperature == 0:
            raise ValueError(f"rollout.n={self.rollout.n} greedy samples (rollout.temperature=0) would all be the "
                             "same; set rollout.temperature (1.0 samples the model's distribution)")

    def rollout_config(self, sequential: bool) -> RolloutConfig:
        """The decoding of one mode: ``rollout`` with spawning on or off; greedy decoding is unseeded."""
        return replace(self.rollout, sequential=sequential,
                       seed=None if self.rollout.temperature == 0 else self.rollout.seed)


# --------------------------------------------------------------------------- benchmarks


@dataclass
class Problem:
    """One benchmark problem: its position, text and reference answer."""

    index: int
    problem: str
    answer: str


def parse_data_arg(item: str) -> tuple[str, Path]:
    """``"NAME=PATH"`` or ``"PATH"`` -> (name, path); the default name is the file's stem.

    The name becomes part of the output files' names (``NAME_parallel.jsonl``),
    so one that would leave the output folder (``sub/x``, ``../x``) is a ValueError.
    """
    if "=" in item and not Path(item).exists():
        name, path = item.split("=", 1)
        return check_name(name, "benchmark name"), Path(path)
    return check_name(Path(item).stem, "benchmark name"), Path(item)


def read_benchmark(path: str | Path, problem_fields: Sequence[str] = ("problem", "question", "prompt"),
                   answer_field: str = "answer", limit: int | None = None) -> list[Problem]:
    """The problems of a JSONL or Parquet file (this project's layout or verl's, ``rollout.records``).

    ValueError naming the line and the fields it has for a bad record.
    """
    problems = []
    for i, rec in iter_records(path):
        text = next((rec[k] for k in problem_fields if isinstance(rec.get(k), str)), None)
        if text is None:
            raise ValueError(f"{path}:{i}: none of the problem fields {list(problem_fields)} holds text "
                             f"(fields: {', '.join(sorted(rec))})")
        answer = rec.get(answer_field)
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"{path}:{i}: no string or number answer field '{answer_field}' "
                             f"(fields: {', '.join(sorted(rec))})")
        problems.append(Problem(len(problems), text, str(answer)))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


# --------------------------------------------------------------------------- decoding


def warm_up(engine, tokenizer, prompt: Sequence[int], rollout_cfg, eos) -> None:
    """A short untimed request (8 tokens of ``prompt``), so that no timed problem pays the engine's first steps."""
    warm = replace(rollout_cfg, n=1, max_tokens=min(8, rollout_cfg.max_tokens))
    generate(engine, tokenizer, [prompt], warm, eos_token_id=eos)


def decode(engine, tokenizer, prompts: Sequence[Sequence[int]], rollout_cfg, isolated: bool,
           eos_ids: Sequence[int] | None = None) -> list:
    """``rollout_cfg.n`` trajectories per prompt; ``isolated``: one problem at a time (own wall clock).

    ``eos_ids``: every EOS id of the model (``rollout.onboard.eos_token_ids``; default the tokenizer's).

    A short untimed warm-up request (the first prompt, 8 tokens) goes first, so
    the first problem's time does not include the engine's first steps. Isolated decoding shows a progress
    bar of the problems done.
    """
    eos = tokenizer.eos_token_id if eos_ids is None else list(eos_ids)
    warm_up(engine, tokenizer, prompts[0], rollout_cfg, eos)
    if not isolated:
        return generate(engine, tokenizer, prompts, rollout_cfg, eos_token_id=eos)
    from tqdm import tqdm  # lazy: only for isolated decoding

    out = []
    for i, p in enumerate(tqdm(prompts, desc="problems", unit="problem", leave=False)):
        out += generate(engine, tokenizer, [p], rollout_cfg, prompt_indices=[i], eos_token_id=eos)
    return out


def _model_name(path: Path) -> str:
    """A model folder's name for tables: ``.../run/checkpoints/step_N/hf`` reads ``run/step_N``."""
    parts = [p for p in path.resolve().parts if p not in ("hf", "checkpoints", "final")]
    return "/".join(parts[-2:]) if len(parts) >= 2 else path.name


def _write_records(path: Path, problems: Sequence[Problem], trajectories, scores) -> None:
    with atomic_write(path) as f:
        for t, s in zip(trajectories, scores):
            rec = {"problem": problems[t.prompt_index].problem, "answer": problems[t.prompt_index].answer}
            rec.update(t.to_dict())
            rec.update(s.to_dict())
            rec["response"] = t.text
            f.write(json.dumps(rec) + "\n")


def check_inputs(cfg: BenchEvalConfig) -> tuple[dict[str, list[Problem]], dict[str, Path]]:
    """What ``run_benchmarks`` checks before any engine or MLflow starts: benchmark names and records, the model
    folders, the output folder (created). Returns the problems per benchmark and the model folder per mode."""
    if not cfg.data:
        raise ValueError("no benchmark: give at least one data file")
    benches = [parse_data_arg(item) for item in cfg.data]
    names = [n for n, _ in benches]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark names repeat: {names}; name them NAME=PATH")
    problems = {name: read_benchmark(path, cfg.problem_fields, cfg.answer_field, cfg.limit) for name, path in benches}
    model_dirs = {"parallel": check_model_dir(cfg.model, "model"),
                  "sequential": check_model_dir(cfg.baseline_model or cfg.model, "baseline model")}
    for key, value, what in (("parallel_before", cfg.model_before, "model_before"),
                             ("sequential_before", cfg.baseline_before, "baseline_before")):
        if value is not None:
            model_dirs[key] = check_model_dir(value, what)
    check_output_dir(cfg.out)
    return problems, model_dirs


class EngineSwitch:
    """One vLLM engine for several models: a model with the same ``config.json`` as the loaded one has its
    weights reloaded in place (``rollout.weights.reload_in_place``, seconds) instead of a new engine
    (30-100 s on CPU). ``reloads`` and ``reload_s`` count the in-place reloads and their time."""

    def __init__(self, rollout: RolloutConfig):
        self.rollout, self.llm, self.loaded, self.config = rollout, None, None, None
        self.reloads, self.reload_s = 0, 0.0

    def load(self, model_dir: Path, verbose: bool = True):
        if self.llm is not None and Path(model_dir).resolve() == self.loaded:
            return self.llm
        config = json.loads((Path(model_dir) / "config.json").read_text())
        t0 = time.perf_counter()
        if self.llm is not None and config == self.config:
            reload_in_place(self.llm, model_dir)
            self.reloads += 1
            self.reload_s += time.perf_counter() - t0
            if verbose:
                print(f"eval: weights of {model_dir} loaded in place in {time.perf_counter() - t0:.1f} s", flush=True)
        else:
            self.close()
            ro = self.rollout
            self.llm = make_llm(model_dir, max_model_len=ro.max_context, seed=ro.seed if ro.seed is not None else 0,
                                dtype=ro.dtype, tensor_parallel_size=ro.tensor_parallel_size,
                                enforce_eager=ro.enforce_eager, gpu_memory_utilization=ro.gpu_memory_utilization)
            print(f"eval: engine on {model_dir} ready in {time.perf_counter() - t0:.0f} s", flush=True)
        self.loaded, self.config = Path(model_dir).resolve(), config
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            shutdown_llm(self.llm)
        self.llm = self.loaded = self.config = None


@dataclass
class _Decoder:
    """What one model needs to decode a benchmark: its folder, tokenizer, prompts, EOS ids and decoding."""

    model_dir: Path
    tokenizer: object
    prompts: list
    eos: list
    rollout: RolloutConfig

    @classmethod
    def of(cls, cfg: BenchEvalConfig, key: str, model_dir: Path, probs: Sequence[Problem],
           tokenizers: dict[Path, tuple]) -> _Decoder:
        """``tokenizers`` caches each model folder's (tokenizer, EOS ids) across benchmarks."""
        from rollout.onboard import eos_token_ids  # lazy: transformers takes seconds to import
        from rollout.tiny import load_tokenizer

        if model_dir not in tokenizers:
            tokenizer = load_tokenizer(model_dir)
            tokenizers[model_dir] = tokenizer, list(eos_token_ids(model_dir, tokenizer))
        tokenizer, eos = tokenizers[model_dir]
        prompts = [chat_prompt_ids(tokenizer, cfg.prompt_template.replace("{problem}", p.problem)) for p in probs]
        return cls(model_dir, tokenizer, prompts, eos, cfg.rollout_config(key.startswith("sequential")))


def turns(n_problems: int, keys: Sequence[str], per_turn: int) -> list[tuple[str, range]]:
    """The order of interleaved decoding: ``per_turn`` problems for each model in turn, the models' order
    reversed every round (the model that ends a round starts the next, saving a weight reload; and no model
    is always first)."""
    order, out = list(keys), []
    for start in range(0, n_problems, per_turn):
        out += [(key, range(start, min(start + per_turn, n_problems))) for key in order]
        order.reverse()
    return out


def decode_interleaved(engines: EngineSwitch, decoders: dict[str, _Decoder], per_turn: int) -> dict[str, list]:
    """Isolated decoding of one benchmark by several models taking turns (see :func:`turns`); returns every
    model's trajectories in problem order."""
    from tqdm import tqdm  # lazy: only for isolated decoding

    for d in decoders.values():
        warm_up(VLLMEngine(engines.load(d.model_dir, verbose=False)), d.tokenizer, d.prompts[0], d.rollout, d.eos)
    n = len(next(iter(decoders.values())).prompts)
    out: dict[str, list] = {key: [] for key in decoders}
    reloads, reload_s = engines.reloads, engines.reload_s
    with tqdm(total=n * len(decoders), desc="problems x models", unit="problem", leave=False) as bar:
        for key, problems in turns(n, list(decoders), per_turn):
            d = decoders[key]
            engine = VLLMEngine(engines.load(d.model_dir, verbose=False))
            for i in problems:
                out[key] += generate(engine, d.tokenizer, [d.prompts[i]], d.rollout, prompt_indices=[i],
                                     eos_token_id=d.eos)
                bar.update()
    print(f"eval: {len(decoders)} models took turns, {per_turn} problem(s) each; {engines.reloads - reloads} "
          f"weight reloads took {engines.reload_s - reload_s:.1f} s (untimed)", flush=True)
    return out


def isolated_keys(cfg: BenchEvalConfig, model_dirs: dict[str, Path]) -> list[str]:
    """The models whose wall clock is measured problem by problem (all but a batched ``baseline_before``)."""
    return [k for k in model_dirs if cfg.latency == "isolated"
            and not (k == "sequential_before" and cfg.baseline_before_batched)]


def interleaved_keys(cfg: BenchEvalConfig, model_dirs: dict[str, Path]) -> list[str]:
    """The models that take turns (``cfg.interleave``): the isolated ones, when there are several and one
    engine can serve them all; else none."""
    keys = isolated_keys(cfg, model_dirs)
    if not cfg.interleave or len(keys) < 2 or not same_architecture(*[model_dirs[k] for k in keys]):
        return []
    return keys


def decode_all(cfg: BenchEvalConfig, problems: dict[str, list[Problem]], model_dirs: dict[str, Path],
               interleaved: Sequence[str] = ()) -> dict[str, dict[str, list]]:
    """Every benchmark decoded by every model of ``model_dirs`` (keys ``parallel``, ``sequential``, and the
    earlier checkpoints ``parallel_before``, ``sequential_before``), on one engine where the models allow.

    The models of ``interleaved`` (:func:`interleaved_keys`) take turns (``cfg.interleave``); the others
    decode in one pass afterwards, each problem alone if it is measured so (:func:`isolated_keys`)."""
    isolated = isolated_keys(cfg, model_dirs)
    if cfg.interleave and len(isolated) > 1 and not interleaved:
        print("eval: the models' config.json differ, so one engine cannot serve them all: each decodes in one "
              "pass (interleave needs one architecture)", flush=True)
    trajectories: dict[str, dict[str, list]] = {name: {} for name in problems}
    tokenizers: dict[Path, tuple] = {}
    engines = EngineSwitch(cfg.rollout)
    try:
        for name, probs in problems.items():
            if interleaved:
                t0 = time.perf_counter()
                decoders = {k: _Decoder.of(cfg, k, model_dirs[k], probs, tokenizers) for k in interleaved}
                trajectories[name].update(decode_interleaved(engines, decoders, cfg.interleave))
                print(f"eval: {name} {', '.join(interleaved)}: {len(probs)} problems each in "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
        for key, model_dir in model_dirs.items():
            if key in interleaved:
                continue
            engine = VLLMEngine(engines.load(model_dir))
            for name, probs in problems.items():
                d = _Decoder.of(cfg, key, model_dir, probs, tokenizers)
                t0 = time.perf_counter()
                trajectories[name][key] = decode(engine, d.tokenizer, d.prompts, d.rollout, key in isolated, d.eos)
                print(f"eval: {name} {key}: {len(trajectories[name][key])} samples in "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        engines.close()
    return {name: {k: runs[k] for k in model_dirs} for name, runs in trajectories.items()}


def run_benchmarks(cfg: BenchEvalConfig, tracker=None, models: tuple[str, str] | None = None,
                   tags: dict[str, str] | None = None, before_models: tuple[str, str] | None = None
                   ) -> list[BenchmarkReport]:
    """Decode, score and report every benchmark of ``cfg`` (see module doc); returns the reports.

    ``tracker`` (a ``cluster.tracking.Tracker`` already started) receives the
    metrics and files; without one, a run is opened from ``cfg.tracking``
    with ``tags``. ``models`` names the parallel model and the baseline in the
    tables, ``before_models`` their earlier checkpoints (``model_before``,
    ``baseline_before``), which are decoded and scored the same way (the
    earlier parallel model against the final baseline's samples). The run is
    tagged with the runs and logged models that made both checkpoints
    (``cluster.lineage``), and the metrics are also attached to the evaluated
    model's logged model when it is in the same store.
    """
    problems, model_dirs = check_inputs(cfg)
    models = models or (f"{_model_name(model_dirs['parallel'])} (parallel decoding)",
                        f"{_model_name(model_dirs['sequential'])} (sequential decoding)")
    labels = {"parallel": models[0], "sequential": models[1]}
    for i, key in enumerate(("parallel_before", "sequential_before")):
        if key in model_dirs:
            labels[key] = (before_models[i] if before_models else
                           f"{_model_name(model_dirs[key])} ({key.split('_')[0]} decoding)")
    out = Path(cfg.out)

    own_tracker = tracker is None
    if own_tracker:
        tracker = Tracker(cfg.tracking, out, tags=tags)
        tracker.start(to_dict(cfg, flat=True), tags={"stage": "eval"})
    source = log_source(tracker, model_dirs["parallel"])
    baseline = source_of(model_dirs["sequential"])
    if baseline.get("run_id"):
        tracker.set_tags({"threadweaver.baseline_source_run_id": baseline["run_id"]})
    status = "FAILED"
    try:
        interleaved = interleaved_keys(cfg, model_dirs)
        trajectories = decode_all(cfg, problems, model_dirs, interleaved)
        turns_of = cfg.interleave if {"parallel", "sequential"} <= set(interleaved) else 0
        reports = []
        reward_cfg = RewardConfig(checker_timeout_s=cfg.checker_timeout_s)
        with AnswerChecker(cfg.checker_timeout_s, eager=False) as checker:
            for name, probs in problems.items():
                report, scores = _score_benchmark(cfg, name, [p.answer for p in probs], trajectories[name],
                                                  labels, checker, reward_cfg)
                report.interleave = turns_of
                reports.append(report)
                for key, runs in trajectories[name].items():
                    records = out / f"{name}_{key}.jsonl"
                    _write_records(records, probs, runs, scores[key])
                    tracker.log_artifact(records, "eval")
                    if cfg.pages:
                        n = cfg.pages
                        title = f"{name}: {key.split('_')[0]} decoding ({labels[key]})"
                        page = write_page(out / f"{name}_{key}.html", runs[:n], scores[key][:n], title=title)
                        tracker.log_artifact(page, "pages")
                tracker.log_metrics(report.metrics(), 0)
                if source.get("model_id") and source.get("tracking_uri") == tracker.uri:
                    tracker.log_model_metrics(source["model_id"], report.metrics(), 0)
        write_report(reports, out, tracker)
        status = "FINISHED"
        return reports
    finally:
        if own_tracker:
            tracker.finish(status)


def _score_benchmark(cfg: BenchEvalConfig, name: str, answers: list[str], runs: dict[str, list],
                     labels: dict[str, str], checker, reward_cfg: RewardConfig
                     ) -> tuple[BenchmarkReport, dict[str, list]]:
    """The report of one benchmark (with the earlier checkpoints' when decoded) and every decoding's scores."""
    models = (labels["parallel"], labels["sequential"])
    report, scores = evaluate_benchmark(runs["parallel"], runs["sequential"], answers, checker, reward_cfg, name,
                                        cfg.latency, models)
    if "parallel_before" in runs:
        report.before, before = evaluate_benchmark(runs["parallel_before"], runs["sequential"], answers, checker,
                                                   reward_cfg, name, cfg.latency,
                                                   (labels["parallel_before"], models[1]))
        scores["parallel_before"] = before["parallel"]
    if "sequential_before" in runs:
        report.sequential_before, scores["sequential_before"] = score_mode(
            "sequential", labels["sequential_before"], runs["sequential_before"], answers, checker, reward_cfg)
        if cfg.baseline_before_batched:  # a batch's times are no single-problem latency
            report.sequential_before.wall_s = float("nan")
    return report, scores


def write_report(reports: Sequence[BenchmarkReport], out: str | Path, tracker=None,
                 title: str = "Evaluation") -> Path:
    """``report.md``, ``speedup_hist.png`` and ``summary.json`` in ``out`` (also logged to ``tracker``)."""
    out = Path(out)
    md = write_text(out / "report.md", report_markdown(reports, title))
    png = histogram(reports, out / "speedup_hist.png")
    summary = write_text(out / "summary.json", json.dumps([asdict(r) for r in reports], indent=1))
    if tracker is not None:
        for path in (md, png, summary):
            tracker.log_artifact(path)
    return md


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "model=runs/rl/final 'data=[math500=/data/math500.jsonl]' rollout.n=4 "
                                 "rollout.temperature=1 latency=batched")


def run(args: argparse.Namespace) -> int:
    cfg, code = resolve(BenchEvalConfig, args, "eval")
    if cfg is None:
        return code
    set_runtime_defaults()
    try:
        if not cfg.data:
            raise ValueError("name at least one benchmark: data=[NAME=FILE.jsonl, ...]")
        reports = run_benchmarks(cfg, models=tuple(cfg.names) if cfg.names else None,
                                 tags=run_context("eval", args.config))
    except (OSError, ValueError) as e:
        print(f"threadweaver eval: {e}", file=sys.stderr)
        return 2
    print()
    print(main_table(reports))
    print(f"\nreport: {Path(cfg.out) / 'report.md'}, histogram: {Path(cfg.out) / 'speedup_hist.png'}")
    return 0
