"""The spawn/join state machine driven by a scripted fake engine (fast, no vLLM).

``ScriptedEngine`` plays a model: a policy maps each request's decoded prompt
to the text the model would write; the engine tokenizes it, cuts it after the
first stop token or at ``max_tokens`` like vLLM does, and returns the
shortest pending completions first, so trajectories and threads finish
interleaved as in continuous batching.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from rollout import orchestrator
from rollout.config import RolloutConfig
from rollout.engine import LENGTH, STOP, Completion, Request
from rollout.format import thread_seed
from rollout.orchestrator import BadOutlines, TooManyThreads, Trajectory, generate, outline_numbers
from rollout.tiny import build_tokenizer
from rollout.units import SEQ, THREAD, encode, replay

EOS = "<|im_end|>"
HEAD = "<think>\nplan<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>"
TAIL = "</Parallel>\nso 3</think>\n\\boxed{3}"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


class ScriptedEngine:
    """A fake :class:`rollout.engine.Engine`; ``policy(prompt_text, request) -> text``."""

    max_model_len = 100_000

    def __init__(self, tok, policy, prompt_len: int | None = None):
        self.tok, self.policy = tok, policy
        self.batches: list[list[Request]] = []
        self.in_flight: list[tuple[Request, Completion]] = []
        self.aborted = False

    def submit(self, requests):
        if requests:
            self.batches.append(list(requests))
        for r in requests:
            assert 1 <= r.max_tokens and len(r.prompt_ids) + r.max_tokens <= self.max_model_len
            text = self.policy(self.tok.decode(r.prompt_ids, skip_special_tokens=False), r)
            ids = encode(self.tok, text)
            cut = next((i + 1 for i, t in enumerate(ids) if t in r.stop_token_ids), None)
            if cut is not None and cut <= r.max_tokens:
                ids, finish = ids[:cut], STOP
            else:
                ids, finish = ids[:r.max_tokens], LENGTH
            self.in_flight.append((r, Completion(ids, [-0.5] * len(ids), finish)))

    def wait(self):
        if not self.in_flight:
            return []
        shortest = min(len(c.token_ids) for _, c in self.in_flight)
        done = [x for x in self.in_flight if len(x[1].token_ids) == shortest]
        self.in_flight = [x for x in self.in_flight if len(x[1].token_ids) != shortest]
        return done

    def abort(self):
        self.aborted = True
        self.in_flight = []


def thread_number(prompt_text: str) -> int | None:
    m = re.search(r"<Thread>\n(\d+):$", prompt_text)
    return int(m.group(1)) if m else None


def good_policy(prompt_text: str, request: Request) -> str:
    n = thread_number(prompt_text)
    if n is not None:
        return f" work {n}{'!' * n}</Thread>"
    if "</Thread>" in prompt_text:
        return TAIL + EOS
    return HEAD + "junk after the head"


def sequential_policy(prompt_text: str, request: Request) -> str:
    return (HEAD + "\n<Thread>\n1: work 1!</Thread>\n<Thread>\n2: work 2!!</Thread>\n" + TAIL + EOS)


def prompt(tok, text="Q: 1+2?"):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                   return_dict=False)


def run(tok, policy, prompts, **cfg):
    cfg.setdefault("seed", 0)
    engine = ScriptedEngine(tok, policy)
    trajectories = generate(engine, tok, prompts, RolloutConfig(**cfg))
    return engine, trajectories


# ------------------------------------------------------------------------------- happy paths


def test_parallel_trajectory_follows_design_section_3(tok):
    p = prompt(tok)
    engine, (t,) = run(tok, good_policy, [p])
    assert t.finish_reason == "eos", t.finish_detail
    assert t.text == HEAD + "\n<Thread>\n1: work 1!</Thread>\n<Thread>\n2: work 2!!</Thread>\n" + TAIL
    # one sequential request, then both threads in ONE submit, then the join
    assert [len(b) for b in engine.batches] == [1, 2, 1]
    head_context = p + encode(tok, HEAD)
    spawn = engine.batches[1]
    for n, r in enumerate(spawn, start=1):
        assert r.prompt_ids == head_context + encode(tok, thread_seed(n))
        assert r.stop_token_ids == [tok.convert_tokens_to_ids("</Thread>"), tok.eos_token_id]
    (join,) = engine.batches[2]
    expected_join = head_context
    for n in (1, 2):
        expected_join = expected_join + encode(tok, thread_seed(n)) + encode(tok, f" work {n}{'!' * n}</Thread>")
    assert join.prompt_ids == expected_join + encode(tok, "\n")
    # the units are exactly what replaying the final text gives
    assert_units_equal_replay(t.units, p, t.text, tok)
    assert t.sequence_ids == t.units[-1].context_ids + t.units[-1].completion_ids
    assert [u.role for u in t.units] == [SEQ, THREAD, THREAD, SEQ]
    assert [u.n_inserted for u in t.units] == [0, len(encode(tok, thread_seed(1))), len(encode(tok, thread_seed(2))),
                                               1]
    assert all(lp == -0.5 for u in t.units for lp in u.completion_logprobs)
    # latency in model-generated tokens (every character and tag is one token of the tiny tokenizer):
    # HEAD = <think> \n p l a n <Parallel> \n <Outlines> \n + 2 x (<Outline> "1: a" </Outline> \n) + </Outlines>
    #      = 1 + 1 + 4 + 1 + 1 + 1 + 1 + 2 * 7 + 1 = 25; threads " work 1!</Thread>" 9, " work 2!!</Thread>" 10;
    # TAIL + EOS = </Parallel> \n "so 3" </think> \n "\boxed{3}" EOS = 1 + 1 + 4 + 1 + 1 + 9 + 1 = 18
    # L_total = 25 + 9 + 10 + 18 = 62; L_crit = 25 + 10 + 18 = 53; eta = 9/62
    assert [len(u.completion_ids) for u in t.units] == [25, 9, 10, 18]
    assert (t.L_total, t.L_crit) == (62, 53)
    assert t.eta == pytest.approx(9 / 62, abs=1e-12) and t.speedup == pytest.approx(62 / 53, abs=1e-12)
    assert (t.n_blocks, t.threads_per_block, t.closed_threads) == (1, [2], [])
    assert t.n_requests == 4


class FakeClock:
    """Stands in for ``time`` in the orchestrator: one second passes at every ``engine.wait()``."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def test_latency_s_is_the_time_from_the_start_to_the_trajectory_end(tok, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(orchestrator, "time", clock)

    class TickingEngine(ScriptedEngine):
        def wait(self):
            clock.now += 1.0
            return super().wait()

    def policy(prompt_text, request):  # Q0 answers in one request; Q1 in a block: head, two threads, join
        return "<think>x</think>\\boxed{3}" + EOS if "Q0" in prompt_text else good_policy(prompt_text, request)

    engine = TickingEngine(tok, policy)
    short, parallel = generate(engine, tok, [prompt(tok, "Q0"), prompt(tok, "Q1")], RolloutConfig(seed=0))
    # waits: 1 returns Q0's answer (13 tokens, the shortest) -> Q0 ends at second 1; then Q1's 25-token head (2),
    # its threads of 9 (3) and 10 tokens (4), and its 18-token tail (5)
    assert (short.finish_reason, parallel.finish_reason) == ("eos", "eos")
    assert (short.latency_s, parallel.latency_s) == (1.0, 5.0)


