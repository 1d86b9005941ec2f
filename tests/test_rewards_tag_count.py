"""The published reward code's token count (rewards.tag_count), on hand-made token sequences.

Token ids: P = <Parallel>, p = </Parallel>, T = <Thread>, t = </Thread>, x = any other token.
Each expected (L_total, L_crit) is counted by hand from the rules in the module docstring.
"""

import pytest

from rewards.config import RewardConfig
from rewards.score import item_tags, measure
from rewards.tag_count import TagTokens, tag_stream_latency
from rollout.task import TaskConfig, make_dataset
from rollout.tiny import build_tokenizer
from rollout.units import chat_prompt_ids, latency, replay

P, p, T, t, x = 1, 2, 3, 4, 9
TAGS = TagTokens(parallel_open=P, parallel_close=p, thread_open=T, thread_close=t)


def count(seq):
    lat = tag_stream_latency(seq, TAGS)
    return lat.L_total, lat.L_crit, lat.n_blocks, lat.threads_per_block


@pytest.mark.parametrize("name, seq, expected", [
    # outside: prompt x x x, text x, <Parallel>, </Parallel>, tail x x = 8; block's sequential part:
    # outlines and newline x x x, four wrappers, two newlines = 9; threads 3 and 1
    # -> total 8 + 9 + 3 + 1 = 21, crit 8 + 9 + 3 = 20
    ("well formed", [x, x, x, x, P, x, x, x, T, x, x, x, t, x, T, x, t, x, p, x, x], (21, 20, 1, [2])),
    ("no block", [x, x, t, T, p], (5, 5, 0, [])),
    # nested <Thread> is thread 1's content: threads 3 and 1, block part T t T t = 4, outside P p = 2
    ("nested thread", [P, T, x, T, x, t, T, x, t, p], (10, 9, 1, [2])),
    # </Parallel> and <Parallel> inside a thread are its content; one thread of 4
    ("tags inside a thread", [P, T, x, p, P, x, t, p], (8, 8, 1, [1])),
    # unterminated block and thread: closed at the end; outside x P = 2, block x T t T = 4, threads 2 and 1
    ("unterminated", [x, P, x, T, x, x, t, T, x], (9, 8, 1, [2])),
    # stray </Thread> in a block (before and after a thread) is its sequential part; after the block, outside
    ("stray close", [P, t, x, T, x, t, t, p, x, t], (10, 10, 1, [1])),
    # a <Parallel> between threads is the block's sequential part, not a new block
    ("parallel in a block", [P, P, x, T, x, x, t, T, x, t, p], (11, 10, 1, [2])),
    # outside 5; block 1: wrappers 4, threads 2 and 1; block 2: wrappers 4, threads 1 and 3
    ("two blocks", [P, T, x, x, t, T, x, t, p, x, P, T, x, t, T, x, x, x, t, p], (20, 5 + 6 + 7, 2, [2, 2])),
    ("empty", [], (0, 0, 0, [])),
])
def test_hand_made_sequences(name, seq, expected):
    assert count(seq) == expected


def test_eta_follows_from_the_counts():
    lat = tag_stream_latency([x, x, x, x, P, x, x, x, T, x, x, x, t, x, T, x, t, x, p, x, x], TAGS)
    assert lat.eta == pytest.approx(1 - 20 / 21) and lat.speedup == pytest.approx(21 / 20)
    assert tag_stream_latency([], TAGS).eta == 0.0


@pytest.fixture(scope="module")
def trajectory():
    tok = build_tokenizer()
    rec = make_dataset(TaskConfig(min_threads=3, max_threads=3), {"train": 1}, seed=3)["train"][0]
    prompt = chat_prompt_ids(tok, rec["prompt"])
    return tok, prompt, replay(prompt, rec["response_parallel"], tok, tok.eos_token_id)


def test_on_a_real_trajectory_the_count_adds_inserted_tokens_and_wrappers(trajectory):
    tok, prompt, units = trajectory
    tags = TagTokens.from_tokenizer(tok)
    ours = latency(units)
    response_only = measure(units, RewardConfig(token_count="tag_stream", count_inserted=True), tags)
    with_prompt = measure(units, RewardConfig(preset="official-code"), tags)
    inserted = sum(u.n_inserted for u in units)
    assert response_only.L_total == ours.L_total + inserted                 # every token of the response
    assert with_prompt.L_total == response_only.L_total + len(prompt)
    assert with_prompt.L_crit == response_only.L_crit + len(prompt)
    # the block's wrappers and seed heads of the threads that are not the longest add to L_crit
    assert response_only.L_crit > ours.L_crit and with_prompt.eta < response_only.eta < ours.eta
    assert (with_prompt.n_blocks, with_prompt.threads_per_block) == (ours.n_blocks, ours.threads_per_block)


def test_tag_stream_needs_the_tag_ids_and_inserted_tokens(trajectory):
    tok, _, units = trajectory
    with pytest.raises(ValueError, match="tag ids"):
        measure(units, RewardConfig(preset="official-code"))
    with pytest.raises(ValueError, match="count_inserted"):
        RewardConfig(token_count="tag_stream")
    with pytest.raises(ValueError, match="fixes token_count"):
        RewardConfig(preset="paper", token_count="tag_stream", count_inserted=True)
    assert item_tags(RewardConfig(), tok) is None
    assert item_tags(RewardConfig(preset="official-code"), tok) == TagTokens.from_tokenizer(tok)
