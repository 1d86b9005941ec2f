"""Onboard a real Hugging Face causal LM: control tags as single tokens, a chat template, the full EOS set.

``threadweaver prepare-model SRC OUT`` (``cluster/cmd_prepare_model.py``) runs
:func:`prepare_model`:

1. *resolve* ``SRC`` (:func:`resolve_model`): a model folder, or a Hub name
   (``Qwen/Qwen3-8B``) found in the local Hugging Face cache (``HF_HUB_CACHE``,
   default ``HF_HOME/hub``). Nothing is downloaded; a name that is not cached
   is an error naming the folder it looked in;
2. *tokenizer*: the model's own, with its chat template (or ``chat_template``
   from a file; a model with neither is refused). The control tags it lacks
   are added as non-special added tokens (``rollout.tiny.add_tag_tokens``:
   matched whole before any other split, kept by ``decode``);
   :func:`tag_problems` then checks that the tokenizer really holds them: each
   tag one token, alone and inside a canonical response, and that response
   decoded back character for character. A tokenizer that fails is refused
   with the reason, before the weights are loaded;
3. *weights*: the embedding tables grow when the new ids do not fit (to a
   multiple of 64 rows); each new tag row (input embeddings, and the output
   head when it is not tied) is the mean of the rows of all existing tokens
   (``init="mean"``), or of the sub-tokens the tag was split into
   (``init="pieces"``) (``rollout.tiny.add_tags``);
4. *EOS set*: the tokenizer's EOS plus every ``eos_token_id`` of the model's
   ``generation_config`` (its ``config.json`` when it has none), recorded as the
   list ``eos_token_id`` of the output's ``generation_config.json``. vLLM stops
   on each of them; the orchestrator reads the same list through
   :func:`eos_token_ids` and ends a trajectory on any of them;
5. *write* everything to a temporary folder beside ``OUT``, read it back
   (tags single tokens, chat template, EOS set) and rename it to ``OUT``, with
   ``threadweaver_model.json`` recording the source, the tag ids and the EOS set.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout.config import check_ranges
from rollout.files import check_model_dir
from rollout.format import ALL_TAGS, OUTLINES_CLOSE, thread_seed
from rollout.tiny import add_tag_tokens, add_tags, load_tokenizer
from rollout.units import chat_prompt_ids, encode

#: a Hub name as ``owner/name`` (letters, digits, ``-``, ``_``, ``.``), the form :func:`resolve_model` looks up
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
#: the record of what :func:`prepare_model` did, written into the output folder
RECORD_FILE = "threadweaver_model.json"
#: a canonical response (DESIGN section 2) that every prepared tokenizer must encode with single-token tags
#: and decode back exactly
SAMPLE_RESPONSE = (
    "<think>\nLet me split the work.\n<Parallel>\n<Outlines>\n<Outline>1: add 12 and 30</Outline>\n"
    "<Outline>2: multiply 7 by 6</Outline>\n" + OUTLINES_CLOSE + thread_seed(1) + " 12 + 30 = 42\n</Thread>"
    + thread_seed(2) + " 7 * 6 = 42\n</Thread>\n</Parallel>\nBoth give 42.\n</think>\n\nThe answer is \\boxed{42}."
)


@dataclass
class PrepareModelConfig:
    """What ``threadweaver prepare-model`` reads, how it initialises the tags, and where it writes."""

    src: str = field(default="", metadata={
        "help": "the model: a Hugging Face causal LM folder, or a Hub name (owner/name) already in the local "
                "Hugging Face cache (HF_HUB_CACHE, default HF_HOME/hub); nothing is downloaded"})
    out: str = field(default="", metadata={"help": "folder to write (must be absent or empty)"})
    revision: str = field(default="main", metadata={
        "help": "for a Hub name: the cached revision (a branch or tag recorded under refs/, or a commit hash)"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "Hugging Face hub cache to look in (null: huggingface_hub's, from HF_HUB_CACHE or HF_HOME)"})
    chat_template: str | None = field(default=None, metadata={
        "help": "a Jinja chat-template file that replaces the model's (required when the model has none)"})
    init: Literal["mean", "pieces"] = field(default="mean", metadata={
        "help": "new tag rows: mean of all existing token rows, or mean of the sub-tokens the tag split into"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "dtype the weights are loaded and saved in (auto: the model's own)"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "let transformers run the model folder's own Python code (models outside transformers)"})

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class PreparedModel:
    """What :func:`prepare_model` wrote (also saved as ``threadweaver_model.json``)."""

    source: str
    resolved: str
    out: str
    tag_ids: dict[str, int]
    added_tags: list[str]
    eos_token_ids: list[int]
    vocab_rows_before: int
    vocab_rows_after: int
    tied_head: bool
    init: str


class ModelNotFound(ValueError):
    """``SRC`` is neither a model folder nor a cached Hub name; the message says where it looked."""


def resolve_model(src: str, revision: str = "main", cache_dir: str | Path | None = None) -> Path:
    """The folder of ``src``: itself if it exists, else the cached snapshot of Hub name ``src``.

    Offline only (``local_files_only``). ValueError for a folder that is not a
    Hugging Face model folder; :class:`ModelNotFound` naming the folder that
    was looked in when ``src`` is neither.
    """
    if not src:
        raise ValueError("src is required: a Hugging Face model folder or a cached Hub name (owner/name)")
    path = Path(src).expanduser()
    if path.exists():
        return check_model_dir(path, "model folder")
    if not HUB_NAME.fullmatch(src):
        raise ModelNotFound(f"model folder {src} does not exist")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)
    looked = cache / f"models--{src.replace('/', '--')}"
    try:
        folder = Path(snapshot_download(src, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelNotFound(f"{src} is not a folder, and revision '{revision}' of the Hub model {src} is not in the "
                            f"local Hugging Face cache (looked in {looked}); nothing is downloaded: put it there "
                            "(huggingface-cli download on a machine with network, then copy the cache) or give "
                            "its folder") from None
    return check_model_dir(folder, f"cached snapshot of {src}")


def eos_token_ids(model_dir: str | Path, tokenizer) -> list[int]:
    """Every EOS id of the model in ``model_dir``: the tokenizer's first, then its ``generation_config``'s.

    ``generation_config.json``'s ``eos_token_id`` (an id or a list) is what
    vLLM stops on besides the tokenizer's EOS; without that file, the one of
    ``config.json`` (transformers and vLLM derive the generation config from
    it). ValueError when there is none at all.
    """
    folder = Path(model_dir)
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids += value if isinstance(value, list) else [] if value is None else [value]
            break
    if not ids:
        raise ValueError(f"{model_dir}: no EOS token id in the tokenizer, generation_config.json or config.json")
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        raise ValueError(f"{model_dir}: EOS token ids must be integers, got {bad}")
    return list(dict.fromkeys(ids))


def tag_problems(tokenizer) -> list[str]:
    """Why ``tokenizer`` cannot hold the control tags (empty when it can).

    Each tag must be one token on its own and inside :data:`SAMPLE_RESPONSE`
    (the same id), and the sample must decode back exactly, since the
    orchestrator and the rewards read decoded text.
    """
    problems = []
    ids = {}
    for tag in ALL_TAGS:
        alone = encode(tokenizer, tag)
        if len(alone) != 1:
            problems.append(f"{tag} encodes to {len(alone)} tokens {alone}")
        else:
            ids[tag] = alone[0]
    sample = encode(tokenizer, SAMPLE_RESPONSE)
    for tag, tag_id in ids.items():
        if sample.count(tag_id) != SAMPLE_RESPONSE.count(tag):
            problems.append(f"{tag} is not one token {tag_id} inside a response (found {sample.count(tag_id)} of "
                            f"{SAMPLE_RESPONSE.count(tag)} times)")
    decoded = tokenizer.decode(sample, skip_special_tokens=False)
    if decoded != SAMPLE_RESPONSE:
        at = next((i for i, (a, b) in enumerate(zip(decoded, SAMPLE_RESPONSE)) if a != b),
                  min(len(decoded), len(SAMPLE_RESPONSE)))
        problems.append(f"a response does not decode back to its text: at character {at} it reads "
                        f"{decoded[max(0, at - 15):at + 15]!r} instead of {SAMPLE_RESPONSE[max(0, at - 15):at + 15]!r}")
    return problems


def _load_tokenizer(folder: Path, cfg: PrepareModelConfig):
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot load the tokenizer of {cfg.src}: {e}") from None
    if cfg.chat_template is not None:
        template = Path(cfg.chat_template)
        if not template.is_file():
            raise ValueError(f"chat_template file {template} does not exist")
        tokenizer.chat_template = template.read_text()
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer of {cfg.src} has no chat template; give one with chat_template=FILE.jinja")
    try:
        chat_prompt_ids(tokenizer, "What is 1 + 2?")
    except Exception as e:  # noqa: BLE001 - any template error (jinja, a missing variable) is the user's input
        raise ValueError(f"the chat template of {cfg.src} does not render one user turn: {type(e).__name__}: {e}")
    return tokenizer


def _source_eos(folder: Path, tokenizer) -> list[int]:
    try:
        return eos_token_ids(folder, tokenizer)
    except (ValueError, OSError) as e:  # OSError: an unreadable file; json errors are ValueErrors
        raise ValueError(f"cannot read the EOS ids of {folder}: {e}") from None


def _output_folder(out: str, source: Path) -> Path:
    if not out:
        raise ValueError("out is required: the folder to write")
    path = Path(out).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"out {path} exists and is not an empty folder")
    if path.resolve() == source.resolve():
        raise ValueError("out must not be the source folder")
    return path


def prepare_model(cfg: PrepareModelConfig) -> PreparedModel:
    """Onboard ``cfg.src`` into ``cfg.out`` (module docstring); ValueError on bad input, with the reason."""
    source = resolve_model(cfg.src, cfg.revision, cfg.cache_dir)
    out = _output_folder(cfg.out, source)
    tokenizer = _load_tokenizer(source, cfg)
    eos = _source_eos(source, tokenizer)
    trial = copy.deepcopy(tokenizer)
    add_tag_tokens(trial)
    problems = tag_problems(trial)
    if problems:
        raise ValueError(f"the tokenizer of {cfg.src} cannot hold the control tags: {'; '.join(problems)}")

    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=cfg.dtype,
                                                     trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load {cfg.src} as a causal LM: {e}") from None
    rows_before = model.get_input_embeddings().weight.shape[0]
    added = [t for t in ALL_TAGS if t not in tokenizer.get_added_vocab()]
    tag_ids = dict(zip(ALL_TAGS, add_tags(model, tokenizer, init=cfg.init)))
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    tied = outputs is not None and outputs.weight.data_ptr() == inputs.weight.data_ptr()
    model.generation_config.eos_token_id = eos
    record = PreparedModel(source=cfg.src, resolved=str(source), out=str(out), tag_ids=tag_ids, added_tags=added,
                           eos_token_ids=eos, vocab_rows_before=rows_before,
                           vocab_rows_after=inputs.weight.shape[0], tied_head=tied, init=cfg.init)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD_FILE).write_text(json.dumps(dataclasses.asdict(record), indent=1) + "\n")
        _check_written(tmp, record)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def _check_written(folder: Path, record: PreparedModel) -> None:
    """Read the written folder back as the rollout workers will; RuntimeError if it differs."""
    tokenizer = load_tokenizer(folder)
    ids = {t: encode(tokenizer, t)[0] for t in ALL_TAGS}
    problems = tag_problems(tokenizer)
    if ids != record.tag_ids or problems:
        raise RuntimeError(f"the written tokenizer differs: tag ids {ids}, {problems}")
    eos = eos_token_ids(folder, tokenizer)
    if eos != record.eos_token_ids:
        raise RuntimeError(f"the written EOS set {eos} is not {record.eos_token_ids}")
    chat_prompt_ids(tokenizer, "What is 1 + 2?")
