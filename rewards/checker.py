"""Check an answer against its reference: fast rules first, then math-verify under a hard time limit.

``AnswerChecker.check(pred, gold)`` first tries :func:`rewards.answer.quick_verdict`
(plain numbers, word answers, identical text). Everything else goes to
math-verify in a separate process (:mod:`rewards.mv_server`), whose worker is
killed and replaced when one item takes longer than ``timeout_s``; the item then
counts as incorrect with ``timed_out=True``. math-verify's verdicts (not its
timeouts or errors) are remembered for the last ``cache_size`` (answer,
reference) pairs: the samples of one GRPO group often end in the same answer,
and math-verify is deterministic. No signal is used in the calling
process, so the limit holds in any thread, in threaded or async Ray actors, and
in plain ones. Calls from several threads are serialised by a lock.

The server's Python path starts with :data:`GRADER_SITE` when that folder exists:
``scripts/setup.sh`` installs antlr4-python3-runtime 4.13.2 there. The shared
environment holds antlr4 4.9.3, which Hydra and OmegaConf (verl's config stack)
need; math-verify's LaTeX parser built for 4.9.3 reads ``10\\%`` as 10 instead
of 0.1, so the grader keeps 4.13.2 in its own process (``rewards.mv_server``
warns on stderr when it runs with another version).

If the server itself stops answering (``timeout_s`` plus a grace of
``SERVER_GRACE_S`` seconds, which only a bug or an overloaded machine can
cause), it is killed and restarted and the item is reported timed out. If it
died (killed from outside), it is restarted and the item sent once more.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from rewards.answer import quick_verdict

#: folder put first on the math-verify server's PYTHONPATH (antlr4 4.13.2, see the module docstring)
GRADER_SITE = Path(sys.prefix) / "grader-site"

#: extra seconds the server may take beyond ``timeout_s`` (to kill and re-fork its worker) before it is restarted
SERVER_GRACE_S = 2.0


@dataclass
class Verdict:
    """Outcome of checking one answer.

    ``method`` is how it was decided: ``"number"``, ``"text"``, ``"same_text"``
    (the fast rules), ``"math_verify"``, ``"timeout"`` or ``"error"`` (math-verify
    raised, its worker died, or the reference could not be parsed; ``error``
    says which). ``seconds`` is the wall time spent on this answer; ``cached``
    marks a math-verify verdict reused for a pair checked before.
    """

    correct: bool
    timed_out: bool
    method: str
    seconds: float
    error: str | None = None
    cached: bool = False


def server_env() -> dict[str, str]:
    """The math-verify server's environment: ours, unbuffered, :data:`GRADER_SITE` first on the path."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if GRADER_SITE.is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(GRADER_SITE)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


class CheckerError(RuntimeError):
    """The math-verify server could not be started."""


class AnswerChecker:
    """Owns one math-verify server process; see the module docstring.

    The server starts in the background at construction (``eager``) or when
    the first answer needs math-verify; the first call that needs it waits for it
    (at most ``start_timeout_s``). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, timeout_s: float = 5.0, memory_limit_mb: int = 4096, start_timeout_s: float = 120.0,
                 eager: bool = True, cache_size: int = 4096):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.start_timeout_s = start_timeout_s
        self.restarts = 0  # server restarts after it stopped answering or died
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._ready = False
        if eager:
            self._launch()

    # ------------------------------------------------------------------ server process

    def _launch(self) -> None:
        ours, theirs = socket.socketpair()
        env = server_env()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "rewards.mv_server", str(theirs.fileno()), str(self.memory_limit_mb)],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._ready = False

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._proc.wait()
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
        self._ready = False

    def _wait_ready(self) -> None:
        if self._ready:
            return
        if self._proc is None:
            self._launch()
        ok = False
        try:
            ok = self._conn.poll(self.start_timeout_s) and self._conn.recv()[0] == "ready"
        except (EOFError, OSError):
            pass
        if not ok:
            code = self._proc.poll()
            self._kill()
            raise CheckerError(f"math-verify server did not start within {self.start_timeout_s:.0f} s "
                               f"(exit code {code}); run 'python -m rewards.mv_server' errors are on stderr")
        self._ready = True

    def wait_ready(self) -> None:
        """Block until the math-verify server is up (raise CheckerError if it cannot start)."""
        with self._lock:
            self._wait_ready()

    @property
    def server_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._proc is not None and self._proc.poll() is None:
                try:
                    self._conn.send(("stop",))
                    self._proc.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            self._kill()

    def __enter__(self) -> "AnswerChecker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._kill()
        except Exception:  # noqa: BLE001 -- interpreter shutdown
            pass

    # ------------------------------------------------------------------ checking

    def check(self, pred: str, gold: str) -> Verdict:
        """Whether ``pred`` (an extracted answer) equals ``gold`` (the reference)."""
        t0 = time.monotonic()
        quick = quick_verdict(pred, gold)
        if quick is not None:
            return Verdict(quick[0], False, quick[1], time.monotonic() - t0)
        with self._lock:
            known = self._cache.get((pred, gold))
            if known is not None:
                self._cache.move_to_end((pred, gold))
                return Verdict(known, False, "math_verify", time.monotonic() - t0, cached=True)
            verdict = self._ask_server(pred, gold)
            if verdict.method == "math_verify":
                self._remember(pred, gold, verdict.correct)
            return verdict

    def _ask_server(self, pred: str, gold: str) -> Verdict:
        for attempt in (1, 2):
            self._wait_ready()
            t0 = time.monotonic()
            try:
                self._conn.send(("check", pred, gold, self.timeout_s))
                reply = self._conn.recv() if self._conn.poll(self.timeout_s + SERVER_GRACE_S) else None
            except (EOFError, OSError) as e:
                # the server died (killed from outside: it runs no math itself); restart, try once more
                code = self._proc.poll()
                self._restart()
                if attempt == 2:
                    return Verdict(False, False, "error", time.monotonic() - t0,
                                   f"math-verify server died twice (exit code {code}): {type(e).__name__}")
                continue
            seconds = time.monotonic() - t0
            if reply is None:
                self._restart()
                return Verdict(False, True, "timeout", seconds, f"math-verify server did not answer within "
                                                                f"{self.timeout_s + SERVER_GRACE_S:.1f} s")
            if reply[0] == "ok":
                return Verdict(bool(reply[1]), False, "math_verify", seconds)
            if reply[0] == "timeout":
                return Verdict(False, True, "timeout", seconds)
            return Verdict(False, False, "error", seconds, reply[1])
        raise AssertionError("unreachable")

    def _remember(self, pred: str, gold: str, correct: bool) -> None:
        if self.cache_size <= 0:
            return
        self._cache[pred, gold] = correct
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _restart(self) -> None:
        self._kill()
        self.restarts += 1
        self._launch()
