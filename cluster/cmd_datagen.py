"""Generate parallel training data: ``threadweaver datagen stage1|stage2 [--config FILE ...] [key=value ...]``.

stage1  rewrite sequential traces into parallel ones (a teacher LLM behind an
        OpenAI-compatible endpoint, or the synthetic task's rules), validate
        them, keep those whose answer still checks;
stage2  sample parallel trajectories from a model with the spawn/join
        orchestrator on Ray rollout workers, keep the format-valid, correct
        ones (optionally with eta >= min_eta).

The configuration is typed: defaults, then YAML files (``--config``/``-c``,
merged in order), then dotted ``key=value`` overrides
(``teacher.model=Qwen/Qwen3-8B``, ``rollout.n=4``). ``--show-config`` lists
every key with its type, default and help (``--keys``: the same, deprecated);
``--print-config`` prints the resolved config.
Both stages write ``out`` (records with ``prompt``, ``answer``, ``response``
and ``provenance``, readable by ``threadweaver check`` and the SFT stage),
``<stem>.rejected.jsonl`` and ``<stem>.stats.json``, and print kept/total and
the reasons for the rest.

Each stage is one MLflow run (experiment: the recipe's name, see
``cluster.command``) with the context tags of ``cluster.lineage``, the input
file as a dataset input, live progress (``datagen/done``, ``datagen/kept``,
at most every 2 s), the final statistics and the ``.stats.json`` file; the
output file's path and SHA-256 are tags (``threadweaver.output``,
``threadweaver.output_sha256``). The teacher's URL is logged without its
secrets.

Exit status: 0 when the run finished (even if nothing was kept), 2 on a bad
configuration or input, or a teacher endpoint that refuses the calls.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cluster.command import add_config_arguments, resolve
from cluster.config import to_dict
from cluster.lineage import dataset_inputs, file_hash, log_source, run_context
from cluster.ray_setup import RayConfig, Role, init_ray
from cluster.tracking import Throttle, Tracker, TrackingConfig
from rewards.checker import AnswerChecker
from rl.datagen.stage1 import Stage1Config, make_rewriter, read_records, run_stage1
from rl.datagen.stage1 import summary as stage1_summary
from rl.datagen.stage2 import Stage2Config, check_prompt_records, pool_sampler, run_stage2
from rl.datagen.stage2 import summary as stage2_summary
from rl.datagen.teacher import TeacherConfigError, redact_url
from rollout.config import set_runtime_defaults
from rollout.files import check_model_dir, check_output_file

STAGES = ("stage1", "stage2")


@dataclass
class Stage1RunConfig(Stage1Config):
    """Stage 1 of data generation, with its tracking."""

    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"help": "MLflow"})


@dataclass
class Stage2RunConfig(Stage2Config):
    """Stage 2 of data generation, with its tracking and the Ray it runs on."""

    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"help": "MLflow"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "Ray"})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=STAGES, help="which stage to run")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="...",
                   help="options and key=value overrides; see 'threadweaver datagen STAGE --help'")


def stage_parser(stage: str) -> argparse.ArgumentParser:
    """Options of one stage; parsed with ``parse_intermixed_args`` so options and overrides mix freely."""
    p = argparse.ArgumentParser(prog=f"threadweaver datagen {stage}",
                                description=_config_class(stage).__doc__,
                                epilog="--show-config lists every key; example configs: experiments/datagen_*.yaml")
    add_config_arguments(p, "teacher.model=Qwen/Qwen3-8B rollout.n=4")
    p.add_argument("--keys", action="store_true", help="deprecated: the same as --show-config")
    return p


def _config_class(stage: str):
    return Stage1RunConfig if stage == "stage1" else Stage2RunConfig


def run(args: argparse.Namespace) -> int:
    opts = stage_parser(args.stage).parse_intermixed_args(args.rest)
    if opts.keys:
        print("threadweaver datagen: deprecated: --keys; use --show-config", file=sys.stderr)
        opts.show_config = True
    cfg, code = resolve(_config_class(args.stage), opts, f"datagen {args.stage}")
    if cfg is None:
        return code
    context = run_context(f"datagen {args.stage}", opts.config)
    return _stage1(cfg, context) if args.stage == "stage1" else _stage2(cfg, context)


def _tracker(cfg, stage: str, context: dict[str, str], source: str) -> tuple[Tracker, Callable]:
    """The stage's MLflow run, started (input file as a dataset input), and its live progress callback."""
    params = to_dict(cfg, flat=True)
    if "teacher.base_url" in params:
        params["teacher.base_url"] = redact_url(params["teacher.base_url"])  # never store credentials
    tracker = Tracker(cfg.tracking, Path(cfg.out).with_suffix(""), tags=context)
    tracker.start(params, tags={"stage": f"datagen_{stage}"})
    tracker.log_inputs(datasets=dataset_inputs({Path(source).stem: source}, context="source"))
    throttle = Throttle(2.0)

    def on_progress(done: int, kept: int | None, total: int) -> None:
        if throttle.ready(force=done == total):
            metrics = {"datagen/done": done, "datagen/total": total}
            if kept is not None:
                metrics |= {"datagen/kept": kept, "datagen/kept_share": kept / max(1, done)}
            tracker.log_metrics(metrics, done)

    return tracker, on_progress


