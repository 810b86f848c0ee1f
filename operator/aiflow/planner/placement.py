"""Where each stage of a flow runs: the seam between the operator and the planner.

`resolve_placement(flow, cluster, state=None)` is the one call the operator and `aiflow render` make.
It asks the planner (`solver.plan`) for the tier of every stage and the partition knobs, on the
cluster state given (the operator's observations: speed, load, measured links) or, without one, on
what the nodes alone say (counts, readiness, memory; declared links). Knobs the spec pins win over
the planner's (the planner respects them anyway). The flow's quality floor is
`spec.objective.minQuality`.

When the planner cannot plan the flow (a model it has no cost model for, a quality floor nothing
reaches, an unreadable profile), a simple rule places it instead and `Placement.note` says why.
The rule: a stage pinned to a tier stays there. An `auto` stage, walking the flow in order:
- the first stage goes to the lowest tier that has nodes (device, then edge, then cloud): requests
  are born on devices, so raw pixels stay off the links;
- a later stage goes one tier up from the previous stage (the next higher tier that has nodes),
  because later stages are the heavier ones; when no higher tier has nodes it stays on the previous
  stage's tier, and when that has none either, it takes the highest tier that has nodes.
Partition knobs (split layer, codec, decoding) pass through from the spec unchanged.
"""

from __future__ import annotations

import functools
import os

from aiflow import TIERS
from aiflow.api.cluster import ClusterView
from aiflow.api.placement import Placement, StagePlacement
from aiflow.api.spec import AUTO, Flow, StageParameters
from aiflow.planner.cluster import ClusterState, cluster_state, declared_links, tier_states_from_nodes
from aiflow.planner.cost import Candidate
from aiflow.planner.problem import PlanError, Problem
from aiflow.planner.profile import Profile, ProfileError, load_profile
from aiflow.planner.solver import Plan, assess, plan

# A profile file that replaces the shipped default (e.g. one `aiflow profile` measured, mounted from
# its ConfigMap).
PROFILE_ENV = "AIFLOW_PLANNER_PROFILE"


@functools.lru_cache(maxsize=4)
def _profile(path: str) -> Profile:
    return load_profile(path or None)


def planner_profile() -> Profile:
    """The profile the operator plans with: $AIFLOW_PLANNER_PROFILE, else the shipped default."""
    return _profile(os.environ.get(PROFILE_ENV, ""))


def node_state(flow: Flow, cluster: ClusterView) -> ClusterState:
    """The planner's view from the nodes alone: counts, readiness, memory, and the declared links."""
    return cluster_state(tier_states_from_nodes(cluster.nodes), declared_links=declared_links(flow))


def problem_of(flow: Flow, state: ClusterState) -> Problem:
    return Problem(flow, state, planner_profile(), min_quality=flow.objective.min_quality)


def placement_of(flow: Flow, result: Plan) -> Placement:
    """A plan as a Placement: the plan's tiers, its knobs under the ones the spec pins."""
    stages = []
    for stage in flow.stages:
        pinned, planned = stage.parameters, result.parameters(stage.name)
        knobs = StageParameters(
            split_layer=pinned.split_layer if pinned.split_layer is not None else planned.split_layer,
            codec=pinned.codec or planned.codec,
            decoding=pinned.decoding or planned.decoding,
        )
        reason = f"pinned to {stage.tier} by the spec" if stage.tier != AUTO else "auto: chosen by the planner"
        stages.append(StagePlacement(stage.name, result.tier_of(stage.name), reason, knobs))
    return Placement(tuple(stages), plan=result)


def plan_flow(flow: Flow, state: ClusterState) -> Plan:
    """The planner's best plan of `flow` on `state`; PlanError (or ProfileError) when there is none."""
    return plan(problem_of(flow, state))


def assess_candidate(flow: Flow, state: ClusterState, candidate: Candidate) -> Plan:
    """A deployed candidate under `state` (see `solver.assess`)."""
    return assess(problem_of(flow, state), candidate)


def resolve_placement(flow: Flow, cluster: ClusterView, state: ClusterState | None = None) -> Placement:
    """The tier and knobs of every stage: the planner's, or the simple rule's when the planner cannot
    plan the flow. Raises ValueError when an `auto` stage has no tier with nodes (validation reports
    that first, with what to fix)."""
    try:
        return placement_of(flow, plan_flow(flow, state or node_state(flow, cluster)))
    except (PlanError, ProfileError) as exc:
        return simple_placement(flow, cluster, f"the planner could not plan the flow: {exc}")


def simple_placement(flow: Flow, cluster: ClusterView, note: str = "") -> Placement:
    """The simple rule of the module docstring."""
    available = [TIERS.index(t) for t in cluster.tiers_with_nodes]
    placed: list[StagePlacement] = []
    previous: int | None = None
    for stage in flow.stages:
        if stage.tier != AUTO:
            tier, reason = stage.tier, f"pinned to {stage.tier} by the spec"
        elif not available:
            raise ValueError(f"stage {stage.name!r} is auto but no tier has nodes")
        elif previous is None:
            tier, reason = TIERS[min(available)], "auto: lowest tier with nodes, where requests are born"
        else:
            higher = [t for t in available if t > previous]
            if higher:
                tier, reason = TIERS[min(higher)], f"auto: next tier up from {TIERS[previous]} with nodes"
            elif previous in available:
                tier, reason = TIERS[previous], f"auto: no higher tier has nodes; stays on {TIERS[previous]}"
            else:
                tier, reason = TIERS[max(available)], "auto: highest tier with nodes"
        placed.append(StagePlacement(stage.name, tier, reason, stage.parameters))
        previous = TIERS.index(tier)
    return Placement(tuple(placed), note=note)
