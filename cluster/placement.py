"""Placement groups: one per role, built from the config, checked against the nodes before any actor starts.

Each actor of a role gets one bundle (the CPUs and GPUs it reserves). The group's strategy says how the bundles of a role share
nodes: the learner's ranks ``PACK`` (``STRICT_PACK`` with
``ray.learner_strategy``), so that a data-parallel group stays on one node
where it fits; a rollout engine per bundle, packed; reward actors ``SPREAD``.
A role whose actors reserve nothing gets no group (Ray refuses empty bundles).

:func:`check_placeable` refuses, with one line per problem, a bundle larger
than every live node (or a ``STRICT_PACK`` group larger than every node):
Ray would otherwise leave the group pending forever. :func:`reserve` creates
the groups, waits until Ray has placed them (removing them all and raising
if that does not happen in time) and returns, per role, the ``.options``
of each actor (``PlacementGroupSchedulingStrategy`` with its bundle index),
which the pools of the lower floors take as ``actor_options``. Ray is imported
inside the functions that need it (it takes seconds; the plan and its checks
need none of it).

Not covered: an engine with ``tensor_parallel_size > 1`` is a worker actor that
reserves ``rollout.gpus_per_worker`` (0) in its bundle; vLLM's own Ray executor
places its shard workers outside the group.
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


def bundle_of(cpus: float, gpus: float) -> dict[str, float]:
    """One actor's bundle; zero amounts left out."""
    return {k: float(v) for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}


def group_plans(roles, learner_strategy: str = "PACK",
                role_resources: dict[str, dict[str, float]] | None = None) -> list[GroupPlan]:
    """A group per role of ``roles`` (``cluster.ray_setup.Role`` with a ``key``); roles that reserve nothing
    get none. ``role_resources[key]`` (custom node resources, e.g. ``{"rollout": 1}``) is added to every bundle
    of that role, so its actors go only to nodes that offer it."""
    if learner_strategy not in LEARNER_STRATEGIES:
        raise ValueError(f"learner placement strategy must be one of {LEARNER_STRATEGIES}, got {learner_strategy!r}")
    plans = []
    for r in roles:
        bundle = bundle_of(r.cpus, r.gpus)
        if r.count < 1 or not bundle:
            continue
        bundle.update({k: float(v) for k, v in (role_resources or {}).get(r.key, {}).items()})
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
                total = {k: sum(b.get(k, 0.0) for b in p.bundles) for k in ("CPU", "GPU")}
                total = {k: v for k, v in total.items() if v > 0}
                if not any(_fits(total, n) for n in nodes):
                    problems.append(f"{p.name}: STRICT_PACK needs {_show(total)} on one node, and no node has "
                                    f"that ({largest}); use ray.learner_strategy=PACK or fewer ranks")
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
    """One line per bundle: role, index, resources, strategy and (once placed) the node's address."""
    lines = []
    for p in plans:
        nodes = (node_of or {}).get(p.key)
        for i, b in enumerate(p.bundles):
            where = f" on node {nodes[i]}" if nodes else ""
            lines.append(f"  {p.name:<16} bundle {i}: {_show(b)} ({p.strategy}){where}")
    return "\n".join(lines) if lines else "  (no role reserves resources)"


@dataclass
class Reservation:
    """The created groups (by role key), their actors' options, and the node of each bundle."""

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
    groups = {p.key: placement_group(p.bundles, strategy=p.strategy) for p in plans}
    reservation = Reservation(groups, {}, {})
    ready, _ = ray.wait([pg.ready() for pg in groups.values()], num_returns=len(groups), timeout=timeout_s)
    if len(ready) < len(groups):
        reservation.release()
        raise RuntimeError(f"Ray did not place every role's placement group within {timeout_s:g} s (resources "
                           f"held by other jobs?):\n{plan_text(plans)}")
    for p in plans:
        pg = groups[p.key]
        reservation.actor_options[p.key] = [
            {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)}
            for i in range(len(p.bundles))]
        reservation.node_of[p.key] = _bundle_nodes(pg)
    return reservation
