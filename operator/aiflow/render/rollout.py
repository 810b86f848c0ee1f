"""How a stage's Deployment rolls out, derived from what its tier can hold (pure).

Make-before-break (`maxSurge: 1, maxUnavailable: 0`) brings a new pod up before an old one goes, but
the surge pod needs room: on a tier that the flow's own pods already fill, it stays Pending forever and
the rollout never finishes. So the surge is chosen only when one more pod of the stage fits on a node
of the tier beside every pod the flow places there (requests packed first-fit, largest first, against
the nodes' allocatable CPU and memory); otherwise the stage rolls one pod at a time
(`maxSurge: 0, maxUnavailable: 1`), which always finishes.

What is not known is not counted: pods of other workloads on the tier's nodes (the operator does not
read them), and a node without allocatable CPU or memory, or a stage without requests, never blocks
the surge. A rollout that still cannot proceed is reported as stuck in the flow's status (the
scheduler's message), not hidden.
"""

from __future__ import annotations

from kubernetes.utils import parse_quantity

from aiflow.api.cluster import ClusterView
from aiflow.api.spec import Flow, Stage
from aiflow.api.placement import Placement

SURGE = {"maxSurge": 1, "maxUnavailable": 0}
ONE_AT_A_TIME = {"maxSurge": 0, "maxUnavailable": 1}
RESOURCES = ("cpu", "memory")


def _amount(raw) -> float | None:
    try:
        return float(parse_quantity(str(raw)))
    except (TypeError, ValueError):
        return None


def pod_requests(stage: Stage) -> dict[str, float]:
    """CPU (cores) and memory (bytes) one pod of the stage requests; limits stand in for requests
    they leave out, as the API server defaults them."""
    requests = {**(stage.resources.get("limits") or {}), **(stage.resources.get("requests") or {})}
    out = {}
    for name in RESOURCES:
        value = _amount(requests.get(name)) if name in requests else None
        out[name] = value or 0.0
    return out


def _free(cluster: ClusterView, tier: str) -> list[dict[str, float]] | None:
    """Allocatable CPU and memory of each usable node of the tier; None when any is unknown."""
    nodes = []
    for node in cluster.usable_nodes(tier):
        amounts = {name: _amount(node.allocatable.get(name)) for name in RESOURCES}
        if any(v is None for v in amounts.values()):
            return None
        nodes.append(amounts)
    return nodes or None


def _fit(free: list[dict[str, float]], pod: dict[str, float]) -> bool:
    for node in free:
        if all(node[r] >= pod[r] for r in RESOURCES):
            for r in RESOURCES:
                node[r] -= pod[r]
            return True
    return False


def surge_fits(flow: Flow, placement: Placement, cluster: ClusterView | None, stage: Stage) -> bool:
    """Whether one more pod of `stage` fits on its tier beside every pod the flow places there."""
    if cluster is None:
        return True
    tier = placement.of(stage.name).tier
    free = _free(cluster, tier)
    if free is None:
        return True
    pods = [pod_requests(s) for s in flow.stages if placement.of(s.name).tier == tier for _ in range(s.replicas)]
    pods.sort(key=lambda p: (p["cpu"], p["memory"]), reverse=True)
    for pod in pods:
        if not _fit(free, pod):
            return False  # the flow does not even fit as it is: no room to surge into
    return _fit(free, pod_requests(stage))


def rolling_update(flow: Flow, placement: Placement, cluster: ClusterView | None, stage: Stage) -> dict:
    """The stage's Deployment strategy: surge when it fits, else one pod at a time."""
    rolling = SURGE if surge_fits(flow, placement, cluster, stage) else ONE_AT_A_TIME
    return {"type": "RollingUpdate", "rollingUpdate": dict(rolling)}


def max_unavailable(deployment: dict) -> int:
    """The Deployment's maxUnavailable as a number of pods (percentages round down, as the
    Deployment controller does); 0 when absent or unreadable."""
    spec = deployment.get("spec") or {}
    raw = ((spec.get("strategy") or {}).get("rollingUpdate") or {}).get("maxUnavailable", 0)
    if isinstance(raw, str) and raw.endswith("%"):
        try:
            return int(int(spec.get("replicas", 1)) * float(raw[:-1]) // 100)
        except ValueError:
            return 0
    try:
        return int(raw)
    except (TypeError, ValueError):
        return 0
