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

import random

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


# --------------------------------------------------------------------------- random decoding, true finish reasons


def true_finish_reasons(t, eos: list[int], outlines_close: int, cfg: RolloutConfig,
                        unknown: tuple[int, ...] = ()) -> set[str]:
    """The finish reasons trajectory ``t`` can truly have, read from its units alone (not from the
    orchestrator's bookkeeping). ``eos``: the EOS ids the orchestrator was told of; ``unknown``: ids the engine
    also stops on. A sequential request ending with an EOS is ``eos``; in the last block, the first thread (in
    outline order) that ends with an EOS is ``eos_in_thread``; a stop on an id of ``unknown`` is
    ``unknown_stop``; a block head that spawned nothing is a block limit or a bad head; a request cut short is
    the budget or the context. (Also used by ``tests/test_onboard.py`` on vLLM.)"""
    last = t.units[-1]
    final = [last] if last.role == SEQ else [u for u in t.units if u.role == THREAD and u.block == last.block]
    if any(u.completion_ids[-1:] and u.completion_ids[-1] in (*eos, *unknown) for u in t.units if u not in final):
        return set()  # a request before the final ones ended on an EOS or an unknown stop, yet decoding went on
    generated = sum(len(u.completion_ids) for u in t.units)
    cut = {"budget"} if generated >= cfg.max_tokens else {"context"}
    if last.role == SEQ:
        end = last.completion_ids[-1] if last.completion_ids else None
        if end in eos:
            return {"eos"}
        if end in unknown:
            return {"unknown_stop"}
        if end == outlines_close:
            return {"bad_outlines", "too_many_threads", "too_many_blocks", "budget", "context"}
        return cut
    for u in sorted(final, key=lambda u: u.thread):
        end = u.completion_ids[-1] if u.completion_ids else None
        if end in eos:
            return {"eos_in_thread"}
        if end in unknown:
            return {"unknown_stop"}
    return cut  # every thread closed or cut, and no room left for the join request


class RandomTokens:
    """An engine that writes uniformly random tokens from ``allowed`` (seeded by the request), stopping after a
    stop id of the request or of ``engine_stops`` (as vLLM adds the generation config's EOS ids)."""

    max_model_len = 100_000

    def __init__(self, allowed, engine_stops=()):
        self.allowed, self.engine_stops, self.queue = list(allowed), set(engine_stops), []

    def submit(self, requests):
        for r in requests:
            rng = random.Random(f"{r.seed}-{len(r.prompt_ids)}-{r.prompt_ids[-3:]}")
            ids, finish = [], LENGTH
            while len(ids) < r.max_tokens:
                ids.append(rng.choice(self.allowed))
                if ids[-1] in r.stop_token_ids or ids[-1] in self.engine_stops:
                    finish = STOP
                    break
            self.queue.append((r, Completion(ids, [-1.0] * len(ids), finish)))

    def wait(self):
        done, self.queue = self.queue, []
        return done

    def abort(self):
        self.queue = []


def test_random_decoding_every_finish_reason_is_the_true_one(tok, eos_ids):
    """400 trajectories of random tags, both EOS ids and a few text tokens, from a well-formed block head: each
    finish reason is the one its units show, and the reasons cover both EOS ids, threads and the limits."""
    close_outlines = tok.convert_tokens_to_ids("</Outlines>")
    allowed = sorted({*eos_ids, *tok.convert_tokens_to_ids(["</Outlines>", "</Thread>", "<Parallel>",
                                                              "</Parallel>", "<Outline>", "</Outline>"]),
                      *encode(tok, "1: 2a\n")})
    head = "<think>\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n"
    cfg = RolloutConfig(n=400, max_tokens=30, max_thread_tokens=6, max_threads=3, max_blocks=2, seed=0)
    start = prompt(tok) + encode(tok, head)
    trajectories = generate(RandomTokens(allowed, eos_ids), tok, [start], cfg, eos_token_id=eos_ids)
    for t in trajectories:
        assert t.finish_reason in true_finish_reasons(t, eos_ids, close_outlines, cfg), (t.finish_reason, t.units)
    reasons = {t.finish_reason for t in trajectories}
    assert {"eos", "eos_in_thread", "budget", "bad_outlines"} <= reasons, reasons
    assert {t.sequence_ids[-1] for t in trajectories if t.finish_reason == "eos"} == set(eos_ids)

    # told only the first EOS while the engine stops on both: the second is unknown_stop, the rest unchanged
    told_one = generate(RandomTokens(allowed, eos_ids), tok, [start], cfg, eos_token_id=eos_ids[0])
    for t in told_one:
        truth = true_finish_reasons(t, eos_ids[:1], close_outlines, cfg, unknown=(eos_ids[1],))
        assert t.finish_reason in truth, (t.finish_reason, t.units)
        if t.finish_reason == "unknown_stop":
            assert f"token {eos_ids[1]}" in t.finish_detail
    assert {"unknown_stop", "eos", "eos_in_thread"} <= {t.finish_reason for t in told_one}
