"""rollout.tiny: the byte tokenizer, the tiny model directory, add_tags, and vLLM on it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config
from transformers import Qwen3ForCausalLM

from cluster.cli import main as cli_main
from rollout.format import ALL_TAGS
from rollout.tiny import IM_END, IM_START, PAD, add_tags, build_tokenizer, init_model, load_tokenizer

TOK = build_tokenizer()
ADDED = (PAD, IM_START, IM_END) + ALL_TAGS


def ids(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


# --------------------------------------------------------------------------- tokenizer


def test_tags_and_special_tokens_are_single_distinct_tokens():
    tag_ids = [ids(t) for t in ADDED]
    assert all(len(i) == 1 for i in tag_ids)
    assert len({i[0] for i in tag_ids}) == len(ADDED)
    assert min(i[0] for i in tag_ids) >= 256  # after the 256 byte tokens
    assert TOK.eos_token == IM_END and TOK.pad_token == PAD
    assert TOK.eos_token_id == ids(IM_END)[0] and TOK.pad_token_id == ids(PAD)[0]
    assert TOK.bos_token is None
    assert len(TOK) == 256 + len(ADDED)


def test_tags_survive_decoding_without_special_tokens():
    text = "<think>\nx<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>\n1: b</Thread>\n</Parallel>\n</think>"
    assert TOK.decode(ids(IM_START + text + IM_END), skip_special_tokens=True) == text
    assert TOK.decode(ids(IM_START + text + IM_END)) == IM_START + text + IM_END


def test_tags_inside_text_are_matched_without_spaces():
    assert ids("a</Thread><Thread>b") == ids("a") + ids("</Thread>") + ids("<Thread>") + ids("b")
    assert len(ids("<Threa")) == len("<Threa")  # a partial tag is plain bytes


def test_every_digit_and_byte_is_one_token():
    assert [ids(d) for d in "0123456789"] == [[ord(d)] for d in "0123456789"]
    assert ids("12345") == [ord(c) for c in "12345"]
    assert ids("é") == list("é".encode())  # two UTF-8 bytes, two tokens


#: the properties below check what the tokenizer returns, never how fast: hypothesis's default deadline (200 ms
#: an example) only makes them fail on a loaded machine (once at load 5-7), so it is off
NO_DEADLINE = settings(deadline=None)


@NO_DEADLINE
@given(st.integers(min_value=-10**30, max_value=10**30))
def test_numbers_are_one_token_per_character(n):
    assert len(ids(str(n))) == len(str(n))


_text_with_tags = st.lists(st.one_of(st.text(max_size=20), st.sampled_from(ADDED)), max_size=8).map("".join)


@settings(NO_DEADLINE, max_examples=300)
@given(st.one_of(st.text(), _text_with_tags))
def test_decode_encode_round_trip(text):
    assert TOK.decode(ids(text)) == text


@settings(NO_DEADLINE, max_examples=300)
@given(st.text(), st.text())
def test_encoding_is_concatenative_without_tags(a, b):
    assume(not any(t in a + b for t in ADDED))
    assert ids(a) + ids(b) == ids(a + b)


def test_chat_template_is_qwen_style():
    p = "What is 2+3?"
    prompt = TOK.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
    assert prompt == f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
    convo = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}]
    assert TOK.apply_chat_template(convo, tokenize=False) == \
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"


# --------------------------------------------------------------------------- model directory


def test_auto_classes_load_the_directory(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert isinstance(model, Qwen3ForCausalLM)
    assert model.dtype == torch.float32
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tokenizer)
    assert model.config.head_dim == 32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == ids(IM_END)[0]
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == ids(PAD)[0]
    assert tokenizer.encode("<Thread>7", add_special_tokens=False) == ids("<Thread>7")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True,
                                         tokenize=False) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.3e6 < n_params < 2e6
    with torch.no_grad():
        logits = model(torch.tensor([ids("<think>12+3")])).logits
    assert logits.shape == (1, 5, model.config.vocab_size) and torch.isfinite(logits).all()


def test_init_model_is_deterministic_per_seed(tmp_path, tiny_model_dir):
    def weights(path):
        return AutoModelForCausalLM.from_pretrained(path).state_dict()

    again = weights(init_model(tmp_path / "a", seed=0))
    other = weights(init_model(tmp_path / "b", seed=1))
    first = weights(tiny_model_dir)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_init_model_sizes_and_bad_sizes(tmp_path):
    path = init_model(tmp_path / "m", hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=96)
    config = AutoModelForCausalLM.from_pretrained(path).config
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (64, 1, 32)
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        init_model(tmp_path / "x", hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="positive integers, got num_layers=0"):
        init_model(tmp_path / "x", num_layers=0)


def test_init_model_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        init_model(tmp_path)
    init_model(tmp_path, force=True)
    assert (tmp_path / "keep.txt").exists() and (tmp_path / "config.json").exists()


def test_load_tokenizer_rejects_a_tokenizer_without_tags(tmp_path):
    _other_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="splits the tags <Parallel>"):
        load_tokenizer(tmp_path)


def test_cli_init_model(tmp_path, capsys):
    out = tmp_path / "model"
    assert cli_main(["init-model", str(out), "--seed", "3", "--num-layers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "config.json" in printed and "model.safetensors" in printed
    n_params = int(printed.split("parameters:")[1].replace(",", "").strip())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    assert n_params == sum(p.numel() for p in model.parameters())  # tied head counted once

    assert cli_main(["init-model", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli_main(["init-model", str(out), "--force"]) == 0
    assert "note:" not in capsys.readouterr().err
    assert cli_main(["init-model", str(tmp_path / "h16"), "--hidden-size", "64", "--num-heads", "4"]) == 0
    assert "head size 16 is not one vLLM's CPU backend supports" in capsys.readouterr().err


# --------------------------------------------------------------------------- add_tags


def _other_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with merges, trained here, that knows none of the tags."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    corpus = ["Parallel threads think in outlines. The thread outlines are parallel."] * 20
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", clean_up_tokenization_spaces=False)


def _random_model(vocab_size: int, tied: bool) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, intermediate_size=128, tie_word_embeddings=tied)
    return Qwen3ForCausalLM(config)


@pytest.mark.parametrize("tied", [False, True])
def test_add_tags_to_another_model(tied):
    tokenizer = _other_tokenizer()
    n_before = len(tokenizer)
    assert n_before % 64 != 0
    model = _random_model(n_before, tied)
    pieces = {t: tokenizer.encode(t, add_special_tokens=False) for t in ALL_TAGS}
    assert all(len(p) > 1 for p in pieces.values())
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()

    tag_ids = add_tags(model, tokenizer)

    assert tag_ids == list(range(n_before, n_before + len(ALL_TAGS)))
    assert [tokenizer.encode(t, add_special_tokens=False) for t in ALL_TAGS] == [[i] for i in tag_ids]
    text = "<think>x<Parallel><Thread>1: y</Thread></Parallel></think>"
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.shape[0] == 64 * math.ceil(len(tokenizer) / 64) == model.config.vocab_size
    assert torch.equal(new_in[:n_before], old_in)
    assert torch.equal(new_out[:n_before], old_out)
    for tag, tag_id in zip(ALL_TAGS, tag_ids):
        torch.testing.assert_close(new_in[tag_id], old_in[pieces[tag]].mean(0))
        torch.testing.assert_close(new_out[tag_id], old_out[pieces[tag]].mean(0))
    assert (new_out.data_ptr() == new_in.data_ptr()) == tied
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode(text)])).logits
    assert logits.shape[-1] == new_in.shape[0]

    assert add_tags(model, tokenizer) == tag_ids  # idempotent
    assert model.get_input_embeddings().weight.shape[0] == new_in.shape[0]


def test_add_tags_uses_spare_rows_without_resizing():
    tokenizer = _other_tokenizer()
    model = _random_model(512, tied=False)
    tag_ids = add_tags(model, tokenizer)
    assert max(tag_ids) < 512 and model.get_input_embeddings().weight.shape[0] == 512


def test_add_tags_keeps_tags_that_are_already_tokens():
    tokenizer = _other_tokenizer()
    model = _random_model(len(tokenizer), tied=True)
    tokenizer.add_tokens(["<think>"])
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    think_id = len(tokenizer) - 1
    before = model.get_input_embeddings().weight[think_id].detach().clone()
    tag_ids = add_tags(model, tokenizer)
    assert tag_ids[ALL_TAGS.index("<think>")] == think_id
    assert torch.equal(model.get_input_embeddings().weight[think_id], before)


# --------------------------------------------------------------------------- vLLM


@pytest.mark.integration
def test_tiny_model_generates_in_vllm(llm, tiny_model_dir, tokenizer):
    from vllm import SamplingParams

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "3*45+6"}], add_generation_prompt=True,
                                           tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    params = SamplingParams(max_tokens=12, temperature=1.0, logprobs=0, seed=0)
    (out,) = llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)
    completion = out.outputs[0]
    token_ids = list(completion.token_ids)
    assert 0 < len(token_ids) <= 12 and len(completion.logprobs) == len(token_ids)
    sampled = [step[t].logprob for step, t in zip(completion.logprobs, token_ids)]

    # vLLM runs the saved weights: its log-probabilities match transformers' on the same tokens.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + token_ids])).logits[0, len(prompt_ids) - 1:-1]
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(sampled), expected, atol=1e-3, rtol=1e-3)
