"""Semantic validation of AIFlow manifests: every problem, with its path and what to fix."""

import copy
from pathlib import Path

import pytest
import yaml

from aiflow.api.catalog import load_catalog
from aiflow.api.cluster import ClusterView, NodeInfo
from aiflow.api.problems import INVALID_SPEC, NO_NODES_FOR_TIER
from aiflow.api.validate import validate_manifest
from tests.unit.test_api_catalog import write_model_repo

EXAMPLES = sorted(
    path for path in (Path(__file__).resolve().parents[2] / "examples").glob("*.yaml")
    if any(isinstance(d, dict) and d.get("kind") == "AIFlow" for d in yaml.safe_load_all(path.read_text()))
)


def flow(*stages, **spec):
    return {"apiVersion": "aiflow.io/v1alpha1", "kind": "AIFlow", "metadata": {"name": "f"},
            "spec": {"stages": [dict(s) for s in stages], **spec}}


HEAD = {"name": "head", "model": "vision_head", "tier": "device"}
DRAFTER = {"name": "drafter", "model": "caption_drafter", "tier": "edge"}
VERIFIER = {"name": "verifier", "model": "caption_verifier", "tier": "cloud"}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return load_catalog(write_model_repo(tmp_path_factory.mktemp("repo")))


def paths(problems):
    return [p.path for p in problems]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid_against_the_repository_models(path, monkeypatch):
    monkeypatch.delenv("AIFLOW_MODEL_REPO", raising=False)
    for doc in yaml.safe_load_all(path.read_text()):
        assert validate_manifest(doc, cluster=ClusterView.every_tier()) == []


def test_a_valid_chain_has_no_problems(catalog):
    assert validate_manifest(flow(HEAD, DRAFTER, VERIFIER), catalog) == []
    assert validate_manifest(flow({"name": "all", "model": "captioner"}), catalog) == []


def test_unknown_model_names_the_known_ones(catalog):
    (problem,) = validate_manifest(flow(HEAD, dict(DRAFTER, model="caption_drafterr"), VERIFIER), catalog)
    assert problem.path == "spec.stages[1].model"
    assert "unknown model 'caption_drafterr'" in problem.message
    assert "caption_drafter," in problem.message


def test_first_stage_must_accept_an_image(catalog):
    (problem,) = validate_manifest(flow(dict(DRAFTER, name="d"), VERIFIER), catalog)
    assert problem.path == "spec.stages[0].model"
    assert "accepts features" in problem.message and "vision_head" in problem.message


def test_consecutive_stages_must_agree_on_what_flows(catalog):
    (problem,) = validate_manifest(flow(HEAD, VERIFIER), catalog)
    assert problem.path == "spec.stages[1].model"
    assert "accepts drafts" in problem.message and "emits features" in problem.message
    assert "caption_decoder" in problem.message  # a model that would fit


def test_last_stage_must_produce_a_caption(catalog):
    (problem,) = validate_manifest(flow(HEAD, DRAFTER), catalog)
    assert problem.path == "spec.stages[1].model"
    assert "must produce a caption" in problem.message


def test_a_model_without_a_declared_contract_is_reported(tmp_path):
    catalog = load_catalog(write_model_repo(tmp_path))
    (tmp_path / "vision_head" / "config.pbtxt").write_text('name: "vision_head"\n')
    problems = validate_manifest(flow(HEAD, DRAFTER, VERIFIER), load_catalog(tmp_path))
    assert paths(problems) == ["spec.stages[0].model"] * 2
    assert "aiflow.accepts" in problems[0].message and "aiflow.emits" in problems[1].message
    assert catalog  # the untouched repo was complete


def test_an_empty_model_repository_says_where_it_looked(catalog, tmp_path, monkeypatch):
    monkeypatch.setenv("AIFLOW_MODEL_REPO", str(tmp_path / "missing"))
    (problem,) = validate_manifest(flow(HEAD, DRAFTER, VERIFIER), {})
    assert "AIFLOW_MODEL_REPO" in problem.message and "missing" in problem.message


def test_all_problems_are_reported_at_once(catalog):
    manifest = flow(dict(HEAD, tier="moon"), dict(DRAFTER, model="nope", replicas=0),
                    dict(VERIFIER, name="Verifier"), links=[{"from": "edge", "to": "edge", "bandwidthMbps": 1}])
    manifest["apiVersion"] = "aiflow.io/v1"
    problems = validate_manifest(manifest, catalog)
    assert set(paths(problems)) >= {
        "apiVersion", "spec.stages[0].tier", "spec.stages[1].model", "spec.stages[1].replicas",
        "spec.stages[2].name", "spec.links[0]",
    }
    assert all(p.reason == INVALID_SPEC for p in problems)


