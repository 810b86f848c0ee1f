"""The operator end to end: the real kopf operator reconciling AIFlows on the emulated API server."""

from __future__ import annotations

import pytest

from tests.operator.conftest import NS, ROOT, WRITES, Cluster, aiflow

CAPTIONING = ROOT / "examples" / "captioning.yaml"
STAGES = {"captioning-head": "device", "captioning-drafter": "edge", "captioning-verifier": "cloud"}


def env_of(deployment: dict) -> dict[str, str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"]}


def ready_captioning(cluster) -> dict:
    """kubectl apply the example and play the Deployment controller until the flow is Ready."""
    cluster.apply(CAPTIONING)
    cluster.wait(lambda: len(cluster.children("captioning")) == 3, message="3 deployments")
    cluster.api.start_deployment_controller()  # no kubelet here: Deployments report ready replicas
    return cluster.wait_condition("captioning", "Ready", "True")


def test_kubectl_apply_of_the_example_yields_a_wired_flow_that_becomes_ready(apiserver, run_kopf_operator):
    for tier in ("device", "edge", "cloud"):
        apiserver.seed_node(f"{tier}-1", tier)
    run_kopf_operator("aiflow.controller.handlers")
    # As on a real cluster, kubectl maps the example's kind only once the CRD is served: two applies.
    apiserver.kubectl("apply", "--validate=false", "-f", str(ROOT / "crds"))
    cluster = Cluster(apiserver)
    cluster.apply(CAPTIONING)
    cluster.wait(lambda: len(cluster.children("captioning")) == 3 and len(cluster.children("captioning", "services")) == 3,
                 message="a Deployment and a Service per stage")
    pending = cluster.wait_condition("captioning", "Ready", "False", "StagesNotReady")
    assert "0/3 stages ready" in pending["message"]

    deployments, services = cluster.children("captioning"), cluster.children("captioning", "services")
    assert set(deployments) == set(services) == set(STAGES)
    for name, tier in STAGES.items():
        pod = deployments[name]["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"aiflow.io/tier": tier}
        assert deployments[name]["metadata"]["ownerReferences"][0]["name"] == "captioning"
    assert env_of(deployments["captioning-head"])["AIFLOW_NEXT_URL"] == "captioning-drafter.default.svc:8001"
    assert env_of(deployments["captioning-drafter"])["AIFLOW_NEXT_URL"] == "captioning-verifier.default.svc:8001"
    assert "AIFLOW_NEXT_URL" not in env_of(deployments["captioning-verifier"])

    cluster.api.start_deployment_controller()  # says so: plays the Deployment controller and kubelets
    ready = cluster.wait_condition("captioning", "Ready", "True", "AllStagesReady")
    status = cluster.flow("captioning")["status"]
    assert status["phase"] == "Ready" and status["readyStages"] == "3/3"
    assert status["observedGeneration"] == cluster.flow("captioning")["metadata"]["generation"]
    assert status["placement"] == "head:device, drafter:edge, verifier:cloud"
    assert [s["endpoint"] for s in status["stages"]] == [f"{n}.default.svc:8001" for n in STAGES]
    assert status["links"][0] == {"from": "device", "to": "edge", "bandwidthMbps": 20.0, "rttMs": 10.0, "source": "Declared"}
    assert ready["message"] == "3/3 stages ready"
    table = apiserver.kubectl("get", "af").stdout
    assert "captioning" in table and "Ready" in table and "3/3" in table
    assert apiserver.warnings == []  # the emulated API server evaluated every CEL rule of the CRD
    cluster.wait(lambda: {"Created", "FlowReady"} <= {e["reason"] for e in cluster.events()},
                 message="Events for the placement and objects, and readiness")
    (created,) = cluster.events("Created")
    assert created["message"].startswith("placed head:device, drafter:edge, verifier:cloud (head: pinned to device")
    assert "created Deployment captioning-verifier" in created["message"]


def test_a_second_reconcile_writes_nothing(cluster):
    ready_captioning(cluster)
    transition = cluster.condition("captioning", "Ready")["lastTransitionTime"]
    assert cluster.writes_of_a_full_reconcile("captioning") == []
    assert cluster.condition("captioning", "Ready")["lastTransitionTime"] == transition


def test_a_spec_change_patches_only_what_changed(cluster):
    ready_captioning(cluster)
    before = cluster.children("captioning")
    mark = len(cluster.api.request_log)
    flow = cluster.flow("captioning")
    stages = flow["spec"]["stages"]
    stages[2]["replicas"] = 3
    cluster.api.patch("aiflows", "captioning", {"spec": {"stages": stages}}, NS)
    cluster.wait(lambda: cluster.children("captioning")["captioning-verifier"]["spec"]["replicas"] == 3,
                 message="verifier scaled to 3")
    writes = cluster.operator_writes(mark)
    children = [(r.verb, r.resource, r.name) for r in writes if r.resource in ("deployments", "services")]
    assert children == [("patch", "deployments", "captioning-verifier")]
    after = cluster.children("captioning")
    for name in ("captioning-head", "captioning-drafter"):
        assert after[name]["metadata"]["resourceVersion"] == before[name]["metadata"]["resourceVersion"]
    cluster.wait_condition("captioning", "Ready", "True")
    # The status is written after the objects, by the same reconcile: wait for it, do not race it.
    cluster.wait(lambda: cluster.flow("captioning")["status"]["observedGeneration"] == cluster.flow("captioning")["metadata"]["generation"],
                 message="the status of the new generation")


def test_removing_a_stage_deletes_its_objects_and_rewires(cluster):
    three = aiflow("chain", {"name": "head", "model": "vision_head", "tier": "device"},
                   {"name": "tail", "model": "vision_tail", "tier": "edge"},
                   {"name": "decoder", "model": "caption_decoder", "tier": "cloud"})
    cluster.api.create(three)
    cluster.wait(lambda: len(cluster.children("chain")) == 3, message="3 deployments")
    assert env_of(cluster.children("chain")["chain-head"])["AIFLOW_NEXT_URL"] == "chain-tail.default.svc:8001"
    stages = cluster.flow("chain")["spec"]["stages"]
    cluster.api.patch("aiflows", "chain", {"spec": {"stages": [stages[0], stages[2]]}}, NS)
    remaining = {"chain-head", "chain-decoder"}
    cluster.wait(lambda: set(cluster.children("chain")) == set(cluster.children("chain", "services")) == remaining,
                 message="the tail Deployment and Service deleted")
    assert env_of(cluster.children("chain")["chain-head"])["AIFLOW_NEXT_URL"] == "chain-decoder.default.svc:8001"
    cluster.wait(lambda: any("Deployment chain-tail" in e["message"] for e in cluster.events("Deleted")),
                 message="an Event about the deletion")


def test_deleting_the_flow_leaves_nothing_behind(cluster, garbage_collector):
    ready_captioning(cluster)
    cluster.api.kubectl("delete", "af", "captioning", "--wait=false")
    cluster.wait(lambda: cluster.flow("captioning") is None, message="the AIFlow gone")
    cluster.wait(
        lambda: not cluster.children("captioning") and not cluster.children("captioning", "services"),
        message="its Deployments and Services garbage-collected")
    mark = len(cluster.api.request_log)
    cluster.wait(lambda: not cluster.children("captioning"), message="nothing recreated")
    assert [r for r in cluster.operator_writes(mark) if r.verb == "create"] == []


def test_an_invalid_spec_is_reported_creates_nothing_and_leaves_other_flows_alone(cluster):
    bad = aiflow("bad", {"name": "head", "model": "vision_head", "tier": "device"},
                 {"name": "verifier", "model": "caption_verifier", "tier": "cloud"})
    good = aiflow("good", {"name": "all", "model": "captioner", "tier": "edge"})
    cluster.api.create(bad)
    cluster.api.create(good)
    ready = cluster.wait_condition("bad", "Ready", "False", "InvalidSpec")
    valid = cluster.condition("bad", "SpecValid")
    assert valid["status"] == "False" and "spec.stages[1].model" in valid["message"]
    assert "accepts drafts" in valid["message"] and "caption_decoder" in valid["message"]
    assert cluster.flow("bad")["status"]["phase"] == "Invalid"
    assert "spec.stages[1].model" in ready["message"]
    assert cluster.children("bad") == {} and cluster.children("bad", "services") == {}
    warnings = cluster.wait(
        lambda: [e for e in cluster.events("InvalidSpec") if e["involvedObject"]["name"] == "bad"], message="a Warning")
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning"

    cluster.wait(lambda: "good-all" in cluster.children("good"), message="the other flow deployed")
    cluster.api.start_deployment_controller()
    cluster.wait_condition("good", "Ready", "True")

    # No retry storm: while nothing changes, the invalid flow is left alone (kopf does not retry it).
    mark = len(cluster.api.request_log)
    cluster.api.patch("aiflows", "good", {"metadata": {"annotations": {"example.com/touch": "1"}}}, NS)
    cluster.wait(lambda: [r for r in cluster.operator_reads("aiflows", mark) if r.name == "good"],
                 message="a reconcile of the other flow")
    assert [r for r in cluster.api.request_log[mark:] if r.name == "bad" and r.verb in WRITES] == []

    # Fixing the spec heals the flow.
    stages = cluster.flow("bad")["spec"]["stages"]
    stages[1]["model"] = "caption_decoder"
    cluster.api.patch("aiflows", "bad", {"spec": {"stages": stages}}, NS)
    cluster.wait_condition("bad", "Ready", "True")
    assert cluster.condition("bad", "SpecValid")["status"] == "True"


def test_a_tier_without_nodes_waits_without_creating_anything_then_heals(bare_cluster):
    cluster = bare_cluster
    cluster.api.seed_node("device-1", "device")
    cluster.api.seed_node("cloud-1", "cloud")
    cluster.apply(CAPTIONING)
    ready = cluster.wait_condition("captioning", "Ready", "False", "NoNodesForTier")
    assert "aiflow.io/tier=edge" in ready["message"] and "drafter" in ready["message"]
    tiers = cluster.condition("captioning", "TiersSchedulable")
    assert tiers["status"] == "False" and tiers["reason"] == "NoNodesForTier"
    assert cluster.flow("captioning")["status"]["phase"] == "Unschedulable"
    assert cluster.children("captioning") == {} and cluster.children("captioning", "services") == {}
    assert [e["type"] for e in cluster.wait(lambda: cluster.events("NoNodesForTier"))] == ["Warning"]

    cluster.api.seed_node("edge-1", "edge")  # a node joins the edge tier
    cluster.wait(lambda: len(cluster.children("captioning")) == 3, message="the flow deployed once edge has a node")
    # The status follows the objects in the same reconcile (after the disruption budget and a look at the pods).
    cluster.wait_condition("captioning", "TiersSchedulable", "True")
    assert cluster.children("captioning")["captioning-drafter"]["spec"]["template"]["spec"]["nodeSelector"] == {
        "aiflow.io/tier": "edge"}


def test_auto_tiers_are_planned_on_the_nodes_there_are(bare_cluster):
    cluster = bare_cluster
    cluster.api.seed_node("edge-1", "edge", labels={"aiflow.io/compute-factor": "4"})  # a slow edge
    cluster.api.seed_node("cloud-1", "cloud", labels={"aiflow.io/compute-factor": "0.25"})
    cluster.apply(ROOT / "examples" / "auto-placement.yaml")
    cluster.wait(lambda: len(cluster.children("auto-placement")) == 3, message="3 deployments")
    tiers = {n: d["spec"]["template"]["spec"]["nodeSelector"]["aiflow.io/tier"]
             for n, d in cluster.children("auto-placement").items()}
    # No device node; the planner predicts the fast cloud beats sending the image to the slow edge.
    assert tiers == {"auto-placement-head": "cloud", "auto-placement-drafter": "cloud", "auto-placement-verifier": "cloud"}
    status = cluster.wait(lambda: (cluster.flow("auto-placement") or {}).get("status", {}).get("plan"))
    assert status["planner"] == "Solver" and status["revision"] == 1
    assert status["placement"] == {"head": "cloud", "drafter": "cloud", "verifier": "cloud"}
    assert "ms predicted" in status["reason"] and status["predictedLatencyMs"] > 0
    head = env_of(cluster.children("auto-placement")["auto-placement-head"])
    assert head["AIFLOW_SPLIT_LAYER"] == str(status["splitLayer"]) and head["AIFLOW_CODEC"] == status["codec"]
    assert cluster.flow("auto-placement")["status"]["placement"] == "head:cloud, drafter:cloud, verifier:cloud"


def test_a_deleted_child_is_recreated(cluster):
    ready_captioning(cluster)
    cluster.api.delete("deployments", "captioning-drafter", NS)
    cluster.wait(lambda: "captioning-drafter" in cluster.children("captioning"), message="recreated")


def test_the_api_server_rejects_a_schema_invalid_manifest(cluster, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CAPTIONING.read_text().replace("tier: edge", "tier: fog"))
    result = cluster.api.kubectl("apply", "--validate=false", "-f", str(bad), check=False)
    assert result.returncode != 0 and "fog" in result.stderr
    assert cluster.flow("captioning") is None and cluster.children("captioning") == {}


def test_an_invalid_update_keeps_the_running_flow(cluster):
    ready_captioning(cluster)
    before = cluster.children("captioning")
    stages = cluster.flow("captioning")["spec"]["stages"]
    stages[1]["model"] = "caption_decoder"  # emits a caption, but the verifier after it wants drafts
    cluster.api.patch("aiflows", "captioning", {"spec": {"stages": stages}}, NS)
    cluster.wait_condition("captioning", "Ready", "False", "InvalidSpec")
    status = cluster.flow("captioning")["status"]
    assert status["phase"] == "Invalid"
    assert status["observedGeneration"] == cluster.flow("captioning")["metadata"]["generation"]
    assert status["readyStages"] == "3/3" and len(status["stages"]) == 3  # the last known state
    after = cluster.children("captioning")
    assert {n: d["metadata"]["resourceVersion"] for n, d in after.items()} == \
        {n: d["metadata"]["resourceVersion"] for n, d in before.items()}


def test_a_tier_losing_its_nodes_is_reported_and_the_running_stages_are_kept(cluster):
    ready_captioning(cluster)
    before = {n: d["metadata"]["resourceVersion"] for n, d in cluster.children("captioning").items()}
    cluster.api.set_node_ready("edge-1", False)  # the only edge node goes NotReady
    ready = cluster.wait_condition("captioning", "Ready", "False", "NoNodesForTier")
    assert "tier edge" in ready["message"]
    assert cluster.flow("captioning")["status"]["phase"] == "Unschedulable"
    assert {n: d["metadata"]["resourceVersion"] for n, d in cluster.children("captioning").items()} == before
    cluster.api.set_node_ready("edge-1", True)
    cluster.wait_condition("captioning", "Ready", "True")
    cluster.wait_condition("captioning", "TiersSchedulable", "True")  # written after the objects


def test_the_operator_watches_only_its_own_objects_and_the_tier_nodes(cluster):
    cluster.api.create({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "other", "namespace": NS},
                        "spec": {"selector": {"matchLabels": {"app": "other"}}, "template": {
                            "metadata": {"labels": {"app": "other"}},
                            "spec": {"containers": [{"name": "c", "image": "registry.example/other:1"}]}}}})
    ready_captioning(cluster)
    watches = {}
    for r in cluster.api.request_log:
        if r.user_agent.startswith("kopf") and r.verb in ("list", "watch") and r.resource in ("deployments", "services", "nodes"):
            watches.setdefault((r.resource, r.verb), set()).add(r.label_selector)
    # Filtered by the API server: the operator never receives another Deployment, or a node of no tier.
    assert watches[("deployments", "watch")] == watches[("services", "watch")] == {"app.kubernetes.io/managed-by=aiflow-operator"}
    assert watches[("nodes", "watch")] == {"aiflow.io/tier"}
    assert all(None not in selectors for selectors in watches.values())


def test_a_deleted_service_is_put_back_without_waiting_for_the_resync(cluster):
    ready_captioning(cluster)
    cluster.api.kubectl("delete", "service", "captioning-drafter")
    # The resync is 30 s away: the Service watch brings it back first.
    cluster.wait(lambda: "captioning-drafter" in cluster.children("captioning", "services"),
                 message="the Service recreated", timeout=20)