def assert_units_equal_replay(units, p, text, tok):
    """Every field but the log-probs (replay has none) equals replay's unit, token for token."""
    expected = replay(p, text, tok, tok.eos_token_id)
    assert len(units) == len(expected)
    for u, e in zip(units, expected):
        assert (u.context_ids, u.completion_ids, u.role, u.block, u.thread, u.n_inserted) == \
               (e.context_ids, e.completion_ids, e.role, e.block, e.thread, e.n_inserted)


def test_sequential_mode_is_the_same_code_without_spawning(tok):
    p = prompt(tok)
    engine, (t,) = run(tok, sequential_policy, [p], sequential=True)
    assert t.finish_reason == "eos"
    assert [len(b) for b in engine.batches] == [1]
    assert engine.batches[0][0].stop_token_ids == [tok.eos_token_id]
    (u,) = t.units
    assert u.role == SEQ and u.context_ids == p
    assert u.completion_ids == encode(tok, sequential_policy("", None))
    assert t.text == sequential_policy("", None)[:-len(EOS)]
    assert (t.eta, t.n_blocks) == (0.0, 0)


def test_many_trajectories_are_batched_and_seeded_by_place(tok):
    prompts = [prompt(tok, f"Q{i}") for i in range(3)]
    engine, trajs = run(tok, good_policy, prompts, n=2)
    assert [(t.prompt_index, t.sample_index) for t in trajs] == [(i, s) for i in range(3) for s in range(2)]
    assert all(t.finish_reason == "eos" for t in trajs)
    assert len(engine.batches[0]) == 6  # every first request in one submit
    assert max(len(b) for b in engine.batches) == 12  # every spawn of the wave together
    seeds = [r.seed for b in engine.batches for r in b]
    assert len(set(seeds)) == len(seeds)
    # the same prompt at another global index gets other seeds; at the same index, the same
    engine2, _ = run(tok, good_policy, prompts[:1], n=2)
    assert [r.seed for r in engine2.batches[0]] == [r.seed for r in engine.batches[0][:2]]
    engine3 = ScriptedEngine(tok, good_policy)
    generate(engine3, tok, prompts[:1], RolloutConfig(n=2, seed=0), prompt_indices=[7])
    assert [r.seed for r in engine3.batches[0]] != [r.seed for r in engine.batches[0][:2]]


