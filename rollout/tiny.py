"""Write the tiny model: a small Qwen3-architecture causal LM with a byte tokenizer.

``threadweaver init-model OUT_DIR`` writes, in Hugging Face format, a randomly
initialised ``Qwen3ForCausalLM`` (fp32, tied input/output embeddings, ~0.6M
parameters by default), a fast tokenizer and a Qwen-style chat template. The
directory loads with transformers' Auto classes and with vLLM (the CPU
attention backend supports the default head size of 32).

The tokenizer is byte-level BPE *without merges*: every UTF-8 byte is one token
(ids 0-255 are the bytes in order), so every digit is its own token and
``decode(encode(s)) == s`` for any text. On top of the bytes come the special
tokens ``<|endoftext|>`` (padding), ``<|im_start|>`` and ``<|im_end|>`` (end of
a turn, the EOS), then the ten control tags of DESIGN section 2 (``<Parallel>``
... ``<think>``) as single added tokens. Like Qwen3's ``<think>``, the tags
are not "special": ``decode(..., skip_special_tokens=True)`` keeps them.

For a real model (e.g. Qwen3-8B) :func:`add_tags` adds whichever tags its
tokenizer lacks and initialises each new embedding row (and output row, when
the head is untied) with the mean embedding of the sub-tokens the tag used to
be split into, or of all existing tokens (``threadweaver prepare-model``,
``rollout.onboard``, does the whole onboarding).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AddedToken, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast, Qwen3Config
from transformers import Qwen3ForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from rollout.config import check_range
from rollout.format import ALL_TAGS

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)
#: Embedding tables are padded to a multiple of this many rows.
VOCAB_MULTIPLE = 64
#: Head sizes that vLLM 0.32's CPU attention backend supports (``CPUAttentionBackend.get_supported_head_sizes``).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

#: Qwen's chat format: one ``<|im_start|>role\\n...<|im_end|>\\n`` block per message.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level tokenizer described in the module docstring (269 tokens)."""
    byte_to_char = bytes_to_unicode()  # the printable stand-ins ByteLevel uses for the 256 bytes
    vocab = {byte_to_char[b]: b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    # No normalizer: text is kept byte for byte (Qwen's NFC would break round trips).
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in ALL_TAGS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved in ``model_dir``; raises if a control tag is not one token.

    A real model's tokenizer that lacks the tags must go through
    :func:`add_tags` first.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    split = [t for t in ALL_TAGS if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    if split:
        raise ValueError(f"{model_dir}: the tokenizer splits the tags {', '.join(split)} into several tokens; "
                         "run threadweaver prepare-model on the model first")
    return tokenizer


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def model_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 128, num_layers: int = 3,
                 num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 384,
                 max_position_embeddings: int = 4096) -> Qwen3Config:
    """The Qwen3 configuration of the tiny model for ``tokenizer``."""
    sizes = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                 intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings)
    bad = [f"{k}={v}" for k, v in sizes.items() if not (isinstance(v, int) and v > 0)]
    if bad:
        raise ValueError(f"model sizes must be positive integers, got {', '.join(bad)}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    return Qwen3Config(
        vocab_size=round_up(len(tokenizer)),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def init_model(out_dir: str | Path, seed: int = 0, hidden_size: int = 128, num_layers: int = 3,
               num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 384,
               max_position_embeddings: int = 4096, force: bool = False) -> Path:
    """Write a freshly initialised tiny model, its tokenizer and chat template to ``out_dir``.

    The weights depend only on ``seed`` and the sizes. ``head_dim`` is
    ``hidden_size // num_heads``; vLLM's CPU backend needs it to be one of
    :data:`VLLM_CPU_HEAD_SIZES` (transformers takes any size). Refuses a non-empty
    ``out_dir`` unless ``force`` (then files of the same name are overwritten
    and other files are left alone). Returns ``out_dir``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (pass force=True / --force to write into it)")
    tokenizer = build_tokenizer()
    config = model_config(tokenizer, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
                          max_position_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def add_tag_tokens(tokenizer: PreTrainedTokenizerFast) -> dict[str, list[int]]:
    """Make every control tag an added token of ``tokenizer`` (non-special, matched whole before any split).

    Returns, for each tag that was not an added token yet, the ids it encoded
    to before (its pieces; one id when the tag already was a single vocabulary
    token, which then keeps that id). Changes ``tokenizer`` in place.
    """
    held = tokenizer.get_added_vocab()
    pieces = {t: tokenizer.encode(t, add_special_tokens=False) for t in ALL_TAGS if t not in held}
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in pieces])
    return pieces


def add_tags(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, init: str = "pieces") -> list[int]:
    """Make every control tag one token of ``tokenizer`` and give it an embedding in ``model``.

    Each tag the tokenizer does not hold yet is added (:func:`add_tag_tokens`,
    as a non-special added token, so decoding keeps it). A tag that gets a new
    id gets new rows, in the input embeddings and, when the output head is not
    tied to them, in the output head:

    * ``init="pieces"``: the mean of the rows of the sub-tokens the tag used to
      be split into;
    * ``init="mean"``: the mean of the rows of every token the tokenizer had
      before; rows that resizing adds beyond the tags get that mean too.

    The embedding tables grow to ``len(tokenizer)`` rounded up to a multiple
    of 64 only when they are too small (Qwen3's tables already have spare
    rows). Returns the tag ids in ``rollout.format.ALL_TAGS`` order; changes
    ``model`` and ``tokenizer`` in place.
    """
    if init not in ("pieces", "mean"):
        raise ValueError(f"init must be 'pieces' or 'mean', got {init!r}")
    n_tokens = len(tokenizer)
    pieces = add_tag_tokens(tokenizer)
    inputs = model.get_input_embeddings()
    old_rows = inputs.weight.shape[0]
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(round_up(len(tokenizer)), mean_resizing=False)
        inputs = model.get_input_embeddings()
    outputs = model.get_output_embeddings()
    tables = [inputs.weight]
    if outputs is not None and outputs.weight.data_ptr() != inputs.weight.data_ptr():
        tables.append(outputs.weight)
    ids = [tokenizer.convert_tokens_to_ids(tag) for tag in ALL_TAGS]
    new = {tag: tag_id for tag, tag_id in zip(ALL_TAGS, ids) if tag in pieces and tag_id >= n_tokens}
    with torch.no_grad():
        for table in tables:
            if init == "mean":
                mean = table[:n_tokens].float().mean(dim=0).to(table.dtype)
                table[sorted(set(new.values()) | set(range(old_rows, table.shape[0])))] = mean
            else:
                for tag, tag_id in new.items():
                    table[tag_id] = table[pieces[tag]].float().mean(dim=0).to(table.dtype)
    return ids


def count_parameters(model_dir: str | Path) -> int:
    """Number of distinct parameters saved in ``model_dir`` (tied tensors counted once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, help="directory to write (must be empty or absent unless --force)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the initial weights (default 0)")
    size = parser.add_argument_group("model size")
    size.add_argument("--hidden-size", type=int, default=128, help="width of the residual stream (default 128)")
    size.add_argument("--num-layers", type=int, default=3, help="transformer layers (default 3)")
    size.add_argument("--num-heads", type=int, default=4,
                      help="attention heads; head size = hidden/heads, 32 or another size vLLM's CPU backend "
                           "supports (default 4)")
    size.add_argument("--num-kv-heads", type=int, default=2, help="key/value heads, divides --num-heads (default 2)")
    size.add_argument("--intermediate-size", type=int, default=384, help="MLP width (default 384)")
    size.add_argument("--max-position-embeddings", type=int, default=4096,
                      help="longest sequence the model accepts, in tokens (default 4096)")


def run(args: argparse.Namespace) -> int:
    try:
        check_range("--seed", args.seed, "[0, 4294967295]")
        out = init_model(args.out_dir, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.num_layers,
                         num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                         intermediate_size=args.intermediate_size,
                         max_position_embeddings=args.max_position_embeddings, force=args.force)
    except (FileExistsError, ValueError) as e:
        print(f"threadweaver init-model: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"threadweaver init-model: cannot write {args.out_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {out}:")
    for path in sorted(out.iterdir()):
        print(f"  {path.name} ({path.stat().st_size:,} bytes)")
    print(f"parameters: {count_parameters(out):,}")
    head_dim = args.hidden_size // args.num_heads
    if head_dim not in VLLM_CPU_HEAD_SIZES:
        print(f"note: head size {head_dim} is not one vLLM's CPU backend supports "
              f"({', '.join(map(str, VLLM_CPU_HEAD_SIZES))}); this model will not load in vLLM on CPU",
              file=sys.stderr)
    return 0
