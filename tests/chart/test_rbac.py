"""The chart's RBAC against what the operator really does.

The real kopf operator runs the captioning example through its life (a name conflict with objects
of someone else, create, ready, a node joining, a hand-edited Service repaired, a spec change that
replaces stages, deletion) against the emulated API server, as the chart's ServiceAccount: the
server holds the chart's rendered Roles, ClusterRoles and bindings and refuses (403) what they do
not grant, as a real one does, and records every request. No request may be refused, and every
granted permission must have been used, apart from the few listed in ALLOWANCES with the reason
each is granted anyway.
"""

from __future__ import annotations

import json

import pytest

from aiflow import TIERS
from aiflow.render.names import object_name
from tests.chart.processes import OPERATOR_AGENTS, ready, reason
from tests.chart.rendering import NAMESPACE, containers, granted_permissions, render
from tests.kube.rbac import User

FLOW = "captioning"

# Granted but not seen in the recorded run, each for a reason the run cannot show.
ALLOWANCES = {
    ("aiflow.io", "aiflows/finalizers", "update"):
        "ownerReferences with blockOwnerDeletion need it where OwnerReferencesPermissionEnforcement "
        "admission runs (e.g. OpenShift); the emulated server does not enforce it",
    ("discovery.k8s.io", "endpointslices", "list"):
        "read only while a move switches the entry Service (tests/operator/test_rescheduler.py); the "
        "recorded run re-plans in place and never moves",
    ("metrics.k8s.io", "nodes", "get"): "node usage for placement, read only when metrics-server is installed",
    ("metrics.k8s.io", "nodes", "list"): "node usage for placement, read only when metrics-server is installed",
    ("autoscaling", "horizontalpodautoscalers", "delete"):
        "autoscaling removed from a stage that stays (the run deletes the flow, whose autoscaler garbage collection removes)",
}


Permission = tuple  # (namespace or None, apiGroup, resource[/subresource], verb)


def requested(records) -> set[Permission]:
    """What each recorded operator request needed, and where: its namespace, or None when the request
    was cluster-scoped or across all namespaces."""
    needed = set()
    for r in records:
        if r.user_agent.startswith(OPERATOR_AGENTS) and r.resource is not None and r.group is not None:
            resource = f"{r.resource}/{r.subresource}" if r.subresource else r.resource
            needed.update((r.namespace, r.group, resource, verb) for verb in r.verbs)
    return needed


def covers(grant: Permission, need: Permission) -> bool:
    return grant[1:] == need[1:] and grant[0] in (None, need[0])


def squat(apiserver, kind: str, name: str) -> None:
    """An object of someone else, named as a stage's object will be."""
    labels = {"app": "other"}
    meta = {"name": name, "namespace": "default", "labels": labels}
    if kind == "Deployment":
        pod = {"metadata": {"labels": labels},
               "spec": {"containers": [{"name": "other", "image": "registry.example/other:1"}]}}
        apiserver.create({"apiVersion": "apps/v1", "kind": kind, "metadata": meta,
                          "spec": {"selector": {"matchLabels": labels}, "template": pod}})
    else:
        apiserver.create({"apiVersion": "v1", "kind": kind, "metadata": meta,
                          "spec": {"selector": labels, "ports": [{"port": 8001}]}})


# The modes the chart installs the operator in: the values, and how kopf then runs.
MODES = {
    "cluster-wide": ({}, {"clusterwide": True}),
    "namespaced": ({"watchNamespaces": ["default"]}, {"namespaces": ("default",)}),
    # With the link probe, the operator also reads the probes' ConfigMaps in the release namespace.
    "cluster-wide with the link probe": ({"linkProbe": {"enabled": True}}, {"clusterwide": True}),
}


