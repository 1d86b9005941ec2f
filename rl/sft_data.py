"""SFT data: records of prompt and response, replayed into units, packed as tries, served by token budget.

A record is a mapping with a prompt and a reference response (JSONL, one
object a line, or Parquet, in this project's layout or verl's; ``rollout.records``
reads them). The prompt becomes the chat-template prompt ids
(``rollout.units.chat_prompt_ids``); the response becomes units:

* ``"parallel"`` layout: ``rollout.units.replay`` -- the exact requests the
  spawn/join orchestrator would make, each segment tokenized on its own;
* ``"sequential"`` layout (the baseline): the response with every block
  flattened into plain text (``rollout.format.flatten``), one unit, trained
  causally.

In the parallel layout a ``sequential_share`` of the records (chosen by a
hash of the prompt, so the same ones every run) is flattened too: a model
that has seen both ways can choose between them, which leaves P-GRPO room to
raise the share of parallel answers (DESIGN section 6).

Before anything is tokenized, a record is checked against the format's
structural limits on its text (``rollout.format.limit_reasons``: UTF-8 bytes,
blocks, threads per block, digits of a thread number; the prompt's bytes);
a record over one is an error that names it, never replayed. Replay takes
time and memory linear in the record; its trie keeps every unit's path, so a
record whose joined sequence is longer than a training row (``max_tokens``)
is refused before its trie is built.

Each record's units form one trie (``rl.trie.build_trie``, SFT weight 1 per
occurrence). :class:`TrieStream` serves the tries in a seeded order, reshuffled
every epoch, in batches that fill a token budget; its position (epoch,
offset) is saved in checkpoints so a resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from rl.trie import Trie, build_trie
from rollout.config import check_ranges
from rollout.files import check_output_dir, write_text
from rollout.format import DEFAULT_MAX_BYTES, FormatError, flatten, limit_reasons, parse, utf8_bytes
from rollout.task import FILE_NAMES, TaskConfig, make_dataset, write_dataset
from rollout.units import Unit, chat_prompt_ids, encode, replay

LAYOUTS = ("parallel", "sequential")
TASK_FILE = "task.json"


@dataclass
class TaskData:
    """The synthetic task's data: its knobs, split sizes and seed; the ``data`` sections of the SFT and RL
    configs and the pipeline's extend it (same keys: ``data.task.*``, ``data.train_size``, ...)."""

    task: TaskConfig = field(default_factory=TaskConfig, metadata={"help": "synthetic task knobs"})
    train_size: int = field(default=20000, metadata={"help": "synthetic training problems (count)", "range": ">= 1"})
    validation_size: int = field(default=200, metadata={
        "help": "synthetic validation problems (count)", "range": ">= 1"})
    test_size: int = field(default=200, metadata={"help": "synthetic test problems (count)", "range": ">= 0"})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic data", "range": ">= 0"})

    def __post_init__(self) -> None:
        check_ranges(self)

    @property
    def sizes(self) -> dict[str, int]:
        """Problems per split, as :func:`ensure_task_data` takes them."""
        return {"train": self.train_size, "validation": self.validation_size, "test": self.test_size}


def ensure_task_data(data_dir: str | Path, task: TaskConfig, sizes: dict[str, int], seed: int) -> Path:
    """Generate the synthetic task into ``data_dir`` unless it is already there with the same settings.

    ``data_dir/task.json`` records the knobs, sizes and seed; a folder made
    with other settings is an error (never silently reused or overwritten).
    """
    data_dir = Path(data_dir)
    if task_data_ready(data_dir, task, sizes, seed):
        return data_dir
    write_dataset(make_dataset(task, sizes, seed=seed), data_dir)
    write_text(data_dir / TASK_FILE, json.dumps(_task_settings(task, sizes, seed), indent=2))
    return data_dir


def _task_settings(task: TaskConfig, sizes: dict[str, int], seed: int) -> dict:
    return {"seed": seed, "sizes": sizes, **asdict(task)}


def task_data_ready(data_dir: Path, task: TaskConfig, sizes: dict[str, int], seed: int) -> bool:
    """True if ``data_dir`` holds the synthetic task made with these settings, False if it holds no data files;
    ValueError if it holds data made otherwise (or files without ``task.json``)."""
    marker = data_dir / TASK_FILE
    if marker.exists():
        # a knob missing from an older task.json counts as its default (which reproduces the data made before it)
        have = {**asdict(TaskConfig()), **json.loads(marker.read_text())}
        wanted = _task_settings(task, sizes, seed)
        if have != wanted:
            diff = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
            raise ValueError(f"{data_dir} holds the synthetic task made with other settings "
                             f"(key: (on disk, wanted)) {diff}; delete it or choose another data.dir")
        missing = [FILE_NAMES[s] for s in sizes if not (data_dir / FILE_NAMES[s]).exists()]
        if missing:
            raise ValueError(f"{data_dir} has {TASK_FILE} but lacks {missing}")
        return True
    if data_dir.exists() and any((data_dir / FILE_NAMES[s]).exists() for s in sizes):
        raise ValueError(f"{data_dir} holds data files but no {TASK_FILE}; it was not made by this stage "
                         "(set data.generate=false to use it as is)")
    return False


