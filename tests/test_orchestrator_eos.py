"""The orchestrator's EOS set and finish reasons, on a scripted engine (fast, no vLLM).

A model with two EOS ids (the tokenizer's ``<|im_end|>`` and
``<|endoftext|>``, which Qwen3's generation config adds and vLLM stops on):
every id of the set ends a sequential request with ``eos`` and a thread with
``eos_in_thread``; an engine that stops on an id the orchestrator was not told
of (``EngineStops``: vLLM applying its generation config) ends the trajectory
with ``unknown_stop``, never as a thread cut at its length limit or a context
overflow.
"""

from __future__ import annotations

import pytest

from rollout.config import RolloutConfig
from rollout.engine import LENGTH, STOP, Completion
from rollout.orchestrator import FINISH_REASONS, TagIds, generate
from rollout.tiny import PAD, build_tokenizer
from rollout.units import SEQ, THREAD, encode
from tests.test_rollout_orchestrator import EOS, HEAD, TAIL, ScriptedEngine, heads_policy, outlines, prompt

SECOND_EOS = PAD  # <|endoftext|>, a second EOS as in Qwen3's generation_config


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def eos_ids(tok):
    return [tok.eos_token_id, tok.convert_tokens_to_ids(SECOND_EOS)]


class EngineStops(ScriptedEngine):
    """A scripted engine that also stops on ``engine_stops`` whatever the request asks (vLLM adds the ids of the
    model's generation config to every request)."""

    def __init__(self, tok, policy, engine_stops):
        super().__init__(tok, policy)
        self.engine_stops = list(engine_stops)

    def submit(self, requests):
        for r in requests:
            r.stop_token_ids = list(r.stop_token_ids) + [i for i in self.engine_stops if i not in r.stop_token_ids]
        super().submit(requests)


def run(tok, policy, eos_token_id, engine_stops=(), **cfg):
    engine = EngineStops(tok, policy, engine_stops)
    trajectories = generate(engine, tok, [prompt(tok)], RolloutConfig(seed=0, **cfg), eos_token_id=eos_token_id)
    return engine, trajectories


def test_unknown_stop_is_a_documented_reason():
    assert "unknown_stop" in FINISH_REASONS


def test_every_eos_id_is_a_stop_of_every_request(tok, eos_ids):
    engine, (t,) = run(tok, heads_policy(outlines(["1: a", "2: b"])), eos_ids)
    assert t.finish_reason == "eos"
    close_outlines, close_thread = tok.convert_tokens_to_ids(["</Outlines>", "</Thread>"])
    seq, thread = engine.batches[0][0], engine.batches[1][0]
    assert seq.stop_token_ids == [*eos_ids, close_outlines]
    assert thread.stop_token_ids == [close_thread, *eos_ids]
    engine, _ = run(tok, lambda text, request: "x" + SECOND_EOS, eos_ids, sequential=True)
    assert engine.batches[0][0].stop_token_ids == eos_ids


def test_a_sequential_request_ending_with_the_second_eos_is_eos(tok, eos_ids):
    _, (t,) = run(tok, lambda text, request: "<think>x</think>\\boxed{3}" + SECOND_EOS, eos_ids)
    assert (t.finish_reason, t.finish_detail) == ("eos", "")
    assert t.text == "<think>x</think>\\boxed{3}"  # the EOS is not part of the text, whichever it is
    assert t.sequence_ids[-1] == eos_ids[1] and t.units[-1].completion_ids[-1] == eos_ids[1]
    _, (t,) = run(tok, lambda text, request: "<think>x</think>\\boxed{3}" + EOS, eos_ids)
    assert t.finish_reason == "eos" and t.text == "<think>x</think>\\boxed{3}"


def test_a_thread_ending_with_the_second_eos_is_eos_in_thread(tok, eos_ids):
    engine, (t,) = run(tok, heads_policy(outlines(["1: a", "2: b"]), thread=" oops" + SECOND_EOS), eos_ids,
                       max_thread_tokens=100)
    assert t.finish_reason == "eos_in_thread" and f"ended with EOS {eos_ids[1]}" in t.finish_detail
    assert t.closed_threads == []  # never taken as a thread cut at its length limit
    assert [u.role for u in t.units] == [SEQ, THREAD, THREAD] and len(engine.batches) == 2


