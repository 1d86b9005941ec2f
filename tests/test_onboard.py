"""``threadweaver prepare-model`` on a model that is not the tiny one, and EOS sets through the orchestrator on vLLM.

The model under test (:func:`write_bpe_model`) is what a real checkpoint looks
like to this code: a randomly initialised Qwen3-architecture model with an
ordinary byte-level BPE tokenizer trained here by the ``tokenizers`` library on
the synthetic task's text (merges, so the tags split into several tokens), a
Qwen-style chat template, an untied output head whose table is not a multiple
of 64 rows, and two EOS ids: the tokenizer's ``<|im_end|>`` and, in
``generation_config.json`` only, ``<|endoftext|>`` (as Qwen3 ships them).
Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast
from transformers import Qwen3Config, Qwen3ForCausalLM

from cluster.cli import main as cli_main
from rollout.config import RolloutConfig
from rollout.format import ALL_TAGS
from rollout.onboard import (
    RECORD_FILE, SAMPLE_RESPONSE, ModelNotFound, PrepareModelConfig, eos_token_ids, prepare_model, resolve_model,
    tag_problems,
)
from rollout.task import TaskConfig, make_dataset
from rollout.tiny import CHAT_TEMPLATE, IM_END, IM_START, PAD, load_tokenizer
from rollout.units import encode
from tests.test_orchestrator_eos import true_finish_reasons

REPO = Path(__file__).resolve().parents[1]


def train_bpe_tokenizer(vocab_size: int = 700) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 pre-tokenizer regex, merges) trained on the synthetic task's prompts and responses."""
    records = make_dataset(TaskConfig(), {"train": 150}, seed=1)["train"]
    corpus = [r[k] for r in records for k in ("prompt", "response_parallel", "response_sequential")]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[PAD, IM_START, IM_END], show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=IM_END, pad_token=PAD,
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_bpe_model(out: Path, *, tied: bool = False, chat_template: bool = True, seed: int = 0) -> Path:
    """The model described in the module docstring, written to ``out`` in Hugging Face format."""
    tokenizer = train_bpe_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    im_end, endoftext = tokenizer.convert_tokens_to_ids([IM_END, PAD])
    config = Qwen3Config(vocab_size=len(tokenizer) + 3, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, intermediate_size=128, max_position_embeddings=2048,
                         tie_word_embeddings=tied, bos_token_id=None, eos_token_id=im_end, pad_token_id=endoftext)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=[im_end, endoftext], pad_token_id=endoftext)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory) -> Path:
    return write_bpe_model(tmp_path_factory.mktemp("bpe") / "model")


