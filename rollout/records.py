"""Data records from JSONL or Parquet, in this project's layout or verl's (one reader for SFT, RL and eval).

This project's records are flat: ``prompt`` (the question as text), ``answer``,
and for SFT ``response_parallel`` / ``response_sequential`` (``rollout.task``).
verl's RL datasets (``verl.utils.dataset.RLHFDataset``) hold one row per prompt
in this layout:

* ``data_source`` (string): which reward/benchmark the row belongs to;
* ``prompt`` (list of chat messages ``{"role", "content"}``);
* ``ability`` (string);
* ``reward_model`` (``{"style": "rule", "ground_truth": answer}``);
* ``extra_info`` (mapping; ``index`` is the prompt's index, which verl passes to
  the agent loop as ``index``);
* ``agent_name`` (string, optional): the agent loop verl runs for the row.

:func:`read_records` reads both: a row whose ``prompt`` is a list of messages is
converted by :func:`from_verl_row` (the single user message becomes ``prompt``,
``reward_model.ground_truth`` becomes ``answer``, and the fields of
``extra_info`` that the row lacks are lifted up, so ``threadweaver export-verl``
output that keeps the reference responses in ``extra_info`` trains SFT too).
:func:`to_verl_row` is the inverse, used by ``threadweaver export-verl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from rollout.check import json_objects

#: file suffixes :func:`iter_records` reads
SUFFIXES = (".jsonl", ".json", ".parquet")


def raw_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line or row from 1, record)`` of a ``.jsonl``, ``.json`` (a list) or ``.parquet`` file, as stored.

    FileNotFoundError for a missing file; ValueError naming the file (and
    line) for an unknown suffix or a record that is not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: expected a {', '.join(SUFFIXES)} file")
    if path.suffix == ".jsonl":
        yield from json_objects(path)
        return
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # pyarrow is large; only Parquet input pays for it

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises its own types for a damaged file
            raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    else:
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json file must hold a list of records, got {type(rows).__name__}")
    for i, rec in enumerate(rows, start=1):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i}: expected an object, got {type(rec).__name__}")
        yield i, rec


def iter_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line, record)`` for every record of a data file (:func:`raw_records`), verl rows converted.

    ValueError naming the file and line for a record that cannot be read or converted;
    FileNotFoundError for a missing file.
    """
    for line, rec in raw_records(path):
        if is_verl_row(rec):
            try:
                rec = from_verl_row(rec)
            except ValueError as e:
                raise ValueError(f"{path}:{line}: {e}") from None
        yield line, rec


def read_records(path: str | Path) -> list[dict]:
    """Every record of a ``.jsonl`` or ``.parquet`` file (see :func:`iter_records`)."""
    return [rec for _, rec in iter_records(path)]


def is_verl_row(rec: dict) -> bool:
    """Whether ``rec`` is in verl's layout: its ``prompt`` is a list of chat messages."""
    return isinstance(rec.get("prompt"), list)


def from_verl_row(row: dict) -> dict:
    """A verl row as this project's record (see the module docstring); ValueError if it has no single user turn."""
    messages = row["prompt"]
    roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in messages]
    if roles != ["user"] or not isinstance(messages[0].get("content"), str):
        raise ValueError(f"a verl prompt converts to this project's prompt text only as one user message with "
                         f"text content; this one has the roles {roles}")
    rec = {k: v for k, v in row.items() if k not in ("prompt", "reward_model", "extra_info")}
    rec["prompt"] = messages[0]["content"]
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict) and reward_model.get("ground_truth") is not None:
        rec["answer"] = reward_model["ground_truth"]
    extra = row.get("extra_info")
    if isinstance(extra, dict):
        for key, value in extra.items():
            if value is not None:  # Parquet fills a struct field missing from some rows with null
                rec.setdefault(key, value)
        rec["extra_info"] = extra
    return rec


def to_verl_row(rec: dict, index: int, *, data_source: str, ability: str, agent_name: str | None,
                prompt_field: str = "prompt", answer_field: str = "answer",
                extra_fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """One record in verl's layout (module docstring); ValueError naming the field a record lacks.

    ``extra_fields`` are copied into ``extra_info`` when the record has them (the reference
    responses, an id); ``extra_info.index`` is ``index``.
    """
    prompt, answer = rec.get(prompt_field), rec.get(answer_field)
    if not isinstance(prompt, str):
        raise ValueError(f"no string field '{prompt_field}' (fields: {', '.join(sorted(rec)) or 'none'})")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"no string or number field '{answer_field}' (fields: {', '.join(sorted(rec))})")
    extra: dict[str, Any] = {"index": index}
    extra.update({k: rec[k] for k in extra_fields if k in rec and k != "index"})
    row: dict[str, Any] = {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": prompt}],
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": str(answer)},
        "extra_info": extra,
    }
    if agent_name is not None:
        row["agent_name"] = agent_name
    return row
