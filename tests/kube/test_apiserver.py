"""The emulated API server behaves like kube-apiserver for what kopf and kubectl use (over HTTP)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import requests
import yaml

from tests.kube.apiserver import EmulatedApiServer, derive_rbac_rules, wait_for

WIDGETS_CRD = Path(__file__).parent / "manifests" / "widgets-crd.yaml"
WIDGETS = "/apis/emulator.test/v1/namespaces/default/widgets"
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
DEPLOYMENTS = "/apis/apps/v1/namespaces/default/deployments"


class Client:
    """A bare HTTP client: what goes on the wire is what the test says."""

    def __init__(self, server: EmulatedApiServer):
        self.url = server.url

    def request(self, method: str, path: str, body=None, content_type: str = "application/json", **params):
        data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
        return requests.request(method, self.url + path, data=data, params=params or None, timeout=10,
                                headers={"Content-Type": content_type})

    def get(self, path, **params):
        return self.request("GET", path, **params)

    def post(self, path, body, **params):
        return self.request("POST", path, body, **params)

    def put(self, path, body, **params):
        return self.request("PUT", path, body, **params)

    def patch(self, path, body, kind: str = "merge", **params):
        content_type = {"merge": "application/merge-patch+json", "json": "application/json-patch+json",
                        "strategic": "application/strategic-merge-patch+json",
                        "apply": "application/apply-patch+yaml"}[kind]
        return self.request("PATCH", path, body, content_type, **params)

    def delete(self, path, body=None, **params):
        return self.request("DELETE", path, body, **params)


@pytest.fixture
def client(apiserver) -> Client:
    return Client(apiserver)


@pytest.fixture
def widgets(apiserver, client) -> Client:
    """The server with the Widget CRD posted, as `kubectl apply -f crd.yaml` would."""
    crd = yaml.safe_load(WIDGETS_CRD.read_text())
    response = client.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    assert response.status_code == 201, response.text
    return client


def widget(name: str, **spec) -> dict:
    return {"apiVersion": "emulator.test/v1", "kind": "Widget", "metadata": {"name": name},
            "spec": {"size": 1, **spec}}


def deployment(name: str, containers: list[dict]) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": containers}}}}


# ------------------------------------------------------------------------------------------- CRUD
def test_create_answers_201_with_server_assigned_metadata(client):
    response = client.post("/api/v1/namespaces/kube-system/configmaps",
                           {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "cm-"}})
    assert response.status_code == 201
    meta = response.json()["metadata"]
    assert meta["namespace"] == "kube-system"  # from the URL, as the body did not say
    assert meta["name"].startswith("cm-") and len(meta["name"]) == 8
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert int(meta["resourceVersion"]) > 0
    again = client.post("/api/v1/namespaces/kube-system/configmaps", {"metadata": {"name": meta["name"]}})
    assert again.status_code == 409 and again.json()["reason"] == "AlreadyExists"


def test_create_rejects_a_namespace_mismatch_a_missing_namespace_and_a_bad_name(client):
    mismatch = client.post(CONFIGMAPS, {"metadata": {"name": "a", "namespace": "kube-system"}})
    assert mismatch.status_code == 400
    missing = client.post("/api/v1/namespaces/nowhere/configmaps", {"metadata": {"name": "a"}})
    assert missing.status_code == 404 and missing.json()["kind"] == "Status"
    bad = client.post(CONFIGMAPS, {"metadata": {"name": "Not_A_Name"}})
    assert bad.status_code == 422 and bad.json()["details"]["causes"][0]["field"] == "metadata.name"


def test_namespaces_are_served_and_their_deletion_removes_their_content(apiserver, client):
    assert {n["metadata"]["name"] for n in client.get("/api/v1/namespaces").json()["items"]} >= {"default"}
    assert client.post("/api/v1/namespaces", {"metadata": {"name": "team"}}).status_code == 201
    assert client.get("/api/v1/namespaces/team").json()["status"]["phase"] == "Active"
    client.post("/api/v1/namespaces/team/configmaps", {"metadata": {"name": "a"}})
    client.post("/api/v1/namespaces/team/configmaps", {"metadata": {"name": "b", "finalizers": ["x/y"]}})
    client.delete("/api/v1/namespaces/team")
    assert client.get("/api/v1/namespaces/team").json()["status"]["phase"] == "Terminating"
    assert client.get("/api/v1/namespaces/team/configmaps/a").status_code == 404
    assert client.post("/api/v1/namespaces/team/configmaps", {"metadata": {"name": "c"}}).status_code == 403
    client.patch("/api/v1/namespaces/team/configmaps/b", {"metadata": {"finalizers": None}})
    assert client.get("/api/v1/namespaces/team").status_code == 404


def test_put_with_a_stale_resource_version_conflicts(client):
    created = client.post(CONFIGMAPS, {"metadata": {"name": "a"}, "data": {"k": "1"}}).json()
    updated = client.put(f"{CONFIGMAPS}/a", {**created, "data": {"k": "2"}})
    assert updated.status_code == 200
    assert int(updated.json()["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    stale = client.put(f"{CONFIGMAPS}/a", {**created, "data": {"k": "3"}})
    assert stale.status_code == 409 and stale.json()["reason"] == "Conflict"
    assert client.get(f"{CONFIGMAPS}/a").json()["data"] == {"k": "2"}


def test_a_no_op_write_keeps_the_resource_version(client):
    created = client.post(CONFIGMAPS, {"metadata": {"name": "a"}, "data": {"k": "1"}}).json()
    same = client.patch(f"{CONFIGMAPS}/a", {"data": {"k": "1"}}).json()
    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


def test_json_patch_with_a_failed_test_is_rejected_with_422(client):
    created = client.post(CONFIGMAPS, {"metadata": {"name": "a"}}).json()
    rv = created["metadata"]["resourceVersion"]
    ok = client.patch(f"{CONFIGMAPS}/a", [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
                                         {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]}], "json")
    assert ok.status_code == 200 and ok.json()["metadata"]["finalizers"] == ["x/y"]
    stale = client.patch(f"{CONFIGMAPS}/a", [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
                                            {"op": "remove", "path": "/metadata/finalizers"}], "json")
    assert stale.status_code == 422  # what kopf expects to retry its finalizer patch later


def test_strategic_merge_patch_merges_containers_env_and_ports_by_key(client):
    containers = [{"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}],
                   "ports": [{"containerPort": 8000}]},
                  {"name": "b", "image": "b:1"}]
    client.post(DEPLOYMENTS, deployment("d", containers))
    patch = {"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
        "containers": [{"name": "a", "image": "a:2", "env": [{"name": "Y", "value": "2"}],
                        "ports": [{"containerPort": 8001}]}]}}}}
    response = client.patch(f"{DEPLOYMENTS}/d", patch, "strategic")
    assert response.status_code == 200, response.text
    merged = response.json()["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in merged] == ["a", "b"]
    assert merged[0]["image"] == "a:2"
    assert merged[0]["env"] == [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]
    assert [p["containerPort"] for p in merged[0]["ports"]] == [8000, 8001]
    delete_b = {"spec": {"template": {"spec": {"containers": [{"name": "b", "$patch": "delete"}]}}}}
    after = client.patch(f"{DEPLOYMENTS}/d", delete_b, "strategic").json()
    assert [c["name"] for c in after["spec"]["template"]["spec"]["containers"]] == ["a"]
    recreate = {"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}
    client.patch(f"{DEPLOYMENTS}/d", {"spec": {"strategy": {"type": "RollingUpdate",
                                                            "rollingUpdate": {"maxSurge": 1}}}}, "strategic")
    strategy = client.patch(f"{DEPLOYMENTS}/d", recreate, "strategic").json()["spec"]["strategy"]
    assert strategy == {"type": "Recreate"}


def configmap(**data) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": data})


def test_server_side_apply_creates_merges_managers_and_needs_a_field_manager(client):
    assert client.patch(f"{CONFIGMAPS}/a", configmap(x="1"), "apply").status_code == 422
    created = client.patch(f"{CONFIGMAPS}/a", configmap(x="1"), "apply", fieldManager="me")
    assert created.status_code == 201 and created.json()["data"] == {"x": "1"}
    (entry,) = created.json()["metadata"]["managedFields"]
    assert (entry["manager"], entry["operation"], entry["fieldsV1"]) == ("me", "Apply", {"f:data": {"f:x": {}}})
    # Another manager's apply adds its field beside the first one's.
    other = client.patch(f"{CONFIGMAPS}/a", configmap(y="2"), "apply", fieldManager="other")
    assert other.status_code == 200 and other.json()["data"] == {"x": "1", "y": "2"}
    assert {e["manager"] for e in other.json()["metadata"]["managedFields"]} == {"me", "other"}


def test_server_side_apply_removes_what_the_manager_no_longer_applies(client):
    client.patch(f"{CONFIGMAPS}/a", configmap(x="1", z="3"), "apply", fieldManager="me")
    client.patch(f"{CONFIGMAPS}/a", configmap(z="3", y="2"), "apply", fieldManager="other")
    # `me` stops applying x and z: x goes (only `me` owned it), z stays (`other` owns it too).
    after = client.patch(f"{CONFIGMAPS}/a", configmap(w="4"), "apply", fieldManager="me")
    assert after.status_code == 200 and after.json()["data"] == {"w": "4", "y": "2", "z": "3"}


def test_server_side_apply_conflicts_with_another_managers_field_unless_forced(client):
    client.patch(f"{CONFIGMAPS}/a", configmap(x="1"), "apply", fieldManager="me")
    client.patch(f"{CONFIGMAPS}/a", json.dumps({"data": {"x": "edited"}}), "merge", fieldManager="editor")
    refused = client.patch(f"{CONFIGMAPS}/a", configmap(x="1"), "apply", fieldManager="me")
    assert refused.status_code == 409 and 'conflict with "editor"' in refused.json()["message"]
    assert ".data.x" in refused.json()["message"]
    forced = client.patch(f"{CONFIGMAPS}/a", configmap(x="1"), "apply", fieldManager="me", force="true")
    assert forced.status_code == 200 and forced.json()["data"] == {"x": "1"}
    assert [e["manager"] for e in forced.json()["metadata"]["managedFields"]] == ["me"]
    rv = forced.json()["metadata"]["resourceVersion"]
    # An apply that changes nothing is no write: the resourceVersion stays.
    again = client.patch(f"{CONFIGMAPS}/a", configmap(x="1"), "apply", fieldManager="me")
    assert again.status_code == 200 and again.json()["metadata"]["resourceVersion"] == rv


def test_built_in_kinds_are_checked_against_the_published_schemas(client):
    containers = [{"name": "a", "image": "a:1", "ports": [{"containerPort": "http"}]}]
    wrong_type = client.post(DEPLOYMENTS, deployment("d", containers))
    assert wrong_type.status_code == 400 and "containerPort" in wrong_type.json()["message"]
    no_selector = deployment("d", [{"name": "a", "image": "a:1"}])
    del no_selector["spec"]["selector"]
    missing = client.post(DEPLOYMENTS, no_selector)
    assert missing.status_code == 422 and missing.json()["details"]["causes"][0]["field"] == "spec.selector"
    unknown = deployment("d", [{"name": "a", "image": "a:1", "imagePolicy": "Always"}])
    strict = client.post(DEPLOYMENTS, unknown, fieldValidation="Strict")
    assert strict.status_code == 400 and "spec.template.spec.containers[0].imagePolicy" in strict.json()["message"]
    dropped = client.post(DEPLOYMENTS, unknown).json()  # fieldValidation=Ignore: dropped, as decoding does
    assert "imagePolicy" not in dropped["spec"]["template"]["spec"]["containers"][0]


def test_built_in_objects_are_stored_as_the_real_server_stores_them(client):
    container = {"name": "a", "image": "a:1", "env": [{"name": "EMPTY", "value": ""}], "args": [],
                 "ports": [{"containerPort": 8000}]}
    stored = client.post(DEPLOYMENTS, deployment("d", [container])).json()
    # Empty omitempty values are not kept, ...
    (kept,) = stored["spec"]["template"]["spec"]["containers"]
    assert kept["env"] == [{"name": "EMPTY"}] and "args" not in kept
    # ... and the kind's defaults are filled in.
    assert kept["ports"] == [{"containerPort": 8000, "protocol": "TCP"}]
    assert kept["terminationMessagePath"] == "/dev/termination-log" and kept["imagePullPolicy"] == "IfNotPresent"
    spec = stored["spec"]
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}
    assert (spec["revisionHistoryLimit"], spec["progressDeadlineSeconds"]) == (10, 600)
    assert spec["template"]["spec"]["dnsPolicy"] == "ClusterFirst"
    service = client.post("/api/v1/namespaces/default/services",
                          {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                           "spec": {"selector": {"app": "d"}, "ports": [{"port": 80}]}}).json()
    assert service["spec"]["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80}]
    assert service["spec"]["sessionAffinity"] == "None"


def test_a_deployments_selector_and_a_services_cluster_ip_are_immutable(client):
    client.post(DEPLOYMENTS, deployment("d", [{"name": "a", "image": "a:1"}]))
    changed = {"spec": {"selector": {"matchLabels": {"app": "d", "extra": "x"}},
                        "template": {"metadata": {"labels": {"app": "d", "extra": "x"}}}}}
    refused = client.patch(f"{DEPLOYMENTS}/d", changed, "strategic")
    assert refused.status_code == 422 and "spec.selector" in refused.json()["message"]
    assert "field is immutable" in refused.json()["message"]
    services = "/api/v1/namespaces/default/services"
    ip = client.post(services, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                                "spec": {"ports": [{"port": 80}]}}).json()["spec"]["clusterIP"]
    moved = client.patch(f"{services}/s", {"spec": {"clusterIP": "10.0.0.1" if ip != "10.0.0.1" else "10.0.0.2"}})
    assert moved.status_code == 422 and "may not change once set" in moved.json()["message"]


def test_label_and_field_selectors_filter_lists(client):
    for name, labels in [("a", {"tier": "edge", "app": "x"}), ("b", {"tier": "cloud"}), ("c", {})]:
        client.post(CONFIGMAPS, {"metadata": {"name": name, "labels": labels}})

    def names(**params):
        response = client.get(CONFIGMAPS, **params)
        assert response.status_code == 200, response.text
        return [i["metadata"]["name"] for i in response.json()["items"]]

    assert names(labelSelector="tier=edge") == ["a"]
    assert names(labelSelector="tier!=edge") == ["b", "c"]
    assert names(labelSelector="tier in (edge,cloud)") == ["a", "b"]
    assert names(labelSelector="tier notin (edge)") == ["b", "c"]
    assert names(labelSelector="tier,!app") == ["b"]
    assert names(fieldSelector="metadata.name=b") == ["b"]
    assert names(fieldSelector="metadata.namespace=default,metadata.name!=b") == ["a", "c"]
    assert client.get(CONFIGMAPS, labelSelector="tier in (edge").status_code == 400
    listing = client.get("/api/v1/configmaps").json()  # all namespaces
    assert listing["kind"] == "ConfigMapList" and listing["apiVersion"] == "v1"
    assert all(i["kind"] == "ConfigMap" for i in listing["items"])


# ---------------------------------------------------------------------------- CRDs and discovery
def test_posting_a_crd_registers_its_resource_for_discovery(widgets):
    groups = widgets.get("/apis").json()["groups"]
    assert {"groupVersion": "emulator.test/v1", "version": "v1"} in \
        next(g for g in groups if g["name"] == "emulator.test")["versions"]
    assert widgets.get("/apis/emulator.test").json()["preferredVersion"]["version"] == "v1"
    resources = {r["name"]: r for r in widgets.get("/apis/emulator.test/v1").json()["resources"]}
    assert resources["widgets"]["kind"] == "Widget" and resources["widgets"]["namespaced"] is True
    assert resources["widgets"]["shortNames"] == ["wg"] and "watch" in resources["widgets"]["verbs"]
    assert resources["widgets/status"]["verbs"] == ["get", "patch", "update"]
    crd = widgets.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.emulator.test").json()
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"] == "True"
    assert widgets.get("/api").json()["versions"] == ["v1"]
    assert widgets.get("/api/v1").json()["groupVersion"] == "v1"


def test_deleting_a_crd_removes_its_resource_and_objects(widgets):
    widgets.post(WIDGETS, widget("w"))
    widgets.delete("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.emulator.test")
    assert widgets.get("/apis/emulator.test/v1").status_code == 404
    assert widgets.get(WIDGETS).status_code == 404


def test_custom_resources_are_validated_against_the_schema(widgets):
    response = widgets.post(WIDGETS, widget("w", size=30, color="pink"))
    assert response.status_code == 422
    status = response.json()
    assert status["kind"] == "Status" and status["reason"] == "Invalid"
    assert status["details"]["kind"] == "Widget" and status["details"]["name"] == "w"
    assert {c["field"] for c in status["details"]["causes"]} == {"spec.size", "spec.color"}
    assert 'Unsupported value: "pink"' in status["message"]
    missing = widgets.post(WIDGETS, {**widget("w"), "spec": {"color": "red"}}).json()
    assert missing["details"]["causes"][0]["field"] == "spec.size"


def test_cel_rules_of_the_schema_are_enforced(widgets):
    response = widgets.post(WIDGETS, widget("w", parts=["a", "a"]))
    assert response.status_code == 422 and "part names must be unique" in response.text
    assert widgets.post(WIDGETS, widget("w", parts=["a", "b"])).status_code == 201


def test_schema_defaults_apply_and_unknown_fields_are_pruned_or_rejected(widgets):
    created = widgets.post(WIDGETS, widget("w", extra=1)).json()
    assert created["spec"] == {"size": 1, "color": "green"}
    strict = widgets.post(WIDGETS, widget("v", extra=1), fieldValidation="Strict")
    assert strict.status_code == 400 and 'unknown field "spec.extra"' in strict.json()["message"]


def test_status_subresource_separates_spec_and_status_writes(widgets):
    created = widgets.post(WIDGETS, {**widget("w"), "status": {"phase": "Bogus"}}).json()
    assert "status" not in created  # status of a create is ignored
    status = widgets.patch(f"{WIDGETS}/w/status", {"status": {"phase": "Ready"}, "spec": {"size": 9}}).json()
    assert status["status"] == {"phase": "Ready"} and status["spec"]["size"] == 1
    assert status["metadata"]["generation"] == 1  # status writes never bump the generation
    main = widgets.patch(f"{WIDGETS}/w", {"status": {"phase": "Ignored"}, "spec": {"size": 2}}).json()
    assert main["status"] == {"phase": "Ready"} and main["spec"]["size"] == 2
    assert main["metadata"]["generation"] == 2
    labelled = widgets.patch(f"{WIDGETS}/w", {"metadata": {"labels": {"a": "b"}}}).json()
    assert labelled["metadata"]["generation"] == 2  # metadata writes never bump it either
    put = widgets.put(f"{WIDGETS}/w/status", {**labelled, "status": {"phase": "Done"}}).json()
    assert put["status"] == {"phase": "Done"}
    assert widgets.get(f"{WIDGETS}/w/status").json()["status"] == {"phase": "Done"}
    assert widgets.patch(f"{WIDGETS}/w", {"spec": {"size": 3}}, "strategic").status_code == 415


# ----------------------------------------------------------------------------- finalizers, watches
def test_finalizers_hold_deletion_until_removed(client):
    client.post(CONFIGMAPS, {"metadata": {"name": "a", "finalizers": ["x/y"]}})
    deleting = client.delete(f"{CONFIGMAPS}/a", {"propagationPolicy": "Background"})
    assert deleting.status_code == 200 and deleting.json()["metadata"]["deletionTimestamp"]
    assert client.get(f"{CONFIGMAPS}/a").status_code == 200
    forbidden = client.patch(f"{CONFIGMAPS}/a", {"metadata": {"finalizers": ["x/y", "x/z"]}})
    assert forbidden.status_code == 422
    client.patch(f"{CONFIGMAPS}/a", {"metadata": {"finalizers": []}})
    assert client.get(f"{CONFIGMAPS}/a").status_code == 404


def test_watch_streams_json_events_from_a_resource_version(client):
    listed = client.get(CONFIGMAPS).json()["metadata"]["resourceVersion"]
    client.post(CONFIGMAPS, {"metadata": {"name": "a", "labels": {"w": "1"}}})
    client.patch(f"{CONFIGMAPS}/a", {"data": {"k": "v"}})
    client.post(CONFIGMAPS, {"metadata": {"name": "other"}})
    client.delete(f"{CONFIGMAPS}/a")
    response = requests.get(client.url + CONFIGMAPS, stream=True, timeout=10,
                            params={"watch": "true", "resourceVersion": listed, "timeoutSeconds": "1",
                                    "labelSelector": "w=1"})
    assert response.headers["Content-Type"].startswith("application/json")
    events = [json.loads(line) for line in response.iter_lines() if line]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == \
        [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    assert events[1]["object"]["data"] == {"k": "v"} and events[0]["object"]["kind"] == "ConfigMap"


def test_watch_without_a_resource_version_starts_with_the_current_objects_then_follows(client):
    client.post(CONFIGMAPS, {"metadata": {"name": "a"}})
    seen: list[tuple[str, str]] = []

    def watch() -> None:
        with requests.get(client.url + CONFIGMAPS, params={"watch": "true", "timeoutSeconds": "3"},
                          stream=True, timeout=10) as response:
            for line in response.iter_lines():
                if line:
                    event = json.loads(line)
                    seen.append((event["type"], event["object"]["metadata"]["name"]))
                    if len(seen) == 2:
                        return

    thread = threading.Thread(target=watch)
    thread.start()
    wait_for(lambda: seen, timeout=10, message="the initial ADDED event")
    client.post(CONFIGMAPS, {"metadata": {"name": "b"}})
    thread.join(10)
    assert seen == [("ADDED", "a"), ("ADDED", "b")]


def test_watch_from_a_compacted_resource_version_answers_410_gone(apiserver, client):
    apiserver.call(lambda h: setattr(h, "compacted_rv", h.resource_version))
    response = requests.get(client.url + CONFIGMAPS, params={"watch": "true", "resourceVersion": "1"}, timeout=10)
    event = json.loads(response.text.splitlines()[0])
    assert event["type"] == "ERROR" and event["object"]["code"] == 410


# --------------------------------------------------------------------------------- the rest
def test_events_are_accepted_in_both_apis(client):
    core = {"metadata": {"generateName": "e-"}, "reason": "Tested", "message": "hello", "type": "Normal",
            "involvedObject": {"kind": "ConfigMap", "name": "a", "namespace": "default"}}
    assert client.post("/api/v1/namespaces/default/events", core).status_code == 201
    new = {"metadata": {"generateName": "e-"}, "reason": "Tested", "note": "hello", "action": "Test",
           "eventTime": "2024-01-01T00:00:00.000000Z", "reportingController": "t", "reportingInstance": "t",
           "regarding": {"kind": "ConfigMap", "name": "a", "namespace": "default"}, "type": "Normal"}
    assert client.post("/apis/events.k8s.io/v1/namespaces/default/events", new).status_code == 201
    found = client.get("/api/v1/namespaces/default/events", fieldSelector="involvedObject.name=a").json()
    assert [e["reason"] for e in found["items"]] == ["Tested"]


def test_kmock_reactions_take_precedence_for_fault_injection(apiserver, client):
    apiserver.handler["get /api/v1/nodes"] << 503  # noqa: B015  (kmock's DSL)
    assert client.get("/api/v1/nodes").status_code == 503
    assert client.get("/api/v1/namespaces").status_code == 200


def test_the_request_log_records_verbs_for_deriving_rbac_rules(apiserver, client):
    apiserver.clear_request_log()
    client.post(CONFIGMAPS, {"metadata": {"name": "a"}})
    client.get(CONFIGMAPS, watch="true", timeoutSeconds="0.1")
    client.patch("/apis/apps/v1/namespaces/default/deployments/x/status", {"status": {}})
    records = apiserver.request_log
    assert [(r.verb, r.resource, r.subresource, r.code) for r in records] == \
        [("create", "configmaps", None, 201), ("watch", "configmaps", None, 200),
         ("patch", "deployments", "status", 404)]
    assert derive_rbac_rules(records) == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "watch"]},
        {"apiGroups": ["apps"], "resources": ["deployments/status"], "verbs": ["patch"]},
    ]


def test_seeded_nodes_carry_tier_labels_conditions_and_allocatable(apiserver, client):
    apiserver.seed_node("edge-1", "edge", allocatable={"cpu": "8", "memory": "16Gi", "pods": "110"})
    apiserver.seed_node("cloud-1", "cloud", taints=[{"key": "aiflow.io/tier", "value": "cloud",
                                                    "effect": "NoSchedule"}])
    edge = client.get("/api/v1/nodes", labelSelector="aiflow.io/tier=edge").json()["items"]
    assert [n["metadata"]["name"] for n in edge] == ["edge-1"]
    assert edge[0]["status"]["allocatable"]["cpu"] == "8"
    assert edge[0]["status"]["conditions"][0]["type"] == "Ready"
    apiserver.set_node_ready("edge-1", False)
    assert apiserver.get("nodes", "edge-1")["status"]["conditions"][0]["status"] == "False"
    apiserver.patch_node("edge-1", {"metadata": {"labels": {"aiflow.io/tier": "device"}}})
    assert apiserver.get("nodes", "edge-1")["metadata"]["labels"]["aiflow.io/tier"] == "device"
    apiserver.remove_node("cloud-1")
    assert [n["metadata"]["name"] for n in apiserver.list("nodes")] == ["edge-1"]


def test_rbac_is_enforced_for_a_registered_token(apiserver, client):
    from tests.kube.rbac import User

    apiserver.create_namespace("team")
    apiserver.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                      "metadata": {"name": "read-configmaps", "namespace": "default"},
                      "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]})
    apiserver.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                      "metadata": {"name": "reader", "namespace": "default"},
                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps"},
                      "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "team"}]})
    apiserver.authorize_token("reader-token", User.service_account("team", "reader"))
    as_reader = {"Authorization": "Bearer reader-token"}

    def call(method, path, body=None):
        return requests.request(method, apiserver.url + path, json=body, headers=as_reader, timeout=10)

    assert call("GET", CONFIGMAPS).status_code == 200
    assert call("GET", "/api").status_code == 200  # discovery: every authenticated user
    elsewhere = call("GET", "/api/v1/namespaces/team/configmaps")
    assert elsewhere.status_code == 403
    assert elsewhere.json()["message"] == ('configmaps is forbidden: User "system:serviceaccount:team:reader" cannot '
                                           'list resource "configmaps" in API group "" in the namespace "team"')
    write = call("POST", CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})
    assert write.status_code == 403 and "cannot create" in write.json()["message"]
    assert call("GET", "/api/v1/configmaps").status_code == 403  # across namespaces needs a ClusterRole
    # Every other token is the admin's.
    assert client.post(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}).status_code == 201


def test_an_apply_that_creates_needs_create_as_well_as_patch(apiserver):
    from tests.kube.rbac import User

    apiserver.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "patcher"},
                      "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["patch"]}]})
    apiserver.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                      "metadata": {"name": "patcher"},
                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "patcher"},
                      "subjects": [{"kind": "User", "name": "patcher"}]})
    apiserver.authorize_token("patcher-token", User("patcher"))
    headers = {"Authorization": "Bearer patcher-token", "Content-Type": "application/apply-patch+yaml"}
    body = yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"x": "1"}})
    url = f"{apiserver.url}{CONFIGMAPS}/a?fieldManager=me"
    refused = requests.patch(url, data=body, headers=headers, timeout=10)
    assert refused.status_code == 403 and "cannot create" in refused.json()["message"]
    apiserver.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "default"}})
    assert requests.patch(url, data=body, headers=headers, timeout=10).status_code == 200