def _finish(tracker: Tracker, result, status: str = "FINISHED") -> None:
    """Final statistics, the stats file and the output's hash into the run; the run closed."""
    stats = result.stats
    tracker.log_metrics({f"datagen/{k}": v for k, v in stats.items() if isinstance(v, (int, float))},
                        int(stats.get("total", 0)))
    out = Path(result.paths["out"])
    tracker.set_tags({"threadweaver.output": str(out.resolve()), "threadweaver.output_sha256": file_hash(out)})
    tracker.log_artifact(result.paths["stats"])
    tracker.finish(status)


def _stage1(cfg, context: dict[str, str]) -> int:
    try:  # the input and the output before the teacher is called
        if not cfg.input or not cfg.out:
            raise ValueError("stage 1 needs 'input' and 'out'")
        read_records(cfg.input, cfg.limit)
        check_output_file(cfg.out, "out")
        rewriter, client = make_rewriter(cfg)
    except (ValueError, TeacherConfigError) as e:
        print(f"threadweaver datagen stage1: {e}", file=sys.stderr)
        return 2
    tracker, on_progress = _tracker(cfg, "stage1", context, cfg.input)
    try:
        with AnswerChecker(cfg.checker_timeout_s, eager=False) as checker:
            result = run_stage1(cfg, rewriter, checker, client=client, on_progress=on_progress)
    except (ValueError, TeacherConfigError) as e:
        tracker.finish("FAILED")
        print(f"threadweaver datagen stage1: {e}", file=sys.stderr)
        return 2
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        if client is not None:
            client.close()
    _finish(tracker, result)
    print(stage1_summary(result.stats))
    return 0


def _stage2(cfg, context: dict[str, str]) -> int:
    set_runtime_defaults()
    try:  # the model, the prompts and the output before Ray and the engines start
        check_model_dir(cfg.model, "model")
        if not cfg.prompts or not cfg.out:
            raise ValueError("stage 2 needs 'prompts' and 'out'")
        check_prompt_records(read_records(cfg.prompts, cfg.limit), cfg.prompts)
        check_output_file(cfg.out, "out")
        from rollout.tiny import load_tokenizer  # lazy: transformers takes seconds to import

        tokenizer = load_tokenizer(cfg.model)
    except (OSError, ValueError) as e:
        print(f"threadweaver datagen stage2: {e}", file=sys.stderr)
        return 2
    import ray  # lazy: Ray takes seconds to import and --show-config needs none of it

    rc = cfg.rollout
    try:
        started = init_ray(cfg.ray, [Role("rollout worker", rc.workers, rc.cpus_per_worker, rc.gpus_per_worker,
                                          tp=rc.tensor_parallel_size)])
    except RuntimeError as e:  # the workers do not fit the cluster
        print(f"threadweaver datagen stage2: {e}", file=sys.stderr)
        return 2
    tracker, on_progress = _tracker(cfg, "stage2", context, cfg.prompts)
    log_source(tracker, cfg.model)
    try:
        sample, close = pool_sampler(cfg, on_progress=lambda done, total: on_progress(done, None, total))
        try:
            with AnswerChecker(cfg.checker_timeout_s, eager=False) as checker:
                result = run_stage2(cfg, sample, tokenizer, checker)
        finally:
            close()
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        if started:
            ray.shutdown()
    _finish(tracker, result)
    print(stage2_summary(result.stats))
    return 0
