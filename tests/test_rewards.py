"""Rewards: answer extraction, answer checking, reward components and presets, token measures."""

import random
from fractions import Fraction

import pytest

from rewards.answer import extract_answer, quick_verdict
from rewards.checker import AnswerChecker, Verdict
from rewards.config import RewardConfig
from rewards.score import (
    RewardItem, ScoreRecord, acceleration_reward, correctness_reward, format_reward, score, score_many, total_reward,
)
from rollout.tiny import build_tokenizer
from rollout.task import TaskConfig, make_dataset
from rollout.units import chat_prompt_ids, encode, replay


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(timeout_s=10.0) as c:  # correctness here, not the limit (test_rewards_limits.py)
        c.wait_ready()
        yield c


def final(answer: str) -> str:
    return f"<think>\nsome reasoning\n</think>\n\nThe answer is \\boxed{{{answer}}}."


# ---------------------------------------------------------------------------- correctness

EQUAL = [
    ("1/2", "0.5"), ("\\frac{1}{2}", "0.5"), ("0.75", "\\frac{3}{4}"), ("\\frac{3}{4}", "\\dfrac34"),
    ("1000", "1,000"), ("1234567", "1,234,567"), ("1,000", "1000"),
    ("2\\sqrt{2}", "\\sqrt{8}"), ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
    ("[1,2)", "[1, 2)"), ("(-\\infty, 3]", "(-\\infty,3]"), ("(0,1)\\cup(2,3)", "(0, 1) \\cup (2, 3)"),
    ("\\{1,2\\}", "\\{2,1\\}"), ("\\{1,2,3\\}", "\\{3, 1, 2\\}"),
    ("Paris", "\\text{Paris}"), ("yes", "Yes"), ("\\text{(B)}", "B"),
    ("-3", "-3"), ("-\\frac{1}{2}", "-0.5"), ("-1000", "-1,000"), ("x^2+1", "1+x^2"), ("10\\%", "0.1"),
]

UNEQUAL = [
    ("1/2", "0.6"), ("\\frac{1}{3}", "0.3"), ("1000", "1,001"), ("2\\sqrt{2}", "\\sqrt{6}"),
    ("[1,2)", "(1,2]"), ("\\{1,2\\}", "\\{1,3\\}"), ("Paris", "London"),
    ("Paris", "Sirap"),  # math-verify alone calls these equal (both read as the product a*i*p*r*s)
    ("-3", "3"), ("-\\frac{1}{2}", "0.5"), ("x^2+1", "x^2-1"),
]


@pytest.mark.parametrize("gold, pred", EQUAL)
def test_equal_answers_in_other_forms_are_correct(checker, gold, pred):
    rec = score(RewardItem(final(pred), gold), RewardConfig(), checker)
    assert rec.extraction == "ok" and rec.extracted_answer == pred
    assert rec.correct and not rec.timed_out, rec
    assert rec.R_correct == 1.0


@pytest.mark.parametrize("gold, pred", UNEQUAL)
def test_unequal_answers_are_incorrect(checker, gold, pred):
    rec = score(RewardItem(final(pred), gold), RewardConfig(), checker)
    assert not rec.correct and not rec.timed_out and rec.check_error is None, rec
    assert rec.R_correct == 0.0 and rec.reward == 0.0


def test_math_verify_decides_what_the_fast_rules_cannot(checker):
    assert quick_verdict("\\sqrt{18}", "3\\sqrt{2}") is None
    assert checker.check("\\sqrt{18}", "3\\sqrt{2}") == Verdict(True, False, "math_verify", pytest.approx(0, abs=2))
    assert quick_verdict("0.3333333", "1/3") is None  # too close to call without math-verify's rounding
    # math-verify rounds the float to the reference's precision: equal
    third = checker.check("0.3333333", "1/3")
    assert (third.correct, third.timed_out, third.method) == (True, False, "math_verify")
    unequal = checker.check("\\sqrt{6}", "2\\sqrt{2}")
    assert (unequal.correct, unequal.timed_out, unequal.method) == (False, False, "math_verify")


