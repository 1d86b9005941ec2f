"""Result files written safely: checked before the work, never half-written, never outside their folder.

* :func:`check_output_file` / :func:`check_output_dir`: before anything expensive
  starts, create the folder and a trial file in it, so an unwritable output is a
  one-line error instead of a failure after minutes of decoding;
* :func:`atomic_write` / :func:`write_text`: write to a temporary file in the
  target's folder, flush it to disk and rename it onto the target, so a reader
  never sees a half-written file and a run that fails leaves the previous file
  as it was;
* :func:`check_name`: a user-chosen name that becomes part of a file name (a
  benchmark's ``NAME=FILE``) must not leave its output folder.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def _temporary(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _probe(folder: Path) -> None:
    """Create ``folder`` (and its parents) and a trial file in it; OSError if either fails."""
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise NotADirectoryError(0, f"{blocking} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    probe = _temporary(folder / "probe", "probe")
    probe.touch(exist_ok=False)
    probe.unlink()


def check_output_dir(folder: str | Path, what: str = "output folder") -> Path:
    """Create ``folder`` and a trial file in it; ValueError 'cannot write WHAT FOLDER: reason' if that fails."""
    folder = Path(folder)
    try:
        _probe(folder)
    except OSError as e:
        raise ValueError(f"cannot write {what} {folder}: {e.strerror or e}") from None
    return folder


def check_output_file(path: str | Path, what: str = "output") -> Path:
    """:func:`check_output_dir` for ``path``'s folder; also refuses a ``path`` that is a folder."""
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(0, "it is a folder")
        _probe(path.parent)
    except OSError as e:
        raise ValueError(f"cannot write {what} {path}: {e.strerror or e}") from None
    return path


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path`` (``mode`` 'w' text in UTF-8, or 'wb'); on success it replaces ``path``.

    If the body raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, "tmp")
    binary = "b" in mode
    f = open(tmp, "xb" if binary else "x", encoding=None if binary else "utf-8")
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_write`; returns the path."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def check_name(name: str, what: str = "name") -> str:
    """``name`` if it is a plain file-name part (no '/' or '\\', not '.' or '..', not empty); else ValueError."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ValueError(f"{what} {name!r} must be a plain name (no '/' or '\\', not '.' or '..'): its files are "
                         "written inside the output folder")
    return name


def check_model_dir(path: str | Path | None, what: str = "model") -> Path:
    """``path`` if it is a Hugging Face model folder (holds ``config.json``); else ValueError saying what is wrong."""
    if path is None or str(path) == "":
        raise ValueError(f"{what} is required: a Hugging Face model folder")
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a folder")
    if not (path / "config.json").is_file():
        raise ValueError(f"{what} {path} holds no config.json (not a Hugging Face model folder)")
    return path
