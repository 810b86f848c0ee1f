"""What the operator observes of the cluster for planning: the nodes of each tier, their speed and
load, and the links between tiers.

- Nodes by the label `aiflow.io/tier`: Ready and schedulable, allocatable memory.
- Speed: the node label or annotation `aiflow.io/compute-factor`, the planner's `computeFactor`: how
  many times longer than on the profile's reference machine a piece of work takes on this node
  (0.5 = twice as fast, 8 = eight times slower); 1 when absent. A tier takes the median of its
  usable nodes.
- Load: CPU usage from metrics.k8s.io (metrics-server) over the node's allocatable CPU; a tier takes
  the mean of its usable nodes. Without metrics-server (the API is not served) or on errors, load
  counts as 0 and the observation says so.
- Links: the link probe's ConfigMaps (one per node, labelled `aiflow.linkprobe.MEASUREMENT_LABELS`,
  in the namespace `AIFLOW_LINK_NAMESPACE` names; read by `read_link_measurements`, attached to the
  node records by `with_links`); the link from tier A to tier B is the median over A's usable nodes of
  what they measured towards B. A measurement older than its `valid-seconds` is stale and not used.
  Links nobody measured (or only long ago) take the flow's declared `spec.links` (the planner's
  `cluster_state` does that), and the notes say which measurement expired.

Garbage (a factor that is not a positive number, a negative or unparsable measurement, a 500 from
the metrics API) is never raised: it is left out, the planner falls back, and `notes` say what was
left out, for the flow's status.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from dataclasses import dataclass, field, replace

from kubernetes.utils import parse_quantity

from aiflow import TIER_LABEL, TIERS
from aiflow.api.cluster import ClusterView, NodeInfo, node_info
from aiflow.controller.kube import CONFIGMAPS, NODES, ApiError, KubeApi, Resource
from aiflow.linkprobe import MEASUREMENT_LABELS, Link, Published, read_measurements
from aiflow.planner.cluster import MEASURED, LinkState, TierState, tier_states_from_nodes
from aiflow.render.names import selector_string

COMPUTE_FACTOR = "aiflow.io/compute-factor"
NODE_METRICS_GROUP = "/apis/metrics.k8s.io/v1beta1"
NODE_METRICS = Resource("metrics.k8s.io/v1beta1", "nodes", namespaced=False)


@dataclass(frozen=True)
class NodeRecord:
    """One tier node as the planner needs it (built from the Node object, pure)."""

    info: NodeInfo
    compute_factor: float | None = None  # None: not given (or garbage, see `problems`)
    links: tuple[tuple[str, Link], ...] = ()  # (destination tier, measurement)
    problems: tuple[str, ...] = ()


def _positive(raw) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def node_record(node: dict) -> NodeRecord | None:
    """A Node object -> NodeRecord, or None when it carries no valid tier label."""
    info = node_info(node)
    if info is None:
        return None
    meta = node.get("metadata") or {}
    annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
    labels = meta.get("labels") or {}
    problems = []
    factor = None
    raw = annotations.get(COMPUTE_FACTOR, labels.get(COMPUTE_FACTOR))
    if raw is not None:
        factor = _positive(raw)
        if factor is None:
            problems.append(f"node {info.name}: {COMPUTE_FACTOR}={raw!r} is not a positive number; using 1")
    return NodeRecord(info, factor, (), tuple(problems))


def read_link_measurements(api: KubeApi, namespace: str) -> tuple[tuple[Published, ...], tuple[str, ...]]:
    """The link probes' ConfigMaps in `namespace`, read back; notes on what could not be read."""
    try:
        items = api.list(CONFIGMAPS.path(namespace), selector_string(MEASUREMENT_LABELS))
    except (ApiError, OSError, ValueError) as exc:
        return (), (f"link measurements: cannot list ConfigMaps in {namespace} ({exc}); using declared links",)
    published = [read_measurements({str(k): str(v) for k, v in ((item or {}).get("data") or {}).items()})
                 for item in items]
    return tuple(p for p in published if p is not None), ()


