"""``L_total``, ``L_crit``, ``eta`` and the reward of trajectories with 0, 1, 2 and 3 blocks, counted by hand.

Every expected number below is written out and derived in a comment; none is
computed with the code under test. The same four trajectories go through
three layers:

1. ``rollout.units.latency`` on units built from per-unit token counts;
2. the spawn/join orchestrator driven by a scripted model (the fake engine of
   ``tests/test_rollout_orchestrator.py``) on the tiny character-level
   tokenizer, where every character and every tag is one token;
3. ``rewards.score.score`` on the orchestrator's text and units.

The scripted model writes, for a plan ``(fills, blocks)``:

* the first sequential request: ``<think>`` (1 token), ``fills[0]`` letters,
  then block 1's head;
* a head of ``k`` threads: ``<Parallel><Outlines>`` (2) + k times
  ``<Outline>N:t</Outline>`` (5 each) + ``</Outlines>`` (1) = 3 + 5k tokens;
* thread ``n`` of block ``j``: ``blocks[j][n]`` letters + ``</Thread>`` (1);
* the request after block ``j``: ``</Parallel>`` (1) + ``fills[j]`` letters +
  the next head, or after the last block the end:
  ``</think>`` (1) + ``\\boxed{3}`` (9 characters) + EOS (1) = 11 tokens.

The orchestrator inserts each thread's seed ``"\\n<Thread>\\nN:"`` (5 tokens)
and one newline after each join (1 token); neither counts by default.
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from rewards.checker import AnswerChecker
from rewards.config import RewardConfig
from rewards.score import RewardItem, score
from rollout.config import RolloutConfig
from rollout.orchestrator import generate
from rollout.tiny import build_tokenizer
from rollout.units import SEQ, THREAD, Unit, encode, latency
from tests.test_rollout_orchestrator import EOS, ScriptedEngine, thread_number

SEED_TOKENS = 5  # "\n<Thread>\nN:" = newline, <Thread>, newline, digit, colon

#: blocks -> (fills, thread body lengths per block)
PLANS = {
    0: ([5], []),
    1: ([2, 0], [[6, 2]]),
    2: ([2, 4, 0], [[3, 9], [5, 1, 2]]),
    3: ([2, 3, 1, 0], [[4, 4], [7, 1], [2, 5, 3]]),
}

# Per-unit completion tokens of each plan, in the orchestrator's unit order, and the measures by hand.
#
# 0 blocks: one request, <think> + 5 letters + the end (11) = 17.
#   L_total = L_crit = 17, eta = 0, speedup 1.
# 1 block: head request 1 + 2 + (3 + 5*2) = 16; threads 6+1 = 7 and 2+1 = 3; end 1 + 0 + 11 = 12.
#   L_total = 16 + 7 + 3 + 12 = 38; L_crit = 16 + 7 + 12 = 35; eta = 1 - 35/38 = 3/38.
# 2 blocks: 16; threads 4, 10; 1 + 4 + (3 + 5*3) = 23; threads 6, 2, 3; end 12.
#   L_total = 16 + 14 + 23 + 11 + 12 = 76; L_crit = 16 + 10 + 23 + 6 + 12 = 67; eta = 9/76.
#   (the blocks' longest threads combined with max instead of a sum: 16 + 23 + 12 + 10 = 61.)
# 3 blocks: 16; threads 5, 5; 1 + 3 + 13 = 17; threads 8, 2; 1 + 1 + 18 = 20; threads 3, 6, 4; end 12.
#   L_total = 16 + 10 + 17 + 10 + 20 + 13 + 12 = 98; L_crit = 16 + 5 + 17 + 8 + 20 + 6 + 12 = 84;
#   eta = 14/98 = 1/7.  (max instead of sum: 16 + 17 + 20 + 12 + 8 = 73.)
SEQ_TOKENS = {0: [17], 1: [16, 12], 2: [16, 23, 12], 3: [16, 17, 20, 12]}
THREAD_TOKENS = {0: [], 1: [[7, 3]], 2: [[4, 10], [6, 2, 3]], 3: [[5, 5], [8, 2], [3, 6, 4]]}
EXPECTED = {  # blocks -> (L_total, L_crit, eta, threads per block)
    0: (17, 17, Fraction(0), []),
    1: (38, 35, Fraction(3, 38), [2]),
    2: (76, 67, Fraction(9, 76), [2, 3]),
    3: (98, 84, Fraction(1, 7), [2, 2, 3]),
}
# The orchestrator's inserted tokens (count_inserted): 5 per seed, 1 per join newline.
#   1 block: total + 2*5 + 1 = 49; crit + 5 (the longest thread's seed) + 1 = 41.
#   2 blocks: total + 5*5 + 2 = 103; crit + 5 + 5 + 2 = 79.
#   3 blocks: total + 7*5 + 3 = 136; crit + 3*5 + 3 = 102.
EXPECTED_INSERTED = {0: (17, 17), 1: (49, 41), 2: (103, 79), 3: (136, 102)}

PROMPT = "Q: 1+2?"  # 7 characters = 7 tokens
# count_prompt adds the 7 prompt tokens to both measures.


def _units(blocks: int, prompt_len: int = 7) -> list[Unit]:
    """Units with the plan's token counts (token ids are placeholders: latency reads lengths and roles)."""
    units = []
    context = [0] * prompt_len
    seq, threads = SEQ_TOKENS[blocks], THREAD_TOKENS[blocks]
    for j, n_seq in enumerate(seq):
        units.append(Unit(list(context), [1] * n_seq, role=SEQ, n_inserted=1 if j else 0))
        context += [1] * n_seq
        if j == len(threads):
            break
        joined = []
        for n, length in enumerate(threads[j], start=1):
            seed = [2] * SEED_TOKENS
            units.append(Unit(context + seed, [3] * length, role=THREAD, block=j + 1, thread=n,
                              n_inserted=SEED_TOKENS))
            joined += seed + [3] * length
        context += joined + [4]  # the join newline
    return units