def test_math_verify_verdicts_are_remembered_per_pair():
    pair = ("\\sqrt{20}", "2\\sqrt{5}")
    with AnswerChecker(timeout_s=2.0, eager=False, cache_size=2) as c:
        first, second = c.check(*pair), c.check(*pair)
        assert (first.correct, first.cached, second.correct, second.cached) == (True, False, True, True)
        c.check("\\sqrt{21}", pair[1])
        c.check("\\sqrt{22}", pair[1])  # the cache holds 2 pairs: the first one is dropped
        assert not c.check(*pair).cached
        c.cache_size = 0  # remembers nothing new
        other = ("\\sqrt{45}", "3\\sqrt{5}")
        assert not c.check(*other).cached and not c.check(*other).cached


def test_fast_rules():
    assert quick_verdict("1,234", "1234") == (True, "number")
    assert quick_verdict("-12", "12") == (False, "number")
    assert quick_verdict("0.75", "\\frac{3}{4}") == (True, "number")
    assert quick_verdict("100001", "100000") == (False, "number")
    assert quick_verdict("100001.0", "100000") is None  # a float: math-verify's rounding rules
    assert quick_verdict("\\text{ Paris }.", "Paris") == (True, "text")
    assert quick_verdict("Sirap", "Paris") == (False, "text")
    assert quick_verdict("\\left[ 1, 2 \\right)", "[1,2)") == (True, "same_text")
    assert quick_verdict("\\sqrt{8}", "2\\sqrt{2}") is None  # different text: math-verify's call


def test_the_last_of_several_boxed_answers_counts(checker):
    response = "<think>\ntry \\boxed{3}\n</think>\nFirst \\boxed{3}, no wait: \\boxed{5}"
    assert score(RewardItem(response, "5"), RewardConfig(), checker).correct
    rec = score(RewardItem(response, "3"), RewardConfig(), checker)
    assert not rec.correct and rec.extracted_answer == "5"


PARALLEL_WITH_BOXED_THREAD = (
    "<think>\n<Parallel>\n<Outlines>\n<Outline>1: first</Outline>\n<Outline>2: second</Outline>\n</Outlines>\n"
    "<Thread>\n1: so it is \\boxed{42}\n</Thread>\n<Thread>\n2: and 40+2\n</Thread>\n</Parallel>\ndone\n"
    "</think>\n\nThe answer is 42."
)


def test_a_boxed_answer_only_inside_a_thread_does_not_count(checker):
    rec = score(RewardItem(PARALLEL_WITH_BOXED_THREAD, "42"), RewardConfig(), checker)
    assert rec.format_valid and rec.parallel
    assert rec.extraction == "no_boxed" and rec.extracted_answer is None
    assert not rec.correct and rec.check_method == "none" and rec.reward == 0.0
    whole = score(RewardItem(PARALLEL_WITH_BOXED_THREAD, "42"), RewardConfig(answer_region="whole"), checker)
    assert whole.correct and whole.extracted_answer == "42"


def test_no_boxed_answer_or_no_end_of_thinking(checker):
    rec = score(RewardItem("<think>\nhmm\n</think>\nIt is 7.", "7"), RewardConfig(), checker)
    assert (rec.correct, rec.extraction, rec.timed_out) == (False, "no_boxed", False)
    rec = score(RewardItem("<think>\nit is \\boxed{7}", "7"), RewardConfig(), checker)
    assert (rec.correct, rec.extraction) == (False, "no_think_close")


@pytest.mark.parametrize("text, answer, status", [
    ("</think> \\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}", "ok"),
    ("</think> \\boxed{\\{1, 2\\}}", "\\{1, 2\\}", "ok"),        # escaped braces are not delimiters
    ("</think> \\boxed {12}", "12", "ok"),
    ("</think> \\boxed{\\boxed{3}}", "3", "ok"),                    # the innermost is the last one
    ("</think> \\boxed{3} and \\boxedfoo", "3", "ok"),
    ("</think> \\boxed{3} then \\boxed{4", None, "unclosed_boxed"),  # no fallback to an earlier answer
    ("</think> 3", None, "no_boxed"),
    ("\\boxed{3}", None, "no_think_close"),
])
def test_extraction(text, answer, status):
    got = extract_answer(text)
    assert (got.answer, got.status) == (answer, status)


