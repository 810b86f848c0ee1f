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
