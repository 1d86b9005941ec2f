"""Start or join Ray for the project's commands, with workers that import the project's own code.

:func:`start_ray` is the one place a command starts Ray:

* it joins the cluster at ``address`` when one is given, else starts a local
  instance (``address="local"``: never a ``ray start`` cluster it happens to
  find on the machine);
* a local instance listens on 127.0.0.1 only (GCS, raylet, workers, agents,
  metrics) and runs no Prometheus endpoint in its dashboard agent (see "What
  listens where" in the README). ``ray.init`` turns ``_node_ip_address=
  "127.0.0.1"`` back into the machine's address; the one switch Ray 2.60 has
  is ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (a one-machine node, the default
  on macOS and Windows), which its processes read from the environment and
  this process from ``ray._private.ray_constants``, set while the instance
  starts;
* every worker imports the project from the folder the driver imported it
  from. Ray puts the driver's working directory first on every worker's
  ``sys.path``, so a command run from a folder that holds a directory named
  ``rollout``, ``rewards``, ``rl`` or ``cluster`` would otherwise make its
  workers import that directory instead ("cannot import name ... (unknown
  location)"). The worker set-up hook (:func:`project_first`) is a closure, so
  Ray ships it by value: unpickling it imports nothing from the project;
* a ``runtime_env`` given (``pip``, ``env_vars``, ``working_dir``, ...: the
  config's ``ray.runtime_env``) is merged with that hook and passed to
  ``ray.init``, so every actor of the job gets it;
* the actors' logs reach the driver's stdout (and so ``ray job logs``) unless
  ``log_to_driver=False``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

#: the folder holding the ``rollout`` package the driver runs (the repository root, or site-packages)
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)

#: the project's top-level packages
PACKAGES = ("rollout", "rewards", "rl", "cluster")

#: options of a local instance: no Prometheus metrics endpoint of the dashboard agent (nothing would scrape it)
LOCAL_OPTIONS = {"_system_config": {"enable_metrics_collection": False}}

#: Ray's switch for a node that is its own cluster: everything binds to 127.0.0.1
ONE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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


@contextmanager
def one_machine_node() -> Iterator[None]:
    """While a local instance starts: its node address is 127.0.0.1 (see the module docstring)."""
    from ray._private import ray_constants

    env, flag = os.environ.get(ONE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ONE_MACHINE_ENV] = "0"  # read by the GCS, raylet and agents ray.init starts (workers inherit it)
    ray_constants.ENABLE_RAY_CLUSTER = False  # read by this process, which may have imported Ray before
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = flag
        if env is None:
            del os.environ[ONE_MACHINE_ENV]
        else:
            os.environ[ONE_MACHINE_ENV] = env


def job_runtime_env(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``extra`` (Ray runtime_env keys) with the project's worker set-up hook; ``extra`` may not set a hook."""
    extra = dict(extra or {})
    if "worker_process_setup_hook" in extra:
        raise ValueError("ray.runtime_env may not set worker_process_setup_hook: the project installs its own")
    return {**extra, "worker_process_setup_hook": project_first()}


def start_ray(address: str | None = None, *, log_to_driver: bool = True,
              runtime_env: Mapping[str, Any] | None = None, **local_options) -> None:
    """Join ``address`` or start a local instance with ``local_options`` (``num_cpus``, ...); see the module doc."""
    import ray

    runtime_env = job_runtime_env(runtime_env)
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=runtime_env)
    else:
        with one_machine_node():
            ray.init(address="local", log_to_driver=log_to_driver, runtime_env=runtime_env,
                     **{**LOCAL_OPTIONS, **local_options})
