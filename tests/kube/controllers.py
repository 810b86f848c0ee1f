"""Stand-ins for the controllers of a real cluster, which the emulated API server does not run.

Each plays one controller's role, explicitly, so a test says what it emulates:
- `GarbageCollector`: kube-controller-manager's garbage collector (background cascading deletion
  through ownerReferences);
- `DeploymentController`: the Deployment controller plus kubelets, reduced to "the pods came up":
  it writes Deployment status as if every replica were ready.
- `EndpointSliceController`: kube-controller-manager's EndpointSlice controller, reduced to what a
  Service's clients see: no Pods exist here, so each ready replica of a Deployment whose pod template
  matches a Service's selector becomes one ready endpoint, named as the Deployment's pod would be.
All work on an `EmulatedApiServer`, once (`run_once()`) or continuously (`start()`/`stop()`, or as
context managers).
"""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable
from typing import Any

from tests.kube.apiserver import EmulatedApiServer, KubeApiHandler, now_rfc3339

Obj = dict[str, Any]


class _Loop:
    """Run `run_once` every `interval` seconds in a thread until stopped."""

    interval = 0.1

    def __init__(self, apiserver: EmulatedApiServer) -> None:
        self.apiserver = apiserver
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    def run_once(self) -> Any:
        raise NotImplementedError

    def start(self) -> "_Loop":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self.errors:
            raise RuntimeError(f"{type(self).__name__} failed: {self.errors!r}") from self.errors[0]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except BaseException as exc:  # surfaced by stop(); a dead controller must not pass silently
                self.errors.append(exc)
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "_Loop":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class GarbageCollector(_Loop):
    """Plays kube-controller-manager's garbage collector: deletes objects whose owners are all gone.

    Background cascade only (foreground deletion is treated as background); owners deleted with
    propagationPolicy=Orphan release their dependents (the ownerReference is removed) instead.
    """

    def run_once(self) -> list[tuple[str, str | None, str]]:
        """One sweep; returns (resource, namespace, name) of the objects it deleted."""
        return self.apiserver.call(self._sweep)

    @staticmethod
    def _sweep(h: KubeApiHandler) -> list[tuple[str, str | None, str]]:
        live_uids = {obj["metadata"]["uid"] for objects in h.store.values() for obj in objects.values()}
        deleted = []
        for (group, plural), objects in list(h.store.items()):
            rt = h.type_of_store(group, plural)
            if rt is None:
                continue
            for obj in list(objects.values()):
                refs = obj["metadata"].get("ownerReferences") or []
                if not refs:
                    continue
                orphaned = [r for r in refs if r.get("uid") in h.orphaned_uids]
                if orphaned:
                    kept = [r for r in refs if r not in orphaned]
                    desired = h.serve(rt, obj)
                    desired["metadata"]["ownerReferences"] = kept
                    if not kept:
                        desired["metadata"].pop("ownerReferences")
                    h.write_object(rt, obj, desired, None)
                    continue
                if all(r.get("uid") not in live_uids for r in refs) and not obj["metadata"].get("deletionTimestamp"):
                    h.delete_object(rt, obj, {"propagationPolicy": "Background"})
                    deleted.append((plural, obj["metadata"].get("namespace"), obj["metadata"]["name"]))
        return deleted

    def collect(self, max_rounds: int = 20) -> list[tuple[str, str | None, str]]:
        """Sweep until nothing more is deleted (cascades through several levels of owners)."""
        deleted: list[tuple[str, str | None, str]] = []
        for _ in range(max_rounds):
            batch = self.run_once()
            if not batch:
                break
            deleted += batch
        return deleted


def deployment_status(deployment: Obj, ready: bool = True) -> Obj:
    """The status the Deployment controller reports once all replicas are (or are not) ready."""
    replicas = int((deployment.get("spec") or {}).get("replicas", 1))
    ready_replicas = replicas if ready else 0
    stamp = now_rfc3339()
    name = deployment["metadata"]["name"]
    return {
        "observedGeneration": deployment["metadata"].get("generation", 1),
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": ready_replicas,
        "availableReplicas": ready_replicas,
        **({"unavailableReplicas": replicas} if not ready and replicas else {}),
        "conditions": [
            {"type": "Available", "status": "True" if ready else "False",
             "reason": "MinimumReplicasAvailable" if ready else "MinimumReplicasUnavailable",
             "message": "Deployment has minimum availability." if ready
             else "Deployment does not have minimum availability.",
             "lastUpdateTime": stamp, "lastTransitionTime": stamp},
            {"type": "Progressing", "status": "True",
             "reason": "NewReplicaSetAvailable" if ready else "ReplicaSetUpdated",
             "message": f'ReplicaSet "{name}" has successfully progressed.' if ready
             else f'ReplicaSet "{name}" is progressing.',
             "lastUpdateTime": stamp, "lastTransitionTime": stamp},
        ],
    }


def _same_status(current: Obj | None, desired: Obj) -> bool:
    if not current:
        return False
    strip = lambda s: {**s, "conditions": [{k: v for k, v in c.items() if not k.endswith("Time")}
                                           for c in s.get("conditions", [])]}
    return strip(current) == strip(desired)


