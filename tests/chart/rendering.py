"""Render the aiflow-operator chart offline (helm-python-sdk) and pick objects out of the result."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "aiflow-operator"
RELEASE = "flows"
NAMESPACE = "aiflow-system"
# The Kubernetes version the rendered objects are validated against, and that lint assumes.
KUBE_VERSION = "1.33.0"

# Value sets a user would really install; each must lint, render and validate.
VALUE_SETS: dict[str, dict] = {
    "defaults": {},
    "peering-two-replicas": {"replicaCount": 2, "peering": {"enabled": True}},
    "link-probe": {"linkProbe": {"enabled": True}},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True}}},
    "namespaced": {
        "watchNamespaces": ["team-a", "team-b"],
        "replicaCount": 2,
        "peering": {"enabled": True},
    },
    "no-metrics-no-node-metrics": {"metrics": {"enabled": False}, "rbac": {"nodeMetrics": False}},
}


@dataclass(frozen=True)
class Rendered:
    """The objects of one rendered release, in template order, and the NOTES text."""

    objects: list[dict]
    notes: str

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, component: str = "operator") -> dict:
        found = [
            o
            for o in self.of_kind(kind)
            if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"expected one {kind} of component {component}, got {len(found)}"
        return found[0]


def load_chart():
    """The chart; helm's INFO note on the CRD symlink (expected) is routed to logging and dropped."""
    import helm_python

    helm_python.enable_logging(logging.WARNING)
    return helm_python.Chart.load(CHART_DIR)


def render(chart, values: dict, *, namespace: str = NAMESPACE, release: str = RELEASE) -> Rendered:
    manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
    objects: list[dict] = []
    notes = ""
    for path in sorted(manifests):
        if path.endswith("NOTES.txt"):
            notes = manifests[path]
            continue
        objects.extend(doc for doc in yaml.safe_load_all(manifests[path]) if doc)
    return Rendered(objects=objects, notes=notes)


def containers(obj: dict) -> list[dict]:
    spec = obj["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def rbac_rules(rendered: Rendered, service_account: str) -> list[tuple[str | None, dict]]:
    """(namespace or None for cluster-wide, rule) for every rule bound to the service account."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in rendered.objects if o["kind"] in ("Role", "ClusterRole")}
    granted = []
    for binding in rendered.objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == service_account
                   for s in binding["subjects"]):
            continue
        scope = binding["metadata"].get("namespace")  # None for a ClusterRoleBinding
        ref = binding["roleRef"]
        role_ns = scope if ref["kind"] == "Role" else None
        role = roles[(ref["kind"], role_ns, ref["name"])]
        granted.extend((scope, rule) for rule in role["rules"])
    return granted


def granted_permissions(rendered: Rendered) -> set[tuple[str | None, str, str, str]]:
    """(namespace or None for cluster-wide, apiGroup, resource, verb) the chart grants the operator."""
    sa = rendered.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    return {(scope, group, resource, verb)
            for scope, rule in rbac_rules(rendered, sa)
            for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}


def load_yaml(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
