"""One trie-packed forward pass equals every unit run on its own (DESIGN section 5, required check).

Random groups: k samples with a shared prompt, several blocks of 2..8 threads,
plus a sequential sample, replayed into units with the tiny byte tokenizer;
several tries share one packed row. The model is a randomly initialised tiny
Qwen3 in fp32.
"""

import random

import pytest
import torch

from rl.attention import IMPLEMENTATION, tree_attention_mask, tree_block_mask, tree_forward, tree_mask_mod
from rl.bench_trie import noisy_response, tiny_model as _tiny_model
from rl.logprobs import sequence_logprobs, token_logprobs, weighted_loss
from rl.trie import group_trie, make_row
from rollout.task import TaskConfig, parallel_response, sample_problem, sequential_response
from rollout.tiny import build_tokenizer
from rollout.units import chat_prompt_ids, replay

TOL = 1e-5


def tiny_model(backend):
    """Smaller than the tiny model (2 layers, hidden 64, 2 heads, 1 kv head) to keep the test fast."""
    return _tiny_model(backend, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1)


def _random_groups(seed: int, n_groups: int, k: int) -> list[list[list]]:
    tok = build_tokenizer()
    rng = random.Random(seed)
    task = TaskConfig(min_threads=2, max_threads=8, blocks=2, b_digits=1)
    groups = []
    for _ in range(n_groups):
        problem = sample_problem(rng, task)
        prompt = chat_prompt_ids(tok, problem.prompt)
        trajs = [replay(prompt, noisy_response(parallel_response(problem, task), rng, 0.3), tok, tok.eos_token_id)
                 for _ in range(k - 1)]
        trajs.append(replay(prompt, sequential_response(problem, task), tok, tok.eos_token_id))
        groups.append(trajs)
    return groups


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, OpenMP threads waiting on each other cost 10-30x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def packed():
    groups = _random_groups(seed=11, n_groups=2, k=3)
    rng = random.Random(5)
    advantages = [[rng.uniform(-1, 1) for _ in g] for g in groups]
    row = make_row([group_trie(g, a) for g, a in zip(groups, advantages)])
    return groups, advantages, row


def _reference(model, row):
    """(row positions, reference logprobs) of every completion token of every unit, one causal pass per unit."""
    positions, values = [], []
    for d, trie in enumerate(row.tries):
        for u in range(trie.n_units):
            path, n_ctx = row.unit_positions(d, u), trie.unit_context_len[u]
            if n_ctx == len(path):
                continue
            positions.append(path[n_ctx:])
            values.append(sequence_logprobs(model, row.input_ids[path].tolist(), n_ctx))
    return torch.cat(positions), torch.cat(values)


@pytest.fixture(scope="module")
def reference(packed):
    """Per-unit causal-pass logprobs of every target occurrence (weights depend only on the seed, not the backend)."""
    _, _, row = packed
    with torch.no_grad():
        return _reference(tiny_model("eager").eval(), row)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_packed_logprobs_equal_per_unit_causal_passes(packed, reference, backend):
    _, _, row = packed
    assert len(row.tries) == 2 and max(len(t.unit_nodes) for t in row.tries) > 10
    pos, ref = reference
    model = tiny_model(backend).eval()
    with torch.no_grad():
        lp = token_logprobs(tree_forward(model, row, backend), row)
    assert pos.numel() == int(row.n_targets.sum())
    assert set(pos.tolist()) == set(torch.nonzero(row.is_target)[:, 0].tolist())
    assert (lp[pos] - ref).abs().max().item() < TOL


def test_flex_forward_equals_per_unit_causal_passes(packed, reference):
    _, _, row = packed
    pos, ref = reference
    model = tiny_model("flex").eval()
    with torch.no_grad():  # torch 2.13 runs flex attention's compiled forward on CPU (no backward)
        lp = token_logprobs(tree_forward(model, row, "flex"), row)
    assert (lp[pos] - ref).abs().max().item() < TOL


@pytest.mark.parametrize("block_size", [16, 128])
def test_block_mask_from_exit_times_equals_torch_dense_construction(packed, block_size):
    from torch.nn.attention.flex_attention import create_block_mask

    _, _, row = packed
    for n in (len(row), 1000, 256):  # a pre-order prefix of the row is itself a forest
        tout = row.tout[:n].clamp(max=n - 1)
        ours = tree_block_mask(tout, block_size)
        ref = create_block_mask(tree_mask_mod(tout), None, None, n, n, device="cpu", BLOCK_SIZE=block_size)
        assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)
        assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
        assert torch.equal(ours.to_dense(), ref.to_dense())
        assert ours.full_kv_num_blocks.sum() > 0 and ours.kv_num_blocks.sum() > 0


