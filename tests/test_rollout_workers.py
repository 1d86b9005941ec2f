"""Ray rollout workers: a pool of one worker on a model taught one parallel response by rote.

The worker's engine starts on the *taught* model, so it writes a real block:
its trajectories are checked against ``replay`` of their own text. Then the
pool's weights are replaced by the random tiny model's, and greedy outputs
must equal those of the session's ``llm``, an engine started on exactly those
weights. (Fast tests of the pieces come first and need neither Ray nor vLLM.)
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rollout.config import RolloutConfig
from rollout.ray_init import start_ray
from rollout.units import SEQ, THREAD, chat_prompt_ids
from rollout.weights import interleave, pack_bucket, split_named
from rollout.workers import assign_prompts
from tests.test_rollout_orchestrator import assert_units_equal_replay

TAUGHT_PROMPT = "Add 2+3+4."
TAUGHT_RESPONSE = ("<think>\n<Parallel>\n<Outlines>\n<Outline>1: two</Outline>\n<Outline>2: three</Outline>\n"
                   "<Outline>3: four</Outline>\n</Outlines>\n<Thread>\n1: 2</Thread>\n<Thread>\n2: 3</Thread>\n"
                   "<Thread>\n3: 4</Thread>\n</Parallel>\n9</think>\\boxed{9}")


def test_assign_prompts_round_robin():
    assert assign_prompts(5, 2) == [[0, 2, 4], [1, 3]]
    assert assign_prompts(1, 3) == [[0], [], []]
    with pytest.raises(ValueError):
        assign_prompts(3, 0)


def test_buckets_hold_every_tensor_once():
    from safetensors.torch import load

    emb = torch.randn(64, 32)
    state = {"a": emb, "tied": emb, "b": torch.randn(1000), "c": torch.arange(10)}
    buckets = [pack_bucket(chunk) for chunk in split_named(state.items(), bucket_bytes=64 * 32 * 4)]
    assert len(buckets) == 3  # a | tied | b + c
    loaded = {}
    for data in buckets:
        loaded.update(load(data))
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)


def test_bucket_cuts_and_rank_shares():
    named = [("a", torch.zeros(4)), ("b", torch.zeros(4)), ("big", torch.zeros(100)), ("c", torch.zeros(2))]
    cuts = [[n for n, _ in chunk] for chunk in split_named(named, bucket_bytes=32)]
    assert cuts == [["a", "b"], ["big"], ["c"]]  # 16 + 16 bytes fit; a tensor over the limit travels alone
    with pytest.raises(ValueError):
        list(split_named(named, bucket_bytes=0))
    # bucket i is published by rank i % world: ranks' shares back in bucket order
    assert interleave([[0, 2, 4], [1, 3]]) == [0, 1, 2, 3, 4]
    assert interleave([["only"]]) == ["only"] and interleave([[], []]) == []
    with pytest.raises(ValueError, match="interleave"):
        interleave([[0], [1, 3]])  # rank 1 cut more buckets than rank 0


def test_buckets_are_written_in_their_place_whatever_order_they_arrive(tmp_path, monkeypatch):
    import ray
    from safetensors.torch import load_file

    from rollout.weights import fetch_to_dir

    data = {f"ref{i}": pack_bucket([(f"w{i}", torch.full((3,), float(i)))]) for i in range(3)}
    arrived = []

    def wait(pending, num_returns):  # the last one asked for arrives first
        arrived.append(pending[-1])
        return [pending[-1]], pending[:-1]

    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "get", lambda ref: data[ref])
    d = fetch_to_dir(list(data), tmp_path / "w")
    assert arrived == ["ref2", "ref1", "ref0"]
    assert sorted(f.name for f in d.iterdir()) == [f"bucket-0000{i}.safetensors" for i in range(3)]
    assert all(torch.equal(load_file(d / f"bucket-0000{i}.safetensors")[f"w{i}"], torch.full((3,), float(i)))
               for i in range(3))
    with pytest.raises(FileExistsError):
        fetch_to_dir(list(data), d)  # every update gets a fresh directory
    with pytest.raises(ValueError, match="twice"):
        fetch_to_dir(["ref0", "ref0"], tmp_path / "again")


def test_a_packed_bucket_holds_private_copies():
    from safetensors.torch import load

    emb = torch.randn(8, 4)
    before = emb.clone()
    data = pack_bucket([("embed", emb), ("head", emb), ("view", emb.t())])  # shared storage, a strided view
    emb.add_(1.0)  # later changes of the sender's weights do not reach a packed bucket
    loaded = load(data)
    assert torch.equal(loaded["embed"], before) and torch.equal(loaded["head"], before)
    assert torch.equal(loaded["view"], before.t())
    with pytest.raises(TypeError):
        pack_bucket([("x", [1.0])])


# ------------------------------------------------------------------------------- Ray + vLLM


@pytest.fixture(scope="module")
def taught_dir(tiny_model_dir, tokenizer, tmp_path_factory):
    from rollout.rote import teach

    out = tmp_path_factory.mktemp("taught") / "model"
    examples = [(chat_prompt_ids(tokenizer, TAUGHT_PROMPT), TAUGHT_RESPONSE)]
    taught = teach(tiny_model_dir, out, examples, tokenizer)  # until every taught token is greedy by a margin
    assert taught.learned, f"the tiny model did not learn the response by rote: {taught}"
    return out


@pytest.fixture(scope="module")
def pool(taught_dir):
    import ray

    from rollout.workers import RolloutPool

    start_ray(None, num_cpus=2, include_dashboard=False)  # as the commands start it
    config = RolloutConfig(workers=1, cpus_per_worker=1, max_context=1024, max_tokens=200, max_thread_tokens=32,
                           temperature=0.0, weight_bucket_mb=0.5)
    try:
        pool = RolloutPool(taught_dir, config)
        yield pool
        pool.shutdown()
    finally:
        ray.shutdown()


@pytest.mark.integration
def test_pool_trajectories_equal_replay_of_their_text(pool, tokenizer):
    prompts = [chat_prompt_ids(tokenizer, TAUGHT_PROMPT), chat_prompt_ids(tokenizer, "Something else?")]
    ticks = []
    trajectories = pool.generate(prompts, n=2, progress=ticks.append)
    assert [(t.prompt_index, t.sample_index) for t in trajectories] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert ticks and ticks[-1] <= 4
    for t in trajectories[:2]:
        assert t.finish_reason == "eos", t.finish_detail
        assert t.text == TAUGHT_RESPONSE
        assert_units_equal_replay(t.units, prompts[0], t.text, tokenizer)
        assert [u.role for u in t.units] == [SEQ, THREAD, THREAD, THREAD, SEQ]
        assert (t.n_blocks, t.threads_per_block, t.closed_threads) == (1, [3], [])
        # by hand (every character and tag one token): head "<think>\n<Parallel>\n<Outlines>\n" 6 + outlines
        # 9 + 11 + 10 + "</Outlines>" 1 = 37; threads " N</Thread>" 3 each; tail "</Parallel>\n9</think>" 4 +
        # "\\boxed{9}" 9 + EOS 1 = 14.  L_total = 37 + 9 + 14 = 60, L_crit = 37 + 3 + 14 = 54, eta = 0.1
        assert (t.L_total, t.L_crit) == (60, 54) and t.eta == pytest.approx(0.1)
        assert all(lp > -0.5 for u in t.units for lp in u.completion_logprobs)
    (seq,) = pool.generate(prompts[:1], n=1, sequential=True)
    assert seq.finish_reason == "eos" and seq.text == TAUGHT_RESPONSE
    assert [u.role for u in seq.units] == [SEQ] and seq.eta == 0.0
    # decoded as one sequence the model also writes the 3 seeds (5 tokens each) and the join newline: 60 + 16
    assert seq.L_total == seq.L_crit == 76


@pytest.mark.integration
def test_weight_updates_equal_fresh_engines(pool, llm, tiny_model_dir, taught_dir, tokenizer):
    """Taught -> random -> taught again, each time compared with an engine started on those weights.

    ``llm`` was started on the random tiny model; the pool's own engine was
    started on the taught one (its greedy output is the taught response, as
    the test above checks).
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rollout.engine import VLLMEngine
    from rollout.orchestrator import generate
    from rollout.weights import publish_state_dict

    prompts = [chat_prompt_ids(tokenizer, TAUGHT_PROMPT), chat_prompt_ids(tokenizer, "Something else?")]
    config = RolloutConfig(max_context=1024, max_tokens=40, temperature=0.0, sequential=True)
    fresh = generate(VLLMEngine(llm), tokenizer, prompts, config)

    # 1. the random model as saved on disk: the tied output head is not in the file
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    assert "lm_head.weight" not in state
    update = pool.update_weights(publish_state_dict(state, 2**19))
    assert update.n_buckets > 1 and update.seconds >= update.load_s > 0
    updated = pool.generate(prompts, config=config)
    assert [t.units[0].completion_ids for t in updated] == [t.units[0].completion_ids for t in fresh]
    assert updated[0].text != TAUGHT_RESPONSE[:40]

    # 2. the taught model as a learner holds it: every name, the tied head included
    state = AutoModelForCausalLM.from_pretrained(str(taught_dir), dtype=torch.float32).state_dict()
    assert "lm_head.weight" in state
    pool.update_weights(publish_state_dict(state, 2**19))
    (back,) = pool.generate(prompts[:1], n=1, sequential=True, config=replace(config, max_tokens=200))
    assert back.text == TAUGHT_RESPONSE