RBAC_KINDS = ("ServiceAccount", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")


def as_chart_service_account(apiserver, rendered, edit=None) -> dict:
    """The chart's ServiceAccount and RBAC objects stored in the server (`edit` may change the
    rules first), and the keyword arguments that run the operator as that ServiceAccount."""
    apiserver.create_namespace(NAMESPACE)
    for obj in rendered.objects:
        if obj["kind"] in RBAC_KINDS:
            apiserver.create(edit(obj) if edit else obj)
    sa = rendered.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    kubeconfig = apiserver.authorize_token("chart-operator", User.service_account(NAMESPACE, sa))
    return {"token": "chart-operator", "kubeconfig": kubeconfig}


def refused(records) -> list:
    return [r for r in records if r.code == 403 and r.user_agent.startswith(OPERATOR_AGENTS)]


@pytest.fixture(params=sorted(MODES))
def recorded_run(request, chart, apiserver, run_kopf_operator, garbage_collector, monkeypatch):
    """The chart values of a mode, and the operator's requests over the life of the captioning flow
    when it runs as the chart runs it in that mode, with the chart's RBAC enforced."""
    values, scope = MODES[request.param]
    if values.get("linkProbe", {}).get("enabled"):
        monkeypatch.setenv("AIFLOW_LINK_NAMESPACE", NAMESPACE)  # as the chart's Deployment sets it
    apiserver.kubectl("apply", "--validate=false", "-f", "crds/")
    for tier in TIERS:
        apiserver.seed_node(f"{tier}-1", tier, allocatable={"cpu": "8", "memory": "32Gi"})
    identity = as_chart_service_account(apiserver, render(chart, values))
    apiserver.clear_request_log()
    run_kopf_operator("aiflow.controller.handlers", **scope, **identity)
    apiserver.start_deployment_controller()
    # Objects of someone else in the way of a stage: the operator reads them and refuses to touch them.
    squat(apiserver, "Deployment", object_name(FLOW, "head"))
    apiserver.kubectl("apply", "--validate=false", "-f", f"examples/{FLOW}.yaml")
    apiserver.wait_for(lambda: reason(apiserver.get("aiflows", FLOW, "default")) == "NameConflict",
                       timeout=60, message="the flow to report the name conflict")
    apiserver.kubectl("delete", "deployment", object_name(FLOW, "head"))
    apiserver.seed_node("edge-2", "edge")  # a node joining re-checks every flow
    apiserver.wait_for(lambda: ready(apiserver.get("aiflows", FLOW, "default")), timeout=60,
                       message="the captioning flow to become Ready")
    # Someone edits a Service by hand: the next reconcile puts it back.
    head_service = apiserver.list("services", "default", label_selector="aiflow.io/stage=head")[0]
    apiserver.kubectl("patch", "service", head_service["metadata"]["name"], "--type=merge", "-p",
                      '{"spec":{"selector":{"aiflow.io/stage":"tampered"}}}')
    # And the verifier's disruption budget: a node joining the tier re-checks the flow and repairs it.
    budget = object_name(FLOW, "verifier")
    apiserver.kubectl("patch", "pdb", budget, "--type=merge", "-p", '{"spec":{"maxUnavailable":2}}')
    apiserver.seed_node("cloud-2", "cloud", allocatable={"cpu": "8", "memory": "32Gi"})
    apiserver.wait_for(lambda: apiserver.get("poddisruptionbudgets", budget, "default")["spec"]["maxUnavailable"] == 1,
                       timeout=60, message="the hand-edited budget to be repaired")
    # A spec change that replaces two stages by one: patches, creates and deletes children.
    flow = apiserver.get("aiflows", FLOW, "default")
    head = flow["spec"]["stages"][0]
    squat(apiserver, "Service", object_name(FLOW, "decoder"))
    apiserver.kubectl("patch", "aiflow", FLOW, "--type=merge", "-p",
                      '{"spec":{"stages":[%s,{"name":"decoder","model":"caption_decoder","tier":"cloud",'
                      '"autoscaling":{"maxReplicas":3}}]}}'
                      % json.dumps(head))
    apiserver.wait_for(lambda: reason(apiserver.get("aiflows", FLOW, "default")) == "NameConflict",
                       timeout=60, message="the changed flow to report the name conflict")
    apiserver.kubectl("delete", "service", object_name(FLOW, "decoder"))
    apiserver.seed_node("edge-3", "edge")
    apiserver.wait_for(lambda: not apiserver.list("deployments", "default",
                                                  label_selector="aiflow.io/stage=verifier"),
                       timeout=60, message="the replaced stages to be removed")
    apiserver.wait_for(lambda: ready(apiserver.get("aiflows", FLOW, "default")), timeout=60,
                       message="the changed flow to become Ready")
    apiserver.wait_for(lambda: apiserver.get("services", head_service["metadata"]["name"], "default")
                       ["spec"]["selector"].get("aiflow.io/stage") == "head",
                       timeout=60, message="the hand-edited Service to be repaired")
    apiserver.kubectl("delete", "aiflow", FLOW, "--wait=false")
    apiserver.wait_for(lambda: apiserver.get("aiflows", FLOW, "default") is None, timeout=60,
                       message="the flow to be deleted")
    assert refused(apiserver.request_log) == [], "the chart's RBAC refused a request of the operator"
    return values, requested(apiserver.request_log)


def test_chart_rbac_grants_what_the_operator_uses_and_nothing_more(chart, recorded_run):
    values, needed = recorded_run
    rendered = render(chart, values)
    args = containers(rendered.one("Deployment"))[0]["args"]
    assert ("--all-namespaces" in args) == ("watchNamespaces" not in values), "the run must use the chart's mode"
    env = {e["name"]: e.get("value") for e in containers(rendered.one("Deployment"))[0]["env"]}
    assert env.get("AIFLOW_LINK_NAMESPACE") == (NAMESPACE if "linkProbe" in values else None)
    grants = granted_permissions(rendered)
    assert needed, "the recorded run made no requests"
    missing = {n for n in needed if not any(covers(g, n) for g in grants)}
    assert not missing, f"the operator made requests the chart does not grant: {sorted(missing, key=str)}"
    unused = {g for g in grants if not any(covers(g, n) for n in needed) and g[1:] not in ALLOWANCES}
    assert not unused, f"the chart grants what the operator never used: {sorted(unused, key=str)}"
    stale = {a for a in ALLOWANCES if any(n[1:] == a for n in needed)}
    assert not stale, f"now used, so no longer an allowance: {sorted(stale)}"


def test_allowances_are_all_granted(chart):
    """An allowance for a permission the chart no longer grants is dead text."""
    permissions = {g[1:] for g in granted_permissions(render(chart, {}))}
    assert set(ALLOWANCES) <= permissions, sorted(set(ALLOWANCES) - permissions)


def test_a_permission_the_chart_does_not_grant_is_refused(chart, apiserver, run_kopf_operator):
    """The server enforces the chart's rules: without `patch` on Services the operator cannot apply
    them, the API server answers 403, and the flow does not go Ready."""
    apiserver.kubectl("apply", "--validate=false", "-f", "crds/")
    for tier in TIERS:
        apiserver.seed_node(f"{tier}-1", tier)

    def without_service_patch(obj):
        for rule in obj.get("rules") or ():
            if "services" in rule.get("resources", ()):
                rule["verbs"] = [v for v in rule["verbs"] if v != "patch"]
        return obj

    identity = as_chart_service_account(apiserver, render(chart, {}), without_service_patch)
    run_kopf_operator("aiflow.controller.handlers", clusterwide=True, **identity)
    apiserver.kubectl("apply", "--validate=false", "-f", f"examples/{FLOW}.yaml")
    (first, *_) = apiserver.wait_for(lambda: refused(apiserver.request_log), timeout=60, message="a 403")
    assert (first.verb, first.resource) == ("patch", "services")
    assert apiserver.list("services", "default", label_selector=f"aiflow.io/flow={FLOW}") == []
    assert not ready(apiserver.get("aiflows", FLOW, "default"))