def _number_pairs(n: int = 240) -> list[tuple[str, str]]:
    """Numbers in every plain form, paired with equal, near and far values in other forms."""
    rng = random.Random(0)
    pairs = []
    for _ in range(n):
        num, den = rng.randint(-999, 999), rng.choice([1, 2, 3, 4, 7, 8, 25, 1000])
        value = Fraction(num, den)
        delta = Fraction(rng.choice([0, 0, 1, -1]), rng.choice([1, 10**3, 10**5, 10**7, 10**9]))
        other = value + delta
        forms = [f"{value.numerator}/{value.denominator}", f"\\frac{{{value.numerator}}}{{{value.denominator}}}",
                 f"{float(value):.{rng.randint(0, 9)}f}", f"{value.numerator:,}" if den == 1 else f"{float(value)}"]
        other_forms = [f"{float(other):.{rng.randint(1, 9)}f}", f"{other.numerator}/{other.denominator}",
                       f"{other.numerator}" if other.denominator == 1 else f"{float(other):.12g}"]
        pairs.append((rng.choice(other_forms), rng.choice(forms)))
    return pairs


def test_the_number_rule_agrees_with_math_verify():
    from rewards.mv_server import check_pair

    decided = 0
    for pred, gold in _number_pairs():
        quick = quick_verdict(pred, gold)
        if quick is None:
            continue
        decided += 1
        assert quick[0] == check_pair(pred, gold, {})[0], (pred, gold, quick)
    assert decided > 100


# ---------------------------------------------------------------------------- reward and presets


def test_reward_components_of_the_paper_preset():
    cfg = RewardConfig(preset="paper")
    assert total_reward(True, True, 0.3, cfg)[0] == pytest.approx(1.0 + 0.15)
    assert total_reward(True, True, 0.6, cfg)[0] == pytest.approx(1.0 + 0.2)   # min(0.3, 0.2)
    assert total_reward(False, True, 0.6, cfg)[0] == 0.0
    assert total_reward(True, False, 0.6, cfg)[0] == 1.0                      # malformed: no bonus
    assert total_reward(True, True, None, cfg)[0] == 1.0                      # unmeasured: no bonus


def test_reward_components_of_the_official_code_preset():
    cfg = RewardConfig(preset="official-code")
    assert (cfg.rho, cfg.clip, cfg.incorrect_reward, cfg.accel_form) == (0.5, 0.2, -1.0, "clip_then_scale")
    assert total_reward(True, True, 0.1, cfg)[0] == pytest.approx(1.05)      # 0.5 * min(0.1, 0.2)
    assert total_reward(True, True, 0.3, cfg)[0] == pytest.approx(1.10)      # 0.5 * min(0.3, 0.2)
    assert total_reward(False, True, 0.3, cfg)[0] == -1.0


def test_components_return_their_metrics():
    cfg = RewardConfig(rho=1.0, clip=0.5, format_penalty=0.25, incorrect_reward=-0.5)
    assert correctness_reward(False, cfg) == (-0.5, {"R_correct": -0.5, "correct": 0.0})
    assert acceleration_reward(0.3, True, True, cfg) == (pytest.approx(0.3), {"R_accel": pytest.approx(0.3)})
    assert acceleration_reward(0.3, False, True, cfg)[0] == 0.0
    assert format_reward(False, cfg) == (-0.25, {"format_penalty": 0.25, "format_valid": 0.0})
    reward, metrics = total_reward(True, False, 0.3, cfg)
    assert reward == pytest.approx(0.75) and metrics["reward"] == reward and metrics["R_accel"] == 0.0


def test_preset_conflicts_and_bad_values_are_errors():
    with pytest.raises(ValueError, match="fixes rho"):
        RewardConfig(preset="paper", rho=0.7)
    with pytest.raises(ValueError, match="unknown reward preset"):
        RewardConfig(preset="papr")
    with pytest.raises(ValueError, match="timeout_s"):
        RewardConfig(checker_timeout_s=0)
    assert RewardConfig(preset="official-code", incorrect_reward=-1.0).incorrect_reward == -1.0
    assert RewardConfig(rho=0.7).rho == 0.7