def test_context_ending_in_outlines_spawns_at_once(tok):
    p = prompt(tok) + encode(tok, HEAD)
    engine, (t,) = run(tok, good_policy, [p])
    assert [len(b) for b in engine.batches] == [2, 1]
    assert engine.batches[0][0].prompt_ids == p + encode(tok, thread_seed(1))
    assert t.finish_reason == "eos" and [u.role for u in t.units] == [THREAD, THREAD, SEQ]


# ------------------------------------------------------------------------------- adversarial output


def heads_policy(head: str, thread: str = " ok</Thread>", tail: str = TAIL + EOS):
    def policy(prompt_text, request):
        if thread_number(prompt_text) is not None:
            return thread
        return tail if "</Thread>" in prompt_text else head
    return policy


def outlines(items):
    return "<Parallel>\n<Outlines>\n" + "".join(f"<Outline>{x}</Outline>\n" for x in items) + "</Outlines>"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("head, reason, detail", [
    (outlines(["first", "second"]), "bad_outlines", "does not start with 'N:'"),
    (outlines(["1: a", "1: b"]), "bad_outlines", "numbered 1,1"),
    (outlines(["2: a", "3: b"]), "bad_outlines", "expected 1..2"),
    (outlines(["1: a", "2:  "]), "bad_outlines", "outline 2 is empty"),
    ("<Outlines>\n<Outline>1: a</Outline>\n</Outlines>", "bad_outlines", "without an open <Parallel>"),
    ("<Parallel>\n<Outlines>\n<Outline>1: a</Outline><Thread>\n</Outlines>", "bad_outlines", "<Thread>"),
    (outlines([f"{i}: x" for i in range(1, 1001)]), "too_many_threads", "1000 outlines"),
    ("<Parallel>\n<Outlines>\n</Outlines>", "bad_outlines", "no outlines"),
])
def test_malformed_heads_end_with_a_reason(tok, head, reason, detail):
    _, (t,) = run(tok, heads_policy(head), [prompt(tok)], max_tokens=100_000, max_context=100_000)
    assert t.finish_reason == reason and detail in t.finish_detail
    assert t.units[-1].completion_ids[-1] == tok.convert_tokens_to_ids("</Outlines>")
    assert t.text == head


