"""Placement groups: one per role, built from the config, checked against the nodes before any actor starts.

Each actor of a role gets one bundle (the CPUs and GPUs it reserves). The group's strategy says how the bundles of a role share
nodes: the learner's ranks ``PACK`` (``STRICT_PACK`` with
``ray.learner_strategy``), so that a data-parallel group stays on one node
where it fits; a rollout engine per bundle, packed; reward actors ``SPREAD``.
A role whose actors reserve nothing gets no group (Ray refuses empty bundles).

A tensor-parallel engine (a role with ``tp > 1``: ``rollout.tensor_parallel_size``)
gets a group of its own instead, ``STRICT_PACK`` so that all its GPUs sit on one
node: ``tp`` bundles of one GPU each (vLLM refuses a bundle of more than one
GPU), bundle 0 also holding the worker actor's CPUs (and the role's custom
resources). The worker actor runs in bundle 0 with
``placement_group_capture_child_tasks``; it reserves no GPU itself. vLLM's Ray
executor (``distributed_executor_backend="ray"``, which ``rollout.engine.make_llm``
sets for ``tp > 1``) reads the actor's group (``ray.util.get_current_placement_group``
in vLLM 0.32's ``EngineArgs``, passed on to the engine process) and starts one
shard worker (1 GPU, 0 CPU) in each of its GPU bundles, so the engine's shards
use exactly the GPUs the plan reserved, on the node ``--check`` shows.

:func:`check_placeable` refuses, with one line per problem, a bundle larger
than every live node (or a ``STRICT_PACK`` group larger than every node):
Ray would otherwise leave the group pending forever. :func:`reserve` creates
the groups, waits until Ray has placed them (removing them all and raising
if that does not happen in time) and returns, per role, the ``.options``
of each actor (``PlacementGroupSchedulingStrategy`` with its bundle index),
which the pools of the lower floors take as ``actor_options``. Ray is imported
inside the functions that need it (it takes seconds; the plan and its checks
need none of it).

Tested on Ray's simulated cluster with fake GPUs (the plan, the groups, the
nodes, and what vLLM reads from inside the actor); a vLLM engine with
``tp > 1`` has never run in this project (no GPU machine).
"""

from __future__ import annotations

from dataclasses import dataclass

#: learner strategies the config accepts
LEARNER_STRATEGIES = ("PACK", "STRICT_PACK")

#: strategy of every other role, by key
ROLE_STRATEGIES = {"rollout": "PACK", "reward": "SPREAD", "reference": "PACK", "eval": "PACK"}


@dataclass
class GroupPlan:
    """The placement group of one role: ``bundles`` (one per actor) under ``strategy``."""

    key: str  # the role's key in the actor options (learner, rollout, reward, reference, eval)
    name: str  # shown in the plan
    bundles: list[dict[str, float]]
    strategy: str
    engine: int | None = None  # a tensor-parallel engine's own group: the index of its actor; None: a role's group

    @property
    def group(self) -> str:
        """The group's name in a :class:`Reservation`: the role's key, or ``key/actor`` for an engine's group."""
        return self.key if self.engine is None else f"{self.key}/{self.engine}"


def bundle_of(cpus: float, gpus: float) -> dict[str, float]:
    """One actor's bundle; zero amounts left out."""
    return {k: float(v) for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}


def engine_bundles(cpus: float, tp: int, custom: dict[str, float]) -> list[dict[str, float]]:
    """The bundles of one tensor-parallel engine: ``tp`` of one GPU, the first also with the actor's CPUs and
    the role's custom resources (the group is STRICT_PACK: the others follow it to its node)."""
    return [{**bundle_of(cpus, 1.0), **custom}] + [{"GPU": 1.0} for _ in range(tp - 1)]


def group_plans(roles, learner_strategy: str = "PACK",
                role_resources: dict[str, dict[str, float]] | None = None) -> list[GroupPlan]:
    """A group per role of ``roles`` (``cluster.ray_setup.Role`` with a ``key``; a role with ``tp > 1``: a
    STRICT_PACK group per actor, see the module doc); roles that reserve nothing get none.
    ``role_resources[key]`` (custom node resources, e.g. ``{"rollout": 1}``) is added to every bundle of that
    role (to an engine's first bundle), so its actors go only to nodes that offer it."""
    if learner_strategy not in LEARNER_STRATEGIES:
        raise ValueError(f"learner placement strategy must be one of {LEARNER_STRATEGIES}, got {learner_strategy!r}")
    plans = []
    for r in roles:
        custom = {k: float(v) for k, v in (role_resources or {}).get(r.key, {}).items()}
        tp = getattr(r, "tp", 1)
        if tp > 1:
            if r.gpus > 0:
                raise ValueError(f"{r.name}: a tensor-parallel engine's shard workers reserve its {tp} GPUs; "
                                 f"the worker actor must reserve none, got {r.gpus:g}")
            plans += [GroupPlan(r.key, f"{r.name} {i}", engine_bundles(r.cpus, tp, custom), "STRICT_PACK", engine=i)
                      for i in range(r.count)]
            continue
        bundle = bundle_of(r.cpus, r.gpus)
        if r.count < 1 or not bundle:
            continue
        bundle.update(custom)
        strategy = learner_strategy if r.key == "learner" else ROLE_STRATEGIES.get(r.key, "PACK")
        plans.append(GroupPlan(r.key, r.name, [dict(bundle) for _ in range(r.count)], strategy))
    return plans


