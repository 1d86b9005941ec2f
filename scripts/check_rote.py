"""Teach the tests' rote fixtures under several CPU settings and print how each ended.

The rote fixtures (``tests/test_evaluate.py``, ``tests/test_rollout_workers.py``)
must learn on every machine, whatever its floating-point path. This script
varies what changes that path here: the number of torch threads (the order of
reduction sums) and ``ATEN_CPU_CAPABILITY`` (the vector kernels PyTorch picks:
``default``, ``avx2``, or this CPU's best), teaching each fixture in a fresh
process, and prints the steps, final losses and whether every token was
learned. Not part of the test suite (it takes a few minutes).

    .venv/bin/python scripts/check_rote.py [--threads 1 2] [--capabilities default avx2 native]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys
sys.path.insert(0, {root!r})
from rollout.rote import teach
from rollout.tiny import init_model, load_tokenizer
from rollout.units import chat_prompt_ids
from tests.test_evaluate import TAUGHT
from tests.test_rollout_workers import TAUGHT_PROMPT, TAUGHT_RESPONSE

model = init_model({tmp!r} + "/tiny", seed=0)  # the tests' session model
tok = load_tokenizer(model)
fixtures = {{"eval": [(chat_prompt_ids(tok, q), r) for q, _, r in TAUGHT],
             "workers": [(chat_prompt_ids(tok, TAUGHT_PROMPT), TAUGHT_RESPONSE)]}}
for name, examples in fixtures.items():
    t = teach(model, {tmp!r} + "/" + name, examples, tok, threads={threads})
    print(json.dumps({{"fixture": name, "steps": t.steps, "loss": t.loss, "max_token_loss": t.max_token_loss,
                      "learned": t.learned}}), flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--capabilities", nargs="+", default=["default", "avx2", "native"],
                        help="values of ATEN_CPU_CAPABILITY; 'native' leaves it unset")
    args = parser.parse_args()
    failed = 0
    print(f"{'capability':<11} {'threads':>7} {'fixture':<8} {'steps':>5} {'mean loss':>10} {'max loss':>10} learned")
    for cap in args.capabilities:
        for threads in args.threads:
            env = dict(os.environ)
            env.pop("ATEN_CPU_CAPABILITY", None)
            if cap != "native":
                env["ATEN_CPU_CAPABILITY"] = cap
            with tempfile.TemporaryDirectory() as tmp:
                code = CHILD.format(root=str(ROOT), tmp=tmp, threads=threads)
                proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{cap:<11} {threads:>7} failed:\n{proc.stderr[-2000:]}")
                failed += 1
                continue
            for line in proc.stdout.splitlines():
                r = json.loads(line)
                failed += not r["learned"]
                print(f"{cap:<11} {threads:>7} {r['fixture']:<8} {r['steps']:>5} {r['loss']:>10.2e} "
                      f"{r['max_token_loss']:>10.2e} {r['learned']}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
