"""``threadweaver run FILE.yaml``: the whole method in one command, tracked as one MLflow run.

Stages, in order, each an MLflow child run of the pipeline's parent run:

1. ``data``: the synthetic task (``data``: knobs, split sizes, seed) written
   to ``RUN_DIR/data`` (``rl.sft_data.ensure_task_data``); logs the reference
   responses' mean ``L_total``/``L_crit``/``eta``;
2. ``sft_parallel`` and ``sft_sequential``: the SFT stage (``rl.sft.train``)
   twice from the same ``sft`` config, on the parallel layout (the
   orchestrator's units, trie-packed) and on the sequential layout (the same
   responses flattened; ``sft_sequential`` overrides on top) -- the
   sequential baseline;
3. ``selftrain`` (only when the section is present): stage 2 of data-gen
   samples the parallel SFT model on the training prompts and keeps the
   format-valid correct trajectories (``rl.datagen``), then SFT goes on
   from the parallel SFT checkpoint on those records (``selftrain_sft``
   overrides on top of ``sft``);
4. ``rl_parallel`` and ``rl_sequential`` (only when ``rl`` is present):
   P-GRPO (``cluster.cmd_rl.run_rl``) from each SFT checkpoint; the baseline run
   decodes with spawning off (``rl_sequential`` overrides, by default
   ``rollout.sequential=true`` and ``eval.modes=[sequential]``);
5. ``eval``: ``threadweaver eval`` (:mod:`cluster.evaluate`) of the last
   parallel model against the last sequential baseline, on the task's test
   split (and any benchmark files listed in ``eval.data``): the report
   table, the speedup histogram, viewer pages.

Each stage's config is the pipeline's section, with the section's dotted
overrides of that stage (``sft_sequential``, ...) and then the *wiring* set
by the pipeline (run folders, model and data paths, tracking), composed in
memory (``cluster.config.override`` and ``with_values``), so it is checked
like any command's config; the section as given is written to
``RUN_DIR/STAGE/stage_config.yaml``.
Every stage's run is created as a child of the parent run (``mlflow.parentRunId``
from the start), with the command's context tags (``cluster.lineage``). The SFT
and RL stages log their metrics live into their child runs, their data files
as dataset inputs, the checkpoint they start from as lineage, and their final
checkpoint as a logged model; the pipeline adds their summaries and the viewer
pages of their last held-out decoding. The data, self-training and eval stages
are logged by the pipeline.

While it runs the pipeline prints ``stage i of N`` with the elapsed time and an
estimate of the time left (the mean time of the stages finished so far, reused
ones included, times the stages left).

``RUN_DIR/pipeline.json`` records every finished stage and its outputs, and
``RUN_DIR/report.md`` ends the run: the evaluation table, the stage times, the training curves
(``training_curves.png``) and the speedup histogram; ``report.html`` is its rendering.
A ``RUN_DIR`` that already holds a stage's folder is refused unless
``reuse: true``, which takes the outputs of the stages recorded as finished
in ``pipeline.json`` as they are (each reuse is printed) and runs the rest;
the folder of a stage that did not finish (an interrupted run) is renamed
``STAGE.incomplete-N`` and the stage runs again.
Ray is started once for all stages (or joined: ``ray.address`` /
``RAY_ADDRESS``; a Ray this process already runs is used as it is), and not
at all when every stage is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from cluster.cmd_rl import RLRunConfig, run_rl
from cluster.cmd_rl import roles as rl_roles
from cluster.cmd_sft import run_sft
from cluster.cmd_sft import roles as sft_roles
from cluster.command import add_config_arguments, resolve
from cluster.config import ConfigError, override, to_dict, with_values
from cluster.evaluate import BenchEvalConfig, parse_data_arg, read_benchmark, run_benchmarks
from cluster.lineage import run_context
from cluster.ray_setup import RayConfig, init_ray
from cluster.report import change_table, markdown_html, stage_table, training_curves, turns_phrase
from cluster.tracking import Tracker, TrackingConfig, resolve_uri
from cluster.viewer import eval_page
from rewards.checker import AnswerChecker
from rl.datagen.stage2 import Stage2Config, pool_sampler, run_stage2
from rl.sft import SFTConfig
from rl.sft_data import TaskData, ensure_task_data
from rollout.config import set_runtime_defaults
from rollout.files import check_model_dir, check_output_dir, write_text
from rollout.records import read_records
from rollout.task import ceiling
from rollout.units import latency, replay

STAGES = ("data", "sft_parallel", "sft_sequential", "selftrain", "rl_parallel", "rl_sequential", "eval")


@dataclass
class TaskDataConfig(TaskData):
    """The synthetic task the pipeline trains and tests on (:class:`rl.sft_data.TaskData`; its test split is the
    evaluation's benchmark, so it holds at least one problem)."""

    test_size: int = field(default=200, metadata={
        "help": "test problems, the evaluation's benchmark (count)", "range": ">= 1"})


@dataclass
class PipelineConfig:
    """Every stage of the method, wired together (see the module doc for what the pipeline sets itself)."""

    run_dir: str = field(default="runs/pipeline", metadata={"help": "output folder; one sub-folder per stage"})
    reuse: bool = field(default=False, metadata={
        "help": "take the outputs of stages already finished in RUN_DIR (pipeline.json) instead of refusing"})
    data: TaskDataConfig = field(default_factory=TaskDataConfig, metadata={"help": "the synthetic task"})
    sft: SFTConfig = field(default_factory=SFTConfig, metadata={
        "help": "SFT stage (run twice: parallel layout and the sequential baseline)"})
    sft_sequential: list[str] = field(default_factory=list, metadata={
        "help": "dotted SFT overrides for the sequential baseline only, e.g. ['steps=200']"})
    selftrain: Stage2Config | None = field(default=None, metadata={
        "help": "self-training: stage 2 of data-gen on the parallel SFT model, then more SFT (null: skipped)"})
    selftrain_sft: list[str] = field(default_factory=lambda: ["steps=50"], metadata={
        "help": "dotted SFT overrides for the SFT round on the self-training records"})
    rl: RLRunConfig | None = field(default=None, metadata={
        "help": "P-GRPO stage, run from each SFT checkpoint (null: skipped; evaluation then uses the SFT models)"})
    rl_sequential: list[str] = field(default_factory=lambda: ["rollout.sequential=true", "eval.modes=[sequential]"],
                                     metadata={"help": "dotted RL overrides for the sequential baseline only"})
    eval: BenchEvalConfig = field(default_factory=BenchEvalConfig, metadata={
        "help": "final evaluation; model, baseline_model and out are set by the pipeline, and the task's test "
                "split is added to data as 'tiny'"})
    eval_rl_start: bool = field(default=True, metadata={
        "help": "with an rl section, the evaluation also decodes the checkpoints the RL stages started from "
                "(eval.model_before, eval.baseline_before), so the report shows what RL changed"})
    tracking: TrackingConfig = field(default_factory=TrackingConfig,
                                     metadata={"help": "MLflow: the parent run; every stage is a child run"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "Ray, shared by all stages"})


# --------------------------------------------------------------------------- stage configs


def stage_config(cls: type, base: Any, path: Path, overrides: list[str], wiring: dict[str, Any] | None = None):
    """``base`` (a config section) as a ``cls`` with the user's dotted ``overrides``, then the pipeline's
    ``wiring`` (typed values by dotted key), composed in memory. The section as given is written to ``path``
    for the user."""
    write_text(path, yaml.safe_dump(to_dict(base), sort_keys=False))
    return with_values(override(cls, base, overrides), wiring or {})


def check_config(cfg: PipelineConfig) -> None:
    """Refuse what cannot work, before any stage runs; ConfigError/ValueError name the key."""
    override(SFTConfig, cfg.sft, cfg.sft_sequential)
    override(SFTConfig, cfg.sft, cfg.selftrain_sft)
    if cfg.rl is not None:
        override(RLRunConfig, cfg.rl, cfg.rl_sequential)
    if cfg.sft.model.path is not None:
        check_model_dir(cfg.sft.model.path, "sft.model.path")
    names = ["tiny"] + [parse_data_arg(item)[0] for item in cfg.eval.data]  # the test split is 'tiny'
    if len(set(names)) != len(names):
        raise ValueError(f"eval.data: benchmark names repeat: {names} (the task's test split is 'tiny')")
    for _, path in map(parse_data_arg, cfg.eval.data):
        read_benchmark(path, cfg.eval.problem_fields, cfg.eval.answer_field, cfg.eval.limit)


# --------------------------------------------------------------------------- tracking


class Runs:
    """The parent MLflow run and one child tracker per stage, all in one store, all with the ``context`` tags."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path, context: dict[str, str] | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.context = dict(context or {})
        self.uri = resolve_uri(cfg.tracking) if cfg.tracking.enabled else None
        self.parent = Tracker(self.tracking_config(cfg.tracking.run_name or run_dir.name), run_dir, tags=context)
        self.parent_id = self.parent.start(to_dict(cfg, flat=True), tags={"stage": "pipeline"})

    def tracking_config(self, run_name: str) -> TrackingConfig:
        """The pipeline's tracking settings for a run named ``run_name``, in the pipeline's store."""
        return replace(self.cfg.tracking, uri=self.uri, run_name=run_name)

    def tags(self, stage: str) -> dict[str, str]:
        """The tags of a stage's run: the context, the stage, and the parent run."""
        tags = {**self.context, "stage": stage}
        if self.parent_id:
            tags["mlflow.parentRunId"] = self.parent_id
        return tags

    def tracker(self, stage: str, stage_dir: Path) -> Tracker:
        """A child tracker, not started yet (the stage starts it with its parameters)."""
        return Tracker(self.tracking_config(stage), stage_dir, tags=self.tags(stage))

    def child(self, stage: str, stage_dir: Path, params: dict) -> Tracker:
        """A child tracker, started with ``params``."""
        tracker = self.tracker(stage, stage_dir)
        tracker.start(params)
        return tracker


def log_last_eval_page(tracker, stage_dir: Path, title: str) -> Path | None:
    """Render the stage's newest ``eval/step_N.jsonl`` with the viewer and log the page; None if there is none."""
    files = sorted((stage_dir / "eval").glob("step_*.jsonl"))
    if not files:
        return None
    page = eval_page(files[-1], f"{title}: {files[-1].stem}")
    if page is not None:
        tracker.log_artifact(page, "pages")
    return page


# --------------------------------------------------------------------------- the stages


def _reference_stats(data_dir: Path, limit: int = 200) -> dict[str, float]:
    """Mean L_total, L_crit, eta of the validation split's reference responses, in the tiny tokenizer's tokens."""
    from rollout.tiny import build_tokenizer  # lazy: transformers takes seconds to import

    tokenizer = build_tokenizer()
    records = [json.loads(x) for x in (data_dir / "validation.jsonl").read_text().splitlines()[:limit]]
    out = {}
    for name in ("parallel", "sequential"):
        lats = [latency(replay([], r[f"response_{name}"], tokenizer, tokenizer.eos_token_id)) for r in records]
        for key in ("L_total", "L_crit", "eta"):
            out[f"reference/{name}/{key}"] = sum(getattr(x, key) for x in lats) / len(lats)
    return out


def _ceiling(data_dir: Path) -> dict[str, float]:
    """The task's token-latency ceiling on the test split (``rollout.task.ceiling``), as ``ceiling/...`` metrics."""
    from rollout.tiny import build_tokenizer  # lazy: transformers takes seconds to import

    c = ceiling(read_records(data_dir / "test.jsonl"), build_tokenizer())
    return {f"ceiling/{k}": float(v) for k, v in asdict(c).items()}


def planned_stages(cfg: PipelineConfig) -> list[str]:
    """The stages this config runs, in order."""
    skipped = set() if cfg.selftrain is not None else {"selftrain"}
    if cfg.rl is None:
        skipped |= {"rl_parallel", "rl_sequential"}
    return [s for s in STAGES if s not in skipped]


class Progress:
    """``stage i of N``, the elapsed time and the time left, estimated as the mean time of the stages finished
    so far times the stages left (no estimate before the first one)."""

    def __init__(self, stages: list[str], t_start: float):
        self.stages = stages
        self.t_start = t_start
        self.times: dict[str, float] = {}

    def done(self, name: str, seconds: float) -> None:
        self.times[name] = seconds

    def line(self, name: str, now: float) -> str:
        i = self.stages.index(name) + 1
        text = f"stage {i} of {len(self.stages)}: {name}, {(now - self.t_start) / 60:.1f} min elapsed"
        if self.times:
            left = len(self.stages) - len(self.times)
            text += f", about {left * sum(self.times.values()) / len(self.times) / 60:.0f} min left"
        return text


def read_record(record_file: Path) -> dict:
    """``pipeline.json``: the finished stages and their outputs (``{"stages": {}}`` when there is none yet)."""
    if not record_file.exists():
        return {"stages": {}}
    try:
        record = json.loads(record_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{record_file} is not valid JSON ({e}); delete it to run every stage again") from None
    stages = record.get("stages") if isinstance(record, dict) else None
    if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
        raise ValueError(f"{record_file} has no 'stages' mapping; delete it to run every stage again")
    return record


def run_pipeline(cfg: PipelineConfig, config_files: list[str] = ()) -> dict:
    """Run every stage (see module doc); returns the record also written to ``pipeline.json``.
    ``config_files`` (the YAML the config came from) are named in the runs' tags."""
    check_config(cfg)
    run_dir = check_output_dir(cfg.run_dir, "run_dir")
    record_file = run_dir / "pipeline.json"
    record = read_record(record_file)
    if record["stages"] and not cfg.reuse:
        raise ValueError(f"{run_dir} already holds pipeline stages {sorted(record['stages'])}; set reuse=true to "
                         "take their outputs, or choose another run_dir")
    for name, done in record["stages"].items():
        output = done.get("checkpoint") or done.get("dir") or done.get("report")
        if output and not Path(output).exists():
            raise ValueError(f"{record_file} records stage {name} as finished, but its output {output} is "
                             f"missing; remove the stage from {record_file.name} to run it again")
    for stage in STAGES:
        if (run_dir / stage).exists() and stage not in record["stages"]:
            if not cfg.reuse:
                raise ValueError(f"{run_dir / stage} exists but did not finish (not in pipeline.json); set "
                                 "reuse=true to keep it aside and run the stage again, delete it, or choose "
                                 "another run_dir")
            aside = next(run_dir / f"{stage}.incomplete-{k}" for k in range(1, 10**6)
                         if not (run_dir / f"{stage}.incomplete-{k}").exists())
            (run_dir / stage).rename(aside)
            print(f"pipeline: stage {stage} did not finish last time; its folder is kept as {aside}", flush=True)

    plan = sft_roles(cfg.sft)
    if cfg.rl is not None:
        plan = max([plan, rl_roles(cfg.rl)], key=lambda roles: sum(r.total_cpus for r in roles))
    # a pipeline whose every stage is recorded (reuse=true) only writes its report again: no Ray to start
    pending = [name for name in planned_stages(cfg) if name not in record["stages"]]
    started_ray = init_ray(cfg.ray, plan) if pending else False
    runs = Runs(cfg, run_dir, run_context("run", config_files))
    if runs.parent_id:
        print(f"pipeline: MLflow parent run {runs.parent_id} at {runs.uri}", flush=True)
    status = "FAILED"
    t_start = time.perf_counter()
    progress = Progress(planned_stages(cfg), t_start)

    def stage(name: str, body: Callable[[Path], dict]) -> dict:
        if name in record["stages"]:
            print(f"pipeline: reusing stage {name} from {run_dir / name}", flush=True)
            progress.done(name, record["stages"][name].get("wall_s", 0.0))
            return record["stages"][name]
        print(f"\n=== pipeline: {progress.line(name, time.perf_counter())} ===", flush=True)
        t0 = time.perf_counter()
        load_start = os.getloadavg()
        out = body(run_dir / name)  # a stage that raises is never recorded: reuse=true runs it again
        out["wall_s"] = time.perf_counter() - t0
        out["load"] = [list(load_start), list(os.getloadavg())]  # 1, 5, 15-minute load averages: start, end
        record["stages"][name] = out
        write_text(record_file, json.dumps(record, indent=1))
        runs.parent.log_metrics({f"time/{name}_s": out["wall_s"]}, 0)
        progress.done(name, out["wall_s"])
        print(f"pipeline: stage {name} done in {out['wall_s'] / 60:.1f} min", flush=True)
        return out

    try:
        data = stage("data", lambda d: _stage_data(cfg, d, runs))
        sft_par = stage("sft_parallel", lambda d: _stage_sft(cfg, d, runs, data["dir"], "parallel", []))
        sft_seq = stage("sft_sequential", lambda d: _stage_sft(cfg, d, runs, data["dir"], "sequential",
                                                                cfg.sft_sequential))
        par_model, seq_model = sft_par["checkpoint"], sft_seq["checkpoint"]
        names = ["ThreadWeaver (SFT)", "sequential baseline (SFT)"]
        if cfg.selftrain is not None:
            st = stage("selftrain", lambda d: _stage_selftrain(cfg, d, runs, data["dir"], par_model))
            par_model = st["checkpoint"]
            names[0] = "ThreadWeaver (SFT + self-training)"
        before = None
        if cfg.rl is not None:
            rl_par = stage("rl_parallel", lambda d: _stage_rl(cfg, d, runs, data["dir"], par_model, []))
            rl_seq = stage("rl_sequential", lambda d: _stage_rl(cfg, d, runs, data["dir"], seq_model,
                                                                 cfg.rl_sequential))
            if cfg.eval_rl_start:
                before = {"models": (par_model, seq_model), "names": tuple(names)}
            par_model, seq_model = rl_par["checkpoint"], rl_seq["checkpoint"]
            names = [names[0][:-1] + " + P-GRPO)", "sequential baseline (SFT + RL)"]
        ev = stage("eval", lambda d: _stage_eval(cfg, d, runs, data["dir"], par_model, seq_model, tuple(names),
                                                 before, data.get("ceiling")))
        total = time.perf_counter() - t_start
        report = _final_report(run_dir, record, ev, total)
        for path in (report, run_dir / "report.html", run_dir / "training_curves.png"):
            if path.is_file():
                runs.parent.log_artifact(path)
        runs.parent.log_artifact(record_file)
        runs.parent.log_metrics({k: v for k, v in ev["metrics"].items()} | {"time/total_s": total}, 0)
        record["wall_s"] = total
        write_text(record_file, json.dumps(record, indent=1))
        status = "FINISHED"
        return record
    finally:
        runs.parent.finish(status)
        if started_ray:
            import ray

            ray.shutdown()


def _stage_data(cfg: PipelineConfig, stage_dir: Path, runs: Runs) -> dict:
    d = cfg.data
    sizes = d.sizes
    tracker = runs.child("data", stage_dir, {**{f"task.{k}": v for k, v in asdict(d.task).items()},
                                             **{f"{k}_size": v for k, v in sizes.items()}, "seed": d.seed})
    try:
        data_dir = ensure_task_data(stage_dir, d.task, sizes, d.seed)
        stats = _reference_stats(data_dir)
        top = _ceiling(data_dir)
        tracker.log_metrics(stats | top, 0)
        print("pipeline: reference responses " + ", ".join(f"{k} {v:.2f}" for k, v in stats.items()), flush=True)
        print(f"pipeline: task ceiling on the test split {top['ceiling/speedup']:.2f}x (mean L of the sequential "
              f"references {top['ceiling/L_sequential']:.1f} / mean L_crit of the parallel ones "
              f"{top['ceiling/L_crit_parallel']:.1f})", flush=True)
        tracker.finish("FINISHED")
    except BaseException:
        tracker.finish("FAILED")
        raise
    return {"dir": str(data_dir), "reference": stats, "ceiling": top}


def _stage_sft(cfg: PipelineConfig, stage_dir: Path, runs: Runs, data_dir: str, layout: str,
               extra: list[str], model_path: str | None = None, response_field: str | None = None) -> dict:

    wiring = {"run_dir": str(stage_dir), "data.dir": data_dir, "data.generate": False, "data.layout": layout}
    if model_path is not None:
        wiring["model.path"] = model_path
    if response_field is not None:
        wiring["data.response_field"] = response_field
    sft_cfg = stage_config(SFTConfig, cfg.sft, stage_dir / "stage_config.yaml", extra, wiring)
    name = stage_dir.name
    tracker = runs.tracker(name, stage_dir)
    summary = run_sft(sft_cfg, ray_cfg=cfg.ray, tracker=tracker)  # live metrics; closes the run
    log_last_eval_page(tracker, stage_dir, name)
    return {"checkpoint": summary["checkpoint"], "eval": summary["eval"], "steps": summary["steps"],
            "mlflow_run_id": summary.get("mlflow_run_id"), "model_id": summary.get("model_id")}


def _stage_selftrain(cfg: PipelineConfig, stage_dir: Path, runs: Runs, data_dir: str, model: str) -> dict:
    from rollout.tiny import load_tokenizer  # lazy: transformers takes seconds to import

    gen_dir = stage_dir / "data"
    st_cfg = stage_config(Stage2Config, cfg.selftrain, stage_dir / "stage2_config.yaml", [],
                          {"model": model, "prompts": str(Path(data_dir) / "train.jsonl"),
                           "out": str(gen_dir / "train.jsonl")})
    tracker = runs.child("selftrain_stage2", stage_dir, to_dict(st_cfg, flat=True))
    try:
        sample, close = pool_sampler(st_cfg)
        try:
            with AnswerChecker(st_cfg.checker_timeout_s, eager=False) as checker:
                result = run_stage2(st_cfg, sample, load_tokenizer(model), checker)
        finally:
            close()
        stats = result.stats
        tracker.log_metrics({k: v for k, v in stats.items() if isinstance(v, (int, float))}, 0)
        tracker.finish("FINISHED")
    except BaseException:
        tracker.finish("FAILED")
        raise
    kept = sum(1 for line in (gen_dir / "train.jsonl").read_text().splitlines() if line.strip())
    if kept == 0:
        raise RuntimeError(f"self-training kept no trajectory (stats in {gen_dir}); the SFT model is too weak for "
                           "stage 2, or its limits too tight; remove the selftrain section to skip it")
    shutil.copy(Path(data_dir) / "validation.jsonl", gen_dir / "validation.jsonl")
    sft = _stage_sft(cfg, stage_dir / "sft", runs, str(gen_dir), "parallel", cfg.selftrain_sft, model_path=model,
                     response_field="response")
    return {"checkpoint": sft["checkpoint"], "kept": kept, "eval": sft["eval"]}


def _stage_rl(cfg: PipelineConfig, stage_dir: Path, runs: Runs, data_dir: str, model: str,
              extra: list[str]) -> dict:

    wiring = {"model": model, "run_dir": str(stage_dir), "data.dir": data_dir, "data.generate": False,
              "tracking": runs.tracking_config(stage_dir.name)}
    rl_cfg = stage_config(RLRunConfig, cfg.rl, stage_dir / "stage_config.yaml", extra, wiring)
    summary = run_rl(rl_cfg, tags=runs.tags(stage_dir.name))  # its evaluation pages are in its run already
    return {"checkpoint": summary["checkpoint"], "eval": summary["eval"], "steps": summary["steps"],
            "mlflow_run_id": summary.get("mlflow_run_id"), "model_id": summary.get("model_id")}


def _stage_eval(cfg: PipelineConfig, stage_dir: Path, runs: Runs, data_dir: str, par_model: str,
                seq_model: str, names: tuple[str, str], before: dict | None = None,
                top: dict[str, float] | None = None) -> dict:
    """``threadweaver eval`` of the final models on the test split; with ``before`` (the checkpoints the RL
    stages started from, and their names) those are decoded too, so the report shows what RL changed. Returns
    the report's file, its metrics and the test split's rows (against the task's ceiling ``top``) as markdown."""
    data = [f"tiny={Path(data_dir) / 'test.jsonl'}"] + list(cfg.eval.data)
    ev_cfg = replace(cfg.eval, model=par_model, baseline_model=seq_model, data=data, out=str(stage_dir),
                     model_before=before["models"][0] if before else None,
                     baseline_before=before["models"][1] if before else None)
    tracker = runs.child("eval", stage_dir, to_dict(ev_cfg, flat=True))
    try:
        reports = run_benchmarks(ev_cfg, tracker=tracker, models=names,
                                 before_models=before["names"] if before else None)
        tracker.finish("FINISHED")
    except BaseException:
        tracker.finish("FAILED")
        raise
    metrics = {}
    for r in reports:
        metrics.update(r.metrics())
    main = reports[0]  # the task's test split
    lines = [f"Test split: {main.parallel.problems} problems of the synthetic task, k={main.k}, {main.latency} "
             f"decoding" + (f", {turns_phrase(main.interleave)}." if main.latency == "isolated" else "."), ""]
    speedup = top.get("ceiling/speedup") if top else None
    if speedup:
        lines += [f"Task ceiling: {speedup:.2f}x (mean L of the sequential reference responses "
                  f"{top['ceiling/L_sequential']:.1f} / mean L_crit of the parallel ones "
                  f"{top['ceiling/L_crit_parallel']:.1f}); ThreadWeaver reaches {main.speedup:.2f}x, "
                  f"{100 * main.speedup / speedup:.0f}% of it.", ""]
    lines += [stage_table(main, speedup), ""]
    if main.before is not None or main.sequential_before is not None:
        lines += ["What RL changed (the checkpoint each RL stage started from -> its last one):", "",
                  change_table(main), ""]
    return {"report": str(stage_dir / "report.md"), "metrics": metrics, "rows": "\n".join(lines)}


def _final_report(run_dir: Path, record: dict, ev: dict, total_s: float) -> Path:
    """``report.md`` (the evaluation, the stage times, the training curves and the speedup histogram as PNGs)
    and its HTML rendering ``report.html`` next to it."""
    lines = ["# Pipeline report", "", ev.get("rows", ""),
             Path(ev["report"]).read_text().replace("# Evaluation", "## Evaluation", 1), "", "## Stages", "",
             "| stage | minutes | load average (1, 5, 15 min) at start -> end | output |", "|---|---:|---|---|"]
    for name in STAGES:
        s = record["stages"].get(name)
        if s is not None:
            out = s.get("checkpoint") or s.get("dir") or s.get("report") or ""
            load = " -> ".join(" ".join(f"{x:.2f}" for x in v) for v in s["load"]) if "load" in s else "-"
            lines.append(f"| {name} | {s['wall_s'] / 60:.1f} | {load} | {out} |")
    lines += ["", f"Total: {total_s / 60:.1f} minutes on {os.cpu_count()} CPU cores."]
    trained = [n for n in ("rl_parallel", "rl_sequential") if n in record["stages"]] or \
        [n for n in ("sft_parallel", "sft_sequential") if n in record["stages"]]
    curves = training_curves({n: run_dir / n / "metrics.jsonl" for n in trained}, run_dir / "training_curves.png")
    if curves is not None:
        lines += ["", "## Training curves", "", f"Stages {', '.join(trained)}: reward, accuracy, activation and "
                  "L_crit over the training steps (dashed: held-out evaluations).", "",
                  f"![training curves]({curves.name})"]
    hist = Path(ev["report"]).parent / "speedup_hist.png"
    if hist.is_file():
        lines += ["", "## Speedup per problem", "", f"![speedup histogram]({hist.relative_to(run_dir).as_posix()})"]
    text = "\n".join(lines) + "\n"
    write_text(run_dir / "report.html", markdown_html(text, f"Pipeline report: {run_dir.name}"))
    return write_text(run_dir / "report.md", text)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "sft.steps=50 run_dir=runs/longer",
                         resume="take the outputs of the stages that finished in run_dir (same as reuse=true)")
    parser.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="key.sub=value",
                        help="deprecated: the same as a key.sub=value override")


def run(args: argparse.Namespace) -> int:
    files = [x for x in args.overrides if "=" not in x]  # the older form: run FILE.yaml [--set k=v ...]
    if files:
        print("threadweaver run: deprecated: name the pipeline YAML with --config FILE", file=sys.stderr)
    if args.set_overrides:
        print("threadweaver run: deprecated: --set k=v; give k=v on its own", file=sys.stderr)
    args.config = list(args.config) + files
    args.overrides = [x for x in args.overrides if "=" in x]
    cfg, code = resolve(PipelineConfig, args, "run", resume_override="reuse=true",
                        extra_overrides=args.set_overrides)
    if cfg is None:
        return code
    if not args.config:
        print("threadweaver run: name the pipeline YAML, e.g. threadweaver run --config experiments/pipeline_tiny.yaml",
              file=sys.stderr)
        return 2

    set_runtime_defaults()
    try:
        check_config(cfg)
        record = run_pipeline(cfg, args.config)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"threadweaver run: {e}", file=sys.stderr)
        return 2
    print("\n" + Path(cfg.run_dir, "report.md").read_text())
    print(f"pipeline finished in {record['wall_s'] / 60:.1f} min; outputs in {cfg.run_dir}")
    return 0
