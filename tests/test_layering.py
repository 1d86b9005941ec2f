"""The floor plan of the code (DESIGN section 7), checked from the source.

Floors, bottom to top: ``rollout/`` -> ``rewards/`` -> ``rl/`` -> ``cluster/``.
A module may import its own floor and the floors below it, never one above.
Every import counts, also one inside a function (a lazy import still makes the
dependency) and ``importlib.import_module("pkg.mod")`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ("rollout", "rewards", "rl", "cluster")


def modules() -> list[Path]:
    return sorted(p for floor in FLOORS for p in (ROOT / floor).rglob("*.py"))


def imported_names(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """``(line, dotted module name)`` of every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(root).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                out.append((node.lineno, ".".join(base + tuple(filter(None, [node.module])))))
            elif node.module:
                out.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return out


def upward_imports(paths: list[Path], root: Path = ROOT) -> list[str]:
    bad = []
    for path in paths:
        floor = path.relative_to(root).parts[0]
        for line, name in imported_names(path, root):
            top = name.split(".")[0]
            if top in FLOORS and FLOORS.index(top) > FLOORS.index(floor):
                bad.append(f"{path.relative_to(root)}:{line} ({floor}/) imports {name} ({top}/ is above)")
    return bad


def test_every_floor_has_modules():
    for floor in FLOORS:
        assert list((ROOT / floor).rglob("*.py")), floor


def test_no_import_runs_upward():
    bad = upward_imports(modules())
    assert not bad, "imports that run up the floors:\n" + "\n".join(bad)


def test_the_checker_sees_lazy_relative_and_string_imports(tmp_path):
    """The checker itself can fail: a hand-made module in ``rollout/`` with each kind of upward import."""
    (tmp_path / "rollout" / "sub").mkdir(parents=True)
    bad = tmp_path / "rollout" / "sub" / "bad.py"
    bad.write_text("import importlib\nfrom rollout.units import Unit\n\n"
                   "def f():\n    from cluster.config import load_config\n    import rewards.score\n"
                   "    from .. import units\n    from ...rl import trie\n"
                   "    return importlib.import_module('rl.grpo')\n")
    found = upward_imports([bad], tmp_path)
    names = sorted(x.split(" imports ")[1].split(" ")[0] for x in found)
    assert names == ["cluster.config", "rewards.score", "rl", "rl.grpo"]


@pytest.mark.parametrize("floor", FLOORS)
def test_relative_imports_resolve_to_their_package(floor):
    for path in (ROOT / floor).rglob("*.py"):
        for _, name in imported_names(path):
            assert name, f"{path}: an import without a module name"


# --------------------------------------------------------------------------- sizes

#: most lines of one module (any floor), and of one function in ``rl/`` and ``cluster/``
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


def long_functions(path: Path, limit: int, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 >= limit]


def test_no_module_is_too_long():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in modules()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_in_rl_or_cluster_is_too_long():
    long = [x for p in modules() if p.relative_to(ROOT).parts[0] in ("rl", "cluster")
            for x in long_functions(p, MAX_FUNCTION_LINES)]
    assert not long, f"functions of {MAX_FUNCTION_LINES} lines or more: {long}"


def test_the_size_check_sees_a_long_function(tmp_path):
    (tmp_path / "rl").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "rl" / "big.py").write_text(f"def big():\n{body}\n\n\ndef small():\n    return 1\n")
    found = long_functions(tmp_path / "rl" / "big.py", MAX_FUNCTION_LINES, tmp_path)
    assert found == [f"rl/big.py:1 big ({MAX_FUNCTION_LINES + 1} lines)"]
