"""The pure parts of reconcile: whether an apply would change anything, and the status and Events it reports."""

import copy

from aiflow.api.problems import NO_NODES_FOR_TIER, Problem
from aiflow.api.spec import parse_flow
from aiflow.controller.apply import Action, differences, extract, managed, unchanged
from aiflow.controller.reconcile import decisions
from aiflow.controller.status import (
    Observation, StageState, build_status, changed_conditions, deployment_ready_replicas, rolled_out, status_patch,
    stuck_reason,
)

# As a live object reads after the operator applied DESIRED: the server normalised the quantities,
# dropped the empty env value, added defaults and another manager's label.
OWNED = {"f:metadata": {"f:labels": {"f:a": {}}},
         "f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {'k:{"name":"c"}': {
             ".": {}, "f:name": {}, "f:image": {}, "f:env": {'k:{"name":"E"}': {".": {}, "f:name": {}, "f:value": {}}},
             "f:resources": {"f:requests": {"f:cpu": {}, "f:memory": {}}}}}}}}}
LIVE = {
    "metadata": {"labels": {"a": "1", "added-by-someone": "x"}, "annotations": {"deployment.kubernetes.io/revision": "1"},
                 "managedFields": [{"manager": "aiflow-operator", "operation": "Apply", "fieldsV1": OWNED},
                                   {"manager": "kubectl", "operation": "Update", "fieldsV1": {}}]},
    "spec": {"replicas": 1, "progressDeadlineSeconds": 600,
             "template": {"spec": {"containers": [{"name": "c", "image": "i:1", "terminationMessagePath": "/dev/x",
                                                   "env": [{"name": "E"}],
                                                   "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}]}}},
}
DESIRED = {
    "metadata": {"labels": {"a": "1"}},
    "spec": {"replicas": 1, "template": {"spec": {"containers": [
        {"name": "c", "image": "i:1", "env": [{"name": "E", "value": ""}],
         "resources": {"requests": {"cpu": "1000m", "memory": "1024Mi"}}}]}}},
}


def test_defaults_others_fields_dropped_empty_values_and_normalised_quantities_are_no_change():
    assert unchanged(DESIRED, LIVE)


def test_a_changed_value_is_a_change_and_names_its_path():
    desired = copy.deepcopy(DESIRED)
    desired["spec"]["replicas"] = 3
    desired["metadata"]["labels"]["a"] = "2"
    assert not unchanged(desired, LIVE)
    owned = managed(extract(LIVE, OWNED))
    assert list(differences(managed(desired), owned)) == ["metadata.labels.a", "spec.replicas"]


def test_a_field_no_longer_rendered_is_a_change_the_apply_removes():
    desired = copy.deepcopy(DESIRED)
    del desired["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"]
    assert not unchanged(desired, LIVE)
    owned = managed(extract(LIVE, OWNED))
    assert list(differences(managed(desired), owned)) == ["spec.template.spec"]


def test_an_object_the_operator_never_applied_is_applied():
    never = copy.deepcopy(LIVE)
    never["metadata"]["managedFields"] = never["metadata"]["managedFields"][1:]
    assert not unchanged(DESIRED, never)


def test_extract_reads_the_owned_fields_only():
    assert extract(LIVE, OWNED)["metadata"] == {"labels": {"a": "1"}}
    (container,) = extract(LIVE, OWNED)["spec"]["template"]["spec"]["containers"]
    assert "terminationMessagePath" not in container and container["env"] == [{"name": "E"}]


def flow():
    return parse_flow({"apiVersion": "aiflow.io/v1alpha1", "kind": "AIFlow", "metadata": {"name": "f", "namespace": "n"},
                       "spec": {"stages": [{"name": "a", "model": "vision_head", "tier": "device"},
                                           {"name": "b", "model": "caption_decoder", "tier": "cloud"}]}})


def obs(ready=(True, True), **kwargs):
    stages = tuple(StageState(n, "m", t, "pinned", 1, int(r), True) for n, t, r in zip("ab", ("device", "cloud"), ready))
    return Observation(generation=2, stages=stages, **kwargs)


def conditions(status):
    return {c["type"]: c for c in status["conditions"]}


def test_status_of_a_ready_flow():
    status = build_status(flow(), obs(), None, "T1")
    assert status["phase"] == "Ready" and status["readyStages"] == "2/2" and status["observedGeneration"] == 2
    c = conditions(status)
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("True", "AllStagesReady")
    assert all(x["lastTransitionTime"] == "T1" and x["observedGeneration"] == 2 for x in c.values())
    assert status["stages"][1]["endpoint"] == "f-b.n.svc:8001"


def test_transition_time_changes_only_when_the_status_flips():
    first = build_status(flow(), obs(ready=(True, False)), None, "T1")
    assert conditions(first)["Ready"]["reason"] == "StagesNotReady"
    assert "b (0/1 replicas ready)" in conditions(first)["Ready"]["message"]
    same = build_status(flow(), obs(ready=(False, False)), first, "T2")
    assert conditions(same)["Ready"]["lastTransitionTime"] == "T1"
    flipped = build_status(flow(), obs(), same, "T3")
    assert conditions(flipped)["Ready"]["lastTransitionTime"] == "T3"
    assert conditions(flipped)["SpecValid"]["lastTransitionTime"] == "T1"


def test_invalid_spec_keeps_the_last_known_stages():
    ready = build_status(flow(), obs(), None, "T1")
    invalid = build_status(None, Observation(3, spec_problems=(Problem("spec.stages[0].model", "unknown"),)), ready, "T2")
    assert invalid["phase"] == "Invalid" and invalid["stages"] == ready["stages"]
    c = conditions(invalid)
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", "InvalidSpec")
    assert c["SpecValid"]["message"] == "spec.stages[0].model: unknown"
    assert c["TiersSchedulable"]["status"] == "Unknown"


def test_no_nodes_for_a_tier():
    problem = Problem("spec.stages[1].tier", "no edge nodes", NO_NODES_FOR_TIER)
    status = build_status(flow(), Observation(1, tier_problems=(problem,)), None, "T")
    assert status["phase"] == "Unschedulable"
    assert conditions(status)["Ready"]["reason"] == "NoNodesForTier"
    assert conditions(status)["TiersSchedulable"]["status"] == "False"


def test_status_patch_is_none_when_nothing_changed_and_removes_dropped_keys():
    status = build_status(flow(), obs(), None, "T1")
    assert status_patch(status, status) is None
    assert status_patch(status, {**status, "stale": 1}) == {"status": {**status, "stale": None}}
    assert status_patch(status, None) == {"status": status}


def test_events_for_decisions_and_changed_conditions_only():
    first = build_status(flow(), obs(ready=(False, False)), None, "T1")
    events = decisions([], first, {})
    assert [e.reason for e in events] == ["Placed"]
    (created,) = decisions([Action("Created", "Service", "f-a")], first, {})
    assert created.reason == "Created" and created.message.startswith("placed a:device, b:cloud (a: pinned")
    assert created.message.endswith("; created Service f-a")
    ready = build_status(flow(), obs(), first, "T2")
    assert [(e.type, e.reason) for e in decisions([], ready, first)] == [("Normal", "FlowReady")]
    assert decisions([], ready, ready) == []
    lost = build_status(flow(), obs(ready=(True, False)), ready, "T3")
    assert [(e.type, e.reason) for e in decisions([], lost, ready)] == [("Warning", "StagesNotReady")]
    assert [c["type"] for c in changed_conditions(lost, ready)] == ["Ready"]


def test_ready_replicas_count_the_old_pods_too_and_a_rollout_finishes_only_on_the_new_spec():
    # A template update: the controller has not seen generation 2 yet, the old pods still serve.
    dep = {"metadata": {"generation": 2}, "spec": {"replicas": 2},
           "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}}
    assert deployment_ready_replicas(dep) == 2 and not rolled_out(dep)
    dep["status"].update(observedGeneration=2, replicas=3, updatedReplicas=1)  # surging: one new pod, two old
    assert deployment_ready_replicas(dep) == 2 and not rolled_out(dep)
    dep["status"].update(replicas=2, updatedReplicas=2)
    assert rolled_out(dep)
    assert deployment_ready_replicas({"metadata": {}, "status": {"readyReplicas": 2}}) == 2


def test_a_stage_is_ready_at_the_availability_its_strategy_allows():
    one_at_a_time = StageState("v", "m", "cloud", "", 2, 1, True, max_unavailable=1)
    assert one_at_a_time.ready
    assert not StageState("v", "m", "cloud", "", 2, 1, True, max_unavailable=0).ready
    assert not StageState("v", "m", "cloud", "", 1, 0, True, max_unavailable=1).ready  # never below one


def test_a_stuck_rollout_carries_the_schedulers_message():
    pending = {"metadata": {"name": "f-v-abc"}, "status": {"conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 1 Insufficient cpu."}]}}
    assert stuck_reason({}, [pending]) == (
        "PodsUnschedulable", "pod f-v-abc cannot be scheduled (Unschedulable): 0/3 nodes are available: 1 Insufficient cpu.")
    late = {"status": {"conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                       "message": 'ReplicaSet "f-v-1" has timed out progressing.'}]}}
    assert stuck_reason(late, []) == ("ProgressDeadlineExceeded", 'ReplicaSet "f-v-1" has timed out progressing.')
    assert stuck_reason({}, [{"metadata": {"name": "ok"}, "status": {"conditions": [
        {"type": "PodScheduled", "status": "True"}]}}]) is None
