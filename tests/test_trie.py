"""Trie building, packing and statistics (DESIGN section 5), on hand-built and replayed units."""

import math
import random

import pytest
import torch

from rl.attention import ancestor_mask
from rl.bench_trie import noisy_response, synthetic_groups
from rl.trie import build_trie, group_trie, group_tries, make_row, pack_tries, tree_stats
from rollout.task import TaskConfig, parallel_response, sample_problem, sequential_response
from rollout.tiny import build_tokenizer
from rollout.units import THREAD, Unit, chat_prompt_ids, replay


def _hand_units():
    return [
        Unit([1, 2, 3], [4, 5]),
        Unit([1, 2, 3, 4, 5, 6], [7]),
        Unit([1, 2, 9], [8]),
    ]


def test_hand_built_trie_structure():
    t = build_trie(_hand_units(), [1.0, 2.0, -1.0])
    assert t.input_ids == [1, 2, 3, 4, 5, 6, 7, 9, 8]
    assert t.position_ids == [0, 1, 2, 3, 4, 5, 6, 2, 3]
    assert t.parent == [-1, 0, 1, 2, 3, 4, 5, 1, 7]
    assert t.tout == [8, 8, 6, 6, 6, 6, 6, 8, 8]
    assert t.n_targets == [0, 0, 0, 1, 1, 0, 1, 0, 1]
    assert t.weight == [0, 0, 0, 1.0, 1.0, 0, 2.0, 0, -1.0]
    assert t.weight_neg == [0, 0, 0, 0, 0, 0, 0, 0, -1.0]
    assert t.unit_nodes == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6], [0, 1, 7, 8]]
    # token 5 (flat 4) is a completion of unit 0 and context of unit 1: a target once
    s = tree_stats([t])
    assert (s.n_units, s.unique_tokens, s.expanded_tokens, s.padded_tokens, s.target_tokens) == (3, 9, 16, 21, 4)
    assert s.expanded_ratio == pytest.approx(16 / 9) and s.padded_ratio == pytest.approx(21 / 9)


def test_weights_sum_per_occurrence_with_signs_kept_apart():
    traj = [Unit([5, 6], [7, 8])]
    t = group_trie([traj, traj, traj], [1.0, -0.5, 2.0])
    assert len(t) == 4
    assert t.n_targets == [0, 0, 3, 3]
    assert t.weight[2:] == [2.5, 2.5] and t.weight_pos[2:] == [3.0, 3.0] and t.weight_neg[2:] == [-0.5, -0.5]


def test_behavior_logprobs_are_averaged_over_occurrences():
    t = build_trie([Unit([1], [2, 3], [-1.0, -2.0]), Unit([1], [2], [-3.0]), Unit([1, 2], [4])])
    assert math.isnan(t.behavior_logprob[0])
    assert t.behavior_logprob[1] == pytest.approx(-2.0) and t.behavior_logprob[2] == pytest.approx(-2.0)
    assert math.isnan(t.behavior_logprob[3])  # token 4: its unit carries no logprobs


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="empty context"):
        build_trie([Unit([], [1, 2])])
    with pytest.raises(ValueError, match="not finite"):
        build_trie([Unit([1], [2])], [float("nan")])
    with pytest.raises(ValueError, match="2 units but 1 weights"):
        build_trie([Unit([1], [2]), Unit([1], [3])], [1.0])
    with pytest.raises(ValueError, match="logprobs"):
        build_trie([Unit([1], [2, 3], [-0.1])])


def _prefix_of(trie, i):
    out = []
    while i >= 0:
        out.append(trie.input_ids[i])
        i = trie.parent[i]
    return tuple(reversed(out))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def group(tok):
    """k=4 noisy parallel samples (2 blocks, 2..8 threads) and one sequential sample of one prompt."""
    rng = random.Random(3)
    task = TaskConfig(min_threads=2, max_threads=8, blocks=2, b_digits=2)
    problem = sample_problem(rng, task)
    prompt = chat_prompt_ids(tok, problem.prompt)
    trajectories = [replay(prompt, noisy_response(parallel_response(problem, task), rng, 0.3), tok, tok.eos_token_id)
                    for _ in range(4)]
    trajectories.append(replay(prompt, sequential_response(problem, task), tok, tok.eos_token_id))
    return trajectories


