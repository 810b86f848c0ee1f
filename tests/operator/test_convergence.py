"""What the real API server does to what the operator writes, and the operator converging anyway:
the real kopf operator on the emulated API server, which stores objects as a real one does (empty
values dropped, defaults filled in) and keeps field ownership for server-side apply.

Each test ends with a full reconcile that must write nothing: a flow that converged stays so.
"""

from __future__ import annotations

from tests.operator.conftest import NS, aiflow

HEAD = {"name": "head", "model": "vision_head", "tier": "device"}
TAIL = {"name": "tail", "model": "vision_tail", "tier": "edge"}
DECODER = {"name": "decoder", "model": "caption_decoder", "tier": "cloud"}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def test_a_stage_env_var_with_an_empty_value_converges_without_repeated_writes(cluster):
    cluster.api.create(aiflow("quiet", {**HEAD, "env": [{"name": "EMPTY", "value": ""}, {"name": "SET", "value": "x"}]},
                              DECODER))
    cluster.wait(lambda: len(cluster.children("quiet")) == 2, message="2 deployments")
    cluster.api.start_deployment_controller()
    cluster.wait_condition("quiet", "Ready", "True")
    env = {e["name"]: e.get("value") for e in container(cluster.children("quiet")["quiet-head"])["env"]}
    assert env["EMPTY"] is None and env["SET"] == "x"  # stored as a real server stores it: no empty value
    for touch in ("1", "2"):
        assert cluster.writes_of_a_full_reconcile("quiet", touch) == []


def test_a_field_removed_from_the_spec_is_removed_from_the_cluster(cluster):
    limited = {**HEAD, "resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "2", "memory": "2Gi"}}}
    cluster.api.create(aiflow("trim", limited, DECODER))
    cluster.wait(lambda: "limits" in container(cluster.children("trim").get("trim-head") or
                                               {"spec": {"template": {"spec": {"containers": [{}]}}}}).get("resources", {}),
                 message="the head with limits")
    stages = cluster.flow("trim")["spec"]["stages"]
    stages[0]["resources"] = {"requests": {"cpu": "1"}}
    cluster.api.patch("aiflows", "trim", {"spec": {"stages": stages}}, NS)
    cluster.wait(lambda: container(cluster.children("trim")["trim-head"])["resources"] == {"requests": {"cpu": "1"}},
                 message="the limits removed from the head's Deployment")
    cluster.wait(lambda: cluster.flow("trim")["status"].get("observedGeneration") == cluster.flow("trim")["metadata"]["generation"],
                 message="the reconcile of the change finished")
    assert cluster.writes_of_a_full_reconcile("trim") == []


def test_a_renamed_stage_replaces_its_objects_and_converges(cluster):
    cluster.api.create(aiflow("renamed", HEAD, TAIL, DECODER))
    cluster.wait(lambda: len(cluster.children("renamed")) == 3, message="3 deployments")
    stages = cluster.flow("renamed")["spec"]["stages"]
    stages[1]["name"] = "middle"
    cluster.api.patch("aiflows", "renamed", {"spec": {"stages": stages}}, NS)
    names = {"renamed-head", "renamed-middle", "renamed-decoder"}
    cluster.wait(lambda: set(cluster.children("renamed")) == set(cluster.children("renamed", "services")) == names,
                 message="the renamed stage's objects in place of the old ones")
    env = {e["name"]: e.get("value") for e in container(cluster.children("renamed")["renamed-head"])["env"]}
    assert env["AIFLOW_NEXT_URL"] == f"renamed-middle.{NS}.svc:8001"
    cluster.api.start_deployment_controller()
    cluster.wait_condition("renamed", "Ready", "True")
    assert cluster.writes_of_a_full_reconcile("renamed") == []


def test_a_hand_edit_of_an_owned_field_is_put_back_by_a_forced_apply(cluster):
    cluster.api.create(aiflow("edited", HEAD, DECODER))
    cluster.wait(lambda: len(cluster.children("edited")) == 2, message="2 deployments")
    cluster.api.kubectl("patch", "deployment", "edited-head", "--type=merge", "-p",
                        '{"metadata":{"labels":{"aiflow.io/stage":"tampered","team":"ours"}}}')
    cluster.writes_of_a_full_reconcile("edited")
    cluster.wait(lambda: cluster.children("edited")["edited-head"]["metadata"]["labels"]["aiflow.io/stage"] == "head",
                 message="the operator's label back")
    labels = cluster.children("edited")["edited-head"]["metadata"]["labels"]
    # The operator's own label is back; a label someone else added is theirs and stays.
    assert labels["aiflow.io/stage"] == "head" and labels["team"] == "ours"
    assert cluster.writes_of_a_full_reconcile("edited", "2") == []


def test_objects_written_before_server_side_apply_lose_the_fields_no_longer_rendered(apiserver):
    """An object a version before server-side apply wrote (create, then merge patches, under the
    same manager name with operation Update): the first apply upgrades that entry, so a field the
    old writes set and the spec no longer renders is removed, as for objects applied from the start."""
    from aiflow.api.cluster import ClusterView
    from aiflow.api.spec import parse_flow
    from aiflow.controller.apply import apply_flow, list_owned
    from aiflow.controller.kube import KubeApi
    from aiflow.controller.revisions import render_revision
    from aiflow.planner.placement import resolve_placement
    from aiflow.render.names import flow_selector

    for tier in ("device", "cloud"):
        apiserver.seed_node(f"{tier}-1", tier)
    apiserver.kubectl("apply", "--validate=false", "-f", "crds/aiflow.io_aiflows.yaml")
    body = apiserver.create(aiflow("old", {**HEAD, "resources": {"limits": {"cpu": "2"}}}, DECODER))
    api = KubeApi.from_environment(str(apiserver.kubeconfig))

    def objects(manifest):
        flow = parse_flow(manifest, NS)
        return render_revision(flow, resolve_placement(flow, ClusterView.every_tier()), 1, 1)

    for obj in objects(body):  # as the old operator did: POST, manager = its User-Agent's name
        path = f"/apis/apps/v1/namespaces/{NS}/deployments" if obj["kind"] == "Deployment" else f"/api/v1/namespaces/{NS}/services"
        api.create(path, obj)
    head = apiserver.get("deployments", "old-head", NS)
    assert [(e["manager"], e["operation"]) for e in head["metadata"]["managedFields"]] == [("aiflow-operator", "Update")]

    assert container(head)["resources"]["limits"]["cpu"] == "2"
    body["spec"]["stages"][0].pop("resources")
    rendered = objects(body)
    apply_flow(api, rendered, list_owned(api, NS, flow_selector("old")), body["metadata"]["uid"])
    resources = container(apiserver.get("deployments", "old-head", NS))["resources"]
    assert "cpu" not in resources.get("limits", {}) and resources == container(rendered[1])["resources"]
    assert [(e["manager"], e["operation"]) for e in apiserver.get("deployments", "old-head", NS)["metadata"]["managedFields"]] \
        == [("aiflow-operator", "Apply")]
    again, _ = apply_flow(api, objects(body), list_owned(api, NS, flow_selector("old")), body["metadata"]["uid"])
    assert again == []
