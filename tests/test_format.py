"""Format module: parse/serialize round trips and a reason for every malformation."""

import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rollout.format import (
    ALL_TAGS, Block, FormatError, Response, canonicalize, flatten, parse, serialize, validate,
)
from rollout.task import TaskConfig, make_dataset

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_plain = st.text(alphabet="abcxyz0123456789 +-*=:.,()\n<>/", min_size=0, max_size=30)
_gap = st.sampled_from(["", "\n", " ", "\n\n", " \n "])


def _clean(text: str) -> bool:
    return not any(tag in text for tag in ALL_TAGS) and not re.search(r"(?i)thread", text)


@st.composite
def blocks(draw, max_threads=6):
    k = draw(st.integers(1, max_threads))
    outlines = [f"{i}:" + draw(_plain.filter(lambda t: t.strip() and _clean(t))) for i in range(1, k + 1)]
    threads = [draw(st.sampled_from(["", "\n"])) + f"{i}:" + draw(_plain.filter(lambda t: t.strip() and _clean(t)))
               for i in range(1, k + 1)]
    gaps = [draw(_gap) for _ in range(3 + 2 * k)]
    return Block(outlines, threads, gaps)


@st.composite
def responses(draw):
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        parts.append(draw(_plain.filter(_clean)))
        parts.append(draw(blocks()))
    answer = draw(_plain.filter(_clean))
    text = "<think>\n" + serialize(Response(parts)) + "\n</think>\n\n" + answer
    return text


@SETTINGS
@given(responses())
def test_round_trip_and_valid(text):
    assert serialize(parse(text)) == text
    assert validate(text) == []


@SETTINGS
@given(responses())
def test_canonical_form_is_stable_and_valid(text):
    canonical = serialize(canonicalize(parse(text)))
    assert serialize(canonicalize(parse(canonical))) == canonical
    assert validate(canonical) == []


def test_side_by_side_threads_parse():
    text = ("<Parallel><Outlines><Outline>1: a</Outline><Outline>2: b</Outline></Outlines>"
            "<Thread>1: x</Thread><Thread>2: y</Thread></Parallel>")
    assert validate(text) == []
    assert serialize(parse(text)) == text
    assert parse(text).blocks[0].thread_numbers == [1, 2]


def test_sequential_response_is_valid():
    assert validate("<think>\njust thinking\n</think>\n\n\\boxed{3}") == []
    assert validate("") == []


def test_synthetic_task_responses_valid_and_flatten_to_sequential():
    data = make_dataset(TaskConfig(blocks=2), {"train": 20}, seed=3)
    for r in data["train"]:
        assert validate(r["response_parallel"]) == []
        assert validate(r["response_sequential"]) == []
        assert flatten(parse(r["response_parallel"])) == r["response_sequential"]


# ---------------------------------------------------------------- malformed responses

GOOD = ("<think>\nstart\n<Parallel>\n<Outlines>\n<Outline>1: do a</Outline>\n<Outline>2: do b</Outline>\n"
        "</Outlines>\n<Thread>\n1: work a\n</Thread>\n<Thread>\n2: work b\n</Thread>\n</Parallel>\nend\n"
        "</think>\n\n\\boxed{1}")


def _reasons(text):
    reasons = validate(text)
    assert reasons, f"no reason for malformed text {text!r}"
    assert all(isinstance(r, str) and r for r in reasons)
    return " | ".join(reasons)


@pytest.mark.parametrize("mutation, expected", [
    (lambda t: t.replace("</Parallel>", "", 1), "expected <Thread> or </Parallel>"),
    (lambda t: t[:t.index("</Parallel>")], "truncated"),
    (lambda t: t.replace("<Parallel>", "", 1), "outside"),
    (lambda t: t.replace("</Thread>", "", 1), "<Thread> inside <Thread>"),
    (lambda t: t.replace("1: work a", "1: <Parallel>"), "cannot nest"),
    (lambda t: t.replace("<Outline>2:", "<Outline>3:").replace("\n2: work", "\n3: work"), "numbered 1,3"),
    (lambda t: t.replace("<Outline>2:", "<Outline>1:").replace("\n2: work", "\n1: work"), "numbered 1,1"),
    (lambda t: t.replace("<Thread>\n2: work b\n</Thread>\n", ""), "2 outlines but 1 threads"),
    (lambda t: t.replace("2: work b", "2: "), "thread 2 is empty"),
    (lambda t: t.replace("</Thread>\n<Thread>", "</Thread>\nhello\n<Thread>"), "unexpected text"),
    (lambda t: t.replace("<Outline>1: do a", "<Outline>do a"), "does not start with 'N:'"),
    (lambda t: t.replace("2: work b", "2: use the result of thread 1"), "refers to thread 1"),
    (lambda t: t.replace("<Outlines>\n<Outline>1: do a</Outline>\n<Outline>2: do b</Outline>\n</Outlines>",
                         "<Outlines></Outlines>"), "no outlines"),
    (lambda t: t.replace("</think>", ""), "never closed"),
    (lambda t: t + "<Parallel><Outlines><Outline>1: a</Outline></Outlines><Thread>1: b</Thread></Parallel>",
     "after </think>"),
])
def test_each_rule_has_a_reason(mutation, expected):
    assert validate(GOOD) == []
    text = mutation(GOOD)
    assert expected in _reasons(text)