def test_outlines_close_after_a_closed_block_is_bad(tok):
    p = prompt(tok) + encode(tok, outlines(["1: a"]) + "\n<Thread>\n1: b</Thread>\n</Parallel>\n")
    _, (t,) = run(tok, lambda text, request: "<Outline>2: c</Outline>\n</Outlines>", [p])
    assert t.finish_reason == "bad_outlines" and "without an open <Parallel>" in t.finish_detail


@pytest.mark.timeout(60)
def test_thread_that_never_closes_is_closed_with_an_inserted_tag(tok):
    close = tok.convert_tokens_to_ids("</Thread>")
    engine, (t,) = run(tok, heads_policy(outlines(["1: a", "2: b"]), thread="x" * 1000), [prompt(tok)],
                       max_thread_tokens=16)
    assert t.finish_reason == "eos"
    assert t.closed_threads == [(1, 1), (1, 2)]
    threads = [u for u in t.units if u.role == THREAD]
    assert [u.completion_ids for u in threads] == [encode(tok, "x" * 16)] * 2  # no </Thread> in the completion
    join = t.units[-1]
    base = threads[0].context_ids[:-threads[0].n_inserted]
    expected = base
    for n in (1, 2):
        expected = expected + encode(tok, thread_seed(n)) + encode(tok, "x" * 16) + [close]
    assert join.context_ids == expected + encode(tok, "\n")
    assert t.L_total == len(t.units[0].completion_ids) + 32 + len(join.completion_ids)  # inserted tags not counted


@pytest.mark.timeout(60)
def test_eos_inside_a_thread_ends_the_trajectory(tok):
    engine, (t,) = run(tok, heads_policy(outlines(["1: a", "2: b"]), thread=" oops" + EOS), [prompt(tok)])
    assert t.finish_reason == "eos_in_thread" and "thread 1" in t.finish_detail
    assert [u.role for u in t.units] == [SEQ, THREAD, THREAD]  # no join request
    assert len(engine.batches) == 2
    assert t.sequence_ids[-1] == tok.eos_token_id and t.text.endswith(" oops" + EOS)


@pytest.mark.timeout(60)
def test_context_overflow_in_the_middle_of_a_block(tok):
    p = prompt(tok)
    head = outlines(["1: a", "2: b", "3: c"])
    n_before = len(p) + len(encode(tok, head))
    seed_len = len(encode(tok, thread_seed(1)))
    # threads fit one by one, the joined context does not
    _, (t,) = run(tok, heads_policy(head, thread="y" * 20 + "</Thread>"), [p], max_context=n_before + seed_len + 40)
    assert t.finish_reason == "context" and "joined context" in t.finish_detail
    assert [u.role for u in t.units] == [SEQ, THREAD, THREAD, THREAD]
    # a thread itself runs into the limit
    _, (t,) = run(tok, heads_policy(head, thread="y" * 100), [p], max_context=n_before + seed_len + 10)
    assert t.finish_reason == "context" and "reached its context limit" in t.finish_detail
    assert all(len(u.context_ids) + len(u.completion_ids) <= n_before + seed_len + 10 for u in t.units)
    # the head itself runs into the limit
    _, (t,) = run(tok, heads_policy(head), [p], max_context=n_before - 5)
    assert t.finish_reason == "context" and len(t.sequence_ids) == n_before - 5
    # a prompt longer than the limit
    _, (t,) = run(tok, heads_policy(head), [p], max_context=len(p))
    assert t.finish_reason == "context" and t.units == []


