"""Where each stage of a flow runs: the seam between the operator and the planner.

`resolve_placement(flow, cluster)` is the one call the operator and `aiflow render` make. The rule
behind it is deliberately simple for now; the planner replaces it behind the same call.

The rule: a stage pinned to a tier stays there. An `auto` stage, walking the flow in order:
- the first stage goes to the lowest tier that has nodes (device, then edge, then cloud): requests
  are born on devices, so raw pixels stay off the links;
- a later stage goes one tier up from the previous stage (the next higher tier that has nodes),
  because later stages are the heavier ones; when no higher tier has nodes it stays on the previous
  stage's tier, and when that has none either, it takes the highest tier that has nodes.
Partition knobs (split layer, codec, decoding) pass through from the spec unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiflow import TIERS
from aiflow.api.cluster import ClusterView
from aiflow.api.spec import AUTO, Flow, StageParameters


@dataclass(frozen=True)
class StagePlacement:
    stage: str
    tier: str
    reason: str  # why this tier, one line for status and Events
    parameters: StageParameters = StageParameters()


@dataclass(frozen=True)
class Placement:
    stages: tuple[StagePlacement, ...]

    def of(self, stage: str) -> StagePlacement:
        return next(p for p in self.stages if p.stage == stage)

    @property
    def summary(self) -> str:
        """`head:device, drafter:edge, verifier:cloud`."""
        return ", ".join(f"{p.stage}:{p.tier}" for p in self.stages)


def resolve_placement(flow: Flow, cluster: ClusterView) -> Placement:
    """The tier and knobs of every stage. Raises ValueError when an `auto` stage has no tier with
    nodes (validation reports that first, with what to fix)."""
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
    return Placement(tuple(placed))