def test_an_engine_stop_the_orchestrator_was_not_told_of_is_unknown_stop(tok, eos_ids):
    """Told only the tokenizer's EOS while the engine also stops on the second one."""
    only_first = eos_ids[0]
    _, (t,) = run(tok, lambda text, request: "<think>x</think>" + SECOND_EOS, only_first, engine_stops=eos_ids)
    assert t.finish_reason == "unknown_stop"  # was "context" before the EOS set
    assert f"sequential request stopped on token {eos_ids[1]}" in t.finish_detail
    assert t.text.endswith(SECOND_EOS)

    engine, (t,) = run(tok, heads_policy(outlines(["1: a", "2: b"]), thread=" t" + SECOND_EOS), only_first,
                       engine_stops=eos_ids, max_thread_tokens=100)
    assert t.finish_reason == "unknown_stop" and f"thread 1 of block 1 stopped on token {eos_ids[1]}" in \
        t.finish_detail
    assert t.closed_threads == [] and len(engine.batches) == 2  # not closed with </Thread>, no join request


def test_a_stop_on_a_tag_not_asked_for_is_unknown_stop(tok, eos_ids):
    """Sequential mode does not stop at </Outlines>; an engine that does is reported, not parsed as a head."""
    close_outlines = tok.convert_tokens_to_ids("</Outlines>")
    _, (t,) = run(tok, lambda text, request: HEAD + TAIL + EOS, eos_ids, engine_stops=[close_outlines],
                  sequential=True)
    assert t.finish_reason == "unknown_stop" and f"token {close_outlines}" in t.finish_detail
    assert t.n_blocks == 0 and t.text == HEAD


def test_length_limits_still_end_as_before(tok, eos_ids):
    _, (t,) = run(tok, heads_policy(outlines(["1: a"]), thread="x" * 50), eos_ids, max_thread_tokens=8)
    assert t.finish_reason == "eos" and t.closed_threads == [(1, 1)]
    _, (t,) = run(tok, lambda text, request: "w" * 500, eos_ids, max_tokens=40)
    assert t.finish_reason == "budget"
    p = prompt(tok)
    _, (t,) = run(tok, lambda text, request: "w" * 500, eos_ids, max_context=len(p) + 10)
    assert t.finish_reason == "context"


class OneCompletion:
    """An engine that answers every request with the same completion (token ids and finish), for edge cases."""

    max_model_len = 100_000

    def __init__(self, completion):
        self.completion, self.queue = completion, []

    def submit(self, requests):
        self.queue += [(r, self.completion) for r in requests]

    def wait(self):
        done, self.queue = self.queue, []
        return done

    def abort(self):
        self.queue = []


@pytest.mark.parametrize("ids, finish, reason", [
    ([65, "EOS2"], STOP, "eos"),
    ([65, 66], STOP, "unknown_stop"),
    ([], STOP, "unknown_stop"),
    ([65, "EOS2"], LENGTH, "budget"),  # a length cut is a length cut, whatever its last token
])
def test_the_rule_for_a_sequential_completion(tok, eos_ids, ids, finish, reason):
    ids = [eos_ids[1] if i == "EOS2" else i for i in ids]
    engine = OneCompletion(Completion(ids, [-1.0] * len(ids), finish))
    (t,) = generate(engine, tok, [prompt(tok)], RolloutConfig(max_tokens=2, sequential=True), eos_token_id=eos_ids)
    assert t.finish_reason == reason


def test_tag_ids_take_one_id_or_a_list(tok, eos_ids):
    assert TagIds.from_tokenizer(tok).eos_ids == (tok.eos_token_id,)
    tags = TagIds.from_tokenizer(tok, eos_ids)
    assert (tags.eos, tags.eos_ids) == (eos_ids[0], tuple(eos_ids))
    assert TagIds.from_tokenizer(tok, [eos_ids[1], eos_ids[0], eos_ids[1]]).eos_ids == (eos_ids[1], eos_ids[0])
    assert TagIds.from_tokenizer(tok, 7).eos_ids == (7,)
    for bad in ([], ["x"], [True]):
        with pytest.raises(ValueError, match="EOS ids must be integers"):
            TagIds.from_tokenizer(tok, bad)
    assert encode(tok, SECOND_EOS) == [eos_ids[1]]