@pytest.mark.timeout(60)
def test_budget_is_enforced_across_threads(tok):
    head = outlines(["1: a", "2: b", "3: c"])
    n_head = len(encode(tok, head))
    _, (t,) = run(tok, heads_policy(head, thread="z" * 100), [prompt(tok)], max_tokens=n_head + 30)
    assert t.finish_reason == "budget" and "budget" in t.finish_detail
    assert t.L_total == n_head + 30  # 3 threads of 10 tokens each
    _, (t,) = run(tok, heads_policy("w" * 500), [prompt(tok)], max_tokens=50)
    assert (t.finish_reason, t.L_total) == ("budget", 50)
    _, (t,) = run(tok, heads_policy(head), [prompt(tok)], max_tokens=n_head + 2)
    assert t.finish_reason == "budget" and "2 tokens left for the 3 threads" in t.finish_detail


@pytest.mark.timeout(60)
def test_too_many_blocks(tok):
    def policy(prompt_text, request):
        if thread_number(prompt_text) is not None:
            return " t</Thread>"
        return ("</Parallel>\n" if "</Thread>" in prompt_text else "") + outlines(["1: a"])
    _, (t,) = run(tok, policy, [prompt(tok)], max_blocks=2)
    assert t.finish_reason == "too_many_blocks" and "block 3" in t.finish_detail
    assert (t.n_blocks, t.threads_per_block) == (2, [1, 1])


@pytest.mark.timeout(60)
def test_an_unexpected_error_ends_one_trajectory_only(tok, monkeypatch):
    real = orchestrator.outline_numbers

    def flaky(head_text, max_threads):
        if "boom" in head_text:
            raise KeyError("boom")
        return real(head_text, max_threads)

    monkeypatch.setattr(orchestrator, "outline_numbers", flaky)

    def policy(prompt_text, request):
        if "Q1" in prompt_text and thread_number(prompt_text) is None and "</Thread>" not in prompt_text:
            return outlines(["1: boom"])
        return good_policy(prompt_text, request)

    engine, trajs = run(tok, policy, [prompt(tok, "Q0"), prompt(tok, "Q1")])
    assert [t.finish_reason for t in trajs] == ["eos", "error"]
    assert "KeyError" in trajs[1].finish_detail
    assert not engine.aborted


@pytest.mark.timeout(60)
def test_every_adversary_at_once_in_one_batch(tok):
    """A mix of all the misbehaviours in one ``generate`` call: all end, each with its reason."""
    cases = {
        "ok": (good_policy, "eos"),
        "nonum": (heads_policy(outlines(["a", "b"])), "bad_outlines"),
        "dup": (heads_policy(outlines(["1: a", "1: a"])), "bad_outlines"),
        "many": (heads_policy(outlines([f"{i}: x" for i in range(1, 1001)])), "too_many_threads"),
        "open": (heads_policy(outlines(["1: a"]), thread="q" * 10_000), "eos"),
        "eos": (heads_policy(outlines(["1: a", "2: b"]), thread=EOS), "eos_in_thread"),
        "ramble": (heads_policy("r" * 50_000), "budget"),
    }

    def policy(prompt_text, request):
        key = re.search(r"case (\w+)", prompt_text).group(1)
        return cases[key][0](prompt_text, request)

    prompts = [prompt(tok, f"case {k}") for k in cases]
    engine, trajs = run(tok, policy, prompts, n=2, max_tokens=30_000, max_context=40_000, max_thread_tokens=64)
    assert [t.finish_reason for t in trajs] == [r for _, r in cases.values() for _ in range(2)]
    assert len(engine.batches[0]) == 2 * len(cases)
    for t in trajs:
        assert Trajectory.from_dict(t.to_dict()) == t


# ------------------------------------------------------------------------------- pieces