def test_config_loads_from_yaml_with_overrides(tmp_path):
    from cluster.config import ConfigError, load_config

    path = tmp_path / "r.yaml"
    path.write_text("preset: official-code\nchecker_timeout_s: 3\n")
    cfg = load_config(RewardConfig, path, ["format_penalty=0.5"])
    assert (cfg.incorrect_reward, cfg.checker_timeout_s, cfg.format_penalty) == (-1.0, 3.0, 0.5)
    with pytest.raises(ConfigError, match="clip"):
        load_config(RewardConfig, None, ["clp=0.1"])


# ---------------------------------------------------------------------------- token measures

# Hand-written responses over the tiny tokenizer, where every character and every tag is one token.
# Parallel: the head "<think>\n" + "<Parallel>\n<Outlines>\n" + 2 x "<Outline>N: a</Outline>\n" + "</Outlines>"
#   = 2 + 4 + 2 * 7 + 1 = 21 tokens; thread 1 " xxxx\n</Thread>" = 7, thread 2 " yy\n</Thread>" = 5 (after
#   their 5-token seeds "\n<Thread>\nN:"); the tail "</Parallel>" + "\nso 6\n</think>\n\n\\boxed{6}" + EOS
#   = 1 + 18 + 1 = 20 (after a 1-token join newline).
#   L_total = 21 + 7 + 5 + 20 = 53; L_crit = 21 + 7 + 20 = 48; eta = 5/53; R_accel = min(0.5 * 5/53, 0.2) = 5/106.
#   count_inserted: 53 + 5 + 5 + 1 = 64 and 48 + 5 + 1 = 54; count_prompt: + the 3 prompt tokens.
# Sequential: "<think>\nso 6\n</think>\n\n\\boxed{6}" + EOS = 19 + 1 = 20 tokens.
PARALLEL = ("<think>\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\n"
            "<Thread>\n1: xxxx\n</Thread>\n<Thread>\n2: yy\n</Thread>\n</Parallel>\nso 6\n</think>\n\n\\boxed{6}")
SEQUENTIAL = "<think>\nso 6\n</think>\n\n\\boxed{6}"


@pytest.fixture(scope="module")
def traces():
    tok = build_tokenizer()
    prompt = encode(tok, "Q: ")
    return {kind: replay(prompt, text, tok, tok.eos_token_id)
            for kind, text in (("parallel", PARALLEL), ("sequential", SEQUENTIAL))}


def test_token_measures_come_from_the_units(checker, traces):
    cfg = RewardConfig()
    assert [len(u.completion_ids) for u in traces["parallel"]] == [21, 7, 5, 20]
    par = score(RewardItem(PARALLEL, "6", traces["parallel"]), cfg, checker)
    assert (par.L_total, par.L_crit, par.n_blocks) == (53, 48, 1)
    assert par.eta == pytest.approx(5 / 53, abs=1e-12) and par.speedup == pytest.approx(53 / 48, abs=1e-12)
    assert par.correct and par.format_valid and par.parallel and par.accel_measured
    assert par.R_accel == pytest.approx(5 / 106, abs=1e-12) and par.reward == pytest.approx(1 + 5 / 106, abs=1e-12)
    seq = score(RewardItem(SEQUENTIAL, "6", traces["sequential"]), cfg, checker)
    assert (seq.L_total, seq.L_crit, seq.eta, seq.R_accel, seq.reward, seq.parallel, seq.n_blocks) == \
        (20, 20, 0.0, 0.0, 1.0, False, 0)
    wrong = score(RewardItem(PARALLEL, "7", traces["parallel"]), cfg, checker)
    assert (wrong.correct, wrong.R_accel, wrong.reward) == (False, 0.0, 0.0)
    assert (wrong.L_total, wrong.L_crit) == (53, 48)


def test_counting_switches_add_inserted_and_prompt_tokens(checker, traces):
    item = RewardItem(PARALLEL, "6", traces["parallel"])
    inserted = score(item, RewardConfig(count_inserted=True), checker)
    assert (inserted.L_total, inserted.L_crit) == (64, 54)
    assert inserted.R_accel == pytest.approx(0.5 * (1 - 54 / 64), abs=1e-12)
    prompt = score(item, RewardConfig(count_prompt=True), checker)
    assert (prompt.L_total, prompt.L_crit) == (56, 51)
    assert prompt.eta == pytest.approx(5 / 56, abs=1e-12)
    both = score(item, RewardConfig(count_inserted=True, count_prompt=True), checker)
    assert (both.L_total, both.L_crit) == (67, 57)


