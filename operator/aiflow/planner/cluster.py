"""The cluster as the planner sees it: per tier nodes, speed, load and memory; per link bandwidth and RTT.

The operator builds it from Nodes, metrics and link probes; `aiflow plan --cluster FILE` reads it from a
cluster snapshot (kind `ClusterSnapshot`, documented in docs/planner.md). Both go through `cluster_state`,
which fills every directed link between tiers and records where each number came from.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from aiflow import TIERS
from aiflow.planner.documents import DocumentError, check_schema, read_document

# Where a number came from.
MEASURED, DECLARED, DEFAULT, COMPOSED = "measured", "declared", "default", "composed"

# A tier loaded beyond this is treated as this loaded: compute time stays bounded (at most 20x).
UTILISATION_CAP = 0.95

# Links nobody declared or measured: a modest access link and a fast backbone.
DEFAULT_LINKS = {("device", "edge"): (10.0, 20.0), ("edge", "cloud"): (100.0, 30.0)}


class ClusterError(DocumentError):
    """A cluster snapshot the planner cannot use."""


@dataclass(frozen=True)
class TierState:
    """One tier's node pool. `memory_mib` is the allocatable memory of its largest Ready node (a stage
    must fit on one node); `compute_factor` multiplies the profile's reference milliseconds."""

    tier: str
    nodes: int = 0
    ready_nodes: int = 0
    compute_factor: float = 1.0
    utilisation: float = 0.0
    memory_mib: float = 0.0  # 0: unknown, does not constrain
    source: str = DECLARED
    busy: float = 0.0  # share of time the tier's stage instances compute (Triton's compute metric)

    @property
    def available(self) -> bool:
        return self.ready_nodes > 0

    @property
    def slowdown(self) -> float:
        """How many times longer than at reference speed a piece of work takes here now."""
        return self.compute_factor / (1.0 - min(max(self.utilisation, 0.0), UTILISATION_CAP))

    @property
    def queueing(self) -> float:
        """Expected wait in the tier's Triton queue per unit of service time, from how busy its stage
        instances are (M/M/1: rho / (1 - rho), rho capped like the CPU load): a request arriving at a
        stage there waits this many times its own compute before it starts."""
        rho = min(max(self.busy, 0.0), UTILISATION_CAP)
        return rho / (1.0 - rho)


@dataclass(frozen=True)
class LinkState:
    """The network from tier `src` to tier `dst`. `via` lists the physical links a message crosses (a
    composed device->cloud link crosses device->edge and edge->cloud)."""

    src: str
    dst: str
    bandwidth_mbps: float
    rtt_ms: float
    source: str = DECLARED
    via: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ClusterState:
    tiers: Mapping[str, TierState]
    links: Mapping[tuple[str, str], LinkState]  # every ordered pair of distinct tiers

    def tier(self, name: str) -> TierState:
        return self.tiers[name]

    def link(self, src: str, dst: str) -> LinkState:
        return self.links[(src, dst)]


def cluster_state(
    tiers: Iterable[TierState],
    observed_links: Iterable[LinkState] = (),
    declared_links: Iterable[LinkState] = (),
) -> ClusterState:
    """Assemble the view. A link direction takes, in order: an observed value for it or its reverse, a
    declared value for it or its reverse, for device<->cloud the series composition of the two hops
    (bandwidth 1/(1/a+1/b), RTTs added: the message is relayed through the edge), else a default."""
    by_tier = {t.tier: t for t in tiers}
    unknown = sorted(set(by_tier) - set(TIERS))
    if unknown:
        raise ClusterError(f"unknown tier(s) {unknown}; tiers are {list(TIERS)}")
    full = {t: by_tier.get(t, TierState(tier=t, source=DEFAULT)) for t in TIERS}
    observed = {(l.src, l.dst): l for l in observed_links}
    declared = {(l.src, l.dst): l for l in declared_links}

    def given(a: str, b: str) -> LinkState | None:
        for table in (observed, declared):
            for key in ((a, b), (b, a)):
                if key in table:
                    found = table[key]
                    return LinkState(a, b, found.bandwidth_mbps, found.rtt_ms, found.source, ((a, b),))
        return None

    links: dict[tuple[str, str], LinkState] = {}
    for a, b in (("device", "edge"), ("edge", "cloud")):
        for src, dst in ((a, b), (b, a)):
            bw, rtt = DEFAULT_LINKS[(a, b)]
            links[(src, dst)] = given(src, dst) or LinkState(src, dst, bw, rtt, DEFAULT, ((src, dst),))
    for src, dst, mid in (("device", "cloud", "edge"), ("cloud", "device", "edge")):
        first, second = links[(src, mid)], links[(mid, dst)]
        links[(src, dst)] = given(src, dst) or LinkState(
            src,
            dst,
            1.0 / (1.0 / first.bandwidth_mbps + 1.0 / second.bandwidth_mbps),
            first.rtt_ms + second.rtt_ms,
            f"{COMPOSED} ({first.source} + {second.source})",
            ((src, mid), (mid, dst)),
        )
    return ClusterState(tiers=MappingProxyType(full), links=MappingProxyType(links))


