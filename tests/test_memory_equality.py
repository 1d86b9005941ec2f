"""Learner memory options change memory, not numbers (fp32, CPU).

* Gradient checkpointing: the gradients of the SFT and P-GRPO losses with
  and without it agree within 1e-5 relative (per parameter tensor, in norm)
  on trie-packed rows, and it really is on (far fewer saved activations).
* Chunked log-probabilities (:func:`rl.logprobs.chunked_predictions`) against
  the full-logits path: the same log-probabilities, greedy hits, losses and
  gradients within 1e-5 relative, for SFT, P-GRPO (on-policy, clipped, with
  a KL term) and the reference model's path.

The integration test trains with the real DeepSpeed learner under ZeRO 0-3
(and optimizer offload) with checkpointing and chunking on, against the plain
stage-0 path, for several steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from rl.attention import tree_predictions
from rl.grpo import group_advantages, pgrpo_loss, rl_tries, with_reference
from rl.losses import sft_loss
from rl.trie import group_tries, pack_tries
from rollout.units import SEQ, THREAD, Unit

VOCAB = 512
REL = 1e-5


def _model(seed: int = 0, checkpointing: bool = False):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, tie_word_embeddings=True,
                         max_position_embeddings=512)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.float32)
    model.config._attn_implementation = "sdpa"
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _trajectory(gen: torch.Generator, prompt: list[int], threads: int) -> list[Unit]:
    """Orchestrator-shaped units: a sequential head, ``threads`` threads on one context, a join tail."""
    def ids(n: int) -> list[int]:
        return torch.randint(10, VOCAB, (n,), generator=gen).tolist()

    head = ids(12)
    units = [Unit(prompt, head)]
    base = prompt + head
    joined = list(base)
    for t in range(threads):
        seed, body = [3, 4 + t], ids(15 + 3 * t)
        units.append(Unit(base + seed, body, role=THREAD, block=1, thread=t + 1, n_inserted=2))
        joined += seed + body
    units.append(Unit(joined + [9], ids(10), role=SEQ, n_inserted=1))
    return units


def _rows(weights: list[float] | None = None):
    """Trie-packed rows of two groups (threads share their contexts, thread 1 is a join prefix)."""
    gen = torch.Generator().manual_seed(1)
    groups = [[_trajectory(gen, [1, 2, 5, 6, 7], k) for k in (2, 3, 1)],
              [_trajectory(gen, [1, 2, 8], k) for k in (2, 2)]]
    if weights is None:
        tries = [t for g in groups for t in group_tries(g)]
    else:
        tries = rl_tries(groups, [weights[:3], weights[3:]], max_tokens=10_000)
    rows = pack_tries(tries, max_tokens=320)
    assert len(rows) >= 2 and all(len(r) > 100 for r in rows)
    assert any(len(set(r.parent.tolist())) < len(r) - 1 for r in rows)  # branching: some node has 2 children
    return rows, groups


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _assert_grads_close(got: dict, want: dict) -> float:
    assert got.keys() == want.keys() and want
    worst = max(_rel(got[n], want[n]) for n in want)
    assert worst <= REL, worst
    return worst


def _run(model, rows, loss: str, chunk: int, options: dict, denominator: float):
    """Summed loss, per-row predictions and gradients of ``rows`` (fresh gradients)."""
    model.zero_grad(set_to_none=True)
    total, preds = 0.0, []
    for row in rows:
        pred = tree_predictions(model, row, "sdpa", chunk_tokens=chunk)
        fn = sft_loss if loss == "sft" else pgrpo_loss
        value, _ = fn(pred, row, denominator, **options)
        value.backward()
        total += float(value.detach())
        preds.append(pred)
    return total, preds, _grads(model)


CASES = [("sft", {}), ("pgrpo", {}), ("pgrpo", {"clip_eps": 0.2}), ("pgrpo", {"kl_coef": 0.1})]


def _case_rows(loss: str, options: dict):
    if loss == "sft":
        rows, _ = _rows()
        return rows, float(sum(int(r.n_targets.sum()) for r in rows))
    rewards = [1.2, 0.0, 1.0, 1.0, 0.0]
    adv = group_advantages(rewards[:3]) + group_advantages(rewards[3:])
    rows, groups = _rows(adv)
    if options.get("clip_eps") is not None:  # a behaviour policy away from the current one: ratios != 1
        gen = torch.Generator().manual_seed(3)
        for row in rows:
            known = row.n_targets > 0
            row.behavior_logprob = torch.where(known, -torch.rand(len(row), generator=gen) * 6, math.nan)
    if options.get("kl_coef"):
        reference = _model(seed=7)
        with torch.no_grad():
            refs = [tree_predictions(reference, r, "sdpa", chunk_tokens=0).logprob for r in rows]
        rows = with_reference(rows, refs)
    n = sum(len(u.completion_ids) for g in groups for t in g for u in t)
    return rows, float(n)


@pytest.mark.parametrize("loss,options", CASES)
def test_checkpointing_leaves_the_gradients_unchanged(loss, options):
    rows, n = _case_rows(loss, options)
    plain_loss, _, plain = _run(_model(), rows, loss, 0, options, n)
    for chunk in (0, 48):
        ckpt_loss, _, ckpt = _run(_model(checkpointing=True), rows, loss, chunk, options, n)
        assert ckpt_loss == pytest.approx(plain_loss, rel=REL)
        _assert_grads_close(ckpt, plain)


@pytest.mark.parametrize("loss,options", CASES)
def test_chunked_logprobs_equal_the_full_logits_path(loss, options):
    rows, n = _case_rows(loss, options)
    model = _model()
    full_loss, full_preds, full = _run(model, rows, loss, 0, options, n)
    for chunk in (1, 37, 4096):
        chunk_loss, chunk_preds, chunked = _run(model, rows, loss, chunk, options, n)
        assert chunk_loss == pytest.approx(full_loss, rel=REL)
        for a, b in zip(chunk_preds, full_preds):
            assert _rel(a.logprob.detach(), b.logprob.detach()) <= REL
            assert torch.equal(a.greedy, b.greedy)
        _assert_grads_close(chunked, full)


def test_chunked_logprobs_at_roots_and_of_the_reference_path(tmp_path):
    """Roots get 0 and no greedy hit; ReferenceModel gives the same numbers chunked and unchunked."""
    from rl.grpo import ReferenceModel

    rows, _ = _rows()
    model = _model()
    model.save_pretrained(tmp_path)
    full = ReferenceModel(str(tmp_path), "sdpa", chunk_tokens=0).logprobs(rows)
    chunked = ReferenceModel(str(tmp_path), "sdpa", chunk_tokens=50).logprobs(rows)
    for row, a, b in zip(rows, chunked, full):
        roots = row.parent < 0
        assert roots.any() and float(a[roots].abs().sum()) == 0.0
        assert _rel(a, b) <= REL and a.dtype == torch.float32
        pred = tree_predictions(model, row, "sdpa", chunk_tokens=50)
        assert not bool(pred.greedy[roots].any())


def test_checkpointing_is_really_on():
    """With checkpointing the forward keeps far fewer bytes for the backward (and the backward still works)."""
    rows, _ = _rows()

    def saved_bytes(model) -> int:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pred = tree_predictions(model, rows[0], "sdpa", chunk_tokens=64)
        pred.logprob.sum().backward()
        return sum(seen.values())

    plain, ckpt = saved_bytes(_model()), saved_bytes(_model(checkpointing=True))
    assert ckpt < 0.4 * plain, (ckpt, plain)


def test_chunked_backward_keeps_no_full_logits():
    """The largest tensor the chunked path allocates is [chunk, vocab], not [L, vocab]."""
    rows, _ = _rows()
    row = rows[0]
    model = _model()

    def largest_logits(chunk: int) -> int:
        """Most positions of any [positions, vocab] tensor made (the weight's [hidden, vocab] transposes aside)."""
        largest = 0

        class Watch(torch.utils._python_dispatch.TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                nonlocal largest
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == VOCAB and t.shape[0] != 64:
                        largest = max(largest, t.shape[0])
                return out

        with Watch():
            pred = tree_predictions(model, row, "sdpa", chunk_tokens=chunk)
            pgrpo_loss(pred, row, 10.0)[0].backward()
        return largest

    assert largest_logits(0) == len(row)
    assert 0 < largest_logits(40) <= 40 < len(row)


# --------------------------------------------------------------------------- DeepSpeed, ZeRO 0-3


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from rollout.ray_init import start_ray

    start_ray(None, num_cpus=2, include_dashboard=False)  # a local instance of this process, as the commands do
    yield ray
    ray.shutdown()


@pytest.mark.integration
def test_zero_stages_with_checkpointing_and_chunks_train_like_the_plain_learner(ray_cluster, tmp_path):
    """4 steps of P-GRPO with the DeepSpeed learner: ZeRO 0-3 (and ZeRO-2 with the optimizer offloaded), gradient
    checkpointing and 48-token log-prob chunks, against stage 0 with neither: same losses and gradient norms."""
    from rl.learner import LearnerConfig, LearnerGroup

    model = _model()
    model.save_pretrained(tmp_path / "model")
    rewards = [1.2, 0.0, 1.0, 1.0, 0.0]
    adv = group_advantages(rewards[:3]) + group_advantages(rewards[3:])
    rows, _ = _rows(adv)
    base = dict(lr=1e-3, row_tokens=320, cpus_per_rank=0.5, threads_per_rank=1, grad_clip=1.0)
    variants = {"plain": dict(logprob_chunk_tokens=0)}
    for stage in (0, 1, 2, 3):
        variants[f"zero{stage}"] = dict(zero_stage=stage, gradient_checkpointing=True, logprob_chunk_tokens=48)
    variants["zero2-offload"] = dict(zero_stage=2, offload_optimizer=True, gradient_checkpointing=True,
                                     logprob_chunk_tokens=48)
    results = {}
    for name, extra in variants.items():
        group = LearnerGroup(LearnerConfig(**base, **extra), tmp_path / "model", total_steps=4)
        try:
            results[name] = [group.train_step(rows, loss="pgrpo", denominator=40.0) for _ in range(4)]
        finally:
            group.shutdown()
    want = results.pop("plain")
    for name, got in results.items():
        for step, (a, b) in enumerate(zip(got, want)):
            assert a["loss"] == pytest.approx(b["loss"], rel=REL, abs=1e-7), (name, step)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (name, step)
    assert want[-1]["loss"] != pytest.approx(want[0]["loss"], rel=1e-3)  # the weights moved


@pytest.mark.integration
def test_bf16_learner_trains_close_to_fp32(ray_cluster, tmp_path):
    """Weights loaded in bf16, DeepSpeed's bf16 mode (fp32 master weights) under ZeRO-1 with checkpointing and
    chunks: the first SFT loss within bf16 rounding of the fp32 learner's, every loss and gradient norm finite,
    and the loss going down."""
    from rl.learner import LearnerConfig, LearnerGroup

    _model().save_pretrained(tmp_path / "model")
    rows, _ = _rows()
    base = dict(lr=1e-3, row_tokens=320, cpus_per_rank=0.5, threads_per_rank=1, grad_clip=1.0, zero_stage=1,
                gradient_checkpointing=True, logprob_chunk_tokens=48)
    results = {}
    for dtype in ("fp32", "bf16"):
        group = LearnerGroup(LearnerConfig(dtype=dtype, **base), tmp_path / "model", total_steps=3)
        try:
            assert group.info[0]["dtype"] == ("torch.bfloat16" if dtype == "bf16" else "torch.float32")
            results[dtype] = [group.train_step(rows, loss="sft") for _ in range(3)]
        finally:
            group.shutdown()
    assert results["bf16"][0]["loss"] == pytest.approx(results["fp32"][0]["loss"], rel=3e-2)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in results["bf16"])
    assert results["bf16"][-1]["loss"] < results["bf16"][0]["loss"]
