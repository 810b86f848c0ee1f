"""The controller stand-ins do what the real controllers would, and only when a test starts them."""
from __future__ import annotations

import requests

from tests.kube.controllers import GarbageCollector


def owned(name: str, owner: dict, kind: str = "ConfigMap") -> dict:
    ref = {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
           "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    return {"apiVersion": "v1", "kind": kind, "metadata": {"name": name, "namespace": "default",
                                                          "ownerReferences": [ref]}}


def test_without_a_garbage_collector_owned_objects_stay(apiserver):
    owner = apiserver.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner",
                                                                                   "namespace": "default"}})
    apiserver.create(owned("child", owner))
    apiserver.delete("configmaps", "owner", "default")
    assert apiserver.get("configmaps", "child", "default") is not None  # no controller runs by itself


def test_garbage_collector_cascades_through_owners(apiserver):
    owner = apiserver.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner",
                                                                                   "namespace": "default"}})
    child = apiserver.create(owned("child", owner))
    apiserver.create(owned("grandchild", child))
    keep = apiserver.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "keep",
                                                                                  "namespace": "default"}})
    apiserver.create(owned("kept-child", keep))
    apiserver.delete("configmaps", "owner", "default")
    deleted = GarbageCollector(apiserver).collect()
    assert deleted == [("configmaps", "default", "child"), ("configmaps", "default", "grandchild")]
    assert {c["metadata"]["name"] for c in apiserver.list("configmaps", "default")} == {"keep", "kept-child"}


def test_garbage_collector_releases_dependents_of_an_orphaning_delete(apiserver):
    owner = apiserver.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner",
                                                                                   "namespace": "default"}})
    apiserver.create(owned("child", owner))
    response = requests.delete(f"{apiserver.url}/api/v1/namespaces/default/configmaps/owner",
                               json={"propagationPolicy": "Orphan"}, timeout=10)
    assert response.status_code == 200
    GarbageCollector(apiserver).collect()
    child = apiserver.get("configmaps", "child", "default")
    assert child is not None and "ownerReferences" not in child["metadata"]


def test_background_garbage_collector_and_kubectl_delete(apiserver):
    owner = apiserver.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner",
                                                                                   "namespace": "default"}})
    apiserver.create(owned("child", owner))
    apiserver.start_garbage_collector()
    apiserver.kubectl("delete", "configmap", "owner")
    apiserver.wait_for(lambda: apiserver.get("configmaps", "child", "default") is None, timeout=10,
                       message="the child to be collected")


def deployment(name: str, replicas: int = 2) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": "i"}]}}}}


def test_mark_deployments_ready_writes_the_status_the_deployment_controller_would(apiserver):
    apiserver.create(deployment("a", replicas=3))
    apiserver.create(deployment("b"))
    assert apiserver.get("deployments", "a", "default").get("status") is None  # nothing runs by itself
    assert apiserver.mark_deployments_ready(names=["a"]) == ["a"]
    status = apiserver.get("deployments", "a", "default")["status"]
    assert (status["replicas"], status["readyReplicas"], status["availableReplicas"],
            status["updatedReplicas"], status["observedGeneration"]) == (3, 3, 3, 3, 1)
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Available": "True", "Progressing": "True"}
    assert apiserver.get("deployments", "b", "default").get("status") is None
    assert apiserver.mark_deployments_ready(names=["a"]) == []  # already so: no write
    apiserver.mark_deployments_ready(label_selector="app=a", ready=False)
    assert apiserver.get("deployments", "a", "default")["status"]["readyReplicas"] == 0


def test_deployment_controller_follows_spec_changes_of_selected_deployments(apiserver):
    apiserver.create(deployment("a"))
    apiserver.create(deployment("unready"))
    apiserver.start_deployment_controller(selector=lambda d: d["metadata"]["name"] != "unready")
    apiserver.wait_for(lambda: (apiserver.get("deployments", "a", "default").get("status") or {})
                       .get("readyReplicas") == 2, timeout=10, message="deployment a to be ready")
    apiserver.patch("deployments", "a", {"spec": {"replicas": 4}}, "default")
    apiserver.wait_for(lambda: apiserver.get("deployments", "a", "default")["status"]
                       .get("observedGeneration") == 2, timeout=10, message="the new generation observed")
    assert apiserver.get("deployments", "a", "default")["status"]["readyReplicas"] == 4
    assert apiserver.get("deployments", "unready", "default").get("status") is None


def test_the_endpointslice_stand_in_follows_the_ready_replicas_a_service_selects(apiserver):
    from tests.kube.controllers import EndpointSliceController, mark_deployments_ready

    def deployment(name: str, revision: str) -> dict:
        labels = {"app": "web", "rev": revision}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": "default"},
                "spec": {"replicas": 2, "selector": {"matchLabels": labels}, "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "web", "image": "registry.example/web:1",
                                             "ports": [{"name": "http", "containerPort": 8000}]}]}}}}

    apiserver.create(deployment("web", "1"))
    apiserver.create(deployment("web-r2", "2"))
    apiserver.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
                      "spec": {"selector": {"app": "web", "rev": "1"}, "ports": [{"name": "http", "port": 80,
                                                                                   "targetPort": "http"}]}})
    controller = EndpointSliceController(apiserver)
    controller.run_once()
    (slice_,) = apiserver.list("endpointslices", "default", "kubernetes.io/service-name=web")
    assert slice_["endpoints"] == [] and slice_["ports"] == [{"name": "http", "port": 8000, "protocol": "TCP"}]

    mark_deployments_ready(apiserver, "default")
    controller.run_once()
    (slice_,) = apiserver.list("endpointslices", "default", "kubernetes.io/service-name=web")
    pods = [e["targetRef"]["name"] for e in slice_["endpoints"]]
    assert len(pods) == 2 and all(p.rsplit("-", 2)[0] == "web" for p in pods)  # named as the ReplicaSet's pods

    apiserver.patch("services", "web", {"spec": {"selector": {"rev": "2"}}}, "default")
    held = EndpointSliceController(apiserver, selector=lambda s: False)
    assert held.run_once() == []  # held back: the slice still lists the old pods
    controller.run_once()
    (slice_,) = apiserver.list("endpointslices", "default", "kubernetes.io/service-name=web")
    assert {e["targetRef"]["name"].rsplit("-", 2)[0] for e in slice_["endpoints"]} == {"web-r2"}

    apiserver.delete("services", "web", "default")
    controller.run_once()
    assert apiserver.list("endpointslices", "default") == []