def test_sdpa_gradients_equal_per_unit_reference(packed):
    groups, advantages, row = packed
    model = tiny_model("sdpa").train()
    denom = float(row.n_targets.sum())
    loss = weighted_loss(token_logprobs(tree_forward(model, row, "sdpa"), row), row, denominator=denom)
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref_loss = torch.zeros(())
    for g, adv in zip(groups, advantages):
        for traj, a in zip(g, adv):
            for u in traj:
                if u.completion_ids:
                    ids = list(u.context_ids) + list(u.completion_ids)
                    ref_loss = ref_loss - a * sequence_logprobs(model, ids, len(u.context_ids)).sum() / denom
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < TOL
    for n, p in model.named_parameters():
        scale = max(1.0, p.grad.abs().max().item())
        assert (packed_grads[n] - p.grad).abs().max().item() < TOL * scale, n


def test_wrong_mask_or_wrong_read_position_would_be_caught(packed, reference):
    """The equivalence test is sensitive: a flat causal mask, or reading at flat index - 1, differ by far more."""
    _, _, row = packed
    pos, ref = reference
    model = tiny_model("sdpa").eval()
    with torch.no_grad():
        flat = tree_forward(model, row, "sdpa").float().log_softmax(-1)
        prev = flat[pos - 1].gather(-1, row.input_ids[pos][:, None])[:, 0]  # read at flat index - 1
        causal = model(input_ids=row.input_ids[None], position_ids=row.position_ids[None],
                       attention_mask=torch.ones(1, 1, len(row), len(row), dtype=torch.bool).tril(),
                       use_cache=False).logits[0]
        lp_causal = token_logprobs(causal, row)
    assert (prev - ref).abs().max().item() > 1e-2
    assert (lp_causal[pos] - ref).abs().max().item() > 1e-2


def test_model_backend_mismatch_and_unknown_backend_are_errors(packed):
    _, _, row = packed
    model = tiny_model("eager")
    with pytest.raises(ValueError, match="attn_implementation"):
        tree_forward(model, row, "sdpa")
    with pytest.raises(ValueError, match="unknown attention backend"):
        tree_attention_mask(row, "dense")
    with pytest.raises(ValueError, match="max_dense_tokens"):
        tree_attention_mask(row, "sdpa", max_dense_tokens=len(row) - 1)
    assert IMPLEMENTATION["flex"] == "flex_attention"


def test_bench_layouts_compute_the_same_loss_on_fewer_trie_tokens():
    import argparse

    from rl.bench_trie import LAYOUTS, run_layout

    args = argparse.Namespace(groups=1, k=3, threads_per_block=3, blocks=1, a_digits=1, b_digits=2, noise=0.05,
                              seed=0, backend="sdpa", row_tokens=4096, repeats=1, threads=1)
    results = {layout: run_layout(layout, args) for layout in LAYOUTS}
    losses = [r.loss for r in results.values()]
    assert max(losses) - min(losses) < 1e-5 and abs(losses[0]) > 1e-4
    assert results["trie"].tokens < results["expanded"].tokens < results["padded"].tokens
    assert results["trie"].rows == 1 and results["expanded"].rows == results["padded"].rows


# --------------------------------------------------------------------------- masks by hand, edges, devices


def _chain_and_fork_row():
    """Flat tokens 0 -> 1 -> {2, 3}: a prompt of two tokens and two one-token branches; tout = [3, 3, 2, 3]."""
    from rollout.units import Unit

    return make_row([group_trie([[Unit([1, 2], [3])], [Unit([1, 2], [4])]])])


def test_ancestor_mask_by_hand_and_on_the_tout_device():
    from rl.attention import ancestor_mask

    row = _chain_and_fork_row()
    assert row.tout.tolist() == [3, 3, 2, 3]
    expected = [[1, 0, 0, 0],   # 0 sees itself
                [1, 1, 0, 0],   # 1 sees 0 and itself
                [1, 1, 1, 0],   # branch 2 sees the prompt and itself (a leaf: tout[2] = 2)
                [1, 1, 0, 1]]   # branch 3 does not see its sibling 2
    assert ancestor_mask(row.tout).int().tolist() == expected
    assert ancestor_mask(row.tout.to("meta")).device.type == "meta"


