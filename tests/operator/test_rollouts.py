"""Rollouts through the real kopf operator on the emulated API server: a strategy that fits the tier, a
PodDisruptionBudget for stages of several replicas, readiness over old and new pods, and a stuck rollout
reported with the scheduler's message.

No Deployment controller, scheduler or kubelet runs here: where a test needs a rollout in progress or
a Pod the scheduler could not place, it writes the status those controllers would write, and says so.
"""

from __future__ import annotations

from tests.kube.apiserver import now_rfc3339
from tests.operator.conftest import NS, ROOT, Cluster

CAPTIONING = ROOT / "examples" / "captioning.yaml"
VERIFIER = "captioning-verifier"
UNSCHEDULABLE = "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) didn't match Pod's node affinity/selector."


def captioning_on(apiserver, run_kopf_operator, cloud_cpu: str = "4") -> Cluster:
    apiserver.kubectl("apply", "--validate=false", "-f", str(ROOT / "crds" / "aiflow.io_aiflows.yaml"))
    for tier in ("device", "edge"):
        apiserver.seed_node(f"{tier}-1", tier)
    apiserver.seed_node("cloud-1", "cloud", allocatable={"cpu": cloud_cpu, "memory": "8Gi", "pods": "110"})
    run_kopf_operator("aiflow.controller.handlers")
    cluster = Cluster(apiserver)
    cluster.apply(CAPTIONING)
    cluster.wait(lambda: len(cluster.children("captioning")) == 3, message="3 deployments")
    return cluster


def ready(cluster: Cluster):
    controller = cluster.api.start_deployment_controller()  # says so: Deployments report ready replicas
    cluster.wait_condition("captioning", "Ready", "True")
    return controller


def rolling(cluster: Cluster, name: str = VERIFIER) -> dict:
    return cluster.api.get("deployments", name, NS)["spec"]["strategy"]["rollingUpdate"]


def test_a_tier_the_flow_fills_rolls_one_pod_at_a_time_and_a_tier_with_room_surges(apiserver, run_kopf_operator):
    # The verifier's two replicas of cpu 1 fill the 2-CPU cloud node: a surge pod could never be placed.
    cluster = captioning_on(apiserver, run_kopf_operator, cloud_cpu="2")
    assert rolling(cluster) == {"maxSurge": 0, "maxUnavailable": 1}
    assert rolling(cluster, "captioning-head") == {"maxSurge": 1, "maxUnavailable": 0}
    # A bigger cloud node joins: now there is room for one more, and make-before-break comes back.
    apiserver.seed_node("cloud-2", "cloud", allocatable={"cpu": "8", "memory": "8Gi", "pods": "110"})
    cluster.wait(lambda: rolling(cluster) == {"maxSurge": 1, "maxUnavailable": 0}, message="the surge back")


def test_a_stage_of_several_replicas_has_a_disruption_budget_that_goes_with_it(apiserver, run_kopf_operator, garbage_collector):
    cluster = captioning_on(apiserver, run_kopf_operator)
    budgets = cluster.wait(lambda: cluster.children("captioning", "poddisruptionbudgets"), message="a budget")
    assert set(budgets) == {VERIFIER}
    budget = budgets[VERIFIER]
    deployment = apiserver.get("deployments", VERIFIER, NS)
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    assert budget["metadata"]["ownerReferences"][0]["name"] == "captioning"
    # One replica: no budget (it would block every drain of the node).
    flow = cluster.flow("captioning")
    stages = flow["spec"]["stages"]
    stages[2]["replicas"] = 1
    apiserver.patch("aiflows", "captioning", {"spec": {"stages": stages}}, NS)
    cluster.wait(lambda: not cluster.children("captioning", "poddisruptionbudgets"), message="the budget deleted")
    stages[2]["replicas"] = 3
    apiserver.patch("aiflows", "captioning", {"spec": {"stages": stages}}, NS)
    cluster.wait(lambda: cluster.children("captioning", "poddisruptionbudgets"), message="the budget back")
    apiserver.kubectl("delete", "aiflow", "captioning", "--wait=false")
    cluster.wait(lambda: not cluster.children("captioning", "poddisruptionbudgets"), message="garbage collected")


def mid_rollout(cluster: Cluster, name: str = VERIFIER, **conditions) -> None:
    """Write the status the Deployment controller reports while it surges one new pod beside the two
    old ones, which still serve (as on a real cluster: readyReplicas counts both ReplicaSets)."""
    dep = cluster.api.get("deployments", name, NS)
    stamp = now_rfc3339()
    progressing = conditions.get("progressing", ("True", "ReplicaSetUpdated", f'ReplicaSet "{name}-2" is progressing.'))
    cluster.api.patch("deployments", name, {"status": {
        "observedGeneration": dep["metadata"]["generation"], "replicas": 3, "updatedReplicas": 1,
        "readyReplicas": 2, "availableReplicas": 2, "unavailableReplicas": 1,
        "conditions": [
            {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
             "message": "Deployment has minimum availability.", "lastUpdateTime": stamp, "lastTransitionTime": stamp},
            {"type": "Progressing", "status": progressing[0], "reason": progressing[1], "message": progressing[2],
             "lastUpdateTime": stamp, "lastTransitionTime": stamp}]}}, NS, subresource="status")


