"""Ray start-up and resource planning for the training roles (DESIGN section 7).

Roles and what each actor reserves (all from the config):

* rollout workers: ``rollout.workers`` actors of ``rollout.cpus_per_worker``
  CPUs and ``rollout.gpus_per_worker`` GPUs, one vLLM engine each (with
  ``rollout.tensor_parallel_size`` = tp > 1, each engine's tp GPUs, one per
  shard worker, in a group of its own on one node: ``cluster.placement``);
* reward actors: ``reward.num_actors`` actors of ``reward.actor_cpus`` CPUs;
* learner ranks: ``learner.ranks`` actors of ``learner.cpus_per_rank`` CPUs
  and ``learner.gpus_per_rank`` GPUs;
* the reference model (only with a KL term): one actor with a learner rank's
  resources.

With ``ray.placement`` (the default) the ``rl`` and ``sft`` commands reserve a
placement group per role (``cluster.placement``: learner ranks packed, reward
actors spread) and schedule each actor into its bundle; without it Ray's
default scheduler places each actor on any node that has its resources free.
:func:`check_fits` refuses, before any actor starts, a plan that the cluster
cannot hold at once (Ray would otherwise leave actors pending forever), and
``cluster.placement.check_placeable`` a bundle that no single node can hold.

:func:`init_ray` joins a cluster (``ray.address``, else ``RAY_ADDRESS``, which a
Ray job's entrypoint has set) or starts a local instance (never attaching to
a ``ray start`` cluster it happens to find on the machine). A local instance
gets ``max(cpu count, CPUs the plan reserves)`` logical CPUs, since the roles
take turns (rollout, then rewards, then learning) rather than all computing at
once; it listens on 127.0.0.1 only, without a metrics endpoint, and its
dashboard is off unless ``ray.dashboard`` is set, and then listens on
``ray.dashboard_host`` (127.0.0.1 by default). Either way the workers import
the driver's project code, whatever the working directory holds
(:func:`rollout.ray_init.start_ray`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from cluster.placement import LEARNER_STRATEGIES, ROLE_STRATEGIES, Reservation, group_plans, reserve
from cluster.placement import plan_text as placement_text
from rollout.config import check_ranges
from rollout.ray_init import start_ray


#: the role keys a config may name (``cluster.placement``)
ROLE_KEYS = ("learner", *ROLE_STRATEGIES)


@dataclass
class RuntimeEnvConfig:
    """Ray's ``runtime_env`` for every actor of the run (https://docs.ray.io/en/latest/ray-core/handling-dependencies.html)."""

    pip: list[str] = field(default_factory=list, metadata={
        "help": "pip requirements each worker installs into its own environment (e.g. ['math-verify==0.8.0']); "
                "empty: none"})
    env_vars: dict[str, str] = field(default_factory=dict, metadata={
        "help": "environment variables of every worker (e.g. {HF_HOME: /mnt/shared/hf})"})
    working_dir: str | None = field(default=None, metadata={
        "help": "a local folder or a remote zip URI that Ray ships to every node as the workers' working directory "
                "(null: none; a Ray job's --working-dir already does this)"})

    def as_dict(self) -> dict:
        """The keys that are set, as ``ray.init(runtime_env=...)`` takes them."""
        out = {"pip": list(self.pip), "env_vars": dict(self.env_vars), "working_dir": self.working_dir}
        return {k: v for k, v in out.items() if v}