@pytest.mark.parametrize("manifest, path", [
    ([], "<root>"),
    ({"apiVersion": "aiflow.io/v1alpha1", "kind": "AIFlow", "metadata": {}, "spec": {"stages": [HEAD]}}, "metadata.name"),
    ({"apiVersion": "aiflow.io/v1alpha1", "kind": "Flow", "metadata": {"name": "x"}, "spec": {"stages": [HEAD]}}, "kind"),
    ({"apiVersion": "aiflow.io/v1alpha1", "kind": "AIFlow", "metadata": {"name": "x"}}, "<root>"),
    ({"apiVersion": "aiflow.io/v1alpha1", "kind": "AIFlow", "metadata": {"name": "x"}, "spec": {"stages": "head"}}, "spec.stages"),
    ({"apiVersion": "aiflow.io/v1alpha1", "kind": "AIFlow", "metadata": {"name": "x"}, "spec": {"stages": ["head"]}}, "spec.stages[0]"),
])
def test_malformed_manifests_get_problems_not_crashes(manifest, path, catalog):
    problems = validate_manifest(manifest, catalog)
    assert path in paths(problems)


def test_tiers_without_nodes_are_reported_with_their_own_reason(catalog):
    cluster = ClusterView((NodeInfo("d", "device"), NodeInfo("c", "cloud"), NodeInfo("e", "edge", usable=False)))
    (problem,) = validate_manifest(flow(HEAD, DRAFTER, VERIFIER), catalog, cluster)
    assert problem.path == "spec.stages[1].tier"
    assert problem.reason == NO_NODES_FOR_TIER
    assert "aiflow.io/tier=edge" in problem.message and "device, cloud, auto" in problem.message


def test_auto_stages_need_some_tier_with_nodes(catalog):
    manifest = flow(dict(HEAD, tier="auto"), dict(DRAFTER, tier="auto"), dict(VERIFIER, tier="auto"))
    assert validate_manifest(manifest, catalog, ClusterView((NodeInfo("c", "cloud"),))) == []
    problems = validate_manifest(manifest, catalog, ClusterView())
    assert paths(problems) == ["spec.stages[0].tier", "spec.stages[1].tier", "spec.stages[2].tier"]
    assert {p.reason for p in problems} == {NO_NODES_FOR_TIER}


def test_validation_does_not_change_the_manifest(catalog):
    manifest = flow(HEAD, DRAFTER, VERIFIER)
    before = copy.deepcopy(manifest)
    validate_manifest(manifest, catalog)
    assert manifest == before


@pytest.mark.parametrize("change, path, fix", [
    (lambda d: d["spec"]["stages"][0].update(replica=3), "spec.stages[0].replica", 'did you mean "replicas"?'),
    (lambda d: d["spec"].update(bogus=1), "spec.bogus", "the fields here are: links, objective, rescheduling, stages, triton"),
    (lambda d: d["metadata"].update(lables={"a": "b"}), "metadata.lables", 'did you mean "labels"?'),
    (lambda d: d["spec"].update(triton={"modelRepository": {"path": "/m", "pvc": {}}}),
     "spec.triton.modelRepository.pvc", "the fields here are"),
])
def test_unknown_fields_are_refused_like_strict_kubectl_with_a_fix(change, path, fix):
    manifest = flow(HEAD, DRAFTER, VERIFIER)
    change(manifest)
    (problem,) = [p for p in validate_manifest(manifest) if p.path == path]
    assert problem.reason == INVALID_SPEC and f'unknown field "{path}"' in problem.message and fix in problem.message


def test_unknown_fields_are_what_the_api_server_prunes():
    """The same fields as the emulated API server finds unknown in the CRD's schema (it refuses them
    with fieldValidation=Strict, kubectl's default)."""
    from aiflow.api.schema import openapi_schema
    from tests.kube.schemas import prune

    manifest = flow(dict(HEAD, replica=3, env=[{"name": "A", "value": "1", "valueFrum": {}}]), DRAFTER, VERIFIER,
                    bogus=1, objective={"latencyMs": 100, "p99": 1})
    pruned = prune(copy.deepcopy(manifest), openapi_schema())
    found = sorted(p.path for p in validate_manifest(manifest) if p.message.startswith("unknown field"))
    assert found == sorted(pruned) and len(found) == 4


def test_the_examples_have_no_unknown_fields():
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "AIFlow":
                assert [p for p in validate_manifest(doc) if "unknown field" in p.message] == [], path


@pytest.mark.parametrize("repository", [
    {"persistentVolumeClaim": {"claimName": "team-models"}, "path": "/models"},
    {"path": "s3://team-bucket/models"},
])
def test_a_flow_with_its_own_repository_is_not_checked_against_the_bundled_models(repository):
    doc = {"apiVersion": "aiflow.io/v1alpha1", "kind": "AIFlow", "metadata": {"name": "byo"},
           "spec": {"stages": [{"name": "only", "model": "my_captioner"}],
                    "triton": {"modelRepository": repository}}}
    assert validate_manifest(doc) == []
    bundled = {**doc, "spec": {"stages": doc["spec"]["stages"]}}
    assert [p.message.split(";")[0] for p in validate_manifest(bundled)] == ["unknown model 'my_captioner'"]
