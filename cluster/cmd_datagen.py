"""Generate parallel training data: ``threadweaver datagen stage1|stage2 [-c CONFIG.yaml ...] [key=value ...]``.

stage1  rewrite sequential traces into parallel ones (a teacher LLM behind an
        OpenAI-compatible endpoint, or the synthetic task's rules), validate
        them, keep those whose answer still checks;
stage2  sample parallel trajectories from a model with the spawn/join
        orchestrator on Ray rollout workers, keep the format-valid, correct
        ones (optionally with eta >= min_eta).

The configuration is typed: defaults, then YAML files (``-c``, merged in
order), then dotted ``key=value`` overrides (``teacher.model=Qwen/Qwen3-8B``,
``rollout.n=4``). ``--keys`` lists every key with its type, default and help.
Both stages write ``out`` (records with ``prompt``, ``answer``, ``response``
and ``provenance``, readable by ``threadweaver check`` and the SFT stage),
``<stem>.rejected.jsonl`` and ``<stem>.stats.json``, and print kept/total and
the reasons for the rest.

Exit status: 0 when the run finished (even if nothing was kept), 2 on a bad
configuration or input, or a teacher endpoint that refuses the calls.
"""

from __future__ import annotations

import argparse
import sys

STAGES = ("stage1", "stage2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=STAGES, help="which stage to run")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="...",
                   help="options and key=value overrides; see 'threadweaver datagen STAGE --help'")


def stage_parser(stage: str) -> argparse.ArgumentParser:
    """Options of one stage; parsed with ``parse_intermixed_args`` so options and overrides mix freely."""
    p = argparse.ArgumentParser(prog=f"threadweaver datagen {stage}",
                                description=_config_class(stage).__doc__,
                                epilog="--keys lists every key; example configs: experiments/datagen_*.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("-c", "--config", action="append", default=[], metavar="YAML",
                   help="config file (repeatable; later files win)")
    p.add_argument("--keys", action="store_true", help="list the stage's config keys and exit")
    p.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    return p


def _config_class(stage: str):
    if stage == "stage1":
        from rl.datagen.stage1 import Stage1Config

        return Stage1Config
    from rl.datagen.stage2 import Stage2Config

    return Stage2Config


def run(args: argparse.Namespace) -> int:
    from cluster.config import ConfigError, describe, load_config, to_dict

    cls = _config_class(args.stage)
    opts = stage_parser(args.stage).parse_intermixed_args(args.rest)
    if opts.keys:
        print(describe(cls))
        return 0
    try:
        cfg = load_config(cls, opts.config, opts.overrides)
    except ConfigError as e:
        print(f"threadweaver datagen {args.stage}: {e}", file=sys.stderr)
        return 2
    if opts.show_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    return _stage1(cfg) if args.stage == "stage1" else _stage2(cfg)


def _stage1(cfg) -> int:
    from rewards.checker import AnswerChecker
    from rl.datagen.stage1 import make_rewriter, read_records, run_stage1, summary
    from rl.datagen.teacher import TeacherConfigError
    from rollout.files import check_output_file

    try:  # the input and the output before the teacher is called
        if not cfg.input or not cfg.out:
            raise ValueError("stage 1 needs 'input' and 'out'")
        read_records(cfg.input, cfg.limit)
        check_output_file(cfg.out, "out")
        rewriter, client = make_rewriter(cfg)
    except (ValueError, TeacherConfigError) as e:
        print(f"threadweaver datagen stage1: {e}", file=sys.stderr)
        return 2
    try:
        with AnswerChecker(cfg.check_timeout_s, eager=False) as checker:
            result = run_stage1(cfg, rewriter, checker, client=client)
    except (ValueError, TeacherConfigError) as e:
        print(f"threadweaver datagen stage1: {e}", file=sys.stderr)
        return 2
    finally:
        if client is not None:
            client.close()
    print(summary(result.stats))
    return 0


def _stage2(cfg) -> int:
    from rewards.checker import AnswerChecker
    from rollout.config import set_runtime_defaults
    from rl.datagen.stage1 import read_records
    from rl.datagen.stage2 import check_prompt_records, pool_sampler, run_stage2, summary
    from rollout.files import check_model_dir, check_output_file

    set_runtime_defaults()
    try:  # the model, the prompts and the output before Ray and the engines start
        check_model_dir(cfg.model, "model")
        if not cfg.prompts or not cfg.out:
            raise ValueError("stage 2 needs 'prompts' and 'out'")
        check_prompt_records(read_records(cfg.prompts, cfg.limit), cfg.prompts)
        check_output_file(cfg.out, "out")
        from rollout.tiny import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    except (OSError, ValueError) as e:
        print(f"threadweaver datagen stage2: {e}", file=sys.stderr)
        return 2
    sample, close = pool_sampler(cfg)
    try:
        with AnswerChecker(cfg.check_timeout_s, eager=False) as checker:
            result = run_stage2(cfg, sample, tokenizer, checker)
    finally:
        close()
    print(summary(result.stats))
    return 0
