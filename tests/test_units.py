"""Replay into units and the latency measures (DESIGN sections 3 and 5)."""

import pytest

from rollout.format import FormatError, canonicalize, parse, serialize
from rollout.task import TaskConfig, make_dataset
from rollout.tiny import build_tokenizer
from rollout.units import SEQ, THREAD, Unit, chat_prompt_ids, encode, full_sequence, latency, replay


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def records():
    return make_dataset(TaskConfig(blocks=2, min_threads=2, max_threads=4), {"train": 30}, seed=7)["train"]


def _blocks(units):
    out = {}
    for u in units:
        if u.role == THREAD:
            out.setdefault(u.block, []).append(u)
    return out


def test_replay_structure_of_parallel_traces(tok, records):
    for r in records:
        prompt = chat_prompt_ids(tok, r["prompt"])
        units = replay(prompt, r["response_parallel"], tok, tok.eos_token_id)
        seq_units = [u for u in units if u.role == SEQ]
        blocks = _blocks(units)
        assert len(blocks) == 2 and len(seq_units) == 3
        for b, threads in blocks.items():
            head = seq_units[b - 1]
            pre_block = head.context_ids + head.completion_ids
            assert tok.decode(head.completion_ids).endswith("</Outlines>")
            join_context = seq_units[b].context_ids
            # all threads share the pre-block context, then their own seed
            for t in threads:
                assert t.context_ids[:len(pre_block)] == pre_block
                seed = t.context_ids[len(pre_block):]
                assert tok.decode(seed) == f"\n<Thread>\n{t.thread}:" and t.n_inserted == len(seed)
                assert tok.decode(t.completion_ids).endswith("</Thread>")
            # thread 1's request is an exact prefix of the joined context
            first = threads[0]
            assert join_context[:len(first.context_ids) + len(first.completion_ids)] == \
                first.context_ids + first.completion_ids
            # joined context = pre-block + every seed and thread in order + newline
            rebuilt = pre_block + [x for t in threads for x in t.context_ids[len(pre_block):] + t.completion_ids]
            assert join_context == rebuilt + encode(tok, "\n")
        # reassembling the units gives back the full token sequence
        assert full_sequence(units) == prompt + encode(tok, r["response_parallel"]) + [tok.eos_token_id]


def test_sequential_trace_is_one_unit(tok, records):
    r = records[0]
    prompt = chat_prompt_ids(tok, r["prompt"])
    units = replay(prompt, r["response_sequential"], tok, tok.eos_token_id)
    assert len(units) == 1 and units[0].context_ids == prompt
    lat = latency(units)
    assert lat.L_total == lat.L_crit == len(units[0].completion_ids)
    assert lat.eta == 0.0 and lat.n_blocks == 0 and lat.speedup == 1.0


def test_latency_by_hand():
    units = [
        Unit([1, 2], [3, 4, 5]),                                       # 3 sequential
        Unit([1, 2, 3, 4, 5, 9], [6] * 10, role=THREAD, block=1, thread=1, n_inserted=1),
        Unit([1, 2, 3, 4, 5, 9], [7] * 4, role=THREAD, block=1, thread=2, n_inserted=1),
        Unit([0] * 20, [8] * 6, n_inserted=1),                         # 6 sequential after the join
    ]
    lat = latency(units)
    assert (lat.L_total, lat.L_crit) == (23, 19)
    assert lat.eta == pytest.approx(1 - 19 / 23) and lat.speedup == pytest.approx(23 / 19)
    assert lat.threads_per_block == [2]
    inserted = latency(units, count_inserted=True)
    assert (inserted.L_total, inserted.L_crit) == (26, 21)
    with_prompt = latency(units, count_prompt=True)
    assert (with_prompt.L_total, with_prompt.L_crit) == (25, 21)


def test_noncanonical_whitespace_replays_like_the_orchestrator(tok):
    squeezed = ("<think>\n<Parallel><Outlines><Outline>1: a</Outline><Outline>2: b</Outline></Outlines>"
                "<Thread>1: x</Thread><Thread>  2: y</Thread></Parallel>\nend\n</think>\n\n\\boxed{1}")
    canonical = serialize(canonicalize(parse(squeezed)))
    assert "</Outlines>\n<Thread>\n1: x</Thread>\n<Thread>\n2: y</Thread>\n</Parallel>" in canonical
    assert replay([5], squeezed, tok, 0) == replay([5], canonical, tok, 0)


def test_unparseable_response_raises_format_error(tok):
    with pytest.raises(FormatError):
        replay([], "<Parallel><Outlines>", tok)
    with pytest.raises(FormatError, match="no number"):
        replay([], "<Parallel><Outlines><Outline>1: a</Outline></Outlines><Thread>x</Thread></Parallel>", tok)


class ByteTokenizer:
    def encode(self, text, add_special_tokens=False):
        return list(text.encode())


def test_replayed_contexts_share_one_list():
    """Every unit's context is a view of the joined trajectory: memory linear in the response, not units x length."""
    k, blocks = 8, 5
    block = ("<Parallel>\n<Outlines>\n" + "".join(f"<Outline>{i}: o</Outline>\n" for i in range(1, k + 1))
             + "</Outlines>\n" + "".join(f"<Thread>\n{i}: " + "x" * 100 + "\n</Thread>\n" for i in range(1, k + 1))
             + "</Parallel>\n")
    units = replay([7, 7], "<think>\n" + ("seq\n" + block) * blocks + "</think>\n\\boxed{1}", ByteTokenizer(), 0)
    assert len(units) == blocks * (k + 1) + 1
    assert len({id(u.context_ids.ids) for u in units}) == 1
    joined = full_sequence(units)
    for u in units:
        base = len(u.context_ids) - len(u.context_ids.tail)
        assert list(u.context_ids)[:base] == joined[:base]
    # a list wherever a list is expected
    assert Unit.from_dict(units[3].to_dict()) == units[3] and isinstance(units[3].to_dict()["context_ids"], list)
    assert units[1].context_ids + [1] == list(units[1].context_ids) + [1] and units[1].context_ids[-1] == ord(":")


