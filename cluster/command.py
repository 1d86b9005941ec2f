"""The one command style of every subcommand that has a config:
``threadweaver CMD [--config FILE] [key.sub=value ...] [--show-config] [--print-config] [--resume]``.

* ``--config FILE`` (repeatable, later files win; ``-c`` is the same) then
  dotted ``key=value`` overrides, both checked by ``cluster.config.load_config``:
  an unknown key anywhere is an error naming the nearest valid key, before
  anything starts;
* ``--show-config`` lists every key with its type, default and help;
* ``--print-config`` prints the resolved config as YAML and exits;
* ``--resume`` (commands whose runs can resume) is the override ``resume=auto``
  (for ``run``: ``reuse=true``).

A config with a ``tracking`` section whose ``experiment`` is not set gets the
recipe's name: the first ``--config`` file's stem (``experiments/rl_tiny.yaml``
-> ``rl_tiny``), else ``threadweaver-COMMAND``: one MLflow experiment per recipe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import yaml

from cluster.config import ConfigError, describe, load_config, to_dict, with_values

T = TypeVar("T")


def add_config_arguments(parser: argparse.ArgumentParser, example: str, resume: str | None = None) -> None:
    """The config options (see module doc); ``example`` shows overrides, ``resume`` the meaning of --resume."""
    g = parser.add_argument_group("configuration")
    g.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                   help="YAML config (repeat to merge several, later ones win)")
    g.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help=f"dotted overrides of config keys, e.g. {example}")
    g.add_argument("--show-config", action="store_true",
                   help="list every config key with its type, default and help, and exit")
    g.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    if resume is not None:
        g.add_argument("--resume", action="store_true", help=resume)


def resolve(cls: type[T], args: argparse.Namespace, prog: str, resume_override: str = "resume=auto",
            extra_overrides: list[str] = (), check: Callable[[T], None] | None = None,
            positional: Sequence[str] = ()) -> tuple[T | None, int | None]:
    """``(config, None)`` to go on, or ``(None, exit code)``: 0 after ``--show-config``/``--print-config``,
    2 (one line on stderr) for a bad config, bad positional items (``positional``: the keys they stand for,
    see :func:`take_positional`) or when ``check(config)`` (the command's input checks, run before anything
    starts) raises ValueError or OSError."""
    if args.show_config:
        print(describe(cls))
        return None, 0
    try:
        named = take_positional(args, positional) if positional else []
    except ValueError as e:
        print(f"threadweaver {prog}: {e}", file=sys.stderr)
        return None, 2
    overrides = named + list(extra_overrides) + list(args.overrides)
    if getattr(args, "resume", False):
        overrides.append(resume_override)
    try:
        cfg = load_config(cls, args.config, overrides)
        tracking = getattr(cfg, "tracking", None)
        if tracking is not None and tracking.experiment is None:
            cfg = with_values(cfg, {"tracking.experiment": recipe_name(args.config, prog)})
    except (ConfigError, ValueError, OSError) as e:
        print(f"threadweaver {prog}: {e}", file=sys.stderr)
        return None, 2
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return None, 0
    if check is not None:
        try:
            check(cfg)
        except (ValueError, OSError) as e:
            print(f"threadweaver {prog}: {e}", file=sys.stderr)
            return None, 2
    return cfg, None


def recipe_name(config_files: list[str], prog: str) -> str:
    """The MLflow experiment of a command's runs when the config names none (see module doc)."""
    if config_files:
        return Path(config_files[0]).stem
    return "threadweaver-" + prog.replace(" ", "-")


def take_positional(args: argparse.Namespace, keys: Sequence[str]) -> list[str]:
    """``key=VALUE`` overrides for the positional items of ``args.overrides`` (those without ``=``), in the
    order of ``keys`` (``threadweaver prepare-model SRC OUT`` is ``src=SRC out=OUT``); ``args.overrides``
    keeps the ``key=value`` items. ValueError for more positional items than keys, or a key given both ways."""
    positional = [x for x in args.overrides if "=" not in x]
    args.overrides = [x for x in args.overrides if "=" in x]
    if len(positional) > len(keys):
        raise ValueError(f"expected {' '.join(k.upper() for k in keys)} and key=value items, got "
                         f"{len(positional)} positional arguments: {' '.join(positional)}")
    named = dict(zip(keys, positional))
    for key in named:
        if any(x.startswith(f"{key}=") for x in args.overrides):
            raise ValueError(f"{key} given twice, as a positional argument and as {key}=")
    return [f"{k}={v}" for k, v in named.items()]
