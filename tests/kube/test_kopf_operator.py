"""The real kopf operator runs against the emulated API server (tests/kube/widget_operator.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
WIDGET_OPERATOR = HERE / "widget_operator.py"
WIDGET = "apiVersion: emulator.test/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: 3}\n"


@pytest.fixture
def widget_operator(apiserver, run_kopf_operator):
    """The CRD posted as a cluster gets it (kubectl apply), then the operator started."""
    apiserver.kubectl("apply", "-f", str(HERE / "manifests" / "widgets-crd.yaml"))
    return run_kopf_operator(WIDGET_OPERATOR)


def phase(apiserver, name="w1"):
    return ((apiserver.get("widgets", name, "default") or {}).get("status") or {}).get("phase")


def test_kopf_reconciles_a_custom_resource_end_to_end(apiserver, widget_operator, garbage_collector):
    apiserver.kubectl("apply", "-f", "-", input=WIDGET)
    apiserver.wait_for(lambda: phase(apiserver) == "Ready", message="the widget to be reconciled")
    widget = apiserver.get("widgets", "w1", "default")
    assert "emulator.test/widget-finalizer" in widget["metadata"]["finalizers"]  # kopf's, via JSON patch
    child = apiserver.get("configmaps", "w1-parts", "default")
    assert child["data"] == {"size": "3", "color": "green"}  # the schema default reached the handler
    assert child["metadata"]["ownerReferences"][0]["uid"] == widget["metadata"]["uid"]
    events = apiserver.wait_for(lambda: [e for e in apiserver.list("events", "default")
                                         if e["reason"] == "Reconciled"], message="kopf's event")
    assert events[0]["involvedObject"]["name"] == "w1" and "size 3" in events[0]["message"]

    apiserver.kubectl("apply", "-f", "-", input=WIDGET.replace("size: 3", "size: 5"))
    apiserver.wait_for(lambda: apiserver.get("configmaps", "w1-parts", "default")["data"]["size"] == "5",
                       message="the update to reach the child")

    apiserver.kubectl("delete", "widget", "w1")  # waits: kopf's finalizer runs the delete handler first
    assert apiserver.get("widgets", "w1", "default") is None
    assert apiserver.get("configmaps", "widget-deletions", "default")["data"] == {"w1": "deleted"}
    apiserver.wait_for(lambda: apiserver.get("configmaps", "w1-parts", "default") is None,
                       message="the garbage collector to delete the owned ConfigMap")


def test_kopf_resumes_objects_that_existed_before_it_started(apiserver, run_kopf_operator):
    apiserver.kubectl("apply", "-f", str(HERE / "manifests" / "widgets-crd.yaml"))
    apiserver.kubectl("apply", "-f", "-", input=WIDGET)
    run_kopf_operator(WIDGET_OPERATOR)
    apiserver.wait_for(lambda: phase(apiserver) == "Ready", message="the resumed widget to be reconciled")


def test_the_recorded_requests_give_the_operators_rbac_rules(apiserver, widget_operator):
    from tests.kube.apiserver import derive_rbac_rules

    apiserver.kubectl("apply", "-f", "-", input=WIDGET)
    apiserver.wait_for(lambda: phase(apiserver) == "Ready", message="the widget to be reconciled")
    apiserver.kubectl("delete", "widget", "w1")
    operator_records = [r for r in apiserver.request_log if not r.user_agent.startswith("kubectl")]
    rules = {(rule["apiGroups"][0], resource): set(rule["verbs"])
             for rule in derive_rbac_rules(operator_records) for resource in rule["resources"]}
    assert {"list", "watch", "patch"} <= rules[("emulator.test", "widgets")]
    assert "create" in rules[("", "configmaps")] and "create" in rules[("", "events")]