def change_verifier_env(cluster: Cluster, value: str) -> None:
    stages = cluster.flow("captioning")["spec"]["stages"]
    stages[2]["env"] = [{"name": "LOG_LEVEL", "value": value}]
    cluster.api.patch("aiflows", "captioning", {"spec": {"stages": stages}}, NS)


def verifier_env(cluster: Cluster) -> dict:
    (container,) = cluster.api.get("deployments", VERIFIER, NS)["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_a_template_update_keeps_the_flow_ready_while_the_old_pods_serve(apiserver, run_kopf_operator):
    cluster = captioning_on(apiserver, run_kopf_operator)
    ready(cluster).stop()  # from here on the test plays the Deployment controller by hand
    transition = cluster.condition("captioning", "Ready")["lastTransitionTime"]
    change_verifier_env(cluster, "verbose")
    # The operator patches the template; the Deployment controller has not seen it yet.
    cluster.wait(lambda: verifier_env(cluster).get("LOG_LEVEL") == "verbose", message="the template update")
    mark = len(apiserver.request_log)
    mid_rollout(cluster)
    # The operator watches its Deployments: the rollout's progress makes it reconcile.
    cluster.wait(lambda: cluster.operator_reads("deployments", mark), message="a reconcile during the rollout")
    finished = len(apiserver.request_log)
    apiserver.mark_deployments_ready(NS)  # the rollout finishes
    # Reconciles of a flow run one at a time: one that starts now comes after the earlier ones.
    cluster.wait(lambda: cluster.operator_reads("deployments", finished), message="a reconcile after the rollout")
    ready_now = cluster.condition("captioning", "Ready")
    assert ready_now["status"] == "True" and ready_now["lastTransitionTime"] == transition
    assert cluster.events("StagesNotReady") == []
    assert cluster.condition("captioning", "RolloutStuck")["status"] == "False"


def unschedulable_pod(cluster: Cluster, name: str = f"{VERIFIER}-7d9f-x2k4q") -> None:
    """A new-ReplicaSet Pod of the verifier as the scheduler leaves it when it does not fit (no
    scheduler runs here: the test writes its PodScheduled condition)."""
    template = cluster.api.get("deployments", VERIFIER, NS)["spec"]["template"]
    cluster.api.create({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": name, "namespace": NS, "labels": template["metadata"]["labels"]},
                        "spec": template["spec"]})
    cluster.api.patch("pods", name, {"status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": UNSCHEDULABLE,
         "lastTransitionTime": now_rfc3339()}]}}, NS, subresource="status")


def test_an_unschedulable_rollout_is_reported_with_the_schedulers_message(apiserver, run_kopf_operator):
    cluster = captioning_on(apiserver, run_kopf_operator)
    ready(cluster).stop()
    change_verifier_env(cluster, "verbose")
    cluster.wait(lambda: verifier_env(cluster).get("LOG_LEVEL") == "verbose", message="the template update")
    unschedulable_pod(cluster)
    mid_rollout(cluster)
    stuck = cluster.wait_condition("captioning", "RolloutStuck", "True", "PodsUnschedulable")
    assert f"stage verifier (Deployment {VERIFIER})" in stuck["message"] and UNSCHEDULABLE in stuck["message"]
    (event,) = cluster.wait(lambda: cluster.events("PodsUnschedulable"), message="a Warning Event")
    assert event["type"] == "Warning" and UNSCHEDULABLE in event["message"]
    assert cluster.condition("captioning", "Ready")["status"] == "True"  # the old pods still serve
    # The rollout gets its room and finishes: the condition clears.
    apiserver.delete("pods", f"{VERIFIER}-7d9f-x2k4q", NS)
    apiserver.mark_deployments_ready(NS)
    cluster.wait_condition("captioning", "RolloutStuck", "False", "RolloutsProgressing")


def test_a_rollout_past_its_progress_deadline_is_reported(apiserver, run_kopf_operator):
    cluster = captioning_on(apiserver, run_kopf_operator)
    ready(cluster).stop()
    change_verifier_env(cluster, "verbose")
    cluster.wait(lambda: verifier_env(cluster).get("LOG_LEVEL") == "verbose", message="the template update")
    message = f'ReplicaSet "{VERIFIER}-2" has timed out progressing.'
    mid_rollout(cluster, progressing=("False", "ProgressDeadlineExceeded", message))
    stuck = cluster.wait_condition("captioning", "RolloutStuck", "True", "ProgressDeadlineExceeded")
    assert message in stuck["message"]
    (event,) = cluster.wait(lambda: cluster.events("ProgressDeadlineExceeded"), message="a Warning Event")
    assert event["type"] == "Warning"