def check_data_config(d) -> None:
    """The files a training stage reads (``d``: the SFT or RL config's ``data`` section) exist, or
    ``d.generate`` can write the synthetic task into ``d.dir``; ValueError naming the key otherwise."""
    data_dir = Path(d.dir)
    if d.generate:
        if not task_data_ready(data_dir, d.task, d.sizes, d.seed):
            check_output_dir(data_dir, "data.dir")
        return
    if not data_dir.is_dir():
        raise ValueError(f"data.dir {data_dir} does not exist (data.generate=true writes the synthetic task there)")
    for key in ("train_file", "validation_file"):
        path = data_dir / getattr(d, key)
        if not path.is_file():
            raise ValueError(f"data.{key} {path} does not exist")


def response_units(prompt_ids: Sequence[int], response: str, tokenizer, eos_token_id: int,
                   layout: str) -> list[Unit]:
    """The training units of one response in ``layout`` (see module doc); raises FormatError if unparseable."""
    if layout == "parallel":
        return replay(prompt_ids, response, tokenizer, eos_token_id)
    if layout == "sequential":
        return [Unit(list(prompt_ids), encode(tokenizer, flatten(parse(response))) + [eos_token_id])]
    raise ValueError(f"unknown layout '{layout}'; choose one of {LAYOUTS}")


def flattened_by_share(prompt: str, share: float) -> bool:
    """Whether a parallel-layout record with this prompt is trained flattened (a fixed hash of the prompt)."""
    if share <= 0:
        return False
    digest = hashlib.sha256(b"sequential_share\0" + prompt.encode()).digest()  # salted: splits hash the prompt too
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def build_tries(records: Sequence[dict], tokenizer, layout: str, prompt_field: str = "prompt",
                response_field: str = "response_parallel",
                progress: Callable[[int], None] | None = None, sequential_share: float = 0.0,
                max_tokens: int | None = None) -> list[Trie]:
    """One trie per record; raises ValueError naming the record whose fields are missing or malformed, or
    whose text is over a structural limit (see module doc).

    ``sequential_share``: in the parallel layout, the share of records trained flattened (see module doc).
    ``max_tokens``: the longest joined sequence a record may have (a training row's tokens; None: no limit).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id")
    if not 0.0 <= sequential_share <= 1.0:
        raise ValueError(f"sequential_share must be in [0, 1], got {sequential_share}")
    tries = []
    for i, rec in enumerate(records):
        prompt, response = rec.get(prompt_field), rec.get(response_field)
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(f"record {i}: needs string fields '{prompt_field}' and '{response_field}'")
        too_big = limit_reasons(response)
        if utf8_bytes(prompt) > DEFAULT_MAX_BYTES:
            too_big.append(f"the prompt has {utf8_bytes(prompt)} bytes (UTF-8), more than the limit of "
                           f"{DEFAULT_MAX_BYTES}")
        if too_big:
            raise ValueError(f"record {i} ({rec.get('id', 'no id')}): {'; '.join(too_big)}")
        rec_layout = "sequential" if layout == "parallel" and flattened_by_share(prompt, sequential_share) else layout
        try:
            units = response_units(chat_prompt_ids(tokenizer, prompt), response, tokenizer, eos, rec_layout)
        except FormatError as e:
            raise ValueError(f"record {i} ({rec.get('id', 'no id')}): response does not parse: {e}") from None
        joined = len(units[-1].context_ids) + len(units[-1].completion_ids)  # one path of the trie
        if max_tokens is not None and joined > max_tokens:
            raise ValueError(f"record {i} ({rec.get('id', 'no id')}): {joined} tokens, more than a training row's "
                             f"{max_tokens}")
        tries.append(build_trie(units))
        if progress is not None:
            progress(i + 1)
    return tries


@dataclass
class StreamState:
    """Where a :class:`TrieStream` stands: ``offset`` tries served in ``epoch``; ``served`` in all."""

    epoch: int = 0
    offset: int = 0
    served: int = 0


class TrieStream:
    """Tries in a seeded order (a new permutation every epoch), batched by a token budget."""

    def __init__(self, tries: Sequence[Trie], seed: int, state: StreamState | None = None):
        if not tries:
            raise ValueError("no training examples")
        self.tries = list(tries)
        self.seed = seed
        self.state = StreamState(**asdict(state)) if state is not None else StreamState()
        self._order = self._permutation(self.state.epoch)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.tries)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, token_budget: int) -> list[Trie]:
        """Tries in stream order while their tokens fit ``token_budget`` (always at least one)."""
        batch: list[Trie] = []
        total = 0
        while True:
            trie = self.tries[self._order[self.state.offset]]
            if batch and total + len(trie) > token_budget:
                return batch
            batch.append(trie)
            total += len(trie)
            self.state.offset += 1
            self.state.served += 1
            if self.state.offset == len(self.tries):
                self.state.epoch += 1
                self.state.offset = 0
                self._order = self._permutation(self.state.epoch)


def timed_build(records: Sequence[dict], tokenizer, layout: str, prompt_field: str, response_field: str,
                desc: str, show: bool, sequential_share: float = 0.0,
                max_tokens: int | None = None) -> tuple[list[Trie], float]:
    """:func:`build_tries` with an optional progress bar; returns the tries and the seconds taken."""
    start = time.perf_counter()
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(records), desc=desc, unit="rec", leave=False)
    try:
        tries = build_tries(records, tokenizer, layout, prompt_field, response_field,
                            progress=(lambda n: bar.update(1)) if bar is not None else None,
                            sequential_share=sequential_share, max_tokens=max_tokens)
    finally:
        if bar is not None:
            bar.close()
    return tries, time.perf_counter() - start