@pytest.mark.parametrize("blocks", [0, 1, 2, 3])
def test_latency_of_units_by_hand(blocks):
    L_total, L_crit, eta, per_block = EXPECTED[blocks]
    lat = latency(_units(blocks))
    assert (lat.L_total, lat.L_crit, lat.n_blocks, lat.threads_per_block) == (L_total, L_crit, blocks, per_block)
    assert lat.eta == pytest.approx(float(eta), abs=1e-12)
    assert lat.speedup == pytest.approx(L_total / L_crit, abs=1e-12)
    assert lat.is_parallel == (blocks > 0)
    inserted = latency(_units(blocks), count_inserted=True)
    assert (inserted.L_total, inserted.L_crit) == EXPECTED_INSERTED[blocks]
    prompt = latency(_units(blocks), count_prompt=True)
    assert (prompt.L_total, prompt.L_crit) == (L_total + 7, L_crit + 7)
    both = latency(_units(blocks), count_inserted=True, count_prompt=True)
    assert (both.L_total, both.L_crit) == (EXPECTED_INSERTED[blocks][0] + 7, EXPECTED_INSERTED[blocks][1] + 7)


def test_latency_of_no_units_and_of_empty_completions():
    empty = latency([])
    assert (empty.L_total, empty.L_crit, empty.eta, empty.speedup, empty.n_blocks) == (0, 0, 0.0, 1.0, 0)
    assert latency([], count_prompt=True).L_total == 0
    # a trajectory cut before its first token: nothing generated, the prompt alone with count_prompt
    cut = [Unit([0] * 4, [])]
    assert (latency(cut).L_total, latency(cut).eta, latency(cut).speedup) == (0, 0.0, 1.0)
    assert (latency(cut, count_prompt=True).L_total, latency(cut, count_prompt=True).L_crit) == (4, 4)