@dataclass
class RayConfig:
    """Which Ray to use and how a local one is started."""

    address: str | None = field(default=None, metadata={
        "help": "Ray cluster to join ('auto' or host:port); null: RAY_ADDRESS if set (as inside a Ray job), "
                "else start a local instance"})
    num_cpus: int | None = field(default=None, metadata={
        "help": "logical CPUs of a local instance (null: max(cpu count, CPUs the roles reserve))", "range": ">= 1"})
    num_gpus: int | None = field(default=None, metadata={
        "help": "GPUs of a local instance (null: Ray detects)", "range": ">= 0"})
    dashboard: bool = field(default=False, metadata={"help": "start the dashboard of a local instance"})
    dashboard_host: str = field(default="127.0.0.1", metadata={
        "help": "address a local instance's dashboard listens on (0.0.0.0: every interface)"})
    dashboard_port: int = field(default=8265, metadata={
        "help": "port of a local instance's dashboard", "range": "[1, 65535]"})
    log_to_driver: bool = field(default=True, metadata={
        "help": "stream the actors' logs (vLLM, DeepSpeed, ...) to the driver's stdout, and so to `ray job logs`"})
    runtime_env: RuntimeEnvConfig = field(default_factory=RuntimeEnvConfig, metadata={
        "help": "Ray runtime_env (pip, env_vars, working_dir) of every actor"})
    placement: bool = field(default=True, metadata={
        "help": "reserve a placement group per role (rl, sft) and schedule each actor into its bundle"})
    learner_strategy: str = field(default="PACK", metadata={
        "help": "placement of the learner ranks: PACK (one node where they fit, else few) or STRICT_PACK "
                "(one node, or refuse)"})
    placement_timeout_s: float = field(default=120.0, metadata={
        "help": "seconds to wait for Ray to place the groups before giving up (s)", "range": "> 0"})
    role_resources: dict[str, dict[str, float]] = field(default_factory=dict, metadata={
        "help": "custom node resources added to every bundle of a role, by role key (learner, rollout, reward, "
                "reference, eval), e.g. {rollout: {rollout_node: 1}}: the role's actors then go only to nodes "
                "started with that resource (ray start --resources); empty: any node", "range": "> 0"})

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.learner_strategy not in LEARNER_STRATEGIES:
            raise ValueError(f"ray.learner_strategy must be one of {', '.join(LEARNER_STRATEGIES)}, "
                             f"got {self.learner_strategy!r}")
        unknown = sorted(set(self.role_resources) - set(ROLE_KEYS))
        if unknown:
            raise ValueError(f"ray.role_resources: unknown role {unknown[0]!r}; roles are {', '.join(ROLE_KEYS)}")
        for key, resources in self.role_resources.items():
            bad = [k for k in resources if k in ("CPU", "GPU")]
            if bad:
                raise ValueError(f"ray.role_resources.{key}.{bad[0]}: custom resources only (a role's CPUs and "
                                 "GPUs come from its own settings)")


@dataclass
class Role:
    """``count`` actors of one role, each reserving ``cpus`` CPUs and ``gpus`` GPUs; ``key`` names the role's
    placement group (learner, rollout, reward, reference, eval; see ``cluster.placement``)."""

    name: str
    count: int
    cpus: float
    gpus: float = 0.0
    key: str = ""
    tp: int = 1  # GPUs of each actor's tensor-parallel engine (> 1: held by the engine's shard workers, not the actor)

    @property
    def total_cpus(self) -> float:
        return self.count * self.cpus

    @property
    def gpus_each(self) -> float:
        """GPUs one actor's share of the plan holds: its engine's tp GPUs, else its own."""
        return float(self.tp) if self.tp > 1 else self.gpus

    @property
    def total_gpus(self) -> float:
        return self.count * self.gpus_each


def plan_text(roles: list[Role]) -> str:
    """One line per role, then the totals."""
    lines = [f"  {r.name:<16} {r.count} x ({r.cpus:g} CPU, {r.gpus_each:g} GPU"
             + (f": a tensor-parallel engine, one GPU per shard, on one node)" if r.tp > 1 else ")") for r in roles]
    cpus, gpus = sum(r.total_cpus for r in roles), sum(r.total_gpus for r in roles)
    lines.append(f"  {'total':<16} {cpus:g} CPU, {gpus:g} GPU")
    return "\n".join(lines)


