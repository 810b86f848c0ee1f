"""The aiflow-operator chart: lints, renders for real value sets, validates, and keeps its promises."""

from __future__ import annotations

import tarfile

import helm_python
import kubernetes_validate
import pytest
import yaml

from aiflow.api.images import DEFAULT_TIER_IMAGES, STAGE_IMAGES_ENV, configured_tier_images
from aiflow.cli import build_parser
from aiflow.controller import metrics
from tests.chart.rendering import (
    CHART_DIR,
    KUBE_VERSION,
    NAMESPACE,
    REPO,
    VALUE_SETS,
    containers,
    load_yaml,
    rbac_rules,
    render,
)

# Kinds whose schema kubernetes-validate does not ship (they come from CRDs); checked otherwise.
CUSTOM_KINDS = {"ServiceMonitor", "ClusterKopfPeering", "KopfPeering"}
WORKLOAD_KINDS = {"Deployment", "DaemonSet"}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_lints_cleanly_in_strict_mode(name):
    report = helm_python.lint(
        CHART_DIR, VALUE_SETS[name], strict=True, namespace=NAMESPACE,
        kube_version=f"v{KUBE_VERSION}",
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_object_validates_against_kubernetes_schemas(rendered_sets, name):
    rendered = rendered_sets[name]
    assert rendered.objects
    for obj in rendered.objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_chart_crds_validate_against_kubernetes_schemas(chart):
    for crd in chart.crds:
        for obj in yaml.safe_load_all(crd["data"]):
            if obj:
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_chart_crd_is_the_one_source_in_crds(chart):
    """The chart's CRD is a link to crds/, and helm loads and packages that very file."""
    link = CHART_DIR / "crds" / "aiflow.io_aiflows.yaml"
    source = REPO / "crds" / "aiflow.io_aiflows.yaml"
    assert link.is_symlink(), "the chart's CRD must be a symlink to crds/, not a copy that can drift"
    assert link.resolve() == source.resolve()
    loaded = {c["name"]: c["data"] for c in chart.crds}
    assert loaded["crds/aiflow.io_aiflows.yaml"] == source.read_text()


def test_packaged_chart_carries_the_crd_content(tmp_path):
    """`helm package` dereferences the symlink, so a chart archive installs the real CRD."""
    archive = helm_python.package(CHART_DIR, destination=tmp_path)
    with tarfile.open(archive) as tar:
        member = tar.getmember("aiflow-operator/crds/aiflow.io_aiflows.yaml")
        assert member.isfile()
        packaged = tar.extractfile(member).read().decode()
    assert packaged == (REPO / "crds" / "aiflow.io_aiflows.yaml").read_text()


BAD_VALUES = {
    "unknown top-level key": {"replicas": 2},
    "two replicas without peering": {"replicaCount": 2},
    "negative replicas": {"replicaCount": -1},
    "pull policy typo": {"image": {"pullPolicy": "Sometimes"}},
    "port out of range": {"metrics": {"port": 70000}},
    "root user": {"podSecurityContext": {"runAsNonRoot": False}},
    "writable root filesystem": {"securityContext": {"readOnlyRootFilesystem": False}},
    "privilege escalation": {"securityContext": {"allowPrivilegeEscalation": True}},
    "namespace not a DNS label": {"watchNamespaces": ["Team_A"]},
    "service monitor without metrics": {
        "metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}
    },
    "bad scrape interval": {"metrics": {"serviceMonitor": {"interval": "soon"}}},
    "existing service account without a name": {"serviceAccount": {"create": False}},
    "verbose not a boolean": {"verbose": "yes"},
    "probe interval too short": {"linkProbe": {"intervalSeconds": 1}},
    "probe budget too large": {"linkProbe": {"budgetPercent": 50}},
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_schema_rejects_bad_values(chart, case):
    values = BAD_VALUES[case]
    with pytest.raises(helm_python.HelmValuesError):
        chart.validate_schema(chart.merge_values(values))
    # And an install (render) with them fails too, instead of producing objects.
    with pytest.raises(helm_python.HelmError):
        render(chart, values)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_schema_accepts_every_documented_value_set(chart, name):
    chart.validate_schema(chart.merge_values(VALUE_SETS[name]))


@pytest.mark.parametrize("name", VALUE_SETS)
def test_workloads_are_hardened(rendered_sets, name):
    workloads = [o for o in rendered_sets[name].objects if o["kind"] in WORKLOAD_KINDS]
    assert workloads
    for obj in workloads:
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not pod.get("hostNetwork") and not pod.get("hostPID")
        for container in containers(obj):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert not sc.get("capabilities", {}).get("add")
            assert container["resources"]["requests"] and container["resources"]["limits"]
            assert container["livenessProbe"] and container["readinessProbe"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_carries_the_standard_labels(rendered_sets, name):
    for obj in rendered_sets[name].objects:
        labels = obj["metadata"]["labels"]
        for key in ("name", "instance", "version", "component", "managed-by"):
            assert f"app.kubernetes.io/{key}" in labels, (obj["kind"], key)
        if obj["kind"] in WORKLOAD_KINDS:
            selector = obj["spec"]["selector"]["matchLabels"]
            assert selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items()


def test_no_namespace_is_hard_coded(chart):
    """Namespaced objects land in the release namespace (or a watched one), whatever it is."""
    for values in VALUE_SETS.values():
        rendered = render(chart, values, namespace="elsewhere")
        allowed = {"elsewhere", *values.get("watchNamespaces", [])}
        for obj in rendered.objects:
            namespace = obj["metadata"].get("namespace")
            if obj["kind"] in ("ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"):
                assert namespace is None
            else:
                assert namespace in allowed, (obj["kind"], namespace)
            for subject in obj.get("subjects", []):
                assert subject["namespace"] == "elsewhere"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rbac_has_no_wildcards_and_no_secrets(rendered_sets, name):
    for obj in rendered_sets[name].objects:
        for rule in obj.get("rules", []) if obj["kind"] in ("Role", "ClusterRole") else []:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (obj["metadata"]["name"], rule)
            assert "secrets" not in rule["resources"]
            assert not rule.get("nonResourceURLs")
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_more_than_one_replica_elects_a_leader_through_peering(rendered_sets):
    rendered = rendered_sets["peering-two-replicas"]
    deployment = rendered.one("Deployment")
    assert deployment["spec"]["replicas"] == 2
    args = containers(deployment)[0]["args"]
    peering = rendered.of_kind("ClusterKopfPeering")
    assert len(peering) == 1
    assert f"--peering={peering[0]['metadata']['name']}" in args
    sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    grants = rbac_rules(rendered, sa)
    assert any("clusterkopfpeerings" in r["resources"] and "patch" in r["verbs"] for _, r in grants)


def test_single_replica_never_overlaps_another_during_upgrades(rendered_sets):
    deployment = rendered_sets["defaults"].one("Deployment")
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert not [a for a in containers(deployment)[0]["args"] if a.startswith("--peering")]


def test_namespaced_mode_grants_namespaced_rules_only_in_watched_namespaces(rendered_sets):
    rendered = rendered_sets["namespaced"]
    deployment = rendered.one("Deployment")
    args = containers(deployment)[0]["args"]
    assert {"--namespace=team-a", "--namespace=team-b"} <= set(args)
    assert "--all-namespaces" not in args
    grants = rbac_rules(rendered, deployment["spec"]["template"]["spec"]["serviceAccountName"])
    for scope, rule in grants:
        if scope is None:  # cluster-wide grants: only cluster-scoped or read-only discovery
            assert not {"aiflows", "deployments", "services", "events"} & set(rule["resources"])
    namespaces = {scope for scope, rule in grants if "deployments" in rule["resources"]}
    assert namespaces == {"team-a", "team-b"}
    peerings = rendered.of_kind("KopfPeering")
    assert {p["metadata"]["namespace"] for p in peerings} == {"team-a", "team-b"}


def test_metrics_service_and_service_monitor_reach_the_operator_metrics_port(rendered_sets):
    rendered = rendered_sets["service-monitor"]
    deployment = rendered.one("Deployment")
    service = rendered.one("Service")
    monitor = rendered.one("ServiceMonitor")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert monitor["spec"]["endpoints"][0]["port"] == port["name"]
    container_ports = {p["name"]: p["containerPort"] for p in containers(deployment)[0]["ports"]}
    assert port["targetPort"] in container_ports
    env = {e["name"]: e.get("value") for e in containers(deployment)[0]["env"]}
    assert env[metrics.METRICS_PORT_ENV] == str(container_ports["metrics"])


def test_link_probe_runs_on_tier_nodes_and_finds_its_peers(rendered_sets):
    rendered = rendered_sets["link-probe"]
    daemonset = rendered.one("DaemonSet", "link-probe")
    service = rendered.one("Service", "link-probe")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()
    terms = daemonset["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "aiflow.io/tier", "operator": "Exists"}]}]
    args = containers(daemonset)[0]["args"]
    assert f"--peers={service['metadata']['name']}.{NAMESPACE}.svc" in args
    sa = daemonset["spec"]["template"]["spec"]["serviceAccountName"]
    grants = sorted((scope or "", rule["resources"][0], tuple(rule["verbs"])) for scope, rule in rbac_rules(rendered, sa))
    # No power over Nodes: it reads them, and writes only ConfigMaps of its own namespace.
    assert grants == [("", "nodes", ("get",)), (NAMESPACE, "configmaps", ("create", "patch"))]
    env = {e["name"]: e for e in containers(daemonset)[0]["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert "--budget-percent=2" in args


def test_notes_tell_the_next_commands(rendered_sets):
    notes = rendered_sets["defaults"].notes
    assert "rollout status deployment/" in notes
    assert "aiflow.io/tier" in notes
    assert "kubectl apply -f examples/" in notes


def test_kopf_peering_crds_match_the_resources_the_rbac_names():
    crds = load_yaml(CHART_DIR / "crds" / "kopf.dev_peerings.yaml")
    assert {(c["spec"]["group"], c["spec"]["names"]["plural"], c["spec"]["scope"]) for c in crds} == {
        ("kopf.dev", "clusterkopfpeerings", "Cluster"),
        ("kopf.dev", "kopfpeerings", "Namespaced"),
    }


def test_stage_images_values_reach_the_operator_per_tier(chart):
    from tests.chart.rendering import render

    chart_yaml = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    rendered = render(chart, {"stageImages": {"cpu": {"repository": "r/cpu", "tag": "7"},
                                              "tiers": {"device": "cpu", "edge": "gpu", "cloud": "cpu"}}})
    env = {e["name"]: e.get("value") for e in containers(rendered.one("Deployment"))[0]["env"]}
    assert configured_tier_images(env) == {"device": "r/cpu:7", "edge": f"ghcr.io/aiflow/triton-stage:{chart_yaml['appVersion']}",
                                          "cloud": "r/cpu:7"}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_operator_container_runs_what_the_aiflow_cli_accepts(rendered_sets, name):
    """The command line the chart renders is parsed by the real `aiflow` parser, and means what the
    values say."""
    values = VALUE_SETS[name]
    container = containers(rendered_sets[name].one("Deployment"))[0]
    assert container["command"] == ["aiflow"]
    parsed = build_parser().parse_args(container["args"])
    assert parsed.command == "operator"
    assert parsed.namespace == (values.get("watchNamespaces") or None)
    assert parsed.all_namespaces == (not values.get("watchNamespaces"))
    assert (parsed.peering is not None) == values.get("peering", {}).get("enabled", False)
    health = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert parsed.liveness == f"http://0.0.0.0:{ports[health['port']]}{health['path']}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    peering = values.get("peering", {}).get("enabled", False)
    probe = values.get("linkProbe", {}).get("enabled", False)
    assert set(env) == ({metrics.METRICS_PORT_ENV, STAGE_IMAGES_ENV} | ({"POD_ID"} if peering else set())
                        | ({"AIFLOW_LINK_NAMESPACE"} if probe else set()))
    if probe:  # the operator reads the probes' ConfigMaps where the chart runs them
        assert env["AIFLOW_LINK_NAMESPACE"] == NAMESPACE
    # The stage images the values name per tier, as the operator reads them.
    assert configured_tier_images(env) == DEFAULT_TIER_IMAGES
    expected = "0" if values.get("metrics", {}).get("enabled") is False else str(ports["metrics"])
    assert env[metrics.METRICS_PORT_ENV] == expected


def test_every_value_is_documented_in_chart_values_md(chart):
    """docs/chart-values.md names every key of values.yaml (maps of free-form keys count as one)."""
    doc = (REPO / "docs" / "chart-values.md").read_text()
    free_form = {"resources", "podSecurityContext", "securityContext", "linkProbe.resources"}

    def keys(values: dict, prefix: str = ""):
        for key, value in values.items():
            path = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict) and value and path not in free_form:
                yield from keys(value, path)
            else:
                yield path

    undocumented = [k for k in keys(chart.values) if f"`{k}`" not in doc]
    assert not undocumented, f"docs/chart-values.md does not describe {undocumented}"
