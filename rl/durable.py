"""Files that outlive a crash of the machine, not only of the process.

A finished ``write`` sits in the page cache; only ``fsync`` puts it on disk,
and a new directory entry (a created or renamed file) is durable only once its
folder is synced too. So whatever a rename publishes (``checkpoints/latest``,
a rewritten ``metrics.jsonl``) is synced before the rename, and the folder
after it. On shared storage every process syncs what it wrote itself: an
``fsync`` from another client does not flush this one's cache.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """``fsync`` one file or folder."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """``fsync`` every file and folder under ``root``, then ``root`` and the folder holding it."""
    root = Path(root)
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(folder)
    fsync_path(root.parent)


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once (a temporary file, synced, renamed, the folder synced)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