def check_fits(roles: list[Role], available: dict[str, float]) -> None:
    """Raise RuntimeError when the roles together need more CPUs or GPUs than ``available`` holds.

    A whole-cluster check: whether each bundle fits on some node is
    ``cluster.placement.check_placeable``'s.
    """
    need = {"CPU": sum(r.total_cpus for r in roles), "GPU": sum(r.total_gpus for r in roles)}
    short = {k: (v, available.get(k, 0.0)) for k, v in need.items() if v > available.get(k, 0.0) + 1e-9}
    if short:
        what = ", ".join(f"{v:g} {k} needed, {have:g} in the cluster" for k, (v, have) in short.items())
        raise RuntimeError(f"the Ray cluster cannot hold every role at once ({what}):\n{plan_text(roles)}")
    for r in roles:
        if r.gpus_each > 0 and available.get("GPU", 0.0) < r.gpus_each:
            raise RuntimeError(f"role {r.name} needs {r.gpus_each:g} GPU per actor; the cluster has "
                               f"{available.get('GPU', 0.0):g}")


def init_ray(cfg: RayConfig, roles: list[Role]) -> bool:
    """Start or join Ray for ``roles`` and check that they fit; returns True when this call started Ray.

    A Ray that is already initialised in this process is used as it is.
    """
    import ray

    started = False
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS") or None
        if address is not None:
            start_ray(address, log_to_driver=cfg.log_to_driver, runtime_env=cfg.runtime_env.as_dict())
        else:
            need = math.ceil(sum(r.total_cpus for r in roles))
            num_cpus = cfg.num_cpus if cfg.num_cpus is not None else max(os.cpu_count() or 1, need)
            kwargs = {"dashboard_host": cfg.dashboard_host, "dashboard_port": cfg.dashboard_port} \
                if cfg.dashboard else {}
            start_ray(None, log_to_driver=cfg.log_to_driver, runtime_env=cfg.runtime_env.as_dict(),
                      num_cpus=num_cpus, num_gpus=cfg.num_gpus,
                      include_dashboard=cfg.dashboard, **kwargs)
        started = True
    try:
        check_fits(roles, ray.cluster_resources())
    except RuntimeError:
        if started:
            ray.shutdown()
        raise
    return started


def reserve_roles(cfg: RayConfig, roles: list[Role]) -> Reservation | None:
    """With ``cfg.placement``: a placement group per role, placed (``cluster.placement.reserve``); else None."""
    if not cfg.placement:
        return None
    return reserve(group_plans(roles, cfg.learner_strategy, cfg.role_resources), cfg.placement_timeout_s)


def placement_report(cfg: RayConfig, roles: list[Role]) -> str:
    """``--check``'s placement lines: each bundle and the node Ray placed it on (the groups are released)."""
    if not cfg.placement:
        return "placement: off (ray.placement=false): Ray's default scheduler places each actor"
    plans = group_plans(roles, cfg.learner_strategy, cfg.role_resources)
    reservation = reserve(plans, cfg.placement_timeout_s)
    try:
        return f"placement (a group per role, learner {cfg.learner_strategy}):\n" \
               f"{placement_text(plans, reservation.node_of)}"
    finally:
        reservation.release()


def check_plan(command: str, cfg: RayConfig, roles: list[Role], what: str = "") -> int:
    """A ``--check``: start or join Ray, print the resource and placement plan; 0, or 2 with one line on stderr.

    ``what`` leads the first line (e.g. the records read); Ray started here is shut down again.
    """
    import sys

    import ray

    try:
        started = init_ray(cfg, roles)
    except RuntimeError as e:
        print(f"threadweaver {command}: {e}", file=sys.stderr)
        return 2
    try:
        placement = placement_report(cfg, roles)  # first: an unplaceable bundle prints no plan
        resources = ray.cluster_resources()
        print(f"{command} check: {what}Ray at {ray.get_runtime_context().gcs_address} with "
              f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU; the roles fit:\n{plan_text(roles)}")
        print(placement)
    except RuntimeError as e:
        print(f"threadweaver {command}: {e}", file=sys.stderr)
        return 2
    finally:
        if started:
            ray.shutdown()
    return 0