_SOURCE = {"enum": [MEASURED, DECLARED, DEFAULT]}
_LINK_SCHEMA = {
    "type": "object",
    "required": ["from", "to", "bandwidthMbps"],
    "additionalProperties": False,
    "properties": {
        "from": {"enum": list(TIERS)},
        "to": {"enum": list(TIERS)},
        "bandwidthMbps": {"type": "number", "exclusiveMinimum": 0},
        "rttMs": {"type": "number", "minimum": 0},
        "source": _SOURCE,
    },
}
_SCHEMA = {
    "type": "object",
    "required": ["kind", "tiers"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"const": "ClusterSnapshot"},
        "note": {"type": "string"},
        "tiers": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                t: {
                    "type": "object",
                    "required": ["nodes"],
                    "additionalProperties": False,
                    "properties": {
                        "nodes": {"type": "integer", "minimum": 0},
                        "readyNodes": {"type": "integer", "minimum": 0},
                        "computeFactor": {"type": "number", "exclusiveMinimum": 0},
                        "utilisation": {"type": "number", "minimum": 0, "maximum": 1},
                        "busy": {"type": "number", "minimum": 0, "maximum": 1},
                        "memoryMiB": {"type": "number", "minimum": 0},
                        "source": _SOURCE,
                    },
                }
                for t in TIERS
            },
        },
        "links": {"type": "array", "items": _LINK_SCHEMA},
    },
}


def link_from_dict(doc: Mapping, source: str) -> LinkState:
    """One link entry (`from`, `to`, `bandwidthMbps`, `rttMs`) as in the snapshot and in spec.links."""
    return LinkState(
        src=doc["from"],
        dst=doc["to"],
        bandwidth_mbps=float(doc["bandwidthMbps"]),
        rtt_ms=float(doc.get("rttMs", 0.0)),
        source=doc.get("source", source),
    )


def cluster_from_snapshot(doc: Any, declared_links: Iterable[LinkState] = (), where: str = "cluster snapshot") -> ClusterState:
    """Validate a parsed ClusterSnapshot and build the view; `declared_links` (from the flow's
    spec.links) fill the links the snapshot does not give."""
    try:
        check_schema(doc, _SCHEMA, where)
    except DocumentError as exc:
        raise ClusterError(str(exc)) from exc
    tiers = []
    for name, t in doc["tiers"].items():
        ready = t.get("readyNodes", t["nodes"])
        if ready > t["nodes"]:
            raise ClusterError(f"invalid {where}: tiers.{name}.readyNodes ({ready}) exceeds tiers.{name}.nodes ({t['nodes']})")
        tiers.append(
            TierState(
                tier=name,
                nodes=t["nodes"],
                ready_nodes=ready,
                compute_factor=float(t.get("computeFactor", 1.0)),
                utilisation=float(t.get("utilisation", 0.0)),
                busy=float(t.get("busy", 0.0)),
                memory_mib=float(t.get("memoryMiB", 0.0)),
                source=t.get("source", DECLARED),
            )
        )
    links = [link_from_dict(l, DECLARED) for l in doc.get("links", [])]
    pairs = [(l.src, l.dst) for l in links]
    for i, link in enumerate(links):
        if link.src == link.dst:
            raise ClusterError(f"invalid {where}: links[{i}] joins {link.src!r} to itself; a link joins two different tiers")
        if pairs.count((link.src, link.dst)) > 1:
            raise ClusterError(f"invalid {where}: links[{i}] declares {link.src}->{link.dst} more than once")
    return cluster_state(tiers, observed_links=links, declared_links=declared_links)


def load_cluster(path: str | Path, declared_links: Iterable[LinkState] = ()) -> ClusterState:
    """Read a cluster snapshot file; ClusterError says what to fix."""
    try:
        doc = read_document(path, "cluster snapshot")
    except DocumentError as exc:
        raise ClusterError(str(exc)) from exc
    return cluster_from_snapshot(doc, declared_links, where=f"cluster snapshot {path}")


@functools.lru_cache(maxsize=256)
def quantity_mib(quantity: str) -> float:
    """A Kubernetes memory quantity ("1Gi", "512M") in MiB; ValueError when it is not one."""
    from kubernetes.utils import parse_quantity

    return float(parse_quantity(quantity)) / 2**20


def tier_states_from_nodes(nodes: Iterable, source: str = MEASURED) -> list[TierState]:
    """Tier states from the operator's `aiflow.api.cluster.NodeInfo`s: node and usable-node counts and
    the largest usable node's allocatable memory. Speed and load stay at their defaults until
    measured (pass them on with dataclasses.replace)."""
    states = []
    for tier in TIERS:
        members = [n for n in nodes if n.tier == tier]
        usable = [n for n in members if n.usable]
        memory = []
        for node in usable:
            try:
                memory.append(quantity_mib(node.allocatable["memory"]))
            except (KeyError, ValueError):
                continue  # no or garbage allocatable memory: this node does not bound the tier
        states.append(
            TierState(tier, nodes=len(members), ready_nodes=len(usable), memory_mib=max(memory, default=0.0), source=source)
        )
    return states


def declared_links(flow) -> list[LinkState]:
    """The links an `aiflow.api.spec.Flow` declares in spec.links."""
    return [LinkState(l.from_tier, l.to_tier, l.bandwidth_mbps, l.rtt_ms, DECLARED) for l in flow.links]
