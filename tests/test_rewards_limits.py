"""Rewards under hostile input: hard time limit in any thread, adversarial responses, dead servers."""

import asyncio
import os
import signal
import threading
import time

import pytest

from rewards.checker import SERVER_GRACE_S, AnswerChecker
from rewards.config import RewardConfig
from rewards.score import RewardItem, score

TIMEOUT_S = 1.0

#: answers that keep sympy busy far longer than the limit (measured: over 20 s each without it)
PATHOLOGICAL = ["2^{2^{2^{2^{30}}}}", "(x+1)^{100000}", "\\frac{" * 3000 + "1" + "}" * 3000, "1+" * 20000 + "1"]


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(timeout_s=TIMEOUT_S) as c:
        c.wait_ready()
        yield c


def limit_s() -> float:
    """The longest one check may take by the checker's own guarantee: the limit plus ``SERVER_GRACE_S``.

    The server kills and re-forks its worker at ``timeout_s``; the checker waits
    ``SERVER_GRACE_S`` more for the reply before it restarts the server and
    reports a timeout itself. A check past this bound means that guarantee is
    broken (a limit that stopped holding shows up as tens of seconds: PATHOLOGICAL).
    """
    return TIMEOUT_S + SERVER_GRACE_S


#: seconds a loaded machine may add to a check's wall time beyond :func:`limit_s`: the checker's wait for the
#: reply ends at ``limit_s()`` by construction, but the wake-up after it (and the restart that may follow) waits
#: for a core; at load 5-7 on 2 cores that took past the bare bound once. Still far below the unguarded cost.
LOAD_SLACK_S = 3.0


def timed_score(response: str, answer: str, checker, cfg=None):
    """The record and the CPU seconds this process spent scoring it: extraction, format checks and parsing run
    here (under 0.2 s for every input below), the math-verify check in the server (``check_seconds``). CPU
    time, unlike wall time, does not grow with the machine's load; a parser that went quadratic would still
    spend seconds of it."""
    t0 = time.process_time()
    rec = score(RewardItem(response, answer), cfg or RewardConfig(checker_timeout_s=TIMEOUT_S), checker)
    return rec, time.process_time() - t0


def within_the_limit(rec, cpu_seconds: float) -> bool:
    """The check ended within the checker's bound (plus :data:`LOAD_SLACK_S`), and this process's own part of
    the scoring within the bare bound (CPU time)."""
    return rec.check_seconds < limit_s() + LOAD_SLACK_S and cpu_seconds < limit_s()


def boxed(answer: str) -> str:
    return f"<think>\nwork\n</think>\n\\boxed{{{answer}}}"


@pytest.mark.parametrize("k, answer", list(enumerate(PATHOLOGICAL)), ids=["tower", "power", "nested-frac", "long-sum"])
def test_pathological_latex_times_out_and_is_flagged(checker, k, answer):
    rec, seconds = timed_score(boxed(answer), "1", checker)
    assert rec.timed_out and not rec.correct and rec.check_method == "timeout"
    assert rec.reward == 0.0
    assert TIMEOUT_S <= rec.check_seconds and within_the_limit(rec, seconds), (rec.check_seconds, seconds)
    again, _ = timed_score(boxed(answer), "1", checker)  # timeouts are not remembered: it is tried again
    assert again.timed_out and not again.check_cached
    after, _ = timed_score(boxed(f"\\sqrt{{{2 * (k + 2) ** 2}}}"), f"{k + 2}\\sqrt{{2}}", checker)  # a new pair
    assert after.correct and after.check_method == "math_verify" and not after.check_cached


#: name -> (response, whether its answer "7" is correct; None: either is acceptable)
ADVERSARIAL = {
    "1MB-response": ("<think>\n" + "let me think again. " * 52_000 + "\n</think>\n\\boxed{7}", True),
    "1MB-answer": ("<think>\nx\n</think>\n\\boxed{" + "12+" * 350_000 + "1}", False),
    "1MB-of-tags": ("<think>\n" + "<Parallel><Thread>" * 60_000 + "\n</think>\n\\boxed{7}", True),
    "10k-nested-braces": ("<think>\nx\n</think>\n\\boxed{" + "{" * 10_000 + "8" + "}" * 10_000 + "}", False),
    "10k-unclosed-braces": ("<think>\nx\n</think>\n\\boxed{" + "{" * 10_000 + "7", False),
    "10k-boxed": ("<think>\nx\n</think>\n" + "\\boxed{" * 10_000, False),
    "invalid-characters": ("<think>\n\x00\ud800\uffff\x1b[31m\n</think>\n\\boxed{\x00\ud800 7 \udfff}", None),
    "nested-sqrt": ("<think>\nx\n</think>\n\\boxed{" + "\\sqrt{" * 2000 + "2" + "}" * 2000 + "}", False),
    "unbalanced-latex": ("<think>\nx\n</think>\n\\boxed{\\frac{1}{\\left( \\right. \\begin{matrix} 1 & }", False),
    "huge-integer": ("<think>\nx\n</think>\n\\boxed{" + "9" * 100_000 + "}", False),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_responses_return_within_the_limit(checker, name):
    response, expected = ADVERSARIAL[name]
    rec, seconds = timed_score(response, "7", checker)
    # the whole scoring, parsing included (under 0.2 s of CPU for these), within the checker's bound
    assert within_the_limit(rec, seconds), (name, seconds, rec.check_seconds, rec.check_method)
    if expected is not None:
        assert rec.correct == expected, rec


def test_the_limit_holds_in_threads_and_event_loops(checker):
    """math-verify's own timeout uses signal.alarm, which raises outside the main thread; ours does not."""
    results = []

    def in_thread():
        results.append(timed_score(boxed(PATHOLOGICAL[0]), "1", checker))
        m = 10 + len(results)  # a pair not checked before
        results.append(timed_score(boxed(f"\\sqrt{{{3 * m * m}}}"), f"{m}\\sqrt{{3}}", checker))

    threads = [threading.Thread(target=in_thread) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=4 * limit_s() + 10)
    assert not any(t.is_alive() for t in threads)
    slow = [r for r, _ in results if r.timed_out]
    fast = [r for r, _ in results if not r.timed_out]
    assert len(slow) == 2 and len(fast) == 2 and all(r.correct for r in fast)

    async def in_loop():
        return await asyncio.to_thread(timed_score, boxed(PATHOLOGICAL[1]), "1", checker)

    rec, seconds = asyncio.run(in_loop())
    assert rec.timed_out and rec.check_seconds < limit_s() + LOAD_SLACK_S


def test_a_killed_server_is_restarted_and_closing_ends_it():
    c = AnswerChecker(timeout_s=TIMEOUT_S)
    c.wait_ready()
    first = c.server_pid
    os.kill(first, signal.SIGKILL)
    verdict = c.check("\\sqrt{8}", "2\\sqrt{2}")  # the item is sent again to a fresh server
    assert verdict.correct and verdict.method == "math_verify"
    assert c.restarts == 1 and c.server_pid != first
    second = c.server_pid
    c.close()
    for pid in (first, second):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
