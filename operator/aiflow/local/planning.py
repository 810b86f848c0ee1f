"""A planner Plan on the local runtime: the cluster the planner sees there, the captioning flows it
plans, which options can run there, and the chain of stages (a Scheme) an option runs as.

`aiflow up --adaptive` and the benchmarks (bench/planner_accuracy.py, bench/sweep.py) use these, so
a plan maps onto the local runtime one way. All functions here are pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from aiflow import TIERS
from aiflow.api.spec import Flow, parse_flow
from aiflow.local.links import LinkConfig
from aiflow.local.schemes import Conditions, Placement, Scheme
from aiflow.planner.cluster import DECLARED, ClusterState, LinkState, TierState, cluster_state
from aiflow.planner.solver import Plan

UNSHAPED_MBPS = 10_000.0  # an unshaped emulated link, as the planner sees it
SCHEME_NAME = "adaptive"
FLOWS = {  # the captioning flows the local runtime can plan: name -> stage models, every stage `auto`
    "spec": ("vision_head", "caption_drafter", "caption_verifier"),
    "split": ("vision_head", "caption_decoder"),
    "whole": ("captioner",),
}


# ---- the cluster the planner sees ------------------------------------------------------------------


def _mbps(bits_per_s: float | None) -> float:
    return UNSHAPED_MBPS if bits_per_s is None else bits_per_s / 1e6


def cluster_of(links: Mapping[str, LinkConfig], compute_factors: Mapping[str, float]) -> ClusterState:
    """The local runtime as the planner's cluster: one Ready node per running tier with its compute
    factor; per link ("device->edge") the up direction from the lower tier, the down one back, both
    with the round trip (latency up + down). Tiers not running have no node."""
    tiers = [TierState(t, nodes=1, ready_nodes=1, compute_factor=float(f), source=DECLARED)
             for t, f in compute_factors.items()]
    states = []
    for name, config in links.items():
        low, _, high = name.partition("->")
        rtt_ms = (config.latency_up + config.latency_down) * 1e3
        states += [LinkState(low, high, _mbps(config.bandwidth_up), rtt_ms, DECLARED),
                   LinkState(high, low, _mbps(config.bandwidth_down), rtt_ms, DECLARED)]
    return cluster_state(tiers, declared_links=states)


def conditions_cluster(c: Conditions) -> ClusterState:
    """The planner's view of emulated `Conditions` as measured: one node per tier, its compute factor,
    no load; the two physical links (device->cloud is composed through the edge, as the runtime
    routes it)."""
    factors = c.compute_factors()
    tiers = [TierState(t, nodes=1, ready_nodes=1, compute_factor=factors[t], source="measured") for t in TIERS]
    links = [
        LinkState("device", "edge", c.uplink_mbps, c.rtt_ms, "measured"),
        LinkState("edge", "cloud", c.edge_uplink_mbps, c.edge_rtt_ms, "measured"),
    ]
    return cluster_state(tiers, observed_links=links)


# ---- the flows it plans, and what can run ----------------------------------------------------------


def flow_of(name: str, models: tuple[str, ...]) -> Flow:
    """A flow of `models` in order, every stage `auto`, each stage named by its model's last word."""
    stages = [{"name": m.split("_")[-1], "model": m, "tier": "auto"} for m in models]
    doc = {"apiVersion": "aiflow.io/v1alpha1", "kind": "AIFlow", "metadata": {"name": name}, "spec": {"stages": stages}}
    return parse_flow(doc)


def runnable(tiers: tuple[str, ...]) -> bool:
    """The local runtime's links carry calls from a lower tier to a higher one (or within a tier)."""
    order = [TIERS.index(t) for t in tiers]
    return all(a <= b for a, b in zip(order, order[1:]))


def describe_option(result: Plan, option) -> str:
    """One line for a plan option: `stage@tier > ...`, then split layer, codec, decoding."""
    c = option.candidate
    parts = [" > ".join(f"{s}@{t}" for s, t in zip(result.stages, c.tiers))]
    if c.split is not None:
        parts.append(f"s{c.split}")
    if c.codec:
        parts.append(c.codec)
    parts.append(c.decoding)
    return " ".join(parts)


# ---- the chain a plan runs as ----------------------------------------------------------------------


def copy_name(model: str, revision: int) -> str:
    """The name a revision's copy of a model_repo/ model is loaded under."""
    return f"{model}.r{revision}"


def source_model(name: str) -> str:
    """The model_repo/ model a copy was made from (`vision_head.r2` -> `vision_head`)."""
    base, sep, number = name.rpartition(".r")
    return base if sep and number.isdigit() else name


def scheme_of(result: Plan, flow: Flow, revision: int) -> Scheme:
    """The chain a plan runs as on the local runtime: each stage's model copy on the planned tier, with
    the planned split layer, codec and decoding as load-time parameters."""
    chain = []
    for stage in flow.stages:
        params = result.parameters(stage.name).as_env()
        chain.append(Placement(result.tier_of(stage.name), copy_name(stage.model, revision), params))
    return Scheme(f"{SCHEME_NAME}-r{revision}", result.reason, tuple(chain))


def option_scheme(result: Plan, option) -> Scheme:
    """A plan option (the chosen one or an alternative) as a local scheme of model_repo/ models: each
    stage on its tier with the option's knobs, named by `describe_option`."""
    as_chosen = dataclasses.replace(result, chosen=option)
    chain = tuple(
        Placement(tier, option.estimate.stages[i].model, as_chosen.parameters(stage).as_env())
        for i, (stage, tier) in enumerate(zip(result.stages, option.candidate.tiers))
    )
    name = describe_option(result, option)
    return Scheme(name, name, chain)


__all__ = [
    "FLOWS", "SCHEME_NAME", "UNSHAPED_MBPS", "cluster_of", "conditions_cluster", "copy_name", "describe_option",
    "flow_of", "option_scheme", "runnable", "scheme_of", "source_model",
]
