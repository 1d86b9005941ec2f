"""What training code needs from experiment tracking: a small protocol, implemented by ``cluster.tracking.Tracker``.

Training functions (``rl.driver.train``) take a tracker as an argument and
never build one: choosing and reaching a tracking server is the command
layer's work (``cluster/``). ``start`` logs the run's parameters; it is also
how a resumed run reopens its earlier run (``run_id``), which then gets no
second copy of the parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol


class Tracker(Protocol):
    """One tracked run. Implementations only warn when the tracking server is unreachable."""

    #: the run's id once started (None: tracking off or not reachable yet)
    run_id: str | None
    #: where the runs are stored (a URI), or None
    uri: str | None

    def start(self, params: Mapping[str, Any], run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> str | None:
        """Open a run (or reopen ``run_id``) and log ``params`` (new runs only); returns the run id or None."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log numeric ``metrics`` at ``step``."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Attach the file ``path`` to the run (under the folder ``artifact_path``)."""

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run with ``status`` (FINISHED, FAILED, KILLED)."""


class NoTracker:
    """A :class:`Tracker` that tracks nothing (a stage run without experiment tracking)."""

    run_id: str | None = None
    uri: str | None = None

    def start(self, params: Mapping[str, Any], run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> str | None:
        return None

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def finish_on_error(tracker: Tracker, error: BaseException) -> None:
    """Close ``tracker``'s run after ``error`` ended a training function: KILLED on Ctrl-C, FAILED otherwise;
    a simulated kill (``rl.checkpoint.Stop``, the fault tests) leaves it open, as a killed process would."""
    from rl.checkpoint import Stop  # lazy: rl.checkpoint imports the learner (torch)

    if not isinstance(error, Stop):
        tracker.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
