"""The real kubectl works against the emulated API server: apply (client and server side), get, delete."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

WIDGETS_CRD = Path(__file__).parent / "manifests" / "widgets-crd.yaml"

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app: web}}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - name: web
          image: nginx:1
          env: [{name: A, value: "1"}]
          ports: [{containerPort: 80}]
"""


def test_client_side_apply_creates_then_configures(apiserver):
    assert "created" in apiserver.kubectl("apply", "-f", "-", input=DEPLOYMENT).stdout
    changed = DEPLOYMENT.replace("nginx:1", "nginx:2").replace('value: "1"', 'value: "2"')
    assert "configured" in apiserver.kubectl("apply", "-f", "-", input=changed).stdout
    deployment = apiserver.get("deployments", "web", "default")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "nginx:2" and container["env"] == [{"name": "A", "value": "2"}]
    assert deployment["metadata"]["generation"] == 2
    assert "unchanged" in apiserver.kubectl("apply", "-f", "-", input=changed).stdout


def test_server_side_apply_creates_then_applies(apiserver):
    result = apiserver.kubectl("apply", "--server-side", "-f", "-", input=DEPLOYMENT)
    assert "serverside-applied" in result.stdout
    changed = DEPLOYMENT.replace("replicas: 2", "replicas: 3")
    apiserver.kubectl("apply", "--server-side", "-f", "-", input=changed)
    assert apiserver.get("deployments", "web", "default")["spec"]["replicas"] == 3


def test_get_prints_tables_yaml_and_json_and_selects_by_label(apiserver):
    apiserver.kubectl("apply", "-f", "-", input=DEPLOYMENT)
    apiserver.mark_deployments_ready()
    table = apiserver.kubectl("get", "deploy").stdout.splitlines()
    assert table[0].split()[:4] == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE"]
    assert table[1].split()[:4] == ["web", "2/2", "2", "2"]
    as_yaml = yaml.safe_load(apiserver.kubectl("get", "deployment", "web", "-o", "yaml").stdout)
    assert as_yaml["status"]["readyReplicas"] == 2
    listing = json.loads(apiserver.kubectl("get", "deployments", "-l", "app in (web)", "-o", "json").stdout)
    assert [i["metadata"]["name"] for i in listing["items"]] == ["web"]
    assert "No resources found" in apiserver.kubectl("get", "deployments", "-l", "app=none").stderr


def test_delete_waits_until_the_object_is_gone(apiserver):
    apiserver.kubectl("apply", "-f", "-", input=DEPLOYMENT)
    assert 'deployment.apps "web" deleted' in apiserver.kubectl("delete", "deployment", "web").stdout
    assert apiserver.get("deployments", "web", "default") is None


def test_custom_resources_by_short_name_with_printer_columns_and_schema_errors(apiserver):
    apiserver.kubectl("apply", "-f", str(WIDGETS_CRD))
    widget = "apiVersion: emulator.test/v1\nkind: Widget\nmetadata: {name: w}\nspec: {size: 2, color: red}\n"
    apiserver.kubectl("apply", "-f", "-", input=widget)
    header, row = apiserver.kubectl("get", "wg").stdout.splitlines()
    assert header.split() == ["NAME", "COLOR", "PHASE", "AGE"] and row.split()[:2] == ["w", "red"]
    bad = apiserver.kubectl("apply", "-f", "-", input=widget.replace("size: 2", "size: 0"),
                            check=False)
    assert bad.returncode != 0 and 'The Widget "w" is invalid' in bad.stderr and "spec.size" in bad.stderr
    unknown = apiserver.kubectl("apply", "-f", "-", input=widget.replace("size: 2", "size: 2, shape: round"),
                                check=False)
    assert unknown.returncode != 0 and 'unknown field "spec.shape"' in unknown.stderr  # server-side, strict
    # As on a real server: the client-side apply owns the color, so changing it server-side conflicts
    # until the change is forced.
    owned = apiserver.kubectl("apply", "--server-side", "-f", "-", input=widget.replace("red", "blue"), check=False)
    assert owned.returncode != 0 and 'conflict with "kubectl-client-side-apply"' in owned.stderr
    assert ".spec.color" in owned.stderr
    apiserver.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=widget.replace("red", "blue"))
    assert apiserver.get("widgets", "w", "default")["spec"]["color"] == "blue"
    apiserver.kubectl("delete", "-f", "-", input=widget)
    assert apiserver.list("widgets") == []


def test_typed_kubectl_commands_sending_protobuf_get_a_clear_415(apiserver):
    # `kubectl create namespace` and other generator commands send protobuf, which is not emulated.
    result = apiserver.kubectl("create", "namespace", "team", check=False)
    assert result.returncode != 0 and "UnsupportedMediaType" in result.stderr


@pytest.mark.parametrize("namespace_flag", [["-n", "team"], ["--all-namespaces"]])
def test_namespaces_from_kubectl(apiserver, namespace_flag):
    apiserver.kubectl("create", "-f", "-", input="apiVersion: v1\nkind: Namespace\nmetadata: {name: team}\n")
    apiserver.kubectl("apply", "-n", "team", "-f", "-", input=DEPLOYMENT)
    assert "web" in apiserver.kubectl("get", "deployments", *namespace_flag).stdout


def test_kubectl_apply_refuses_unknown_fields_of_built_in_kinds_on_create_and_on_update(apiserver):
    typo = DEPLOYMENT.replace("replicas: 2", "replica: 2")
    created = apiserver.kubectl("apply", "-f", "-", input=typo, check=False)
    assert created.returncode != 0 and 'unknown field "spec.replica"' in created.stderr
    apiserver.kubectl("apply", "-f", "-", input=DEPLOYMENT)
    for mode in (["--server-side"], []):  # a patch of an existing object is checked as strictly
        updated = apiserver.kubectl("apply", *mode, "-f", "-", input=typo, check=False)
        assert updated.returncode != 0 and 'unknown field "spec.replica"' in updated.stderr, mode
