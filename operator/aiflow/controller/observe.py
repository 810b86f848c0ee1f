"""What reconcile reads from the cluster besides the flow itself."""

from __future__ import annotations

from aiflow import TIER_LABEL
from aiflow.api.cluster import ClusterView, cluster_from_nodes
from aiflow.controller.kube import NODES, KubeApi


def observe_cluster(api: KubeApi) -> ClusterView:
    """The nodes that carry the tier label, grouped by tier."""
    return cluster_from_nodes(api.list(NODES.path(), label_selector=TIER_LABEL))
