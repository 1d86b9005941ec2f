"""Where a run comes from and what it made, as MLflow tags, inputs and logged models.

* :func:`run_context`: the tags every run of a command gets: the git commit
  (``mlflow.source.git.commit``) and whether the work tree had uncommitted
  changes (``threadweaver.git_dirty``), the command line, the config files, the
  user (``mlflow.user``) and the host;
* :func:`dataset_inputs`: data files as MLflow dataset inputs, each with the
  SHA-256 of its bytes (digest: its first 16 hex digits; the whole hash, size
  and record count in the profile);
* :func:`log_checkpoint`: the final Hugging Face checkpoint of a training run
  as an MLflow logged model that points at the folder (nothing is copied),
  with the run's final evaluation attached; the run and model ids are written
  next to the weights (``CHECKPOINT/mlflow_run.json``), so
* :func:`log_source`: a run that starts from such a checkpoint (an RL run
  from an SFT checkpoint, a sweep point, an evaluation) tags the run and model
  it came from (``threadweaver.source_run_id``, ``threadweaver.source_model_id``)
  and takes the logged model as an input.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from rollout.storage import Storage

#: the file next to a checkpoint's weights that names the MLflow run and logged model that made it
SOURCE_FILE = "mlflow_run.json"
ROOT = Path(__file__).resolve().parent.parent
MAX_TAG = 5000


def git_state(root: Path = ROOT) -> tuple[str, bool] | None:
    """``(commit, dirty)`` of the git work tree at ``root`` (tracked files only), or None outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return commit, bool(status.strip())


def run_context(command: str, config_files: Sequence[str | Path] = (), argv: Sequence[str] | None = None
                ) -> dict[str, str]:
    """The tags of a run started by ``threadweaver COMMAND`` (see module doc)."""
    argv = list(sys.argv if argv is None else argv)
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": f"threadweaver {command}",
            "mlflow.user": getpass.getuser(), "threadweaver.host": socket.gethostname(),
            "threadweaver.command": shlex.join(argv)[:MAX_TAG],
            "threadweaver.config": ",".join(str(Path(f).resolve()) for f in config_files) or "none"}
    state = git_state()
    if state is not None:
        tags["mlflow.source.git.commit"], dirty = state
        tags["threadweaver.git_dirty"] = "true" if dirty else "false"
    return tags


def file_hash(path: str | Path) -> str:
    """SHA-256 of the file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dataset_inputs(files: Mapping[str, str | Path], context: str = "training") -> list:
    """MLflow ``DatasetInput`` entities of the existing files among ``files`` (name -> path)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag  # lazy: mlflow takes seconds to import

    out = []
    for name, path in files.items():
        path = Path(path)
        if not path.is_file():
            continue
        sha = file_hash(path)
        with open(path, "rb") as f:
            records = sum(1 for line in f if line.strip())
        profile = json.dumps({"sha256": sha, "bytes": path.stat().st_size, "records": records})
        dataset = Dataset(name=name, digest=sha[:16], source_type="local",
                          source=json.dumps({"uri": str(path.resolve())}), profile=profile)
        out.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    return out


def source_of(model: str | Path) -> dict:
    """What ``MODEL/mlflow_run.json`` says made the checkpoint (``{}`` when there is no readable file)."""
    try:
        data = json.loads((Path(model) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def log_source(tracker, model: str | Path) -> dict:
    """Tag ``tracker``'s run with the run and logged model that made checkpoint ``model`` and take the model as
    an input (when it is in the same store); returns :func:`source_of`."""
    source = source_of(model)
    tags = {"threadweaver.source_checkpoint": str(Path(model).resolve())}
    if source.get("run_id"):
        tags["threadweaver.source_run_id"] = source["run_id"]
    if source.get("model_id"):
        tags["threadweaver.source_model_id"] = source["model_id"]
    tracker.set_tags(tags)
    if source.get("model_id") and source.get("tracking_uri") == tracker.uri:
        tracker.log_inputs(models=[source["model_id"]])
    return source


def log_checkpoint(tracker, name: str, checkpoint: str | Path, metrics: Mapping[str, float], step: int) -> str | None:
    """The final checkpoint as a logged model of ``tracker``'s run, ``metrics`` attached; ``mlflow_run.json``
    written into the checkpoint folder. Returns the model id (None without a run or server). A checkpoint in a
    storage URI is downloaded into the driver's scratch for MLflow, and ``mlflow_run.json`` written there."""
    storage = Storage.of(checkpoint)
    local = storage.fetch()
    try:
        model_id = tracker.log_model(name, local.resolve(), metrics, step)
    finally:
        storage.release(local)
    if tracker.run_id is not None:
        storage.write_text(SOURCE_FILE, json.dumps({"run_id": tracker.run_id, "model_id": model_id,
                                                     "tracking_uri": tracker.uri, "name": name}, indent=1))
    return model_id


def data_files(data) -> dict[str, Path]:
    """The training and validation files of a stage's ``data`` section (``dir``, ``train_file``,
    ``validation_file``)."""
    return {"train": Path(data.dir) / data.train_file, "validation": Path(data.dir) / data.validation_file}


def log_inputs_when_present(tracker, files: Mapping[str, Path]) -> bool:
    """Log ``files`` as dataset inputs if they all exist (True), else nothing (False: log them once written)."""
    if not all(Path(f).is_file() for f in files.values()):
        return False
    tracker.log_inputs(datasets=dataset_inputs(files))
    return True
