"""Mutation testing of the core-formula modules with mutmut; prints the kill rate per module.

Not part of CI (it takes tens of minutes on two cores). For every module below
it copies the packages and tests into ``runs/mutation/<module>/`` (a scratch
folder, git-ignored), writes a ``[tool.mutmut]`` section there that mutates
that module only and runs only the fast tests that exercise it, runs
``mutmut run`` (niced; mutmut itself picks, for each mutant, the tests that
call the mutated function), and reads mutmut's results back.

Mutants listed in ``tests/mutation_equivalent.txt`` (one ``name  # reason``
per line) are equivalent: no test can tell them from the original code, and
the reason says why. A reason that starts with ``[cpu]`` marks a mutant that
only differs on an accelerator (a tensor left on the CPU): equivalent on the
CPU-only machines these tests run on, and counted in the table's note. They
are counted apart; the kill rate is ``killed / (total - equivalent)``. A
timeout counts as killed (the mutant made the tests hang), as mutmut counts it,
and so does a crash of the test process (a segfault in torch, say).

    .venv/bin/pip install -e ".[dev]"          # mutmut is in the dev extra
    nice -n 19 .venv/bin/python scripts/mutation.py                 # every module
    nice -n 19 .venv/bin/python scripts/mutation.py rl/grpo.py      # one module
    nice -n 19 .venv/bin/python scripts/mutation.py --resume rollout/format.py   # continue an interrupted run
    .venv/bin/python scripts/mutation.py --report                   # the table of the last runs, no new run
    .venv/bin/python scripts/mutation.py --survivors rl/grpo.py     # each survivor's diff

Exit code 1 when a module is under ``--target`` (default 0.9) or a listed
equivalent mutant no longer exists (the list went stale after a code change).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / "runs" / "mutation"
EQUIVALENT = ROOT / "tests" / "mutation_equivalent.txt"
PACKAGES = ("rollout", "rewards", "rl", "cluster")

#: module -> the fast test files that exercise it (mutmut runs, per mutant, those of them that reach it)
MODULES: dict[str, list[str]] = {
    "rollout/units.py": ["tests/test_units.py", "tests/test_latency_by_hand.py"],
    "rollout/format.py": ["tests/test_format.py", "tests/test_units.py"],
    "rl/trie.py": ["tests/test_trie.py", "tests/test_grpo.py"],
    "rl/attention.py": ["tests/test_trie_attention.py"],
    "rl/logprobs.py": ["tests/test_trie_attention.py", "tests/test_grpo.py", "tests/test_trie.py"],
    "rl/grpo.py": ["tests/test_grpo.py"],
    "rl/losses.py": ["tests/test_grpo.py", "tests/test_trie_attention.py"],
    "rewards/score.py": ["tests/test_rewards.py", "tests/test_latency_by_hand.py"],
}

KILLED_CODES = {1, 3, 36, 24, 152, 255}  # a failing test run, pytest's internal error, or a timeout
SURVIVED = {0}


def is_killed(code: int | None) -> bool:
    """A failing run, a timeout, or a run killed by a signal (negative code: the mutant crashed the tests)."""
    return code is not None and (code in KILLED_CODES or code < 0)


def workdir(module: str) -> Path:
    return SCRATCH / module.replace("/", "_").removesuffix(".py")


def prepare(module: str) -> Path:
    """A fresh scratch copy of the code with a mutmut config for ``module``."""
    work = workdir(module)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in PACKAGES + ("tests",):
        shutil.copytree(ROOT / package, work / package, ignore=ignore)
    tests = MODULES[module]
    config = "\n".join([
        "",
        "[tool.mutmut]",
        f"source_paths = {json.dumps([module.split('/')[0]])}",
        f"only_mutate = {json.dumps([module])}",
        f"also_copy = {json.dumps([p for p in PACKAGES if p != module.split('/')[0]])}",
        f"pytest_add_cli_args = {json.dumps(['-m', 'not integration', '-p', 'no:cacheprovider', '-x', '-q'])}",
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        "use_git_change_detection = false",
        "",
    ])
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + config)
    return work


def run(module: str, max_children: int, resume: bool = False) -> None:
    work = workdir(module)
    if not (resume and (work / "mutants").is_dir()):
        work = prepare(module)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", MLFLOW_DISABLE_TELEMETRY="true", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    mutmut = Path(sys.executable).with_name("mutmut")
    cmd = ["nice", "-n", "19", str(mutmut), "run", "--max-children", str(max_children)]
    print(f"[mutation] {module}: {' '.join(cmd)} (in {work.relative_to(ROOT)})", flush=True)
    with open(work / "mutmut.log", "w") as log:
        subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)


def results(module: str) -> dict[str, int | None]:
    """mutant name -> mutmut's exit code (None: not checked) of the last run of ``module``."""
    meta = workdir(module) / "mutants" / (module + ".meta")
    if not meta.exists():
        return {}
    return json.loads(meta.read_text())["exit_code_by_key"]


