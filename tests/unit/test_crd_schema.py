"""The CRD: structure, `kubectl explain` quality, and what its openAPIV3Schema and CEL rules reject.

Schema-invalid manifests are checked with jsonschema against the CRD's openAPIV3Schema; the
x-kubernetes-validations (CEL) rules are evaluated with cel-python (the same evaluation
`aiflow validate` runs), after the schema's defaults are applied as the API server would.
"""

import copy

import kubernetes_validate
import pytest

from aiflow import GROUP, KIND, PLURAL, TIERS, VERSION
from aiflow.api.schema import apply_defaults, cel_problems, cel_rules, crd, openapi_schema, schema_problems

VALID = {
    "apiVersion": "aiflow.io/v1alpha1",
    "kind": "AIFlow",
    "metadata": {"name": "captioning"},
    "spec": {
        "stages": [
            {"name": "head", "model": "vision_head", "tier": "device", "parameters": {"splitLayer": 4, "codec": "topk:16+int8+zstd"},
             "env": [{"name": "LOG_LEVEL", "value": "debug"}]},
            {"name": "drafter", "model": "caption_drafter", "tier": "edge", "parameters": {"decoding": "speculative"}},
            {"name": "verifier", "model": "caption_verifier", "tier": "cloud", "replicas": 2,
             "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": 4294967296}}},
        ],
        "triton": {"image": "registry.example/triton:1", "modelRepository": {
            "path": "/models", "persistentVolumeClaim": {"claimName": "models", "subPath": "repo"}}},
        "links": [{"from": "device", "to": "edge", "bandwidthMbps": 20, "rttMs": 10},
                  {"from": "edge", "to": "device", "bandwidthMbps": 50}],
        "objective": {"latencyMs": 250},
        "rescheduling": {"enabled": True, "intervalSeconds": 30, "minImprovementPercent": 10, "cooldownSeconds": 120},
    },
}


def problems_of(manifest):
    doc = apply_defaults(manifest)
    return schema_problems(doc) + cel_problems(doc)


def with_change(path, value):
    """VALID with the field at `path` (a tuple of keys and indexes) set to `value` (None deletes)."""
    doc = copy.deepcopy(VALID)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