def test_without_units_there_is_no_acceleration_reward(checker):
    r = score(RewardItem(PARALLEL, "6"), RewardConfig(), checker)
    assert r.correct and not r.accel_measured and r.eta is None and r.R_accel == 0.0 and r.reward == 1.0


def test_format_penalty_applies_to_malformed_responses(checker):
    malformed = "<think>\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n</think>\n\\boxed{4}"
    rec = score(RewardItem(malformed, "4"), RewardConfig(format_penalty=0.5), checker)
    assert not rec.format_valid and rec.format_error and rec.correct
    assert (rec.R_correct, rec.format_penalty, rec.reward) == (1.0, 0.5, 0.5)


def test_score_many_metrics_and_the_record_dict(checker, traces):
    cfg = RewardConfig(format_penalty=0.5)
    items = [RewardItem(PARALLEL, "6", traces["parallel"]), RewardItem("<think>\nhmm\n</think>\nno answer", "6")]
    par, none = score_many(items, cfg, checker)
    # a format-valid response pays no penalty, whatever its size
    assert (par.format_penalty, par.reward) == (0.0, pytest.approx(1 + 5 / 106))
    # no boxed answer: nothing was checked, in no time
    assert (none.check_method, none.check_seconds, none.extraction, none.correct) == ("none", 0.0, "no_boxed", False)
    m = par.metrics()
    assert m["L_total"] == 53.0 and m["L_crit"] == 48.0 and m["correct"] == 1.0 and m["parallel"] == 1.0
    assert m["reward"] == pytest.approx(1 + 5 / 106) and isinstance(m["n_blocks"], float)
    assert "extracted_answer" not in m and "format_error" not in m  # text fields are not metrics
    assert "L_total" not in none.metrics()  # unmeasured: left out
    d = par.to_dict()
    assert d["extracted_answer"] == "6" and d["L_crit"] == 48 and d["correct"] is True
    assert set(d) == set(ScoreRecord.__dataclass_fields__)


def test_the_checkers_verdict_is_reported_as_it_came():
    class Fixed:
        def __init__(self, verdict):
            self.verdict = verdict

        def check(self, pred, gold):
            return self.verdict

    broken = score(RewardItem(final("x"), "1"), RewardConfig(), Fixed(Verdict(False, False, "error", 0.25, "boom")))
    assert (broken.check_method, broken.check_error, broken.check_seconds, broken.check_cached) == \
        ("error", "boom", 0.25, False)
    cached = score(RewardItem(final("x"), "1"), RewardConfig(), Fixed(Verdict(True, False, "math_verify", 0.0,
                                                                              cached=True)))
    assert (cached.correct, cached.check_cached, cached.check_error, cached.timed_out) == (True, True, None, False)


# ---------------------------------------------------------------------------- cut responses, scoring errors


@pytest.fixture(scope="module")
def task_traces():
    """A task record and its responses replayed into units."""
    tok = build_tokenizer()
    rec = make_dataset(TaskConfig(min_threads=3, max_threads=3), {"train": 1}, seed=3)["train"][0]
    prompt = chat_prompt_ids(tok, rec["prompt"])
    return rec, {kind: replay(prompt, rec[f"response_{kind}"], tok, tok.eos_token_id)
                 for kind in ("parallel", "sequential")}



class CountingChecker:
    """A checker that says "correct" for equal text and counts its calls."""

    def __init__(self):
        self.calls = 0

    def check(self, pred: str, gold: str) -> Verdict:
        self.calls += 1
        return Verdict(pred == gold, False, "text", 0.0)


@pytest.mark.parametrize("reason", ["budget", "context", "too_many_threads", "too_many_blocks", "bad_outlines",
                                    "eos_in_thread", "error", "length"])
