"""Parsing AIFlow manifests into typed data, and reading cluster files."""

import pytest

from aiflow.api.cluster import ClusterView, cluster_from_document, cluster_from_nodes
from aiflow.api.spec import (
    Flow, Link, ModelRepository, Rescheduling, Stage, StageParameters, Triton, parse_flow,
)
from aiflow.api.schema import openapi_schema


def manifest(**spec):
    return {"apiVersion": "aiflow.io/v1alpha1", "kind": "AIFlow",
            "metadata": {"name": "f", "namespace": "ns", "uid": "u-1", "generation": 3},
            "spec": {"stages": [{"name": "all", "model": "captioner"}], **spec}}


def test_minimal_manifest_gets_the_crd_defaults():
    flow = parse_flow(manifest())
    assert (flow.name, flow.namespace, flow.uid, flow.generation) == ("f", "ns", "u-1", 3)
    (stage,) = flow.stages
    assert stage == Stage(name="all", model="captioner", tier="auto", replicas=1,
                          resources={"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}})
    assert "default" not in openapi_schema()["properties"]["spec"]["properties"]["triton"]["properties"]["image"]
    assert flow.triton == Triton()  # no image named: the operator's default per tier
    assert flow.links == () and flow.objective.latency_ms is None


def test_dataclass_defaults_agree_with_the_crd_defaults():
    flow = parse_flow(manifest())
    assert flow.rescheduling == Rescheduling()
    assert flow.triton.model_repository == ModelRepository()
    assert flow.triton.image_pull_policy == Triton(image="x").image_pull_policy
    assert flow.stages[0].tier == Stage("a", "b").tier and flow.stages[0].replicas == Stage("a", "b").replicas


def test_every_field_is_parsed():
    flow = parse_flow(manifest(
        stages=[{"name": "head", "model": "vision_head", "tier": "device", "replicas": 2,
                 "parameters": {"splitLayer": 3, "codec": "int8", "decoding": "greedy"},
                 "env": [{"name": "A", "value": "1"}, {"name": "B"}], "image": "own:1"}],
        triton={"image": "img:1", "imagePullPolicy": "Always", "tierImages": {"edge": "edge:1"},
                "modelRepository": {"path": "/m", "persistentVolumeClaim": {"claimName": "pvc", "subPath": "r"}}},
        links=[{"from": "device", "to": "edge", "bandwidthMbps": 2.5}],
        objective={"latencyMs": 100},
        rescheduling={"enabled": True, "intervalSeconds": 10, "minImprovementPercent": 5, "cooldownSeconds": 20},
    ), namespace="ignored")
    (stage,) = flow.stages
    assert stage.parameters == StageParameters(3, "int8", "greedy")
    assert stage.env == (("A", "1"), ("B", ""))
    assert flow.namespace == "ns"
    assert stage.image == "own:1"
    assert flow.triton == Triton("img:1", {"edge": "edge:1"}, "Always", ModelRepository("/m", "pvc", "r"))
    assert flow.links == (Link("device", "edge", 2.5, 0.0),)
    assert flow.objective.latency_ms == 100
    assert flow.rescheduling == Rescheduling(True, 10, 5, 20)


def test_the_most_specific_image_wins_and_unnamed_ones_are_the_operators_tier_defaults():
    from aiflow.api.images import CPU_STAGE_IMAGE, GPU_STAGE_IMAGE

    plain, own = Stage("a", "m"), Stage("b", "m", image="own:1")
    flow = parse_flow(manifest())
    assert [flow.triton.image_for(plain, t) for t in ("device", "edge", "cloud")] == \
        [CPU_STAGE_IMAGE, CPU_STAGE_IMAGE, GPU_STAGE_IMAGE]
    flow = parse_flow(manifest(), default_images={"cloud": "gpu:2"})
    assert flow.triton.image_for(plain, "cloud") == "gpu:2" and flow.triton.image_for(plain, "edge") == CPU_STAGE_IMAGE
    flow = parse_flow(manifest(triton={"image": "all:1", "tierImages": {"edge": "edge:1"}}))
    assert [flow.triton.image_for(plain, t) for t in ("device", "edge", "cloud")] == ["all:1", "edge:1", "all:1"]
    assert flow.triton.image_for(own, "edge") == "own:1"


def test_the_operators_tier_images_come_from_the_environment_with_clear_errors():
    from aiflow.api.images import DEFAULT_TIER_IMAGES, configured_tier_images

    assert configured_tier_images({}) == DEFAULT_TIER_IMAGES
    assert configured_tier_images({"AIFLOW_STAGE_IMAGES": "cloud=c:1, edge=e:1"}) == \
        {**DEFAULT_TIER_IMAGES, "cloud": "c:1", "edge": "e:1"}
    with pytest.raises(ValueError, match=r"\$AIFLOW_STAGE_IMAGES: unknown tier 'moon'"):
        configured_tier_images({"AIFLOW_STAGE_IMAGES": "moon=x:1"})
    with pytest.raises(ValueError, match="is not TIER=IMAGE"):
        configured_tier_images({"AIFLOW_STAGE_IMAGES": "edge"})


def test_links_are_symmetric_unless_both_directions_are_declared():
    up, down = Link("device", "edge", 10, 5), Link("edge", "device", 50, 5)
    flow = Flow("f", "ns", (), Triton("i"), links=(up,))
    assert flow.link("device", "edge") == up and flow.link("edge", "device") == up
    assert flow.link("edge", "cloud") is None
    flow = Flow("f", "ns", (), Triton("i"), links=(up, down))
    assert flow.link("edge", "device") == down


def test_namespace_falls_back_to_the_given_one():
    doc = manifest()
    del doc["metadata"]["namespace"]
    assert parse_flow(doc, "team-a").namespace == "team-a"


def node(name, tier=None, ready="True", cordoned=False):
    labels = {"aiflow.io/tier": tier} if tier else {}
    return {"kind": "Node", "metadata": {"name": name, "labels": labels},
            "spec": {"unschedulable": cordoned},
            "status": {"conditions": [{"type": "Ready", "status": ready}], "allocatable": {"cpu": "4"}}}


def test_cluster_from_nodes_counts_usable_tier_nodes_only():
    cluster = cluster_from_nodes([
        node("d1", "device"), node("e1", "edge", ready="False"), node("c1", "cloud", cordoned=True),
        node("x", None), node("m", "moon"),
    ])
    assert {n.name for n in cluster.nodes} == {"d1", "e1", "c1"}
    assert cluster.tiers_with_nodes == ("device",)
    assert cluster.usable_nodes("device")[0].allocatable == {"cpu": "4"}


def test_a_node_without_conditions_counts_as_ready():
    bare = {"metadata": {"name": "n", "labels": {"aiflow.io/tier": "edge"}}}
    assert cluster_from_nodes([bare]).tiers_with_nodes == ("edge",)


@pytest.mark.parametrize("doc, tiers", [
    ({"tiers": {"device": 1, "edge": 0, "cloud": ["c1", "c2"]}}, ("device", "cloud")),
    ([node("e", "edge")], ("edge",)),
    ({"apiVersion": "v1", "kind": "List", "items": [node("c", "cloud")]}, ("cloud",)),
    (node("d", "device"), ("device",)),
])
def test_cluster_files_in_every_documented_form(doc, tiers):
    assert cluster_from_document(doc).tiers_with_nodes == tiers


@pytest.mark.parametrize("doc, message", [
    ({"tiers": {"fog": 1}}, "unknown tier"),
    ({"tiers": {"edge": "two"}}, "node count"),
    ({"nodes": []}, "tiers:"),
    ("text", "tiers:"),
])
def test_bad_cluster_files_say_what_is_wrong(doc, message):
    with pytest.raises(ValueError, match=message):
        cluster_from_document(doc)


def test_every_tier_cluster_has_each_tier():
    assert ClusterView.every_tier().tiers_with_nodes == ("device", "edge", "cloud")