_TOKEN_RE = re.compile("|".join(re.escape(t) for t in ALL_TAGS) + r"|[\s\S]")


def test_truncation_at_every_token_position():
    """Tags are single tokens and other characters single byte tokens in the tiny
    tokenizer: cut after every token. Inside the reasoning every cut is reported."""
    data = make_dataset(TaskConfig(blocks=2), {"train": 2}, seed=0)
    for text in [GOOD] + [r["response_parallel"] for r in data["train"]]:
        tokens = _TOKEN_RE.findall(text)
        assert "".join(tokens) == text
        reasoning_end = tokens.index("</think>")
        for cut in range(1, len(tokens)):
            prefix = "".join(tokens[:cut])
            reasons = validate(prefix)
            if cut <= reasoning_end:
                assert reasons, f"truncation after token {cut} has no reason: {prefix!r}"


def test_thousands_of_outlines():
    n = 3000
    outlines = "".join(f"<Outline>{i}: o</Outline>" for i in range(1, n + 1))
    threads = "".join(f"<Thread>{i}: t</Thread>" for i in range(1, n + 1))
    text = f"<Parallel><Outlines>{outlines}</Outlines>{threads}</Parallel>"
    assert "more than the limit" in _reasons(text)
    assert validate(text, max_threads=None) == []


def test_deep_nesting_does_not_recurse():
    _reasons("<Parallel>" * 10000 + "</Parallel>" * 10000)
    _reasons("<Thread>" * 10000)


@SETTINGS
@given(st.lists(st.sampled_from(list(ALL_TAGS) + ["1:", "2:", " ", "\n", "x"]), max_size=60).map("".join))
def test_random_tag_soup_never_raises(text):
    reasons = validate(text)
    assert isinstance(reasons, list)
    try:
        response = parse(text)
    except FormatError:
        assert reasons
        return
    assert serialize(response) == text


@SETTINGS
@given(responses(), st.data())
def test_dropping_any_block_tag_is_reported(text, data):
    tags = [m for m in re.finditer("|".join(re.escape(t) for t in ALL_TAGS[:8]), text)]
    assume(tags)
    m = data.draw(st.sampled_from(tags))
    broken = text[:m.start()] + text[m.end():]
    if m.group() in ("<Outline>", "</Outline>") and broken.count("<Outline>") == broken.count("</Outline>"):
        return  # cannot happen: removing one side always unbalances the pair
    _reasons(broken)


def test_structural_limits_are_checked_on_the_text_first():
    from rollout.format import leading_number, limit_reasons, thread_references

    digits = "7" * 5000
    assert leading_number(f"{digits}: x") is None and leading_number("123456789: x") == 123456789
    assert thread_references(f"see thread {digits} and thread 2", own=1) == [2]
    text = GOOD.replace("<Outline>1:", f"<Outline>{digits}:").replace("\n1: work", f"\n{digits}: work")
    assert validate(text) == [f"char {text.index(digits)}: outline number with 5000 digits, more than 9"]
    assert limit_reasons(GOOD) == [] and limit_reasons(GOOD, max_threads=1) == ["block 1: 2 threads, more than the "
                                                                                 "limit of 1"]
    assert limit_reasons(GOOD, max_blocks=0) == ["the response has 1 blocks, more than the limit of 0"]
    assert limit_reasons(GOOD, max_bytes=10) == [f"the response has {len(GOOD)} bytes (UTF-8), more than the "
                                                 "limit of 10"]
    assert validate(GOOD, max_bytes=10) == limit_reasons(GOOD, max_bytes=10)
    assert limit_reasons("\u20ac" * 4, max_bytes=11) == ["the response has 12 bytes (UTF-8), more than the limit of 11"]
    assert limit_reasons(GOOD, max_threads=None, max_blocks=None, max_bytes=None) == []


