"""Where files that cross nodes go: a storage location, and each node's own scratch folder.

A *location* is a local folder (a path) or a URI that ``pyarrow.fs`` opens
(``file://``, ``s3://``, ``gs://``, ``hdfs://`` where pyarrow has the support
built in and the service answers) or, for any other scheme, an ``fsspec``
filesystem wrapped for pyarrow (``memory://``, ``gcs://`` with gcsfs,
``abfs://`` with adlfs, ...; a scheme whose package is missing is an error
naming it). A local folder means a folder that every process that reads it
sees: the driver's disk on one machine, or a shared filesystem mounted at the
same path on every node. On a cluster without a shared filesystem, give a URI.

:class:`Storage` is a small picklable handle (the location string only; each
process opens the filesystem itself, once). What the roles do with it:

* an actor writes what it produces into :meth:`Storage.stage` (the final
  folder itself when the storage is local, a fresh folder under the node's
  scratch otherwise) and hands it over with :meth:`Storage.commit` (nothing to
  do locally; an upload, then the scratch copy is removed, otherwise);
* a reader asks :meth:`Storage.fetch` for a local folder holding the files
  (the folder itself when local, a download into scratch otherwise);
* the driver writes and reads small files (``latest``, ``trainer_state.json``)
  and lists sizes through the handle, never through a path an actor wrote.

Node scratch: :func:`scratch_dir` is ``$THREADWEAVER_SCRATCH`` (a folder on
the node's own disk; the simulated cluster of the test suite gives each node
its own) or the system's temporary folder. Every actor-local file of the
project lives under it: staged checkpoint shards, downloaded checkpoints and
models, weight-update folders.

:func:`ship_folder` / :func:`fetch_folder` move a *local* input folder (a
model given as a path on the driver's machine) to actors on other nodes: the
driver reads its files once into Ray's object store, each node writes them
once into its scratch. A URI needs no shipping: actors read it from storage.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

#: environment variable naming the node's scratch folder
SCRATCH_ENV = "THREADWEAVER_SCRATCH"

#: schemes pyarrow.fs opens itself; any other scheme goes through fsspec
ARROW_SCHEMES = ("file", "s3", "gs", "hdfs", "viewfs", "abfs", "abfss")


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (a storage URI), False for a local path."""
    return "://" in str(location)