def equivalent() -> dict[str, str]:
    """Listed equivalent mutants: name -> reason."""
    out = {}
    if not EQUIVALENT.exists():
        return out
    for line in EQUIVALENT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition("#")
        out[name.strip()] = reason.strip()
    return out


def module_of(mutant: str) -> str:
    """``rl.grpo.x_pgrpo_loss__mutmut_3`` -> ``rl/grpo.py``."""
    parts = mutant.split(".")
    for i in range(len(parts), 0, -1):
        candidate = "/".join(parts[:i]) + ".py"
        if candidate in MODULES:
            return candidate
    return ""


def table(modules: list[str], target: float) -> int:
    equiv = equivalent()
    rows, status = [], 0
    for module in modules:
        codes = results(module)
        if not codes:
            rows.append((module, "-", "-", "-", "-", "-", "no results (not run)"))
            status = 1
            continue
        listed = {name for name in equiv if module_of(name) == module}
        stale = sorted(listed - set(codes))
        eq = listed & set(codes)
        killed = sum(1 for name, code in codes.items() if is_killed(code) and name not in eq)
        survived = sorted(name for name, code in codes.items() if not is_killed(code) and name not in eq)
        judged = len(codes) - len(eq)
        rate = killed / judged if judged else 1.0
        cpu_only = sum(1 for name in eq if equiv[name].startswith("[cpu]"))
        note = f"{cpu_only} of the equivalent only on CPU" if cpu_only else ""
        if stale:
            note += f"{'; ' if note else ''}{len(stale)} listed equivalent mutants do not exist"
            status = 1
        other = [n for n in survived if codes[n] not in SURVIVED]
        if other:
            note += f"{'; ' if note else ''}{len(other)} not survived but not killed (no tests/not checked/...)"
        if rate < target:
            status = 1
        rows.append((module, str(len(codes)), str(killed), str(len(eq)), str(len(survived)), f"{100 * rate:.1f}%",
                     note))
    head = ("module", "mutants", "killed", "equivalent", "survived", "kill rate", "")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"kill rate = killed / (mutants - equivalent); target {100 * target:.0f}% in every module")
    return status


def survivors(module: str) -> None:
    equiv = equivalent()
    work = workdir(module)
    mutmut = Path(sys.executable).with_name("mutmut")
    for name, code in sorted(results(module).items()):
        if is_killed(code) or name in equiv:
            continue
        print(f"==== {name} (exit code {code})")
        subprocess.run([str(mutmut), "show", name], cwd=work, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="modules to test (default: all of them)")
    parser.add_argument("--report", action="store_true", help="print the table of the last runs without running")
    parser.add_argument("--survivors", action="store_true", help="print the diff of every survivor, no run")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in its scratch folder (same code and tests) instead of "
                             "starting afresh")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (processes)")
    parser.add_argument("--target", type=float, default=0.9, help="minimum kill rate per module (fraction)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        print(f"unknown module(s) {unknown}; choose from {list(MODULES)}", file=sys.stderr)
        return 2
    modules = args.modules or list(MODULES)
    if not args.report and not Path(sys.executable).with_name("mutmut").exists():
        print(f"mutmut is not installed next to {sys.executable}; install the dev extra: "
              f"{Path(sys.executable).parent}/pip install -e '.[dev]'", file=sys.stderr)
        return 2
    if args.survivors:
        for module in modules:
            survivors(module)
        return 0
    if not args.report:
        for module in modules:
            run(module, args.max_children, args.resume)
    return table(modules, args.target)


if __name__ == "__main__":
    sys.exit(main())