def test_targets_are_completion_occurrences_exactly(group):
    t = group_trie(group, [0.5, -1.0, 2.0, 0.25, -0.75])
    # independent count: a target is identified by its full path prefix
    expected_count, expected_weight = {}, {}
    for traj, w in zip(group, [0.5, -1.0, 2.0, 0.25, -0.75]):
        for u in traj:
            path = tuple(u.context_ids) + tuple(u.completion_ids)
            for i in range(len(u.context_ids), len(path)):
                expected_count[path[:i + 1]] = expected_count.get(path[:i + 1], 0) + 1
                expected_weight[path[:i + 1]] = expected_weight.get(path[:i + 1], 0.0) + w
    prefixes = [_prefix_of(t, i) for i in range(len(t))]
    assert len(set(prefixes)) == len(t)  # every node is a distinct path
    assert [expected_count.get(p, 0) for p in prefixes] == t.n_targets
    assert t.weight == pytest.approx([expected_weight.get(p, 0.0) for p in prefixes])
    assert sum(t.n_targets) == sum(len(u.completion_ids) for traj in group for u in traj)
    for i in range(len(t)):  # the flat index is the pre-order entry time; depth = position
        assert t.parent[i] < i and t.position_ids[i] == len(prefixes[i]) - 1


def test_prompt_seeds_and_join_copies_of_threads_2_to_k_are_never_targets(group):
    t = group_trie(group)
    prompt_len = len(group[0][0].context_ids)
    first_unit = 0
    n_blocks_checked = 0
    for traj in group:
        paths = t.unit_nodes[first_unit:first_unit + len(traj)]
        first_unit += len(traj)
        for u, path in zip(traj, paths):
            assert all(t.n_targets[n] == 0 for n in path[:prompt_len]), "prompt token is a target"
            n_ctx = len(u.context_ids)
            inserted = path[n_ctx - u.n_inserted:n_ctx]
            assert all(t.n_targets[n] == 0 for n in inserted), "orchestrator-inserted token is a target"
            assert all(t.n_targets[n] >= 1 for n in path[n_ctx:]), "completion token is not a target"
        for i, u in enumerate(traj):
            if u.role != THREAD or u.thread != 1:
                continue
            j = i
            while traj[j].role == THREAD:
                j += 1  # traj[j] continues after the join; its context holds every thread
            members, join_path = list(range(i, j)), paths[j]
            start = len(u.context_ids) - u.n_inserted  # pre-block context length
            offset = start
            for k in members:
                th = traj[k]
                length = th.n_inserted + len(th.completion_ids)  # seed + body
                copy, own = join_path[offset:offset + length], paths[k][start:]
                if k == i:
                    assert copy == own  # thread 1 is a prefix of the join context: same nodes, trained once
                else:
                    assert not set(copy) & set(own)
                    assert all(t.n_targets[n] == 0 for n in copy), f"join copy of thread {th.thread} is a target"
                offset += length
            n_blocks_checked += 1
    assert n_blocks_checked == 8  # 4 parallel samples x 2 blocks


def test_packing_respects_budget_and_keeps_tries_whole():
    groups = synthetic_groups(5, 2, TaskConfig(min_threads=2, max_threads=3, b_digits=1), 0.5, seed=1)
    tries = [group_trie(g) for g in groups]
    budget = max(len(t) for t in tries) + min(len(t) for t in tries)
    rows = pack_tries(tries, budget)
    assert all(len(r) <= budget for r in rows)
    assert sorted(len(t) for r in rows for t in r.tries) == sorted(len(t) for t in tries)
    assert len(rows) < len(tries)  # some rows hold more than one trie
    for r in rows:
        mask = ancestor_mask(r.tout)
        doc = r.doc
        assert not (mask & (doc[:, None] != doc[None, :])).any(), "attention crosses a document boundary"
        for d, off in enumerate(r.doc_offsets):
            assert (doc[off:off + len(r.tries[d])] == d).all()
            assert int(r.parent[off]) == -1
        roots = r.parent < 0
        assert (r.parent[~roots] < torch.nonzero(~roots)[:, 0]).all()
    with pytest.raises(ValueError, match="more than the row budget"):
        pack_tries(tries, max(len(t) for t in tries) - 1)


def test_ancestor_mask_is_the_ancestor_relation(group):
    row = make_row([group_trie(group[:2]), build_trie(group[2])])
    mask = ancestor_mask(row.tout)
    parent = row.parent.tolist()
    rng = random.Random(0)
    for q in rng.sample(range(len(row)), 60):
        anc = set()
        i = q
        while i >= 0:
            anc.add(i)
            i = parent[i]
        assert set(torch.nonzero(mask[q])[:, 0].tolist()) == anc