@pytest.mark.parametrize("bad, message", [
    ([1], "expected a unit object, got int"),
    ({"context_ids": [1]}, "field 'completion_ids' must be a list of token ids"),
    ({"context_ids": [True], "completion_ids": []}, "field 'context_ids' must be a list of token ids"),
    ({"context_ids": [1], "completion_ids": [2], "role": "thread", "block": 1},
     "a thread unit needs an integer 'thread'"),
    ({"context_ids": [1], "completion_ids": [2], "n_inserted": -1}, "field 'n_inserted' must be an integer from 0"),
    ({"context_ids": [1], "completion_ids": [2], "completion_logprobs": ["x"]},
     "field 'completion_logprobs' must be null"),
    ({"context_ids": [1], "completion_ids": [2], "extra": 1}, "unknown field 'extra'"),
])
def test_units_from_json_names_the_unit_and_field(bad, message):
    from rollout.units import units_from_json

    ok = {"context_ids": [1], "completion_ids": [2, 3], "completion_logprobs": [-0.5, 0], "role": "thread",
          "block": 1, "thread": 2, "n_inserted": 1}
    assert units_from_json([ok]) == [Unit([1], [2, 3], [-0.5, 0], THREAD, 1, 2, 1)]
    with pytest.raises(ValueError, match=f"unit 1: {message}"):
        units_from_json([ok, *([bad] if isinstance(bad, dict) else bad)])


class _BosTokenizer:
    """Characters as ids; adds a BOS (id 1) unless ``add_special_tokens=False``, as Hugging Face tokenizers do."""

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


def test_encode_never_adds_special_tokens():
    assert encode(_BosTokenizer(), "ab") == [97, 98]
    assert encode(_BosTokenizer(), "") == []


def test_chat_prompt_is_the_user_turn_up_to_the_assistant_turn(tok):
    ids = chat_prompt_ids(tok, "hi")
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ids[-len("assistant\n"):] == encode(tok, "assistant\n")


def test_replay_of_two_blocks_unit_by_unit():
    """Every field of every unit, with characters as tokens (the orchestrator's seeds and join newlines inserted)."""
    tok = _BosTokenizer()
    response = ("a<Parallel><Outlines><Outline>1:x</Outline></Outlines><Thread>1:bb</Thread></Parallel>c"
                "<Parallel><Outlines><Outline>1:y</Outline><Outline>2:z</Outline></Outlines>"
                "<Thread>1:d</Thread><Thread>2:ee</Thread></Parallel>f")
    units = replay([7], response, tok)  # no EOS: the last unit ends with the text
    ids = lambda s: [ord(c) for c in s]  # noqa: E731
    head1 = ids("a<Parallel><Outlines><Outline>1:x</Outline></Outlines>")
    seed1 = ids("\n<Thread>\n1:")
    t11 = ids("bb</Thread>")
    head2 = ids("</Parallel>c<Parallel><Outlines><Outline>1:y</Outline><Outline>2:z</Outline></Outlines>")
    after1 = [7] + head1 + seed1 + t11 + ids("\n")
    seed2 = ids("\n<Thread>\n2:")
    t21, t22 = ids("d</Thread>"), ids("ee</Thread>")
    expected = [
        Unit([7], head1, role=SEQ, n_inserted=0),
        Unit([7] + head1 + seed1, t11, role=THREAD, block=1, thread=1, n_inserted=len(seed1)),
        Unit(after1, head2, role=SEQ, n_inserted=1),
        Unit(after1 + head2 + seed1, t21, role=THREAD, block=2, thread=1, n_inserted=len(seed1)),
        Unit(after1 + head2 + seed2, t22, role=THREAD, block=2, thread=2, n_inserted=len(seed2)),
        Unit(after1 + head2 + seed1 + t21 + seed2 + t22 + ids("\n"), ids("</Parallel>f"), role=SEQ, n_inserted=1),
    ]
    assert units == expected
    # with an EOS id the last unit ends with it
    assert replay([7], response, tok, eos_token_id=0)[-1].completion_ids == ids("</Parallel>f") + [0]


def test_replay_of_an_empty_response_is_one_empty_unit():
    assert replay([5], "", _BosTokenizer()) == [Unit([5], [], role=SEQ, n_inserted=0)]
    assert replay([5], "", _BosTokenizer(), eos_token_id=0) == [Unit([5], [0])]


def test_replay_names_the_thread_without_a_number():
    response = ("<Parallel><Outlines><Outline>1: a</Outline><Outline>2: b</Outline></Outlines>"
                "<Thread>1: x</Thread><Thread>y</Thread></Parallel>")
    with pytest.raises(FormatError, match=r"^block 1: thread 2 has no number, cannot replay it$"):
        replay([5], response, _BosTokenizer())


def test_unit_dict_round_trip():
    u = Unit([1, 2], [3], [-0.5], role=THREAD, block=2, thread=1, n_inserted=1)
    d = u.to_dict()
    assert d == {"context_ids": [1, 2], "completion_ids": [3], "completion_logprobs": [-0.5], "role": "thread",
                 "block": 2, "thread": 1, "n_inserted": 1}
    assert Unit.from_dict(d) == u