def test_mask_forms_of_each_backend():
    row = _chain_and_fork_row()
    allowed = tree_attention_mask(row, "sdpa")
    assert allowed.dtype == torch.bool and allowed.shape == (1, 1, 4, 4)
    eager = tree_attention_mask(row, "eager", dtype=torch.bfloat16)
    assert eager.dtype == torch.bfloat16
    assert eager[0, 0, 3, 2] == torch.finfo(torch.bfloat16).min and eager[0, 0, 3, 1] == 0
    assert tree_attention_mask(row, "eager", device="meta").device.type == "meta"
    assert tree_attention_mask(row, "sdpa", device="meta").device.type == "meta"
    assert tree_attention_mask(row, "sdpa", max_dense_tokens=4).shape == (1, 1, 4, 4)  # the cap is inclusive
    with pytest.raises(ValueError, match=r"^row of 4 tokens is longer than max_dense_tokens=3 for the dense 'eager'"):
        tree_attention_mask(row, "eager", max_dense_tokens=3)
    with pytest.raises(ValueError, match=r"^unknown attention backend 'dense'; choose one of \('eager', 'sdpa', "
                                         r"'flex'\)$"):
        tree_attention_mask(row, "dense")
    flex = tree_attention_mask(row, "flex")
    assert type(flex).__name__ == "BlockMask" and flex.to_dense().shape[-2:] == (1, 1)
    assert flex.BLOCK_SIZE == (128, 128)  # flex attention's tile size by default


class _RecordingModel(torch.nn.Module):
    """Stands in for a transformers model: records what tree_forward passes, returns zero logits."""

    def __init__(self, implementation: str, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.config = type("Config", (), {"_attn_implementation": implementation})()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=dtype, device=device))
        self.seen = {}

    def forward(self, **kwargs):
        self.seen = kwargs
        n = kwargs["input_ids"].shape[1]
        return type("Out", (), {"logits": torch.zeros(1, n, 8, device=self.weight.device)})()


def test_tree_forward_passes_the_row_and_mask_in_the_models_dtype_and_device():
    row = _chain_and_fork_row()
    model = _RecordingModel("eager", dtype=torch.bfloat16)
    assert tree_forward(model, row, "eager").shape == (4, 8)
    seen = model.seen
    assert seen["input_ids"].tolist() == [row.input_ids.tolist()]
    assert seen["position_ids"].tolist() == [[0, 1, 2, 2]]
    assert seen["attention_mask"].dtype == torch.bfloat16 and seen["use_cache"] is False
    meta = _RecordingModel("sdpa", device="meta")
    tree_forward(meta, row, "sdpa")
    for key in ("input_ids", "position_ids", "attention_mask"):
        assert meta.seen[key].device.type == "meta", key
    with pytest.raises(ValueError, match="longer than max_dense_tokens=3"):
        tree_forward(model, row, "eager", max_dense_tokens=3)
    with pytest.raises(ValueError, match=r"^unknown attention backend 'dense'; choose one of"):
        tree_forward(model, row, "dense")
    with pytest.raises(ValueError, match=r"^backend 'sdpa' needs the model's attn_implementation to be 'sdpa', "
                                         r"it is 'eager'"):
        tree_forward(model, row, "sdpa")


@pytest.mark.parametrize("block_size", [1, 2, 3, 16])
@pytest.mark.parametrize("n", [17, 33, 48])
def test_block_mask_tiles_at_small_and_ragged_sizes(packed, block_size, n):
    """Rows whose last tile holds one token (17, 33 with 16), a full last tile (48), tiles of 1-3 tokens."""
    from torch.nn.attention.flex_attention import create_block_mask

    _, _, row = packed
    tout = row.tout[:n].clamp(max=n - 1)
    ours = tree_block_mask(tout, block_size)
    ref = create_block_mask(tree_mask_mod(tout), None, None, n, n, device="cpu", BLOCK_SIZE=block_size)
    assert ours.BLOCK_SIZE == ref.BLOCK_SIZE
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert ours.kv_num_blocks.dtype == ours.kv_indices.dtype == torch.int32
    assert torch.equal(ours.to_dense(), ref.to_dense())
    for q in range(ours.kv_num_blocks.shape[-1]):  # the selected key blocks, in increasing order
        k = int(ours.kv_num_blocks[0, 0, q])
        assert torch.equal(ours.kv_indices[0, 0, q, :k], ref.kv_indices[0, 0, q, :k])
        f = int(ours.full_kv_num_blocks[0, 0, q])
        assert torch.equal(ours.full_kv_indices[0, 0, q, :f], ref.full_kv_indices[0, 0, q, :f])
