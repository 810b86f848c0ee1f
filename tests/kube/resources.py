"""The resource types the emulated API server serves: built-in kinds and CRD-registered ones."""
from __future__ import annotations

import dataclasses
from typing import Any

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SUBRESOURCE_VERBS = ("get", "patch", "update")


@dataclasses.dataclass(frozen=True)
class ResourceType:
    """One served resource (group/version/plural) and what discovery says about it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    categories: tuple[str, ...] = ()
    schema: dict[str, Any] | None = dataclasses.field(default=None, compare=False, hash=False)
    printer_columns: tuple[dict[str, Any], ...] = dataclasses.field(default=(), compare=False, hash=False)
    custom: bool = False  # defined by a CRD: no strategic merge, schema validation

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def qualified(self) -> str:
        """`deployments.apps`, as Kubernetes names a resource in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def url(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        parts = [base]
        if self.namespaced and namespace:
            parts += ["namespaces", namespace]
        parts.append(self.plural)
        if name:
            parts.append(name)
        if subresource:
            parts.append(subresource)
        return "/".join(parts)


def _b(group: str, version: str, plural: str, kind: str, namespaced: bool = True,
       short: tuple[str, ...] = (), sub: tuple[str, ...] = (), cats: tuple[str, ...] = ()) -> ResourceType:
    columns = tuple({"name": n, "type": t, "jsonPath": p} for n, t, p in _COLUMNS.get((group, plural), ()))
    return ResourceType(group, version, plural, kind, namespaced, short, sub, categories=cats,
                        printer_columns=columns)


# `kubectl get` columns for the kinds tests look at (the real server computes a few more).
# A path in braces is a template: "{.status.readyReplicas}/{.spec.replicas}" prints "1/2".
_COLUMNS: dict[tuple[str, str], tuple[tuple[str, str, str], ...]] = {
    ("apps", "deployments"): (("Ready", "string", "{.status.readyReplicas}/{.spec.replicas}"),
                              ("Up-To-Date", "integer", ".status.updatedReplicas"),
                              ("Available", "integer", ".status.availableReplicas")),
    ("", "services"): (("Type", "string", ".spec.type"), ("Cluster-IP", "string", ".spec.clusterIP")),
    ("", "events"): (("Type", "string", ".type"), ("Reason", "string", ".reason"),
                     ("Object", "string", ".involvedObject.name"), ("Message", "string", ".message")),
    ("", "nodes"): (("Tier", "string", ".metadata.labels.aiflow\\.io/tier"),),
    ("", "namespaces"): (("Status", "string", ".status.phase"),),
}


BUILTIN_RESOURCES: tuple[ResourceType, ...] = (
    _b("", "v1", "namespaces", "Namespace", False, ("ns",), ("status", "finalize")),
    _b("", "v1", "nodes", "Node", False, ("no",), ("status",)),
    _b("", "v1", "pods", "Pod", True, ("po",), ("status", "log"), ("all",)),
    _b("", "v1", "services", "Service", True, ("svc",), ("status",), ("all",)),
    _b("", "v1", "endpoints", "Endpoints", True, ("ep",)),
    _b("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    _b("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    _b("", "v1", "secrets", "Secret", True),
    _b("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",)),
    _b("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, ("pvc",), ("status",)),
    _b("", "v1", "events", "Event", True, ("ev",)),
    _b("", "v1", "limitranges", "LimitRange", True, ("limits",)),
    _b("", "v1", "resourcequotas", "ResourceQuota", True, ("quota",), ("status",)),
    _b("apps", "v1", "deployments", "Deployment", True, ("deploy",), ("status", "scale"), ("all",)),
    _b("apps", "v1", "statefulsets", "StatefulSet", True, ("sts",), ("status", "scale"), ("all",)),
    _b("apps", "v1", "daemonsets", "DaemonSet", True, ("ds",), ("status",), ("all",)),
    _b("apps", "v1", "replicasets", "ReplicaSet", True, ("rs",), ("status", "scale"), ("all",)),
    _b("batch", "v1", "jobs", "Job", True, (), ("status",), ("all",)),
    _b("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", True, ("hpa",), ("status",)),
    _b("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True, ("pdb",), ("status",)),
    _b("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, ("netpol",)),
    _b("networking.k8s.io", "v1", "ingresses", "Ingress", True, ("ing",), ("status",)),
    _b("events.k8s.io", "v1", "events", "Event", True, ("ev",)),
    _b("coordination.k8s.io", "v1", "leases", "Lease", True),
    _b("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    _b("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    _b("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    _b("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    _b("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False,
       ("crd", "crds"), ("status",)),
    _b("admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations",
       "ValidatingWebhookConfiguration", False),
    _b("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations",
       "MutatingWebhookConfiguration", False),
    _b("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor", True),
)
# ServiceMonitor is a CRD on real clusters; it is not served unless a CRD registers it.
BUILTIN_RESOURCES = tuple(r for r in BUILTIN_RESOURCES if r.group != "monitoring.coreos.com")

# metrics-server's aggregated API (read only); served only once a test registers it
# (`EmulatedApiServer.serve_node_metrics()`), as a cluster serves it only with metrics-server installed.
NODE_METRICS = ResourceType("metrics.k8s.io", "v1beta1", "nodes", "NodeMetrics", False, verbs=("get", "list"))


def crd_resource_types(crd: dict[str, Any]) -> list[ResourceType]:
    """The served resource types (one per served version) that a CRD (apiextensions.k8s.io/v1) defines."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    result = []
    for version in spec.get("versions") or []:
        if not version.get("served", True):
            continue
        subresources = tuple(sorted((version.get("subresources") or {}).keys()))
        schema = ((version.get("schema") or {}).get("openAPIV3Schema")) or None
        result.append(ResourceType(
            group=spec.get("group", ""),
            version=version["name"],
            plural=names["plural"],
            kind=names["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            short_names=tuple(names.get("shortNames") or ()),
            subresources=subresources,
            categories=tuple(names.get("categories") or ()),
            schema=schema,
            printer_columns=tuple(version.get("additionalPrinterColumns") or ()),
            custom=True,
        ))
    return result