def _fits(need: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def _show(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items())) or "nothing"


def unplaceable(plans: list[GroupPlan], nodes: list[dict[str, float]]) -> list[str]:
    """Why each unplaceable bundle (or STRICT_PACK group) cannot be placed on ``nodes`` (their total
    resources); empty when every group can be."""
    problems = []
    largest = "; ".join(_show({k: v for k, v in n.items() if k in ("CPU", "GPU")}) for n in nodes) or "no nodes"
    for p in plans:
        for i, b in enumerate(p.bundles):
            if not any(_fits(b, n) for n in nodes):
                problems.append(f"{p.name} bundle {i} ({_show(b)}) is larger than every node ({largest})")
                break
        else:
            if p.strategy == "STRICT_PACK":
                total = {k: sum(b.get(k, 0.0) for b in p.bundles) for k in {k for b in p.bundles for k in b}}
                if not any(_fits(total, n) for n in nodes):
                    shown = _show({k: v for k, v in total.items() if k in ("CPU", "GPU")})
                    hint = "lower the tensor-parallel size or add a node with that many GPUs" \
                        if p.engine is not None else "use ray.learner_strategy=PACK or fewer ranks"
                    problems.append(f"{p.name}: STRICT_PACK needs {shown} on one node, and no node has "
                                    f"that ({largest}); {hint}")
    return problems


def live_nodes() -> list[dict[str, float]]:
    """The total resources of each live node of the connected Ray."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def check_placeable(plans: list[GroupPlan]) -> None:
    """Raise RuntimeError, naming every unplaceable bundle, before anything is reserved."""
    problems = unplaceable(plans, live_nodes())
    if problems:
        raise RuntimeError("the Ray cluster cannot place these roles:\n  " + "\n  ".join(problems)
                           + "\n" + plan_text(plans))


def plan_text(plans: list[GroupPlan], node_of: dict[str, list[str]] | None = None) -> str:
    """One line per bundle: role (an engine's group: role and actor), index, resources, strategy and (once placed)
    the node's address; ``node_of`` is keyed by :attr:`GroupPlan.group`."""
    lines = []
    for p in plans:
        nodes = (node_of or {}).get(p.group)
        for i, b in enumerate(p.bundles):
            where = f" on node {nodes[i]}" if nodes else ""
            lines.append(f"  {p.name:<16} bundle {i}: {_show(b)} ({p.strategy}){where}")
    return "\n".join(lines) if lines else "  (no role reserves resources)"


@dataclass
class Reservation:
    """The created groups and the node of each of their bundles (by :attr:`GroupPlan.group`), and each role's
    actors' options (by role key, one per actor in order)."""

    groups: dict
    actor_options: dict[str, list[dict]]
    node_of: dict[str, list[str]]

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups.values():
            remove_placement_group(pg)
        self.groups = {}


def _bundle_nodes(pg) -> list[str]:
    """The node each bundle of ``pg`` sits on: its address and the start of its id (nodes may share an address)."""
    import ray
    from ray.util.placement_group import placement_group_table

    address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    by_index = placement_group_table(pg)["bundles_to_node_id"]
    return [f"{address.get(by_index.get(i), '?')} ({str(by_index.get(i))[:8]})" for i in range(len(by_index))]


def reserve(plans: list[GroupPlan], timeout_s: float = 60.0) -> Reservation:
    """Check the plans (:func:`check_placeable`), create their groups and wait until they are placed."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    check_placeable(plans)
    groups = {p.group: placement_group(p.bundles, strategy=p.strategy) for p in plans}
    reservation = Reservation(groups, {}, {})
    ready, _ = ray.wait([pg.ready() for pg in groups.values()], num_returns=len(groups), timeout=timeout_s)
    if len(ready) < len(groups):
        reservation.release()
        raise RuntimeError(f"Ray did not place every role's placement group within {timeout_s:g} s (resources "
                           f"held by other jobs?):\n{plan_text(plans)}")
    for p in plans:
        pg = groups[p.group]
        if p.engine is None:
            reservation.actor_options[p.key] = [
                {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)}
                for i in range(len(p.bundles))]
        else:  # the worker actor in bundle 0; vLLM's shard workers find the group through it (module doc)
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0,
                                                        placement_group_capture_child_tasks=True)
            reservation.actor_options.setdefault(p.key, []).append({"scheduling_strategy": strategy})
        reservation.node_of[p.group] = _bundle_nodes(pg)
    return reservation