def test_a_cut_response_gets_no_correctness_reward_by_default(task_traces, reason):
    rec, units = task_traces
    cfg = RewardConfig(incorrect_reward=-0.5)
    checker = CountingChecker()
    cut = score(RewardItem(rec["response_parallel"], rec["answer"], units["parallel"], reason), cfg, checker)
    assert cut.cut and not cut.correct and checker.calls == 0 and cut.check_method == "cut"
    assert (cut.R_correct, cut.R_accel, cut.reward) == (-0.5, 0.0, -0.5)
    assert cut.extracted_answer == rec["answer"] and cut.eta > 0 and cut.metrics()["cut"] == 1.0
    rewarded = score(RewardItem(rec["response_parallel"], rec["answer"], units["parallel"], reason),
                     RewardConfig(incorrect_reward=-0.5, reward_cut_responses=True), checker)
    assert rewarded.cut and rewarded.correct and rewarded.R_accel > 0 and checker.calls == 1


@pytest.mark.parametrize("reason", ["eos", "stop", None])
def test_a_response_that_ended_by_itself_is_checked(task_traces, reason):
    rec, units = task_traces
    r = score(RewardItem(rec["response_parallel"], rec["answer"], units["parallel"], reason), RewardConfig(),
              CountingChecker())
    assert not r.cut and r.correct and r.reward > 1.0


def test_an_item_whose_scoring_raises_is_incorrect_with_its_error_and_a_warning(task_traces, caplog):
    from rewards.score import score_many

    rec, units = task_traces
    good = RewardItem(rec["response_parallel"], rec["answer"], units["parallel"], "eos")
    bad_units = RewardItem(rec["response_parallel"], rec["answer"], [object()], "eos")  # not units: latency raises
    not_text = RewardItem(None, rec["answer"])  # type: ignore[arg-type]
    cfg = RewardConfig(incorrect_reward=-1.0, format_penalty=0.25)
    with caplog.at_level("WARNING", logger="rewards.score"):
        records = score_many([good, bad_units, not_text, good], cfg, CountingChecker())
    assert [r.error is None for r in records] == [True, False, False, True]
    assert records[0].correct and records[3].reward == records[0].reward
    for r in records[1:3]:
        assert (r.correct, r.format_valid, r.reward, r.check_method) == (False, False, -1.25, "error")
        assert r.metrics()["error"] == 1.0 and r.metrics()["correct"] == 0.0
    assert records[1].error.startswith("AttributeError") and records[2].error.startswith("AttributeError")
    assert len([m for m in caplog.messages if "could not be scored" in m]) == 2
    assert records[0].metrics()["error"] == 0.0


def test_the_record_of_an_unscorable_item_field_by_field(caplog):
    class Raising:
        def check(self, pred, gold):
            raise ValueError("x" * 400)

    cfg = RewardConfig(incorrect_reward=-1.0, format_penalty=0.25)
    with caplog.at_level("WARNING", logger="rewards.score"):
        rec, = score_many([RewardItem("<think>\nt\n</think>\n\\boxed{1}", "1")], cfg, Raising())
    error = "ValueError: " + "x" * 300  # the exception's text, cut at 300 characters
    # incorrect (R_correct = incorrect_reward) and not format-valid (the penalty), nothing measured or checked
    assert rec.to_dict() == {
        "reward": -1.25, "R_correct": -1.0, "R_accel": 0.0, "format_penalty": 0.25, "correct": False,
        "timed_out": False, "format_valid": False, "format_error": None, "extracted_answer": None,
        "extraction": "error", "check_method": "error", "check_error": None, "check_seconds": 0.0,
        "check_cached": False, "parallel": False, "accel_measured": False, "L_total": None, "L_crit": None,
        "eta": None, "speedup": None, "n_blocks": None, "cut": False, "error": error}
    assert [type(v) for v in (rec.timed_out, rec.check_cached, rec.parallel, rec.accel_measured)] == [bool] * 4
    assert caplog.messages == [f"item 0 could not be scored, counted as incorrect: {error}"]


def test_a_cut_response_is_not_checked_and_takes_no_time(task_traces):
    rec, units = task_traces
    cut = score(RewardItem(rec["response_parallel"], rec["answer"], units["parallel"], "budget"), RewardConfig(),
                CountingChecker())
    assert cut.timed_out is False and cut.check_seconds == 0.0 and cut.check_cached is False
