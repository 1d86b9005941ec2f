"""Start or join Ray for the project's commands, with workers that import the project's own code.

:func:`start_ray` is the one place a command starts Ray:

* it joins the cluster at ``address`` when one is given, else starts a local
  instance (``address="local"``: never a ``ray start`` cluster it happens to
  find on the machine);
* a local instance listens on the loopback interface only and runs no
  Prometheus metrics endpoint (see "What listens where" in the README);
* every worker puts the folder the driver imported the project from first on
  its import path. Ray puts the driver's working directory first on every
  worker's ``sys.path``, so a command run from a folder that holds a directory
  named ``rollout``, ``rewards``, ``rl`` or ``cluster`` would otherwise make
  its workers import that directory instead of the project ("cannot import
  name ... (unknown location)"). The worker set-up hook that does it is a
  closure, so Ray ships it by value: unpickling it imports nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

#: the folder holding the ``rollout`` package the driver runs (the repository root, or site-packages)
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)

#: options of a local instance: bound to 127.0.0.1, no Prometheus metrics endpoint (nothing would scrape it)
LOCAL_OPTIONS = {"_node_ip_address": "127.0.0.1", "_system_config": {"enable_metrics_collection": False}}


def project_first(root: str = PROJECT_ROOT) -> Callable[[], None]:
    """A worker set-up hook that puts ``root`` first on the worker's import path."""

    def hook() -> None:
        import sys

        if sys.path[:1] != [root]:
            sys.path.insert(0, root)

    return hook


def start_ray(address: str | None = None, *, log_to_driver: bool = False, **local_options) -> None:
    """Join ``address`` or start a local instance with ``local_options`` (``num_cpus``, ...); see the module doc."""
    import ray

    runtime_env = {"worker_process_setup_hook": project_first()}
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=runtime_env)
    else:
        ray.init(address="local", log_to_driver=log_to_driver, runtime_env=runtime_env,
                 **{**LOCAL_OPTIONS, **local_options})