def test_crd_identity_and_subresources():
    c = crd()
    assert c["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert c["spec"]["group"] == GROUP and c["spec"]["scope"] == "Namespaced"
    assert c["spec"]["names"]["kind"] == KIND and c["spec"]["names"]["shortNames"] == ["af"]
    (version,) = c["spec"]["versions"]
    assert version["name"] == VERSION and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {col["name"]: col["jsonPath"] for col in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and columns["Ready"] == ".status.readyStages"
    assert columns["Placement"] == ".status.placement" and columns["Age"] == ".metadata.creationTimestamp"


def test_crd_is_a_valid_kubernetes_object():
    kubernetes_validate.validate(crd(), "1.32", strict=True)


def _walk(schema, path=""):
    yield path, schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_every_field_has_a_description_for_kubectl_explain():
    missing = [path for path, sub in _walk(openapi_schema())
               if path and not path.endswith("{}") and path != ".metadata" and not sub.get("description")]
    assert missing == []


def test_schema_is_structural():
    for path, sub in _walk(openapi_schema()):
        assert "type" in sub or sub.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if sub.get("x-kubernetes-list-type") == "map":
            required = set(sub["items"].get("required", ()))
            assert set(sub["x-kubernetes-list-map-keys"]) <= required, path


def test_tiers_enum_matches_the_package_constants():
    stage = openapi_schema()["properties"]["spec"]["properties"]["stages"]["items"]
    assert stage["properties"]["tier"]["enum"] == [*TIERS, "auto"]


def test_a_complete_manifest_is_valid():
    assert problems_of(VALID) == []


@pytest.mark.parametrize("path, value, where", [
    (("spec", "stages"), [], "spec.stages"),
    (("spec",), None, "<root>"),
    (("spec", "stages", 0, "model"), None, "spec.stages[0]"),
    (("spec", "stages", 0, "name"), "Head", "spec.stages[0].name"),
    (("spec", "stages", 0, "name"), "-head", "spec.stages[0].name"),
    (("spec", "stages", 0, "name"), "h" * 41, "spec.stages[0].name"),
    (("spec", "stages", 0, "model"), "bad model", "spec.stages[0].model"),
    (("spec", "stages", 0, "tier"), "fog", "spec.stages[0].tier"),
    (("spec", "stages", 0, "replicas"), 0, "spec.stages[0].replicas"),
    (("spec", "stages", 0, "replicas"), 65, "spec.stages[0].replicas"),
    (("spec", "stages", 0, "replicas"), "2", "spec.stages[0].replicas"),
    (("spec", "stages", 0, "parameters", "splitLayer"), -1, "spec.stages[0].parameters.splitLayer"),
    (("spec", "stages", 0, "parameters", "codec"), "int8 zstd", "spec.stages[0].parameters.codec"),
    (("spec", "stages", 1, "parameters", "decoding"), "beam", "spec.stages[1].parameters.decoding"),
    (("spec", "stages", 2, "resources", "requests", "cpu"), "fast", "spec.stages[2].resources.requests.cpu"),
    (("spec", "stages", 2, "resources", "limits", "memory"), 1.5, "spec.stages[2].resources.limits.memory"),
    (("spec", "stages", 0, "env", 0, "name"), "1BAD", "spec.stages[0].env[0].name"),
    (("spec", "triton", "imagePullPolicy"), "Sometimes", "spec.triton.imagePullPolicy"),
    (("spec", "triton", "modelRepository", "path"), "models", "spec.triton.modelRepository.path"),
    (("spec", "triton", "modelRepository", "persistentVolumeClaim", "claimName"), "Bad_Claim",
     "spec.triton.modelRepository.persistentVolumeClaim.claimName"),
    (("spec", "links", 0, "bandwidthMbps"), 0, "spec.links[0].bandwidthMbps"),
    (("spec", "links", 0, "rttMs"), -1, "spec.links[0].rttMs"),
    (("spec", "links", 0, "from"), "moon", "spec.links[0].from"),
    (("spec", "links", 0, "bandwidthMbps"), None, "spec.links[0]"),
    (("spec", "objective", "latencyMs"), 0, "spec.objective.latencyMs"),
    (("spec", "rescheduling", "intervalSeconds"), 1, "spec.rescheduling.intervalSeconds"),
    (("spec", "rescheduling", "minImprovementPercent"), 101, "spec.rescheduling.minImprovementPercent"),
    (("spec", "rescheduling", "enabled"), "yes", "spec.rescheduling.enabled"),
])
def test_schema_rejects_malformed_fields(path, value, where):
    problems = schema_problems(apply_defaults(with_change(path, value)))
    assert where in [p.path for p in problems], problems


# Each CEL rule: a manifest that breaks it, and the path its problem is reported at.
CEL_CASES = {
    "size(self.metadata.name) <= 63": (("metadata", "name"), "n" * 64, "<root>"),
    "self.all(s, self.exists_one(t, t.name == s.name))": (("spec", "stages", 1, "name"), "head", "spec.stages"),
    "self.all(e, !e.name.startsWith('AIFLOW_'))": (("spec", "stages", 0, "env", 0, "name"), "AIFLOW_CODEC", "spec.stages[0].env"),
    "self.all(e, self.exists_one(f, f.name == e.name))": (
        ("spec", "stages", 0, "env"), [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}], "spec.stages[0].env"),
    "!has(self.valueFrom) || self.value == ''": (
        ("spec", "stages", 0, "env", 0, "valueFrom"), {"secretKeyRef": {"name": "s3", "key": "id"}}, "spec.stages[0].env[0]"),
    "has(self.secretKeyRef) != has(self.configMapKeyRef)": (
        ("spec", "stages", 0, "env", 0), {"name": "X", "valueFrom": {}}, "spec.stages[0].env[0].valueFrom"),
    "!has(self.persistentVolumeClaim) || self.path.startsWith('/')": (
        ("spec", "triton", "modelRepository", "path"), "s3://bucket/repo", "spec.triton.modelRepository"),
    "self.all(l, self.exists_one(m, m.from == l.from && m.to == l.to))": (
        ("spec", "links", 1), {"from": "device", "to": "edge", "bandwidthMbps": 5}, "spec.links"),
    "self.from != self.to": (("spec", "links", 0, "to"), "device", "spec.links[0]"),
}


def test_every_cel_rule_is_covered_by_a_case():
    assert sorted(rule["rule"] for _, rule in cel_rules()) == sorted(CEL_CASES)


@pytest.mark.parametrize("rule", sorted(CEL_CASES))
def test_cel_rule_rejects_what_it_should(rule):
    path, value, where = CEL_CASES[rule]
    assert cel_problems(apply_defaults(VALID)) == []
    problems = cel_problems(apply_defaults(with_change(path, value)))
    (message,) = [r.get("message") for _, r in cel_rules() if r["rule"] == rule]
    assert (where, message) in [(p.path, p.message) for p in problems]


def test_defaults_are_applied_like_the_api_server():
    doc = apply_defaults({"spec": {"stages": [{"name": "a", "model": "captioner", "env": [{"name": "X"}]}]}})
    stage = doc["spec"]["stages"][0]
    assert stage["tier"] == "auto" and stage["replicas"] == 1
    assert stage["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    assert stage["env"] == [{"name": "X", "value": ""}]
    assert doc["spec"]["triton"]["modelRepository"]["path"] == "/opt/aiflow/model_repo"
    assert doc["spec"]["rescheduling"] == {"enabled": False, "intervalSeconds": 60,
                                           "minImprovementPercent": 10, "cooldownSeconds": 300}
    assert "links" not in doc["spec"] and "objective" not in doc["spec"]