def with_links(records, published, now: dt.datetime) -> tuple[list[NodeRecord], tuple[str, ...]]:
    """Node records with the fresh links their node's probe published (towards other tiers), and
    notes on every measurement left out: garbage, or stale (older than its `valid-seconds`)."""
    by_node = {p.node: p for p in published}
    out, notes = [], []
    for record in records:
        mine = by_node.get(record.info.name)
        if mine is None:
            out.append(record)
            continue
        fresh, stale = mine.fresh(now)
        links = tuple(sorted((t, l) for t, l in fresh.items() if t != record.info.tier))
        notes += list(mine.problems) + list(stale)
        out.append(replace(record, links=links))
    return out, tuple(notes)


def records_from_nodes(nodes: list[dict]) -> list[NodeRecord]:
    records = [node_record(n) for n in nodes]
    return sorted((r for r in records if r), key=lambda r: (r.info.tier, r.info.name))


def cluster_view(records) -> ClusterView:
    return ClusterView(tuple(r.info for r in records))


@dataclass(frozen=True)
class Observations:
    """The cluster as the planner sees it, and what had to fall back."""

    tiers: tuple[TierState, ...]
    links: tuple[LinkState, ...]  # measured links only; declared ones come from the flow
    notes: tuple[str, ...] = ()
    utilisation: dict = field(default_factory=dict)  # node -> 0..1, from metrics.k8s.io


def observations(records, utilisation: dict[str, float] | None = None, notes: tuple[str, ...] = ()) -> Observations:
    """Tier states and measured links from node records and per-node CPU utilisation (pure)."""
    records = list(records)
    utilisation = utilisation or {}
    tiers = []
    problems = [p for r in records for p in r.problems]
    for state in tier_states_from_nodes([r.info for r in records]):
        usable = [r for r in records if r.info.tier == state.tier and r.info.usable]
        factors = [r.compute_factor for r in usable if r.compute_factor is not None]
        loads = [utilisation[r.info.name] for r in usable if r.info.name in utilisation]
        tiers.append(replace(
            state,
            compute_factor=statistics.median(factors) if factors else 1.0,
            utilisation=sum(loads) / len(loads) if loads else 0.0,
        ))
    links = []
    for src in TIERS:
        for dst in TIERS:
            found = [link for r in records if r.info.tier == src and r.info.usable for t, link in r.links if t == dst]
            if src != dst and found:
                links.append(LinkState(src, dst, statistics.median(l.bandwidth_mbps for l in found),
                                       statistics.median(l.rtt_ms for l in found), MEASURED))
    return Observations(tuple(tiers), tuple(links), tuple(notes) + tuple(problems), dict(utilisation))


def node_utilisation(api: KubeApi, records) -> tuple[dict[str, float], tuple[str, ...]]:
    """CPU utilisation per node from metrics.k8s.io, and notes on what could not be read. Asks the
    API's discovery first, so that a cluster without metrics-server costs no failing list."""
    try:
        if api.get(NODE_METRICS_GROUP) is None:
            return {}, ("node load: metrics.k8s.io is not served (no metrics-server); load counts as 0",)
        items = api.list(NODE_METRICS.path())
    except (ApiError, OSError, ValueError) as exc:
        return {}, (f"node load: metrics.k8s.io failed ({exc}); load counts as 0",)
    except Exception as exc:  # urllib3 errors and a garbage answer alike: the planner goes on without load
        return {}, (f"node load: metrics.k8s.io unreadable ({type(exc).__name__}: {exc}); load counts as 0",)
    allocatable = {r.info.name: r.info.allocatable.get("cpu") for r in records}
    out, notes = {}, []
    for item in items:
        name = ((item or {}).get("metadata") or {}).get("name")
        if name not in allocatable:
            continue
        try:
            used = float(parse_quantity(((item.get("usage") or {}).get("cpu"))))
            total = float(parse_quantity(allocatable[name]))
        except (TypeError, ValueError, AttributeError):
            notes.append(f"node load: {name}: usage or allocatable CPU is not a quantity; load counts as 0")
            continue
        if not (math.isfinite(used) and used >= 0 and total > 0):
            notes.append(f"node load: {name}: CPU usage {used:g} of {total:g} makes no sense; load counts as 0")
            continue
        out[name] = min(used / total, 1.0)
    return out, tuple(notes)


def observe_nodes(api: KubeApi) -> list[NodeRecord]:
    """Node records of every tier node (reconcile without the operator's node index)."""
    return records_from_nodes(api.list(NODES.path(), label_selector=TIER_LABEL))
