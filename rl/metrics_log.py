"""A run's ``metrics.jsonl``: one JSON object per line, each with its ``step``, written as the run goes.

Both training stages (``rl.driver``, ``rl.sft``) log through :class:`MetricsLog`,
and the pipeline reads the file back with :func:`read_records`.

A run that resumes from the checkpoint of step ``N`` continues the file after
its last record of a step ``<= N``: the records of later steps came from work
lost with the process that wrote them, and the resumed run logs those steps
again (so no step appears twice). A line that is not a JSON object (a write cut
off by a kill) is dropped with a warning, never appended onto. A fresh run
starts an empty file. Records without a ``step`` count as step 0.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rl import durable


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _step(record: dict) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) else 0


def read_records(path: str | Path) -> list[dict]:
    """Every record of ``path`` in order; lines that are not JSON objects are skipped with a warning."""
    records, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                record = _parse(line)
                if record is None:
                    bad.append(number)
                else:
                    records.append(record)
    if bad:
        print(f"warning: {path}: skipped {len(bad)} line(s) that are not JSON objects (line {bad[0]}"
              f"{' and more' if len(bad) > 1 else ''}; a write cut off by a kill?)", file=sys.stderr, flush=True)
    return records


def trim(path: str | Path, step: int | None) -> int:
    """Keep the records of ``path`` up to ``step`` (None: none) and drop unreadable lines; returns those kept.

    The file is rewritten only when something goes, at once (``durable.write_text``),
    with a warning that says what went.
    """
    path = Path(path)
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8", errors="replace")
    kept, later, bad = [], 0, 0
    for line in text.splitlines():
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            bad += 1
        elif step is None or _step(record) > step:
            later += 1
        else:
            kept.append(line)
    if later or bad:
        durable.write_text(path, "".join(line + "\n" for line in kept))
        what = (f"a fresh run: removed {later} record(s) of an earlier run" if step is None else
                f"resuming at step {step}: removed {later} record(s) of later steps (they are redone)")
        print(f"warning: {path}: {what}"
              + (f", and {bad} line(s) that are not JSON objects (a write cut off by a kill?)" if bad else ""),
              file=sys.stderr, flush=True)
    elif text and not text.endswith("\n"):
        durable.write_text(path, text + "\n")  # a complete last record whose newline was cut off
    return len(kept)


class MetricsLog:
    """Appends records to ``path`` after trimming it to ``resume_step`` (None: a fresh run, an empty file).

    Every record is flushed when written (a killed process loses none); :meth:`sync`
    also puts them on disk (call it before a checkpoint, so the records up to the
    checkpoint survive a crash of the machine as the checkpoint does).
    """

    def __init__(self, path: str | Path, resume_step: int | None):
        self.path = Path(path)
        trim(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def sync(self) -> None:
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
