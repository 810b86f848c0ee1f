"""Profiles and cluster snapshots: the shipped ones load, bad ones get errors that say what to fix."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from aiflow.api.cluster import NodeInfo
from aiflow.planner.cluster import (
    ClusterError,
    LinkState,
    TierState,
    cluster_state,
    load_cluster,
    tier_states_from_nodes,
)
from aiflow.planner.profile import DEFAULT_PROFILE_PATH, ProfileError, load_profile, profile_from_dict

EXAMPLES = sorted(Path("examples").glob("cluster-*.yaml"))
DEFAULT_DOC = yaml.safe_load(DEFAULT_PROFILE_PATH.read_text())


def edited(change) -> dict:
    doc = copy.deepcopy(DEFAULT_DOC)
    change(doc)
    return doc


def test_the_default_profile_is_labelled_as_defaults():
    profile = load_profile(manifest=None)
    assert profile.source == "default"
    assert profile.layers == len(DEFAULT_DOC["encoder"]["layerMs"])
    assert profile.quality_of("topk:16+int8+zstd", 0) < profile.quality_of("topk:16+int8+zstd", profile.layers)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["encoder"].pop("layerMs"), "encoder: 'layerMs' is a required property"),
        (lambda d: d["encoder"].update(layerMs=[1, "fast"]), "encoder.layerMs[1]: 'fast' is not of type 'number'"),
        (lambda d: d["decoder"].update(acceptance=1.5), "decoder.acceptance: 1.5 is greater than the maximum of 1"),
        (lambda d: d.update(kind="Profile"), "kind: 'PlannerProfile' was expected"),
        (lambda d: d["image"].update(pngbytes=3), "image: Additional properties are not allowed ('pngbytes' was unexpected) (known fields: jpegBytes, pngBytes)"),
        (lambda d: d["features"]["codecs"].append("int7"), "unknown step 'int7'"),
        (lambda d: d["features"]["codecs"].append("zstd+int8"), "zstd+int8"),
        (lambda d: d["quality"]["large"].pop("int8"), "quality.large has no score for codec(s) ['int8']"),
        (lambda d: d["quality"]["large"].update({"topk:16+int8+zstd": [90, 91]}), "quality.large['topk:16+int8+zstd'] has 2 values; give one number, or one per split layer 0..4 (5 values)"),
        (lambda d: d["features"]["codecs"].append("int8+zstd:19"), "lists the same codec twice"),
    ],
)
def test_profile_errors_name_the_field_and_the_fix(change, expected):
    with pytest.raises(ProfileError) as err:
        profile_from_dict(edited(change), where="p.yaml")
    assert expected in str(err.value)


def test_unreadable_and_malformed_profiles(tmp_path):
    with pytest.raises(ProfileError, match="cannot read profile .*missing.yaml"):
        load_profile(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("encoder: [1, 2\n")
    with pytest.raises(ProfileError, match="is not valid YAML"):
        load_profile(bad)


def test_quality_comes_from_the_weights_manifest_when_it_has_it(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"quality_by_codec": {"metric": "cider", "large": {"int8+zstd": 91.5, "fp32": 92.0}}}))
    profile = load_profile(manifest=manifest)
    assert profile.quality_of("int8+zstd") == 91.5 and profile.quality_metric == "cider"
    assert profile.quality_source == f"manifest {manifest}"
    assert profile.quality_of("fp16") == load_profile(manifest=None).quality_of("fp16")
    manifest.write_text(json.dumps({"quality_by_codec": {"large": {"int8": 120}}}))
    with pytest.raises(ProfileError, match=r"(?s)quality_by_codec.*large\.int8: 120 is greater than the maximum of 100"):
        load_profile(manifest=manifest)


def test_the_default_profile_describes_the_shipped_model():
    load_profile()  # checks layers, tokens and channels against operator/aiflow/model/weights/manifest.json


def test_the_planner_reads_the_manifest_of_the_shipped_weights():
    # The planner reads the file without importing the model code; both must name the same file.
    from aiflow.model.checkpoint import MANIFEST_FILE, WEIGHTS_DIR
    from aiflow.planner.profile import WEIGHTS_MANIFEST_PATH

    assert WEIGHTS_MANIFEST_PATH == (WEIGHTS_DIR / MANIFEST_FILE).resolve() and WEIGHTS_MANIFEST_PATH.is_file()


def test_a_profile_of_another_model_is_refused(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"config": {"num_layers": 6, "image_size": 96, "patch_size": 16, "hidden_size": 96}}))
    with pytest.raises(ProfileError, match=r"does not describe the model of .*: encoder layers 4 \(model: 6\); profile this model"):
        load_profile(manifest=manifest)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_snapshots_load(path):
    cluster = load_cluster(path)
    assert cluster.tier("device").available
    assert cluster.link("device", "cloud").source.startswith("composed")


SNAPSHOT = {
    "kind": "ClusterSnapshot",
    "tiers": {"device": {"nodes": 1}, "edge": {"nodes": 2, "readyNodes": 1}},
    "links": [{"from": "device", "to": "edge", "bandwidthMbps": 5, "rttMs": 20}],
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["tiers"]["edge"].update(readyNodes=3), "tiers.edge.readyNodes (3) exceeds tiers.edge.nodes (2)"),
        (lambda d: d["tiers"].update(fog={"nodes": 1}), "tiers: Additional properties are not allowed ('fog' was unexpected)"),
        (lambda d: d["links"][0].update(bandwidthMbps=0), "links[0].bandwidthMbps: 0 is less than or equal to the minimum of 0"),
        (lambda d: d["links"][0].update(to="device"), "links[0] joins 'device' to itself"),
        (lambda d: d["links"].append(dict(d["links"][0])), "declares device->edge more than once"),
        (lambda d: d["tiers"]["device"].update(utilisation=-0.1), "tiers.device.utilisation: -0.1 is less than the minimum of 0"),
        (lambda d: d.pop("tiers"), "'tiers' is a required property"),
    ],
)
def test_snapshot_errors_name_the_field_and_the_fix(tmp_path, change, expected):
    doc = copy.deepcopy(SNAPSHOT)
    change(doc)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ClusterError) as err:
        load_cluster(path)
    assert expected in str(err.value) and str(path) in str(err.value)


def test_links_fill_in_reverse_declared_composed_and_default():
    declared = [LinkState("edge", "cloud", 100.0, 30.0)]
    cluster = cluster_state([TierState("device", 1, 1)], observed_links=[LinkState("device", "edge", 4.0, 10.0, "measured")], declared_links=declared)
    assert cluster.link("edge", "device").bandwidth_mbps == 4.0 and cluster.link("edge", "device").source == "measured"
    assert cluster.link("cloud", "edge").source == "declared"
    composed = cluster.link("device", "cloud")
    assert composed.bandwidth_mbps == pytest.approx(1 / (1 / 4 + 1 / 100)) and composed.rtt_ms == 40.0
    assert composed.via == (("device", "edge"), ("edge", "cloud"))
    bare = cluster_state([])
    assert bare.link("device", "edge").source == "default" and not bare.tier("cloud").available


def test_tier_states_from_operator_nodes():
    nodes = [
        NodeInfo("e1", "edge", usable=True, allocatable={"memory": "8Gi"}),
        NodeInfo("e2", "edge", usable=True, allocatable={"memory": "garbage"}),
        NodeInfo("e3", "edge", usable=False, allocatable={"memory": "64Gi"}),
        NodeInfo("c1", "cloud", usable=True),
    ]
    states = {s.tier: s for s in tier_states_from_nodes(nodes)}
    assert (states["edge"].nodes, states["edge"].ready_nodes, states["edge"].memory_mib) == (3, 2, 8192)
    assert states["cloud"].available and states["cloud"].memory_mib == 0  # unknown: does not constrain
    assert not states["device"].available