def test_trie_is_at_least_twice_smaller_than_expanded_rows():
    groups = synthetic_groups(2, 8, TaskConfig(min_threads=4, max_threads=4, b_digits=3), 0.05, seed=0)
    s = tree_stats([group_trie(g) for g in groups])
    assert s.expanded_ratio >= 2.0 and s.padded_tokens > s.expanded_tokens > s.unique_tokens


def test_group_tries_split_a_group_that_exceeds_the_budget():
    (g,) = synthetic_groups(1, 6, TaskConfig(min_threads=2, max_threads=3, b_digits=2), 0.5, seed=2)
    weights = [0.5, -0.25, 1.0, -1.0, 0.0, 2.0]
    whole = group_trie(g, weights)
    singles = [len(group_trie([traj])) for traj in g]
    assert group_tries(g, weights, len(whole)) == [whole]
    budget = 2 * max(singles) + 10
    assert budget < len(whole)
    tries = group_tries(g, weights, budget)
    assert 1 < len(tries) < len(g) and all(len(t) <= budget for t in tries)
    assert sum(t.n_units for t in tries) == whole.n_units
    assert sum(sum(t.n_targets) for t in tries) == sum(whole.n_targets)
    assert sum(sum(t.weight) for t in tries) == pytest.approx(sum(whole.weight))
    with pytest.raises(ValueError, match="alone has a trie"):
        group_tries(g, weights, max(singles) - 1)


# --------------------------------------------------------------------------- edges and errors, by hand


def _sized(n: int, first: int = 100):
    """A trie of ``n`` tokens: one unit with ``n - 1`` context tokens and one completion token."""
    return build_trie([Unit(list(range(first, first + n - 1)), [first + n - 1])])


def _traj(a: int, b: int):
    """A trajectory [1, 2] -> [a, b]: with others it shares the 2 prompt nodes and adds 2 of its own."""
    return [Unit([1, 2], [a, b])]