def _block(outlines, threads):
    return ("<Parallel><Outlines>" + "".join(f"<Outline>{o}</Outline>" for o in outlines) + "</Outlines>"
            + "".join(f"<Thread>{t}</Thread>" for t in threads) + "</Parallel>")


@pytest.mark.parametrize("text, reasons", [
    (_block(["1: a", "x"], ["1: b", "2: c"]), ["block 1: outline 2 does not start with 'N:'"]),
    (_block(["1: a", "2:  "], ["1: b", "2: c"]), ["block 1: outline 2 is empty"]),
    (_block(["1: a", "2: b"], ["1: b", "2:"]), ["block 1: thread 2 is empty"]),
    (_block(["1: a"], ["b"]), ["block 1: thread 1 does not start with 'N:'"]),
    (_block(["1: a", "2: b"], ["1: see thread 2", "2: c"]), ["block 1: thread 1 refers to thread 2"]),
    (_block(["1: a", "2: b"], ["1: x"]),
     ["block 1: 2 outlines but 1 threads", "block 1: threads are numbered 1, outlines 1,2"]),
    (_block([f"{i}: x" for i in range(2, 13)], [f"{i}: y" for i in range(2, 13)]),
     ["block 1: outlines are numbered 2,3,4,5,6,7,8,9,10,11,... (11 in all), expected 1..11"]),
    (_block([f"{i}: x" for i in range(2, 12)], [f"{i}: y" for i in range(2, 12)]),
     ["block 1: outlines are numbered 2,3,4,5,6,7,8,9,10,11, expected 1..10"]),
    (_block(["1: a", "2: b"], ["2: x", "1: y"]), ["block 1: threads are numbered 2,1, outlines 1,2"]),
    ("<Parallel><Outlines></Outlines></Parallel>", ["block 1: no outlines"]),
    ("<Parallel><Outlines>" + "x" * 40 + "</Outlines></Parallel>",
     ["block 1 at char 20: unexpected text '" + "x" * 40 + "' after <Outlines> (expected <Outline> or "
      "</Outlines>)"]),
    ("<Parallel><Outlines>" + "x" * 41 + "</Outlines></Parallel>",
     ["block 1 at char 20: unexpected text '" + "x" * 40 + "...' after <Outlines> (expected <Outline> or "
      "</Outlines>)"]),
    ("<Parallel><Outlines><Outline>1: a</Outline></Outlines><Thread>1: b</Outlines>",
     ["block 1 at char 66: </Outlines> inside <Thread>"]),  # 10 + 10 + 9 + 4 + 10 + 11 + 8 + 4 characters
    ("<Parallel><Outlines><Outline>1: a</Outline></Outlines><Thread>1: b</Thread>" + "y" * 50 + "</Parallel>",
     ["block 1 at char 75: unexpected text '" + "y" * 40 + "...' after </Thread> (expected <Thread> or "
      "</Parallel>)"]),
])
def test_every_reason_word_for_word(text, reasons):
    assert validate(text) == reasons


def test_the_thread_limit_is_inclusive():
    text = _block(["1: a", "2: b", "3: c"], ["1: x", "2: y", "3: z"])
    assert validate(text, max_threads=3) == []
    assert validate(text, max_threads=2) == ["block 1: 3 threads, more than the limit of 2"]
    assert validate(text, max_threads=None) == []


def test_block_bodies_and_canonical_whitespace():
    block = Block(["1: plan", "free text"], ["\n1: work", "no number"], ["", " ", "\t", "", "  ", "", ""])
    assert [block.outline_body(0), block.outline_body(1)] == [" plan", "free text"]
    assert [block.thread_body(0), block.thread_body(1)] == [" work", "no number"]
    # canonical form: the model's own whitespace (head gaps) kept, the orchestrator's normalised, a thread
    # without a number left as it is
    (canon,) = canonicalize(Response([block])).parts
    assert canon.gaps == ["", " ", "\t", "", "\n", "\n", "\n"]
    assert canon.threads == ["\n1: work", "no number"]
    assert serialize(Response([canon])) == ("<Parallel><Outlines> <Outline>1: plan</Outline>\t<Outline>free text"
                                            "</Outline></Outlines>\n<Thread>\n1: work</Thread>\n<Thread>no number"
                                            "</Thread>\n</Parallel>")


_HEAD = "<Parallel><Outlines><Outline>1: a</Outline></Outlines>"  # 54 characters
_ONE = _HEAD + "<Thread>1: b</Thread></Parallel>"  # 86 characters


