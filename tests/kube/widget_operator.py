"""A tiny kopf operator for Widgets, used to prove the emulated API server against real kopf.

A Widget owns a ConfigMap `<name>-parts` (ownerReference, so garbage collection removes it),
reports `status.phase`, posts Events, and on deletion (kopf's finalizer) records it in the
ConfigMap `widget-deletions`.
"""
import logging

import kopf


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    settings.posting.level = logging.INFO
    settings.persistence.finalizer = "emulator.test/widget-finalizer"
    settings.watching.server_timeout = 30


def _core_api():
    import os

    import kubernetes

    # Like an operator in a pod, but configured from KUBECONFIG (pointing at the emulated API server).
    # The path is read now: the kubernetes package fixes its default path when first imported.
    kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return kubernetes.client.CoreV1Api()


@kopf.on.create("emulator.test", "v1", "widgets")
@kopf.on.update("emulator.test", "v1", "widgets")
@kopf.on.resume("emulator.test", "v1", "widgets")
def reconcile(spec, name, namespace, body, patch, **_):
    import kubernetes

    config_map = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"{name}-parts", "namespace": namespace, "labels": {"emulator.test/widget": name}},
        "data": {"size": str(spec["size"]), "color": spec.get("color", "")},
    }
    kopf.adopt(config_map, owner=body)
    api = _core_api()
    try:
        api.create_namespaced_config_map(namespace, config_map)
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise
        api.patch_namespaced_config_map(f"{name}-parts", namespace, {"data": config_map["data"]})
    kopf.info(body, reason="Reconciled", message=f"widget {name} has size {spec['size']}")
    patch.status["phase"] = "Ready"


@kopf.on.delete("emulator.test", "v1", "widgets")
def record_deletion(name, namespace, **_):
    import kubernetes

    api = _core_api()
    body = {"metadata": {"name": "widget-deletions"}, "data": {name: "deleted"}}
    try:
        api.create_namespaced_config_map(namespace, body)
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise
        api.patch_namespaced_config_map("widget-deletions", namespace, {"data": body["data"]})