def test_default_weights_and_context_lengths():
    t = build_trie([Unit([1], [2, 3]), Unit([1, 2], [4])])
    assert t.weight == [0.0, 1.0, 1.0, 1.0] and t.n_targets == [0, 1, 1, 1]
    assert t.unit_context_len == [1, 2]
    zero = build_trie([Unit([1], [2])], [0.0])
    assert (zero.weight, zero.weight_pos, zero.weight_neg) == ([0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    assert group_tries([_traj(3, 4), _traj(5, 6)])[0].weight == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]


def test_group_tries_cut_by_hand():
    # 4 trajectories of 2 own tokens after the shared prompt: 2 + 2k tokens for k of them in one trie
    trajs = [_traj(3, 4), _traj(5, 6), _traj(7, 8), _traj(9, 10)]
    weights = [0.5, -0.5, 0.25, -0.25]
    tries = group_tries(trajs, weights, max_tokens=6)  # 2 trajectories fill a trie exactly
    assert [len(t) for t in tries] == [6, 6]
    assert [t.input_ids for t in tries] == [[1, 2, 3, 4, 5, 6], [1, 2, 7, 8, 9, 10]]
    assert tries[1].weight == [0.0, 0.0, 0.25, 0.25, -0.25, -0.25]
    tries = group_tries(trajs[:3], weights[:3], max_tokens=5)  # one per trie; the third starts a new one
    assert [t.input_ids for t in tries] == [[1, 2, 3, 4], [1, 2, 5, 6], [1, 2, 7, 8]]
    assert [t.weight[2] for t in tries] == [0.5, -0.5, 0.25]
    assert len(group_tries(trajs)) == 1  # no limit
    with pytest.raises(ValueError, match=r"^trajectory 0 alone has a trie of 4 tokens, more than max_tokens=3$"):
        group_tries(trajs, max_tokens=3)
    exact = [Unit([1, 2], [11, 12, 13])]  # alone exactly the budget: allowed
    assert [t.input_ids for t in group_tries([trajs[0], exact], max_tokens=5)] == [[1, 2, 3, 4], [1, 2, 11, 12, 13]]
    big = [Unit([1, 2], [11, 12, 13, 14])]
    with pytest.raises(ValueError, match=r"^trajectory 1 alone has a trie of 6 tokens, more than max_tokens=5$"):
        group_tries([trajs[0], big], max_tokens=5)
    with pytest.raises(ValueError, match=r"^2 trajectories but 1 weights$"):
        group_tries(trajs[:2], [1.0])
    with pytest.raises(ValueError, match=r"^2 trajectories but 1 weights$"):
        group_trie(trajs[:2], [1.0])


def test_build_trie_errors_word_for_word():
    with pytest.raises(ValueError, match=r"^unit 0: empty context, its first completion token has no parent "
                                         r"position to be predicted from$"):
        build_trie([Unit([], [1])])
    with pytest.raises(ValueError, match=r"^1 units but 2 weights$"):
        build_trie([Unit([1], [2])], [1.0, 1.0])


def test_pack_tries_first_fit_decreasing_by_hand():
    two, three, five = _sized(2, 100), _sized(3, 200), _sized(5, 300)
    rows = pack_tries([two, three, five], max_tokens=5)
    # by decreasing size: 5 fills row 0; 3 opens row 1; 2 fits exactly in the 2 tokens left there
    assert [[len(t) for t in r.tries] for r in rows] == [[5], [3, 2]]
    assert [r.doc_offsets for r in rows] == [[0], [0, 3]]
    assert len(pack_tries([build_trie([Unit([5], [])])], max_tokens=1)) == 1  # one-token rows are allowed
    with pytest.raises(ValueError, match=r"^max_tokens must be positive, got 0$"):
        pack_tries([two], max_tokens=0)
    with pytest.raises(ValueError, match=r"^trie 1 has 5 tokens, more than the row budget 4; raise the row length "
                                         r"or put fewer trajectories in one trie$"):
        pack_tries([two, five], max_tokens=4)


def test_make_row_of_two_tries_field_by_field():
    a = build_trie([Unit([1, 2], [3], [-0.5])], [0.5])   # 3 tokens
    b = build_trie([Unit([7], [8, 9])], [-1.0])          # 3 tokens
    row = make_row([a, b])
    assert row.input_ids.tolist() == [1, 2, 3, 7, 8, 9]
    assert row.position_ids.tolist() == [0, 1, 2, 0, 1, 2]
    assert row.parent.tolist() == [-1, 0, 1, -1, 3, 4]
    assert row.tout.tolist() == [2, 2, 2, 5, 5, 5]
    assert row.doc.tolist() == [0, 0, 0, 1, 1, 1] and row.doc_offsets == [0, 3]
    assert row.weight.tolist() == [0.0, 0.0, 0.5, 0.0, -1.0, -1.0]
    assert row.weight_pos.tolist() == [0.0, 0.0, 0.5, 0.0, 0.0, 0.0]
    assert row.weight_neg.tolist() == [0.0, 0.0, 0.0, 0.0, -1.0, -1.0]
    assert row.n_targets.tolist() == [0, 0, 1, 0, 1, 1]
    blp = row.behavior_logprob.tolist()
    assert blp[2] == -0.5 and all(math.isnan(blp[i]) for i in (0, 1, 3, 4, 5))
    assert row.unit_positions(1, 0).tolist() == [3, 4, 5] and row.unit_positions(0, 0).tolist() == [0, 1, 2]
    assert row.unit_positions(1, 0).dtype == torch.long
    with pytest.raises(ValueError, match=r"^make_row needs at least one trie$"):
        make_row([])
    three = make_row([a, b, build_trie([Unit([5], [6]), Unit([], [])])])  # offsets add up; an empty unit
    assert three.doc_offsets == [0, 3, 6] and three.unit_positions(2, 0).tolist() == [6, 7]
    empty = three.unit_positions(2, 1)
    assert empty.numel() == 0 and empty.dtype == torch.long


def test_row_tensors_are_fp32_and_int64_whatever_the_default_dtype():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        row = make_row([build_trie([Unit([1, 2], [3], [-0.5])], [0.5])])
    finally:
        torch.set_default_dtype(default)
    for name in ("weight", "weight_pos", "weight_neg", "behavior_logprob"):
        assert getattr(row, name).dtype == torch.float32, name
    for name in ("input_ids", "position_ids", "parent", "tout", "doc", "n_targets"):
        assert getattr(row, name).dtype == torch.int64, name
    empty = make_row([build_trie([])])  # no tokens at all: still integer ids (an empty list is float by default)
    assert len(empty) == 0 and empty.input_ids.dtype == empty.parent.dtype == empty.n_targets.dtype == torch.int64
    for name in ("position_ids", "tout", "doc"):
        assert getattr(empty, name).dtype == torch.int64, name


def test_tree_stats_of_nothing():
    s = tree_stats([])
    assert (s.n_units, s.unique_tokens, s.expanded_tokens, s.padded_tokens, s.target_tokens) == (0, 0, 0, 0, 0)
    assert (s.expanded_ratio, s.padded_ratio) == (0.0, 0.0)