@pytest.fixture(scope="module")
def prepared(bpe_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "model"
    prepare_model(PrepareModelConfig(src=str(bpe_model), out=str(out)))
    return out


# --------------------------------------------------------------------------- the model under test


def test_the_bpe_model_is_not_ready_before_preparation(bpe_model):
    tokenizer = AutoTokenizer.from_pretrained(bpe_model)
    assert all(len(tokenizer.encode(t, add_special_tokens=False)) > 1 for t in ALL_TAGS)
    assert any(len(tokenizer.encode(w, add_special_tokens=False)) == 1 for w in ("Thread", "Outline", "think"))
    with pytest.raises(ValueError, match="prepare-model"):
        load_tokenizer(bpe_model)
    assert eos_token_ids(bpe_model, tokenizer) == tokenizer.convert_tokens_to_ids([IM_END, PAD])
    assert json.loads((bpe_model / "config.json").read_text())["vocab_size"] % 64 != 0


# --------------------------------------------------------------------------- prepare_model


@pytest.mark.parametrize("tied", [False, True])
def test_prepare_model_adds_tags_with_mean_rows(tmp_path, tied):
    src = write_bpe_model(tmp_path / "src", tied=tied)
    before = AutoModelForCausalLM.from_pretrained(src)
    old_in = before.get_input_embeddings().weight.detach().clone()
    old_out = before.get_output_embeddings().weight.detach().clone()
    n_tokens = len(AutoTokenizer.from_pretrained(src))

    record = prepare_model(PrepareModelConfig(src=str(src), out=str(tmp_path / "out")))

    out = tmp_path / "out"
    tokenizer = load_tokenizer(out)  # raises if any tag is split
    assert record.added_tags == list(ALL_TAGS)
    assert list(record.tag_ids.values()) == list(range(n_tokens, n_tokens + len(ALL_TAGS)))
    assert [tokenizer.encode(t, add_special_tokens=False) for t in ALL_TAGS] == [[i] for i in record.tag_ids.values()]
    assert tag_problems(tokenizer) == []
    assert tokenizer.decode(tokenizer.encode(SAMPLE_RESPONSE), skip_special_tokens=True) == SAMPLE_RESPONSE

    model = AutoModelForCausalLM.from_pretrained(out)
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    rows = new_in.shape[0]
    assert rows == 64 * -(-len(tokenizer) // 64) == model.config.vocab_size == record.vocab_rows_after
    assert record.vocab_rows_before == old_in.shape[0] and record.tied_head == tied
    assert (new_in.data_ptr() == new_out.data_ptr()) == tied
    torch.testing.assert_close(new_in[:n_tokens], old_in[:n_tokens], rtol=0, atol=0)  # the tags take the 3 spare
    torch.testing.assert_close(new_out[:n_tokens], old_out[:n_tokens], rtol=0, atol=0)  # rows, then new ones
    mean_in, mean_out = old_in[:n_tokens].mean(0), old_out[:n_tokens].mean(0)
    for r in [*record.tag_ids.values(), *range(old_in.shape[0], rows)]:  # the tags and every padding row
        torch.testing.assert_close(new_in[r], mean_in)
        torch.testing.assert_close(new_out[r], mean_out)

    im_end, endoftext = tokenizer.convert_tokens_to_ids([IM_END, PAD])
    assert record.eos_token_ids == [im_end, endoftext]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [im_end, endoftext]
    assert eos_token_ids(out, tokenizer) == [im_end, endoftext]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert json.loads((out / RECORD_FILE).read_text())["tag_ids"] == record.tag_ids
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_prepare_model_pieces_init_and_a_tag_already_held(tmp_path):
    src = write_bpe_model(tmp_path / "src")
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.add_tokens(["<think>", "</think>"])  # as Qwen3 holds them: added tokens with trained rows
    tokenizer.save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    think = tokenizer.convert_tokens_to_ids("<think>")
    assert think < model.get_input_embeddings().weight.shape[0]  # the spare rows hold it
    held_row = model.get_input_embeddings().weight[think].detach().clone()
    pieces = {t: tokenizer.encode(t, add_special_tokens=False) for t in ALL_TAGS}

    record = prepare_model(PrepareModelConfig(src=str(src), out=str(tmp_path / "out"), init="pieces"))

    assert record.added_tags == [t for t in ALL_TAGS if t not in ("<think>", "</think>")]
    assert record.tag_ids["<think>"] == think
    new = AutoModelForCausalLM.from_pretrained(tmp_path / "out").get_input_embeddings().weight
    torch.testing.assert_close(new[think], held_row, rtol=0, atol=0)
    old = model.get_input_embeddings().weight
    for tag in record.added_tags:
        torch.testing.assert_close(new[record.tag_ids[tag]], old[pieces[tag]].mean(0))


def test_a_chat_template_file_replaces_a_missing_one(tmp_path):
    src = write_bpe_model(tmp_path / "src", chat_template=False)
    with pytest.raises(ValueError, match="has no chat template; give one with chat_template=FILE.jinja"):
        prepare_model(PrepareModelConfig(src=str(src), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    prepare_model(PrepareModelConfig(src=str(src), out=str(tmp_path / "out"), chat_template=str(template)))
    assert load_tokenizer(tmp_path / "out").chat_template == CHAT_TEMPLATE


def test_a_tokenizer_that_cannot_hold_the_tags_is_refused_with_the_reason(tmp_path):
    """A word-level tokenizer (whitespace pre-tokenizer, unknown token) loses the newlines around the tags."""
    src = write_bpe_model(tmp_path / "src")
    words = sorted({w for w in SAMPLE_RESPONSE.split()} | {"What", "is", "1", "+", "2?"})
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate([PAD, IM_START, IM_END, "[UNK]", *words])},
                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    word_level = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=IM_END, pad_token=PAD,
                                         unk_token="[UNK]")
    word_level.chat_template = CHAT_TEMPLATE
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    word_level.save_pretrained(src)
    with pytest.raises(ValueError, match="cannot hold the control tags: a response does not decode back"):
        prepare_model(PrepareModelConfig(src=str(src), out=str(tmp_path / "out")))


def test_hub_names_resolve_from_the_local_cache_only(tmp_path, bpe_model):
    cache = tmp_path / "hub"
    with pytest.raises(ModelNotFound, match=f"looked in {cache / 'models--Qwen--Qwen3-8B'}"):
        resolve_model("Qwen/Qwen3-8B", cache_dir=cache)
    with pytest.raises(ModelNotFound, match="model folder /no/such/folder does not exist"):
        resolve_model("/no/such/folder")
    snapshot = cache / "models--someone--bpe" / "snapshots" / ("a" * 40)
    snapshot.parent.mkdir(parents=True)
    (cache / "models--someone--bpe" / "refs").mkdir()
    (cache / "models--someone--bpe" / "refs" / "main").write_text("a" * 40)
    snapshot.mkdir()
    for f in bpe_model.iterdir():
        (snapshot / f.name).symlink_to(f)
    assert resolve_model("someone/bpe", cache_dir=cache) == snapshot
    assert resolve_model("someone/bpe", revision="a" * 40, cache_dir=cache) == snapshot
    with pytest.raises(ModelNotFound, match="revision 'v2'"):
        resolve_model("someone/bpe", revision="v2", cache_dir=cache)
    with pytest.raises(ValueError, match="holds no config.json"):
        resolve_model(str(tmp_path))


def test_eos_token_ids_reads_generation_config_then_config(tmp_path, bpe_model):
    tokenizer = AutoTokenizer.from_pretrained(bpe_model)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert eos_token_ids(folder, tokenizer) == [tokenizer.eos_token_id, 5]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, tokenizer.eos_token_id, 7]}))
    assert eos_token_ids(folder, tokenizer) == [tokenizer.eos_token_id, 7]  # config.json not read, duplicates out
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ["x"]}))
    with pytest.raises(ValueError, match="must be integers"):
        eos_token_ids(folder, tokenizer)