def test_count_prompt_when_the_prompt_ends_in_outlines():
    """A 10-token prompt ending in </Outlines>: the first unit is thread 1, its context the prompt + a 3-token seed.

    Threads 4 and 2 tokens, then a 5-token tail after a 1-token join newline:
    L_total = 4 + 2 + 5 = 11, L_crit = 4 + 5 = 9; count_prompt adds the 10 prompt tokens (not 13);
    count_inserted adds 3 + 3 + 1 = 7 to L_total and 3 + 1 = 4 to L_crit.
    """
    prompt, seed = list(range(10)), [20, 21, 22]
    units = [Unit(prompt + seed, [30] * 4, role=THREAD, block=1, thread=1, n_inserted=3),
             Unit(prompt + seed, [31] * 2, role=THREAD, block=1, thread=2, n_inserted=3),
             Unit(prompt + seed + [30] * 4 + seed + [31] * 2 + [9], [32] * 5, role=SEQ, n_inserted=1)]
    assert (latency(units).L_total, latency(units).L_crit) == (11, 9)
    with_prompt = latency(units, count_prompt=True)
    assert (with_prompt.L_total, with_prompt.L_crit) == (21, 19)
    assert with_prompt.eta == pytest.approx(1 - 19 / 21)
    both = latency(units, count_prompt=True, count_inserted=True)
    assert (both.L_total, both.L_crit) == (28, 23)


# --------------------------------------------------------------------------- the orchestrator


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _head(k: int) -> str:
    return "<Parallel><Outlines>" + "".join(f"<Outline>{n}:t</Outline>" for n in range(1, k + 1)) + "</Outlines>"


def plan_policy(fills: list[int], blocks: list[list[int]]):
    """The scripted model of the module docstring; a request's block is the number of <Parallel> before it."""
    def policy(prompt_text: str, request) -> str:
        j = prompt_text.count("<Parallel>")
        n = thread_number(prompt_text)
        if n is not None:
            return "b" * blocks[j - 1][n - 1] + "</Thread>"
        opener = "</Parallel>" if j else "<think>"
        if j < len(blocks):
            return opener + "a" * fills[j] + _head(len(blocks[j]))
        return opener + "a" * fills[j] + "</think>\\boxed{3}" + EOS
    return policy


def _generate(tok, blocks: int, prompt_text: str = PROMPT):
    fills, plan = PLANS[blocks]
    engine = ScriptedEngine(tok, plan_policy(fills, plan))
    (t,) = generate(engine, tok, [encode(tok, prompt_text)], RolloutConfig(seed=0))
    return t


@pytest.mark.parametrize("blocks", [0, 1, 2, 3])
def test_orchestrator_trajectories_by_hand(tok, blocks):
    L_total, L_crit, eta, per_block = EXPECTED[blocks]
    t = _generate(tok, blocks)
    assert t.finish_reason == "eos", t.finish_detail
    assert len(encode(tok, PROMPT)) == 7 and len(t.prompt_ids) == 7
    # the units' token counts are the plan's, in request order
    seq = [len(u.completion_ids) for u in t.units if u.role == SEQ]
    threads = [len(u.completion_ids) for u in t.units if u.role == THREAD]
    assert seq == SEQ_TOKENS[blocks] and threads == [n for b in THREAD_TOKENS[blocks] for n in b]
    assert (t.L_total, t.L_crit, t.n_blocks, t.threads_per_block) == (L_total, L_crit, blocks, per_block)
    assert t.eta == pytest.approx(float(eta), abs=1e-12)
    assert t.speedup == pytest.approx(L_total / L_crit, abs=1e-12)
    assert t.n_requests == len(SEQ_TOKENS[blocks]) + sum(len(b) for b in THREAD_TOKENS[blocks])
    inserted = latency(t.units, count_inserted=True)
    assert (inserted.L_total, inserted.L_crit) == EXPECTED_INSERTED[blocks]
    with_prompt = latency(t.units, count_prompt=True)
    assert (with_prompt.L_total, with_prompt.L_crit) == (L_total + 7, L_crit + 7)