def mark_deployments_ready(apiserver: EmulatedApiServer, namespace: str | None = None,
                           names: Iterable[str] | None = None, label_selector: str | None = None,
                           ready: bool = True) -> list[str]:
    """Write Deployment status as the Deployment controller would once pods are (not) ready.

    Selects by namespace, names and/or label selector (all Deployments by default); returns the
    names whose status changed.
    """
    wanted = set(names) if names is not None else None
    changed = []
    for deployment in apiserver.list("deployments.apps", namespace, label_selector):
        name = deployment["metadata"]["name"]
        if wanted is not None and name not in wanted:
            continue
        status = deployment_status(deployment, ready)
        if _same_status(deployment.get("status"), status):
            continue
        apiserver.patch("deployments.apps", name, {"status": status}, deployment["metadata"].get("namespace"),
                        subresource="status")
        changed.append(name)
    return changed


class _SelectingLoop(_Loop):
    """A controller stand-in that acts on the objects `selector` picks (all by default), in one
    namespace or all."""

    def __init__(self, apiserver: EmulatedApiServer, selector: Callable[[Obj], bool] | None = None,
                 namespace: str | None = None) -> None:
        super().__init__(apiserver)
        self.selector = selector or (lambda _: True)
        self.namespace = namespace


class DeploymentController(_SelectingLoop):
    """Plays the Deployment controller (and kubelets): selected Deployments report all replicas ready.

    `selector(deployment) -> bool` picks which ones become ready (all by default); the others are
    left alone, so a test can keep a stage unready on purpose.
    """

    def run_once(self) -> list[str]:
        names = [d["metadata"]["name"] for d in self.apiserver.list("deployments.apps", self.namespace)
                 if self.selector(d)]
        return mark_deployments_ready(self.apiserver, self.namespace, names) if names else []


SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SLICE_MANAGER = "endpointslice-controller.k8s.io"


def _digest(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _matches(selector: Obj, labels: Obj) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def endpoint_slice(service: Obj, deployments: Iterable[Obj]) -> Obj:
    """The EndpointSlice the EndpointSlice controller keeps for `service`: one ready endpoint per
    ready replica of the Deployments its selector matches (pods named `<deployment>-<hash>-<suffix>`,
    as a Deployment's ReplicaSet names them), and the Service's labels, as the real controller copies."""
    meta = service["metadata"]
    selector = (service.get("spec") or {}).get("selector") or {}
    endpoints = []
    for dep in sorted(deployments, key=lambda d: d["metadata"]["name"]):
        template = ((dep.get("spec") or {}).get("template") or {}).get("metadata") or {}
        if not _matches(selector, template.get("labels") or {}):
            continue
        name = dep["metadata"]["name"]
        replicaset = _digest(f"{name}/{dep['metadata'].get('generation', 1)}", 10)
        for i in range(int((dep.get("status") or {}).get("readyReplicas") or 0)):
            pod = f"{name}-{replicaset}-{_digest(f'{replicaset}/{i}', 5)}"
            endpoints.append({
                "addresses": [f"10.{int(_digest(pod, 2), 16)}.{int(_digest(pod[::-1], 2), 16)}.{i + 1}"],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": meta.get("namespace")},
            })
    named = {}  # a named targetPort is the matched pods' container port of that name
    for dep in deployments:
        template = ((dep.get("spec") or {}).get("template") or {})
        if _matches(selector, (template.get("metadata") or {}).get("labels") or {}):
            for container in (template.get("spec") or {}).get("containers") or ():
                named.update({p["name"]: p["containerPort"] for p in container.get("ports") or () if p.get("name")})
    ports = []
    for p in (service.get("spec") or {}).get("ports") or ():
        target = p.get("targetPort", p.get("port"))
        target = named.get(target) if isinstance(target, str) else target
        if target is not None:
            ports.append({"name": p.get("name", ""), "port": int(target), "protocol": p.get("protocol", "TCP")})
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{meta['name']}-{_digest(meta['name'], 5)}", "namespace": meta.get("namespace"),
                     "labels": {**(meta.get("labels") or {}), SERVICE_NAME_LABEL: meta["name"],
                                "endpointslice.kubernetes.io/managed-by": SLICE_MANAGER},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": meta["name"],
                                          "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }


class EndpointSliceController(_SelectingLoop):
    """Plays the EndpointSlice controller: each selected Service's slice follows the ready replicas
    of the Deployments it selects; the slice of a Service that is gone goes too.

    `selector(service) -> bool` picks the Services whose slices it updates (all by default); the
    others keep the slice they have, so a test can hold back the news that endpoints moved.
    """

    def run_once(self) -> list[str]:
        """One pass; returns the names of the slices it wrote or deleted."""
        api, changed = self.apiserver, []
        services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in api.list("services", self.namespace)}
        deployments = api.list("deployments.apps", self.namespace)
        for (ns, name), service in services.items():
            if not (service.get("spec") or {}).get("selector") or not self.selector(service):
                continue
            desired = endpoint_slice(service, [d for d in deployments if d["metadata"].get("namespace") == ns])
            live = api.get("endpointslices.discovery.k8s.io", desired["metadata"]["name"], ns)
            if live is None:
                api.create(desired)
            elif (live.get("endpoints") or []) != desired["endpoints"]:
                api.patch("endpointslices.discovery.k8s.io", desired["metadata"]["name"],
                          {"endpoints": desired["endpoints"]}, ns)
            else:
                continue
            changed.append(desired["metadata"]["name"])
        for slice_ in api.list("endpointslices.discovery.k8s.io", self.namespace):
            meta = slice_["metadata"]
            owner = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
            if (meta.get("labels") or {}).get("endpointslice.kubernetes.io/managed-by") == SLICE_MANAGER and \
                    (meta.get("namespace"), owner) not in services:
                api.delete("endpointslices.discovery.k8s.io", meta["name"], meta.get("namespace"))
                changed.append(meta["name"])
        return changed