# --------------------------------------------------------------------------- the command


def test_prepare_model_command(tmp_path, bpe_model, capsys):
    out = tmp_path / "out"
    assert cli_main(["prepare-model", str(bpe_model), str(out), "init=pieces"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "EOS ids (generation_config.json): [" in printed
    assert json.loads((out / RECORD_FILE).read_text())["init"] == "pieces"
    assert cli_main(["prepare-model", "--show-config"]) == 0
    assert "chat_template" in capsys.readouterr().out
    assert cli_main(["prepare-model", f"src={bpe_model}", "out=x", "--print-config"]) == 0
    assert f"src: {bpe_model}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["/no/such/model", "OUT"], "model folder /no/such/model does not exist"),
    (["no-such-org/no-such-model", "OUT"], "is not in the local Hugging Face cache (looked in"),
    (["BPE", "OUT"], "has no chat template; give one with chat_template=FILE.jinja"),
    (["BPE", "NONEMPTY"], "exists and is not an empty folder"),
    (["BPE", "OUT", "init=zeros"], "init"),
    (["BPE", "OUT", "bogus=1"], "bogus"),
    (["BPE", "OUT", "src=x"], "src given twice"),
    (["BPE", "OUT", "extra"], "3 positional arguments"),
    (["BPE", "OUT", "chat_template=/no/such.jinja"], "chat_template file /no/such.jinja does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, argv, message, capsys):
    src = write_bpe_model(tmp_path / "bpe", chat_template=False) if "BPE" in argv else None
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    names = {"BPE": str(src), "OUT": str(tmp_path / "out"), "NONEMPTY": str(tmp_path / "full")}
    argv = [names.get(a, a) for a in argv]
    capsys.readouterr()  # writing the model prints progress bars
    assert cli_main(["prepare-model", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_hub_name_is_found_under_hf_home(tmp_path, bpe_model):
    """The command in a fresh process with HF_HOME set, offline: Qwen/Qwen3-8B resolves from HF_HOME/hub."""
    snapshot = tmp_path / "hf" / "hub" / "models--Qwen--Qwen3-8B" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("b" * 40)
    for f in bpe_model.iterdir():
        (snapshot / f.name).symlink_to(f)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "cluster.cli", "prepare-model", "Qwen/Qwen3-8B",
                          str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"from {snapshot}" in run.stdout
    assert load_tokenizer(tmp_path / "out")
    env["HF_HOME"] = str(tmp_path / "empty")
    run = subprocess.run([sys.executable, "-m", "cluster.cli", "prepare-model", "Qwen/Qwen3-8B",
                          str(tmp_path / "out2")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"looked in {tmp_path / 'empty' / 'hub' / 'models--Qwen--Qwen3-8B'}" in run.stderr


def test_add_tags_keeps_the_row_of_a_tag_that_was_one_vocabulary_token():
    """A word-level vocabulary that holds "<think>" as an ordinary token: the tag is made an added token with
    the same id and its trained row is kept, while init="mean" fills the other tags' new rows."""
    from rollout.tiny import add_tags

    vocab = {w: i for i, w in enumerate([PAD, IM_END, "[UNK]", "<think>", "a", "b"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=IM_END, pad_token=PAD,
                                        unk_token="[UNK]")
    assert tokenizer.encode("<think>", add_special_tokens=False) == [3] and "<think>" not in tokenizer.get_added_vocab()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=6, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=32, intermediate_size=64,
                                         tie_word_embeddings=True))
    old = model.get_input_embeddings().weight.detach().clone()
    ids = add_tags(model, tokenizer, init="mean")
    new = model.get_input_embeddings().weight
    assert ids[ALL_TAGS.index("<think>")] == 3 and "<think>" in tokenizer.get_added_vocab()
    torch.testing.assert_close(new[:6], old, rtol=0, atol=0)
    assert sorted(set(ids) - {3}) == list(range(6, 6 + len(ALL_TAGS) - 1)) and new.shape[0] == 64
    for row in range(6, 64):
        torch.testing.assert_close(new[row], old.mean(0))
    with pytest.raises(ValueError, match="init must be"):
        add_tags(model, tokenizer, init="zeros")


# --------------------------------------------------------------------------- vLLM on the prepared model


@pytest.fixture(scope="module")
def prepared_llm(prepared):
    from rollout.engine import make_llm, shutdown_llm

    llm = make_llm(prepared, max_model_len=512, seed=0, dtype="float32", enforce_eager=True)
    try:
        yield llm
    finally:
        shutdown_llm(llm)


def forced_engine(llm, choose):
    """A ``VLLMEngine`` whose every request may sample only the token ``choose(request)`` returns
    (vLLM's ``allowed_token_ids``): the random weights then write what the test needs, through the real engine."""
    from rollout.engine import VLLMEngine

    class Forced(VLLMEngine):
        def _params(self, r):
            self.sampling_overrides = {"allowed_token_ids": [choose(r)]}
            return super()._params(r)

    return Forced(llm)


@pytest.mark.integration
def test_the_prepared_model_decodes_spawn_join_on_vllm_with_single_token_tags(prepared, prepared_llm):
    from rollout.orchestrator import generate
    from rollout.format import JOIN_SUFFIX, thread_seed
    from rollout.units import chat_prompt_ids

    tokenizer = load_tokenizer(prepared)
    vllm_tokenizer = prepared_llm.get_tokenizer()
    tag_ids = json.loads((prepared / RECORD_FILE).read_text())["tag_ids"]
    assert {t: vllm_tokenizer.encode(t, add_special_tokens=False) for t in ALL_TAGS} == \
        {t: [i] for t, i in tag_ids.items()}
    eos = eos_token_ids(prepared, tokenizer)
    outlines_close, thread_close = tag_ids["</Outlines>"], tag_ids["</Thread>"]
    head = "<think>\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n"
    prompt = chat_prompt_ids(tokenizer, "Compute 7*486 + 3*961.") + encode(tokenizer, head)

    def choose(r):  # the head's close, then each thread closes at once, then the second EOS
        if thread_close in r.stop_token_ids:
            return thread_close
        return eos[1] if thread_close in r.prompt_ids else outlines_close

    cfg = RolloutConfig(max_tokens=64, max_context=512, seed=0)
    (t,) = generate(forced_engine(prepared_llm, choose), tokenizer, [prompt], cfg, eos_token_id=eos)
    assert (t.finish_reason, t.finish_detail) == ("eos", "")
    assert t.text == "</Outlines>\n<Thread>\n1:</Thread>\n<Thread>\n2:</Thread>\n"
    assert t.sequence_ids[-1] == eos[1] and (t.n_blocks, t.threads_per_block) == (1, [2])
    assert [len(u.completion_ids) for u in t.units] == [1, 1, 1, 1]
    # DESIGN section 3 on token ids: each thread's prompt is the context plus its seed (tokenized alone); the join
    # context is every seed and thread output in order, then the join newline
    seed1, seed2 = encode(tokenizer, thread_seed(1)), encode(tokenizer, thread_seed(2))
    base = prompt + [outlines_close]
    assert [(list(u.context_ids), u.completion_ids) for u in t.units] == [
        (prompt, [outlines_close]), (base + seed1, [thread_close]), (base + seed2, [thread_close]),
        (base + seed1 + [thread_close] + seed2 + [thread_close] + encode(tokenizer, JOIN_SUFFIX), [eos[1]])]

    # vLLM runs the prepared weights: the log-probability of the first tag it wrote (a new, mean-initialised
    # output row) matches transformers' on the same context
    model = AutoModelForCausalLM.from_pretrained(prepared)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    expected_lp = torch.log_softmax(logits, -1)[outlines_close].item()
    assert t.units[0].completion_logprobs[0] == pytest.approx(expected_lp, abs=1e-3)


@pytest.mark.integration
def test_vllm_stops_on_the_generation_config_eos_and_the_orchestrator_names_it(prepared, prepared_llm):
    from rollout.orchestrator import generate
    from rollout.units import chat_prompt_ids

    tokenizer = load_tokenizer(prepared)
    eos = eos_token_ids(prepared, tokenizer)
    assert len(eos) == 2 and eos[0] == tokenizer.eos_token_id
    engine = forced_engine(prepared_llm, lambda r: eos[1])  # the model can only write the second EOS
    prompt = chat_prompt_ids(tokenizer, "Compute 7*486 + 3*961.")
    cfg = RolloutConfig(max_tokens=16, max_context=512, seed=0)

    (t,) = generate(engine, tokenizer, [prompt], cfg, eos_token_id=eos)
    assert (t.finish_reason, t.text, t.sequence_ids[-1]) == ("eos", "", eos[1])
    # told only the tokenizer's EOS, the orchestrator does not ask vLLM to stop on the second one, yet vLLM stops
    # there (the model's generation_config): the trajectory says so instead of claiming a context overflow
    (t,) = generate(engine, tokenizer, [prompt], cfg, eos_token_id=eos[0])
    assert t.finish_reason == "unknown_stop" and f"token {eos[1]}" in t.finish_detail
    assert t.units[0].completion_ids == [eos[1]]

    threads = prompt + encode(tokenizer, "<think>\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n"
                                         "<Outline>2: b</Outline>\n</Outlines>")
    (t,) = generate(engine, tokenizer, [threads], cfg, eos_token_id=eos)
    assert t.finish_reason == "eos_in_thread" and t.closed_threads == []
    assert [u.completion_ids for u in t.units] == [[eos[1]], [eos[1]]]


@pytest.mark.integration
def test_free_sampling_on_vllm_every_finish_reason_is_the_true_one(prepared, prepared_llm):
    """The random model samples freely among the tags, both EOS ids and a few text tokens (vLLM's
    ``allowed_token_ids``), so trajectories end in every way: each one's finish reason must be the one its units
    show. Told only the tokenizer's EOS, the trajectories that vLLM stops on the generation config's second EOS
    are ``unknown_stop``, not a context overflow."""
    from rollout.engine import VLLMEngine
    from rollout.orchestrator import generate
    from rollout.units import chat_prompt_ids

    tokenizer = load_tokenizer(prepared)
    eos = eos_token_ids(prepared, tokenizer)
    tag_ids = json.loads((prepared / RECORD_FILE).read_text())["tag_ids"]
    allowed = sorted({*eos, *tag_ids.values(), *encode(tokenizer, "1: 2 a\n")})
    head = "<think>\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n"
    prompt = chat_prompt_ids(tokenizer, "Compute 7*486 + 3*961.") + encode(tokenizer, head)
    engine = VLLMEngine(prepared_llm, sampling_overrides={"allowed_token_ids": allowed})
    cfg = RolloutConfig(n=48, max_tokens=24, max_context=512, max_thread_tokens=6, max_threads=3, max_blocks=2,
                        seed=0)

    close = tag_ids["</Outlines>"]
    trajectories = generate(engine, tokenizer, [prompt], cfg, eos_token_id=eos)
    for t in trajectories:
        assert t.finish_reason in true_finish_reasons(t, eos, close, cfg), (t.finish_reason, t.units)
    reasons = {t.finish_reason for t in trajectories}
    assert {"eos", "eos_in_thread"} <= reasons, reasons
    ends = {t.sequence_ids[-1] for t in trajectories if t.finish_reason == "eos"}
    assert ends == set(eos)  # both EOS ids ended trajectories

    told_one = generate(engine, tokenizer, [prompt], cfg, eos_token_id=eos[0])
    for t in told_one:  # vLLM stops on the second EOS (the model's generation config) though not asked to
        assert t.finish_reason in true_finish_reasons(t, eos[:1], close, cfg, unknown=(eos[1],)), t.finish_reason
    assert "unknown_stop" in {t.finish_reason for t in told_one}
