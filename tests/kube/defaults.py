"""Defaults the API server fills into built-in objects on every write (Kubernetes 1.32's Go defaulters,
`SetDefaults_*` in pkg/apis/{core,apps}/v1, for the kinds and fields the tests use).

The published JSON schemas carry almost no defaults (two in all of 1.32), so these are written out
here; a client that compares what it sent with what is stored must expect them. Not defaulted here:
the kinds nobody in the tests writes (Pods are never created: no kubelet runs).
"""
from __future__ import annotations

from typing import Any

Obj = dict[str, Any]


def _probe(probe: Any) -> None:
    if isinstance(probe, dict):
        for key, value in (("timeoutSeconds", 1), ("periodSeconds", 10), ("successThreshold", 1),
                           ("failureThreshold", 3)):
            probe.setdefault(key, value)
        for handler in ("httpGet",):
            if isinstance(probe.get(handler), dict):
                probe[handler].setdefault("scheme", "HTTP")


def _container(container: Any) -> None:
    if not isinstance(container, dict):
        return
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")
    image = str(container.get("image") or "")
    tag = image.rsplit("/", 1)[-1]
    latest = "@" not in image and (":" not in tag or tag.endswith(":latest"))
    container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
    container.setdefault("resources", {})
    for port in container.get("ports") or ():
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        _probe(container.get(probe))
    for var in container.get("env") or ():
        ref = (var.get("valueFrom") or {}).get("fieldRef") if isinstance(var, dict) else None
        if isinstance(ref, dict):
            ref.setdefault("apiVersion", "v1")


def pod_spec(spec: Any) -> None:
    if not isinstance(spec, dict):
        return
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    for key in ("containers", "initContainers"):
        for container in spec.get(key) or ():
            _container(container)
    for volume in spec.get("volumes") or ():
        if isinstance(volume, dict):
            for source, mode in (("configMap", 420), ("secret", 420)):
                if isinstance(volume.get(source), dict):
                    volume[source].setdefault("defaultMode", mode)


def deployment(obj: Obj) -> None:
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        return
    spec.setdefault("replicas", 1)
    strategy = spec.setdefault("strategy", {})
    if isinstance(strategy, dict):
        strategy.setdefault("type", "RollingUpdate")
        if strategy["type"] == "RollingUpdate":
            rolling = strategy.setdefault("rollingUpdate", {})
            if isinstance(rolling, dict):
                rolling.setdefault("maxUnavailable", "25%")
                rolling.setdefault("maxSurge", "25%")
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    template = spec.get("template")
    if isinstance(template, dict):
        pod_spec(template.get("spec"))


def service(obj: Obj) -> None:
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        return
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    if spec["type"] in ("ClusterIP", "NodePort", "LoadBalancer"):
        spec.setdefault("internalTrafficPolicy", "Cluster")
    for port in spec.get("ports") or ():
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))


BY_KIND = {("apps", "Deployment"): deployment, ("", "Service"): service}


def apply_defaults(group: str, kind: str, obj: Obj) -> None:
    """Fill, in place, the defaults of a built-in object of `kind` (no-op for other kinds)."""
    default = BY_KIND.get((group, kind))
    if default is not None:
        default(obj)