@pytest.mark.parametrize("text, reasons", [
    # grammar errors: where (character offset), what was expected, what was found
    ("<Parallel>x<Outlines></Outlines></Parallel>",
     ["block 1 at char 10: unexpected text 'x' after <Parallel> (expected <Outlines>)"]),
    ("<Parallel><Outlines><Outline>1: a</Outline>x</Outlines></Parallel>",
     ["block 1 at char 43: unexpected text 'x' after </Outline> (expected <Outline> or </Outlines>)"]),
    (_HEAD + "x<Thread>1: b</Thread></Parallel>",
     ["block 1 at char 54: unexpected text 'x' after </Outlines> (expected <Thread>)"]),
    ("<Parallel><Outlines><Outline>1: a</Outline><Thread>1: b</Thread></Parallel>",
     ["block 1 at char 43: expected </Outlines> to close the outlines, found <Thread>"]),
    (_HEAD + "<Thread>1: b</Thread><Outlines>",
     ["block 1 at char 75: expected </Parallel> to close the block, found <Outlines>"]),
    ("<Parallel><Thread>", ["block 1 at char 10: expected <Outlines> after <Parallel>, found <Thread>"]),
    ("<Parallel><Outlines><Outline>1: a", ["block 1: truncated inside <Outline>, missing </Outline>"]),
    ("<Parallel><Outlines><Outline>1: a<Parallel>",
     ["block 1 at char 33: <Parallel> inside <Outline> (blocks cannot nest)"]),
    (_ONE + "x<Parallel><Outlines>y",  # the second block is named block 2 (86 + 1 + 10 + 10 = 107)
     ["block 2 at char 107: unexpected text 'y' after <Outlines> (expected <Outline> or </Outlines>)"]),
    ("<Parallel><Outlines><Outline></Outline></Outlines><Thread>1: b</Thread></Parallel>",
     ["block 1: outline 1 does not start with 'N:'"]),
    # the think tags
    ("<think>a</think><think>b</think>",
     ["<think> after </think>", "2 <think> and 2 </think> tags, expected at most one of each"]),
    ("<think>a</think></think>",
     ["</think> without <think>", "1 <think> and 2 </think> tags, expected at most one of each"]),
    ("<think><think>a</think>",
     ["<think> is never closed (truncated reasoning)", "2 <think> and 1 </think> tags, expected at most one of each"]),
    ("a</think>", ["</think> without <think>"]),
    ("<think>a", ["<think> is never closed (truncated reasoning)"]),
    ("<think>x</think>" + _ONE, ["a block appears after </think> (in the final answer)"]),
    # every thread is checked, even after one without a number; a thread may name itself
    ("<Parallel><Outlines><Outline>1: a</Outline><Outline>2: b</Outline></Outlines><Thread>b</Thread>"
     "<Thread>2: see thread 1</Thread></Parallel>",
     ["block 1: thread 1 does not start with 'N:'", "block 1: thread 2 refers to thread 1"]),
    (_HEAD + "<Thread>1: I am thread 1</Thread></Parallel>", []),
])
def test_grammar_and_think_reasons_word_for_word(text, reasons):
    assert validate(text) == reasons


def test_is_valid_follows_validate():
    from rollout.format import is_valid

    three = _block(["1: a", "2: b", "3: c"], ["1: x", "2: y", "3: z"])
    assert is_valid(three) and not is_valid("<think>a")
    assert not is_valid(three, max_threads=2) and is_valid(three, max_threads=3)


def test_parts_and_empty_contents():
    # no empty text parts around or between blocks
    assert [type(p).__name__ for p in parse(_ONE).parts] == ["Block"]
    assert [type(p).__name__ for p in parse(_ONE + _ONE).parts] == ["Block", "Block"]
    assert parse("a" + _ONE).parts[0] == "a" and len(parse("a" + _ONE).parts) == 2
    empty = parse("<Parallel><Outlines><Outline></Outline></Outlines><Thread></Thread></Parallel>").blocks[0]
    assert (empty.outlines, empty.threads) == ([""], [""])


def test_block_gaps_default_check_and_placement():
    assert Block(["1: a"], ["1: b"]).gaps == ["\n"] * 5
    assert Block(["1: a", "2: b"], ["1: c"]).gaps == ["\n"] * 6
    with pytest.raises(ValueError, match=r"^Block needs 5 gaps, got 1$"):
        Block(["1: a"], ["1: b"], ["\n"])
    gaps = ["0", "1", "2", "3", "4", "5", "6"]  # not whitespace: only to see where each gap goes
    text = Block(["1: a", "2: b"], ["1: c", "2: d"], gaps).text()
    assert text == ("<Parallel>0<Outlines>1<Outline>1: a</Outline>2<Outline>2: b</Outline>3</Outlines>4"
                    "<Thread>1: c</Thread>5<Thread>2: d</Thread>6</Parallel>")
