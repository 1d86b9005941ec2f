"""Start or join Ray for the project's commands, with workers that import the project's own code.

:func:`start_ray` is the one place a command starts Ray:

* it joins the cluster at ``address`` when one is given, else starts a local
  instance (``address="local"``: never a ``ray start`` cluster it happens to
  find on the machine);
* a local instance runs no Prometheus metrics endpoint in its dashboard agent
  (see "What listens where" in the README);
* every worker imports the project from the folder the driver imported it
  from. Ray puts the driver's working directory first on every worker's
  ``sys.path``, so a command run from a folder that holds a directory named
  ``rollout``, ``rewards``, ``rl`` or ``cluster`` would otherwise make its
  workers import that directory instead ("cannot import name ... (unknown
  location)"). The worker set-up hook (:func:`project_first`) is a closure, so
  Ray ships it by value: unpickling it imports nothing from the project.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

#: the folder holding the ``rollout`` package the driver runs (the repository root, or site-packages)
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)

#: the project's top-level packages
PACKAGES = ("rollout", "rewards", "rl", "cluster")

#: options of a local instance: no Prometheus metrics endpoint of the dashboard agent (nothing would scrape it)
LOCAL_OPTIONS = {"_system_config": {"enable_metrics_collection": False}}


def project_first(root: str = PROJECT_ROOT, packages: tuple[str, ...] = PACKAGES) -> Callable[[], None]:
    """A worker set-up hook: the worker's first import of a project package puts ``root`` first on its path.

    Ray runs the hook before it inserts the driver's working directory into
    ``sys.path``, so the hook cannot reorder the path itself: it installs a
    finder, first in ``sys.meta_path``, that does so when ``rollout`` (or
    another of ``packages``) is first imported, i.e. after Ray's insert, and
    then leaves the import to the ordinary finders. Processes the worker starts
    later (vLLM's engine core, spawned with the worker's ``sys.path``) inherit
    the corrected path.
    """

    def hook() -> None:
        import sys

        class ProjectFirst:
            @staticmethod
            def find_spec(name, path=None, target=None):
                if path is None and name in packages and sys.path[:1] != [root]:
                    sys.path.insert(0, root)
                return None

        sys.meta_path.insert(0, ProjectFirst)

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
