"""The memory planner (``rl.memory_plan``) and ``threadweaver plan``: counts checked against real models and
saved tensors, the knobs moving the lines they should, the GPU recipes fitting, a config that does not fit
refused with its knob named (by the command and by the training commands' input check)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.cli import main
from rl.learner_config import LearnerConfig
from rl.memory_plan import (GIB, KNOWN_SHAPES, ModelShape, PlanConfig, check_plan, layer_activation_bytes,
                            learner_items, make_plan, model_shape)
from rollout.config import RolloutConfig

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["sft_qwen3_8b_gpu", "sft_qwen3_1p7b_gpu", "rl_qwen3_8b_gpu", "rl_qwen3_1p7b_gpu"]


def qwen3(tied: bool, **kw):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sizes = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, intermediate_size=96)
    sizes.update(kw)
    config = Qwen3Config(tie_word_embeddings=tied, **sizes)
    config._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(config)


@pytest.mark.parametrize("tied", [True, False])
def test_the_parameter_count_is_the_models(tied):
    model = qwen3(tied)
    shape = ModelShape.from_config(model.config.to_dict())
    assert shape.parameters == sum(p.numel() for p in model.parameters())


def test_the_known_shapes_have_their_published_sizes():
    billions = {name: round(s.parameters / 1e9, 2) for name, s in KNOWN_SHAPES.items()}
    assert billions == {"qwen3-0.6b": 0.6, "qwen3-1.7b": 1.72, "qwen3-4b": 4.02, "qwen3-8b": 8.19}


@pytest.mark.parametrize("sizes", [{}, {"hidden_size": 128}, {"intermediate_size": 256},
                                   {"num_attention_heads": 8}, {"num_key_value_heads": 4}])
def test_one_layer_keeps_what_the_plan_counts(sizes):
    """Bytes autograd saves for one fp32 decoder layer (two models, 1 and 2 layers) against the count, within 5%."""
    tokens = 256

    def saved(layers: int) -> int:
        model = qwen3(True, num_hidden_layers=layers, **sizes).train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids, pos = torch.randint(0, 300, (1, tokens)), torch.arange(tokens)[None]
        mask = torch.ones(tokens, tokens, dtype=torch.bool).tril()[None, None]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.get_decoder()(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
        return sum(seen.values())

    measured = saved(2) - saved(1)
    shape = ModelShape.from_config(qwen3(True, **sizes).config.to_dict())
    assert layer_activation_bytes(shape, tokens, 4, "sdpa") == pytest.approx(measured, rel=0.05)


def _lines(**learner) -> dict[str, float]:
    items = learner_items(KNOWN_SHAPES["qwen3-8b"], LearnerConfig(**learner))
    return {i.what.split(" (")[0].split(",")[0]: (0.0 if i.host else i.bytes) for i in items}


def test_the_knobs_move_their_lines():
    base = dict(ranks=8, dtype="bf16", row_tokens=8192, attention="flex")
    z0, z1, z2, z3 = (_lines(zero_stage=s, **base) for s in range(4))
    assert z0["parameters"] == z1["parameters"] == z2["parameters"] > z3["parameters"]
    assert z0["gradients"] > z2["gradients"] and z0["optimizer states"] > 7 * z1["optimizer states"]
    assert _lines(zero_stage=2, offload_optimizer=True, **base)["optimizer states"] == 0.0  # in host memory
    plain, ckpt = _lines(**base), _lines(gradient_checkpointing=True, **base)
    assert ckpt["activations"] < plain["activations"] / 5
    assert _lines(logprob_chunk_tokens=0, **base)["log-probs"] > 5 * _lines(**base)["log-probs"]
    p = KNOWN_SHAPES["qwen3-8b"].parameters  # fp32 at stage 0: weights 4P, gradients 4P, AdamW 8P
    fp32 = _lines(ranks=1, row_tokens=8192)
    assert (fp32["parameters"], fp32["gradients"], fp32["optimizer states"]) == (4 * p, 4 * p, 8 * p)


def test_a_shared_gpu_adds_the_engines_share_and_a_too_small_share_is_named():
    shape = KNOWN_SHAPES["qwen3-1.7b"]
    learner = LearnerConfig(gpus_per_rank=0.5, dtype="bf16", row_tokens=4096, gradient_checkpointing=True)
    rollout = RolloutConfig(gpus_per_worker=0.5, dtype="bfloat16", gpu_memory_utilization=0.3, max_context=8192)
    plan = make_plan(shape, learner, PlanConfig(device_memory_gib=80), rollout)
    learner_alone = make_plan(shape, learner, PlanConfig(device_memory_gib=80))
    assert list(plan.shares) == ["shared device"]
    assert plan.device_total(plan.shares["shared device"]) == pytest.approx(
        learner_alone.device_total(["learner rank"]) + 0.3 * 80 * GIB)
    small = RolloutConfig(gpus_per_worker=0.5, dtype="bfloat16", gpu_memory_utilization=0.05, max_context=8192)
    problems = make_plan(shape, learner, PlanConfig(device_memory_gib=80), small).problems()
    assert len(problems) == 1 and "rollout.gpu_memory_utilization" in problems[0]
    with pytest.raises(ValueError, match="rollout.gpu_memory_utilization"):
        check_plan(make_plan(shape, learner, PlanConfig(device_memory_gib=80), small))


def test_the_shape_comes_from_config_json_else_the_named_architecture(tmp_path):
    qwen3(False).config.save_pretrained(tmp_path)
    assert model_shape(tmp_path, "qwen3-8b").vocab == 300  # the folder wins
    assert model_shape(tmp_path / "missing", "qwen3-8b") == KNOWN_SHAPES["qwen3-8b"]
    with pytest.raises(ValueError, match="plan.architecture"):
        model_shape(tmp_path / "missing", None)
    with pytest.raises(ValueError, match="qwen3-0.6b"):
        PlanConfig(architecture="qwen3-9b")


# --------------------------------------------------------------------------- the command


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_gpu_recipe_fits_with_ten_percent_headroom(recipe, capsys):
    assert main(["plan", str(ROOT / "experiments" / f"{recipe}.yaml")]) == 0
    out = capsys.readouterr().out
    totals = [line for line in out.splitlines() if line.startswith("total per")]
    assert totals and all("of 80 GiB" in t for t in totals)
    for line in totals:
        used = float(line.split("(")[1].split("%")[0])
        assert used <= 90.0, line


def test_the_8b_recipe_without_checkpointing_on_long_rows_is_refused_naming_the_knob(capsys):
    code = main(["plan", str(ROOT / "experiments" / "rl_qwen3_8b_gpu.yaml"), "learner.gradient_checkpointing=false",
                 "learner.row_tokens=131072"])
    err = capsys.readouterr().err
    assert code == 1 and "learner device" in err and "turn learner.gradient_checkpointing" in err


def test_plan_takes_the_device_memory_from_the_command_line(capsys):
    recipe = str(ROOT / "experiments" / "sft_qwen3_8b_gpu.yaml")
    assert main(["plan", recipe, "--device-memory-gib", "24"]) == 1
    assert "of 24 GiB" in capsys.readouterr().out


def test_plan_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    assert main(["plan", "--stage", "rl", "model=" + str(tmp_path), "rollout.n=2"]) == 2  # no config.json
    assert main(["plan", str(ROOT / "experiments" / "sft_tiny.yaml"), "learner.zero_stag=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("threadweaver plan: ") for line in err)
    assert "plan.architecture" in err[1] and "zero_stage" in err[2]


def test_sft_refuses_a_plan_that_does_not_fit_before_starting(tmp_path):
    from rl.sft import SFTConfig, check_inputs

    cfg = SFTConfig(run_dir=str(tmp_path / "run"), plan=PlanConfig(device_memory_gib=0.01),
                    learner=LearnerConfig(row_tokens=4096, logprob_chunk_tokens=0))
    with pytest.raises(ValueError, match="learner device: .* turn learner"):
        check_inputs(cfg)
    check_inputs(SFTConfig(run_dir=str(tmp_path / "run2")))  # no device memory given: no check