def test_orchestrator_prompt_ending_in_outlines_counts_the_prompt_once(tok):
    """The prompt holds block 1's head: 7 + <think> (1) + 2 letters + a 2-thread head (13) = 23 tokens.

    The orchestrator spawns at once: units thread 1 (7 tokens), thread 2 (3), then the end (12):
    L_total = 22, L_crit = 19; with the prompt 45 and 42 (a seed counted as prompt would give 50 and 47).
    """
    prompt_text = PROMPT + "<think>aa" + _head(2)
    assert len(encode(tok, prompt_text)) == 23
    t = _generate(tok, 1, prompt_text)
    assert t.finish_reason == "eos" and [u.role for u in t.units] == [THREAD, THREAD, SEQ]
    assert (t.L_total, t.L_crit) == (22, 19)
    with_prompt = latency(t.units, count_prompt=True)
    assert (with_prompt.L_total, with_prompt.L_crit) == (45, 42)
    rec = score(RewardItem(t.text, "3", t.units), RewardConfig(count_prompt=True), AnswerChecker(eager=False))
    assert (rec.L_total, rec.L_crit) == (45, 42)
    assert rec.eta == pytest.approx(1 - 42 / 45)


# --------------------------------------------------------------------------- the reward

# r = R_correct + min(rho * eta, clip) with rho 0.5, clip 0.2 (the defaults), for a correct, format-valid answer:
#   0 blocks: 1 + 0 = 1;  1 block: 1 + 0.5 * 3/38 = 1 + 3/76;  2 blocks: 1 + 9/152;  3 blocks: 1 + 1/14.
# With rho 2: 0, 6/38 = 0.158 (under the clip), 18/76 = 0.237 -> 0.2 (clipped), 2/7 = 0.286 -> 0.2 (clipped).
R_ACCEL = {0: Fraction(0), 1: Fraction(3, 76), 2: Fraction(9, 152), 3: Fraction(1, 14)}
R_ACCEL_RHO2 = {0: Fraction(0), 1: Fraction(3, 19), 2: Fraction(1, 5), 3: Fraction(1, 5)}


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(eager=False) as c:  # "3" against "3" is decided by the number rule, no server
        yield c


@pytest.mark.parametrize("blocks", [0, 1, 2, 3])
def test_reward_of_orchestrator_trajectories_by_hand(tok, checker, blocks):
    L_total, L_crit, eta, _ = EXPECTED[blocks]
    t = _generate(tok, blocks)
    rec = score(RewardItem(t.text, "3", t.units), RewardConfig(), checker)
    assert rec.correct and rec.format_valid and rec.accel_measured and rec.parallel == (blocks > 0)
    assert (rec.L_total, rec.L_crit, rec.n_blocks) == (L_total, L_crit, blocks)
    assert rec.eta == pytest.approx(float(eta), abs=1e-12)
    assert rec.R_accel == pytest.approx(float(R_ACCEL[blocks]), abs=1e-12)
    assert rec.reward == pytest.approx(1 + float(R_ACCEL[blocks]), abs=1e-12)
    strong = score(RewardItem(t.text, "3", t.units), RewardConfig(rho=2.0), checker)
    assert strong.R_accel == pytest.approx(float(R_ACCEL_RHO2[blocks]), abs=1e-12)
    # a wrong answer earns neither part; the measures stay
    wrong = score(RewardItem(t.text, "4", t.units), RewardConfig(), checker)
    assert (wrong.reward, wrong.R_accel, wrong.L_crit) == (0.0, 0.0, L_crit)
    # count_inserted: 3 blocks -> eta = 1 - 102/136 = 1/4, R_accel = min(0.5 * 1/4, 0.2) = 1/8
    if blocks == 3:
        counted = score(RewardItem(t.text, "3", t.units), RewardConfig(count_inserted=True), checker)
        assert (counted.L_total, counted.L_crit) == (136, 102)
        assert counted.R_accel == pytest.approx(0.125, abs=1e-12)
    assert checker.server_pid is None  # no math-verify was needed
