"""``threadweaver bench WHAT``: benchmarks that print side-by-side tables of measured ratios.

Each benchmark is a module with ``add_arguments(parser)`` and ``run(args)``,
registered by one line in :data:`BENCHMARKS`.
"""

from __future__ import annotations

import argparse
import importlib

#: benchmark name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "trie": ("rl.bench_trie", "trie packing vs expanded vs padded rows: tokens, fwd+bwd seconds, peak memory"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT", help="the benchmark to run")
    for name, (module_name, help_) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_, description=importlib.import_module(module_name).__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        importlib.import_module(module_name).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(BENCHMARKS[args.what][0]).run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