def scratch_dir(*parts: str) -> Path:
    """``$THREADWEAVER_SCRATCH/threadweaver/PARTS`` (system temp folder without it), created."""
    base = os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()
    path = Path(base, "threadweaver", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@functools.lru_cache(maxsize=16)
def _open(uri: str):
    """``(pyarrow filesystem, path in it)`` of a URI; ValueError with one line saying why not."""
    import pyarrow.fs as pafs

    scheme = uri.split("://", 1)[0].lower()
    try:
        if scheme in ARROW_SCHEMES:
            return pafs.FileSystem.from_uri(uri)
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    except ImportError as e:
        raise ValueError(f"{uri}: a package is missing for '{scheme}://' ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - pyarrow and fsspec raise many kinds; one line says which
        raise ValueError(f"{uri}: cannot open it ({type(e).__name__}: {_first_line(e)})") from None


@dataclass(frozen=True)
class Storage:
    """A local folder or a storage URI (see the module doc); relative names use '/'."""

    root: str

    @classmethod
    def of(cls, location: "str | os.PathLike | Storage") -> "Storage":
        """The storage at ``location``; a local path is made absolute (actors may run elsewhere)."""
        if isinstance(location, Storage):
            return location
        text = str(location)
        if not text:
            raise ValueError("storage location is empty")
        if is_uri(text):
            return cls(text.rstrip("/"))
        return cls(str(Path(text).absolute()))

    @property
    def is_local(self) -> bool:
        return not is_uri(self.root)

    @property
    def location(self) -> "Path | str":
        """The root as callers name it: a ``Path`` when local, the URI otherwise."""
        return Path(self.root) if self.is_local else self.root

    def __str__(self) -> str:
        return self.root

    def child(self, rel: str) -> "Storage":
        """The storage rooted at ``rel`` inside this one."""
        rel = rel.strip("/")
        if not rel:
            return self
        return Storage(str(Path(self.root, rel)) if self.is_local else f"{self.root}/{rel}")

    @property
    def name(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    # ------------------------------------------------------------------ filesystem

    def _fs(self):
        import pyarrow.fs as pafs

        if self.is_local:
            return pafs.LocalFileSystem(), self.root
        return _open(self.root)

    def _path(self, rel: str = "") -> tuple:
        fs, base = self._fs()
        rel = rel.strip("/")
        return fs, (f"{base.rstrip('/')}/{rel}" if rel else base)

    def check(self, what: str = "storage") -> "Storage":
        """Open the filesystem, create the root and a trial file in it; ValueError with one line if that fails."""
        try:
            probe = f".probe-{uuid.uuid4().hex[:8]}"
            self.write_bytes(probe, b"")
            self.delete(probe)
        except ValueError as e:  # the URI's filesystem cannot be opened
            raise ValueError(f"{what} {e}") from None
        except Exception as e:  # noqa: BLE001 - OSError and the filesystems' own errors alike
            raise ValueError(f"cannot write {what} {self.root}: {type(e).__name__}: {_first_line(e)}") from None
        return self

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        fs, path = self._path(rel)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def is_dir(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        fs, path = self._path(rel)
        return fs.get_file_info(path).type == pafs.FileType.Directory

    def dirs(self) -> list[str]:
        """Names of the folders directly under the root (none when it does not exist), sorted."""
        import pyarrow.fs as pafs

        fs, path = self._path()
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def sizes(self, rel: str = "") -> dict[str, int]:
        """``relative name -> bytes`` of every file under ``rel`` (names relative to ``rel``)."""
        import pyarrow.fs as pafs

        fs, path = self._path(rel)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        prefix = path.rstrip("/") + "/"
        return {i.path[len(prefix):]: i.size for i in sorted(infos, key=lambda i: i.path)
                if i.type == pafs.FileType.File}

    def read_bytes(self, rel: str) -> bytes:
        fs, path = self._path(rel)
        with fs.open_input_stream(path) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file: locally a synced temporary file renamed onto it (readers never see half of it);
        elsewhere one upload, which object stores publish only when complete."""
        if self.is_local:
            path = Path(self.root, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        fs, path = self._path(rel)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def make(self) -> "Storage":
        """Create the root folder (object stores have none to create: nothing happens there)."""
        fs, path = self._path()
        fs.create_dir(path, recursive=True)
        return self

    def delete(self, rel: str = "") -> None:
        """Remove the file or folder ``rel`` (nothing when it does not exist)."""
        import pyarrow.fs as pafs

        fs, path = self._path(rel)
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            fs.delete_file(path)

    # ------------------------------------------------------------------ folders in and out

    def upload(self, local: str | Path, rel: str = "") -> None:
        """Copy every file under the local folder ``local`` to ``rel``."""
        local = Path(local)
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            name = f.relative_to(local).as_posix()
            target = f"{rel.strip('/')}/{name}" if rel.strip("/") else name
            fs, path = self._path(target)
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with open(f, "rb") as src, fs.open_output_stream(path) as dst:
                shutil.copyfileobj(src, dst, 16 * 2**20)

    def download(self, local: str | Path, keep: Callable[[str], bool] | None = None) -> Path:
        """Copy every file of this storage (those ``keep(name)`` accepts) into the local folder ``local``."""
        local = Path(local)
        fs, base = self._path()
        for name in self.sizes():
            if keep is not None and not keep(name):
                continue
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{base.rstrip('/')}/{name}") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 * 2**20)
        return local

    def stage(self) -> Path:
        """A local folder to write this storage's files into: the folder itself when local (created), a fresh
        scratch folder otherwise (hand it over with :meth:`commit`)."""
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            return Path(self.root)
        return Path(tempfile.mkdtemp(prefix="stage-", dir=scratch_dir("staging")))

    def commit(self, staged: Path) -> None:
        """Hand over what was written into :meth:`stage`: upload it and remove the scratch copy (remote); locally
        the files are already in place."""
        if self.is_local:
            return
        try:
            self.upload(staged)
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def fetch(self, keep: Callable[[str], bool] | None = None) -> Path:
        """A local folder holding this storage's files: the folder itself when local, a fresh download into
        scratch otherwise (the caller removes it when done: :func:`release`)."""
        if self.is_local:
            return Path(self.root)
        return self.download(tempfile.mkdtemp(prefix="fetch-", dir=scratch_dir("downloads")), keep)

    def release(self, fetched: Path) -> None:
        """Remove what :meth:`fetch` downloaded (nothing when the storage is local)."""
        if not self.is_local:
            shutil.rmtree(fetched, ignore_errors=True)


# --------------------------------------------------------------------------- inputs shipped to actors


@dataclass(frozen=True)
class ShippedFolder:
    """A local folder's files, put in Ray's object store by the driver (:func:`ship_folder`)."""

    name: str
    digest: str
    files: object  # ObjectRef of {relative name: bytes}


def folder_digest(folder: Path) -> str:
    """A hash of every file's name and bytes: the same folder gives the same scratch copy on a node."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0")
        with open(f, "rb") as src:
            for block in iter(lambda: src.read(2**20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def ship_folder(location: str | os.PathLike) -> "str | ShippedFolder":
    """What actors need to read ``location``: a URI as it is; a local folder's files in the object store when
    Ray has more than one live node (one node: the path itself, which every actor sees)."""
    import ray

    if is_uri(location):
        return str(location)
    folder = Path(location).absolute()
    if sum(1 for n in ray.nodes() if n.get("Alive")) <= 1:
        return str(folder)
    files = {f.relative_to(folder).as_posix(): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}
    return ShippedFolder(folder.name, folder_digest(folder), ray.put(files))


def fetch_folder(source: "str | ShippedFolder") -> Path:
    """A local folder holding ``source`` (from :func:`ship_folder`) on this node: a path as it is, a shipped
    folder or a URI copied once per node into scratch (later calls reuse the copy)."""
    if isinstance(source, ShippedFolder):
        target = scratch_dir("inputs") / f"{source.name}-{source.digest}"
        if not target.is_dir():
            import ray

            tmp = Path(tempfile.mkdtemp(prefix=".in-", dir=target.parent))
            for name, data in ray.get(source.files).items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
            _publish(tmp, target)
        return target
    if is_uri(source):
        storage = Storage.of(source)
        key = hashlib.sha256(storage.root.encode()).hexdigest()[:16]
        target = scratch_dir("inputs") / f"{storage.name}-{key}"
        if not target.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".in-", dir=target.parent))
            _publish(storage.download(tmp), target)
        return target
    return Path(source)


def _publish(tmp: Path, target: Path) -> None:
    """Rename a complete download onto ``target``; another actor of the node that got there first wins."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
