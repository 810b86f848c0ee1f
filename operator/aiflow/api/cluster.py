"""What the operator knows about the cluster when it places a flow: the nodes of each tier.

Built from Node objects (the operator lists them; `aiflow render --nodes` reads them from a file) or
from a short `tiers:` map for offline use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiflow import TIER_LABEL, TIERS


@dataclass(frozen=True)
class NodeInfo:
    """A node labelled with a tier. `usable` = Ready (or no Ready condition reported) and not
    cordoned."""

    name: str
    tier: str
    usable: bool = True
    allocatable: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterView:
    """The nodes of every tier; nodes without a valid tier label are not part of any tier."""

    nodes: tuple[NodeInfo, ...] = ()

    def usable_nodes(self, tier: str) -> list[NodeInfo]:
        return [n for n in self.nodes if n.tier == tier and n.usable]

    def has_nodes(self, tier: str) -> bool:
        return bool(self.usable_nodes(tier))

    @property
    def tiers_with_nodes(self) -> tuple[str, ...]:
        return tuple(t for t in TIERS if self.has_nodes(t))

    @classmethod
    def every_tier(cls) -> "ClusterView":
        """A cluster with one usable node per tier: the assumption of offline rendering."""
        return cls(tuple(NodeInfo(name=f"{t}-node", tier=t) for t in TIERS))


def node_info(node: dict) -> NodeInfo | None:
    """A Node object (dict) -> NodeInfo, or None when it carries no valid tier label."""
    meta = node.get("metadata") or {}
    tier = (meta.get("labels") or {}).get(TIER_LABEL)
    if tier not in TIERS:
        return None
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = all(c.get("status") == "True" for c in conditions if c.get("type") == "Ready")
    cordoned = bool((node.get("spec") or {}).get("unschedulable"))
    allocatable = {k: str(v) for k, v in ((node.get("status") or {}).get("allocatable") or {}).items()}
    return NodeInfo(name=meta.get("name", ""), tier=tier, usable=ready and not cordoned, allocatable=allocatable)


def cluster_from_nodes(nodes: list[dict]) -> ClusterView:
    """Node objects -> ClusterView (nodes without a tier label are ignored)."""
    infos = [node_info(n) for n in nodes]
    return ClusterView(tuple(sorted((i for i in infos if i), key=lambda i: (i.tier, i.name))))


def cluster_from_document(doc) -> ClusterView:
    """Reads a nodes file: a list of Node objects, a `kind: List`/`NodeList` with `items`, or a
    `tiers:` map from tier to a node count or a list of node names, e.g. `tiers: {device: 1, edge: 2,
    cloud: 0}`. Raises ValueError with what is wrong."""
    if isinstance(doc, list):
        return cluster_from_nodes(doc)
    if not isinstance(doc, dict):
        raise ValueError("expected a list of Node objects, a NodeList, or a mapping with `tiers:`")
    if "items" in doc:
        return cluster_from_nodes(doc.get("items") or [])
    if doc.get("kind") == "Node":
        return cluster_from_nodes([doc])
    tiers = doc.get("tiers")
    if not isinstance(tiers, dict):
        raise ValueError("expected a list of Node objects, a NodeList, or a mapping with `tiers:`")
    nodes = []
    for tier, spec in tiers.items():
        if tier not in TIERS:
            raise ValueError(f"tiers.{tier}: unknown tier; use one of: {', '.join(TIERS)}")
        if isinstance(spec, bool) or not isinstance(spec, (int, list)):
            raise ValueError(f"tiers.{tier}: give a node count or a list of node names")
        names = [f"{tier}-{i}" for i in range(spec)] if isinstance(spec, int) else [str(n) for n in spec]
        nodes.extend(NodeInfo(name=n, tier=tier) for n in names)
    return ClusterView(tuple(nodes))
