"""The math-verify process: checks answer pairs, each under a hard time limit.

Run as ``python -m rewards.mv_server FD MEMORY_LIMIT_MB`` by
:class:`rewards.checker.AnswerChecker`, which talks to it over the socket ``FD``
with :class:`multiprocessing.connection.Connection` messages:

* request ``("check", pred, gold, timeout_s)`` -> reply ``("ok", correct, seconds)``,
  ``("timeout", seconds)`` or ``("error", message, seconds)``;
* request ``("stop",)`` or end of file -> the server exits.

This process (the *manager*) is single-threaded and never runs math-verify
itself: it imports and warms math-verify once, then ``fork``s a *worker* that
inherits the warm state. The worker runs ``parse``/``verify`` with
math-verify's own ``signal.alarm`` timeouts disabled; the manager waits for its
answer at most ``timeout_s`` seconds, and on expiry kills it (SIGKILL) and forks
a fresh one, which takes milliseconds. A worker that dies (out of memory, a
crash) is replaced the same way and the item reported as an error.

Safety nets: the worker's address space is capped (``MEMORY_LIMIT_MB``, 0 = no
cap); it asks Linux to kill it when the manager exits (``PR_SET_PDEATHSIG``); and
before each item it arms ``signal.alarm(ceil(timeout_s) + 5)`` with the default
action (terminate), so a runaway computation ends even if nobody kills it.
The manager exits at end of file on its socket, i.e. when its owner dies.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import resource
import signal
import sys
import time
from importlib.metadata import version
from multiprocessing.connection import Connection

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

_EXTRACTION = (LatexExtractionConfig(), ExprExtractionConfig())
_GOLD_CACHE_SIZE = 4096
_BACKSTOP_EXTRA_S = 5

#: the antlr4 runtime whose math-verify grammar reads percentages (rewards.checker.GRADER_SITE holds it)
GRADER_ANTLR = "4.13.2"

#: pairs that load math-verify's lazily built regexes and LaTeX parser before any fork
_WARM_UP = [("\\frac{1}{2}", "0.5"), ("[1, 2)", "[1,2)"), ("\\{1,2\\}", "\\{2,1\\}"), ("2\\sqrt{2}", "\\sqrt{8}"),
            ("(-\\infty, 3]", "(-\\infty,3]"), ("x^2+1", "1+x^2"), ("10\\%", "0.1"), ("\\text{(B)}", "B")]


def boxed(answer: str) -> str:
    """``answer`` as math-verify should read it: inside ``\\boxed{}`` unless it already has one."""
    answer = answer.strip().strip("$")
    return answer if "\\boxed" in answer else f"\\boxed{{{answer}}}"


def check_pair(pred: str, gold: str, gold_cache: dict) -> tuple[bool, str | None]:
    """``(correct, error)`` from math-verify for one answer and its reference."""
    parsed_gold = gold_cache.get(gold)
    if parsed_gold is None:
        parsed_gold = parse(boxed(gold), extraction_config=_EXTRACTION, parsing_timeout=None)
        if len(gold_cache) >= _GOLD_CACHE_SIZE:
            gold_cache.clear()
        gold_cache[gold] = parsed_gold
    if not parsed_gold:
        return False, f"math-verify cannot parse the reference answer {gold[:80]!r}"
    parsed_pred = parse(boxed(pred), extraction_config=_EXTRACTION, parsing_timeout=None)
    return bool(verify(parsed_gold, parsed_pred, timeout_seconds=None)), None


def _die_with_parent(manager_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent (the manager) exits."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the EOF on the pipe still ends an idle worker
        pass
    if os.getppid() != manager_pid:  # the manager died before the request above
        os._exit(0)


def _worker_main(conn: Connection, manager_end: Connection, manager_pid: int, memory_limit_mb: int) -> None:
    manager_end.close()  # else this process holds the pipe open and never sees the manager's end of file
    _die_with_parent(manager_pid)
    if memory_limit_mb > 0:
        limit = memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    gold_cache: dict = {}
    while True:
        try:
            pred, gold, timeout_s = conn.recv()
        except EOFError:
            return
        t0 = time.monotonic()
        signal.alarm(math.ceil(timeout_s) + _BACKSTOP_EXTRA_S)
        try:
            correct, error = check_pair(pred, gold, gold_cache)
            reply = ("ok", correct, time.monotonic() - t0) if error is None else ("error", error, time.monotonic() - t0)
        except BaseException as e:  # noqa: BLE001 -- reported to the caller, item scored incorrect
            reply = ("error", f"math-verify raised {type(e).__name__}: {str(e)[:200]}", time.monotonic() - t0)
        signal.alarm(0)
        conn.send(reply)


class _Worker:
    """One forked math-verify worker process and its pipe."""

    def __init__(self, memory_limit_mb: int):
        self.memory_limit_mb = memory_limit_mb
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, daemon=True,
                                args=(child, self.conn, os.getpid(), self.memory_limit_mb))
        self.proc.start()
        child.close()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()

    def check(self, pred: str, gold: str, timeout_s: float) -> tuple:
        t0 = time.monotonic()
        try:
            self.conn.send((pred, gold, timeout_s))
            if self.conn.poll(timeout_s):
                return self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.exitcode if not self.proc.is_alive() else None
            self.stop()
            self._start()
            return ("error", f"math-verify worker died (exit code {code})", time.monotonic() - t0)
        self.stop()
        self._start()
        return ("timeout", time.monotonic() - t0)


def _warm_up() -> None:
    cache: dict = {}
    for gold, pred in _WARM_UP:
        check_pair(pred, gold, cache)


def _warn_on_antlr_version() -> None:
    have = version("antlr4-python3-runtime")
    if have != GRADER_ANTLR:
        print(f"rewards.mv_server: math-verify runs with antlr4 {have}, not {GRADER_ANTLR}: percentages such as "
              "10\\% read as 10, not 0.1; scripts/setup.sh installs the grader's runtime into "
              "$VENV/grader-site", file=sys.stderr)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m rewards.mv_server FD MEMORY_LIMIT_MB", file=sys.stderr)
        return 2
    conn = Connection(int(argv[0]))
    # math-verify warns once that its own timeout is off (ours replaces it) and logs every parse failure
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    _warm_up()
    _warn_on_antlr_version()
    worker = _Worker(int(argv[1]))
    try:
        conn.send(("ready", os.getpid()))
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "stop":
                break
            _, pred, gold, timeout_s = msg
            try:
                conn.send(worker.check(pred, gold, timeout_s))
            except (BrokenPipeError, OSError):
                break
    finally:
        worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