def test_outline_numbers():
    assert outline_numbers(outlines(["1: a", " 2 : b"]), 8) == [1, 2]
    with pytest.raises(TooManyThreads):
        outline_numbers(outlines(["1: a", "2: b", "3: c"]), 2)
    with pytest.raises(BadOutlines, match="expected 1..2"):
        outline_numbers(outlines(["1: a", "3: b"]), 8)
    with pytest.raises(BadOutlines):
        outline_numbers("junk" + outlines(["1: a"]), 8)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1, got 0"):
        RolloutConfig(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        RolloutConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0, got nan"):
        RolloutConfig(temperature=float("nan"))


def test_max_context_must_fit_the_engine(tok):
    engine = ScriptedEngine(tok, good_policy)
    engine.max_model_len = 100
    with pytest.raises(ValueError, match="max_model_len"):
        generate(engine, tok, [prompt(tok)], RolloutConfig(max_context=200))


# ------------------------------------------------------------------------------- the awaited driver


class AsyncScripted:
    """A :class:`rollout.engine.AsyncEngine` over the scripted model; records every request and when."""

    max_model_len = 100_000

    def __init__(self, tok, policy, fail_on: str | None = None):
        self.scripted = ScriptedEngine(tok, policy)
        self.tok, self.fail_on = tok, fail_on
        self.requests: list[Request] = []
        self.cancelled = 0

    async def complete(self, request):
        self.requests.append(request)
        text = self.tok.decode(request.prompt_ids, skip_special_tokens=False)
        try:
            await asyncio.sleep(0.01 if self.fail_on and text.endswith("2:") else 0)  # thread 2 finishes last
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail_on and text.endswith(self.fail_on):
            raise ConnectionError("server went away")
        self.scripted.submit([request])
        ((r, completion),) = self.scripted.wait()
        return completion


def test_agenerate_is_generate_for_one_sample(tok):
    """Every sample of two prompts (one already at a block head): the awaited driver gives generate's trajectory."""
    prompts = [prompt(tok, "Q0"), prompt(tok, "Q1") + encode(tok, HEAD)]
    cfg = RolloutConfig(n=3, seed=11, max_tokens=400, max_thread_tokens=12)
    _, batch = run(tok, good_policy, prompts, **{k: getattr(cfg, k) for k in ("n", "seed", "max_tokens",
                                                                            "max_thread_tokens")})
    for t in batch:
        engine = AsyncScripted(tok, good_policy)
        one = asyncio.run(orchestrator.agenerate(engine, tok, prompts[t.prompt_index], cfg,
                                                 prompt_index=t.prompt_index, sample_index=t.sample_index))
        a, b = one.to_dict(), t.to_dict()
        a.pop("latency_s"), b.pop("latency_s")
        assert a == b
        # the seeds are those of generate's requests for that sample
        assert [r.seed for r in engine.requests] == [
            orchestrator.request_seed(11, t.prompt_index, t.sample_index, i) for i in range(t.n_requests)]


def test_agenerate_awaits_the_threads_of_a_block_together(tok):
    engine = AsyncScripted(tok, good_policy)
    t = asyncio.run(orchestrator.agenerate(engine, tok, prompt(tok), RolloutConfig(seed=0)))
    assert t.finish_reason == "eos" and [u.role for u in t.units] == [SEQ, THREAD, THREAD, SEQ]
    assert [r.owner[1] for r in engine.requests] == [None, 1, 2, None]


def test_an_engine_error_cancels_the_other_threads_and_propagates(tok):
    engine = AsyncScripted(tok, good_policy, fail_on="1:")
    with pytest.raises(ConnectionError, match="went away"):
        asyncio.run(orchestrator.agenerate(engine, tok, prompt(tok), RolloutConfig(seed=0)))
    assert engine.cancelled == 1  # thread 2 was still waiting


def test_agenerate_checks_the_context_limit(tok):
    engine = AsyncScripted(tok, good_policy)
    engine.max_model_len = 100
    with pytest.raises(ValueError, match="max_model_len"):
        asyncio.run(orchestrator.agenerate(engine, tok, prompt(tok), RolloutConfig(max_context=200)))
