"""`aiflow plan` on the shipped examples: the plans follow the cluster, bad input gets a clear error."""

from __future__ import annotations

import json

import pytest
import yaml

from aiflow.cli import main

AUTO_FLOW = "examples/auto-placement.yaml"


def plan_json(capsys, flow: str, cluster: str, *extra: str) -> dict:
    assert main(["plan", "-f", flow, "--cluster", f"examples/cluster-{cluster}.yaml", "-o", "json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def tiers_used(option: dict) -> set[str]:
    return set(option["placement"].values())


def test_thin_uplink_keeps_raw_images_off_the_link(capsys):
    out = plan_json(capsys, AUTO_FLOW, "thin-uplink")
    chosen = out["chosen"]
    assert chosen["placement"]["head"] == "device"
    assert 0 < chosen["bytesUpstream"] < chosen["hops"][0]["bytes"], "sends features, smaller than the image"
    assert out["feasible"] and out["reason"].startswith("head@device")
    good = plan_json(capsys, AUTO_FLOW, "good-uplink")
    assert good["chosen"]["bytesUpstream"] > chosen["bytesUpstream"]


@pytest.mark.parametrize("cluster", ["edge-overloaded", "edge-down"])
def test_work_leaves_an_overloaded_or_missing_edge(capsys, cluster):
    out = plan_json(capsys, AUTO_FLOW, cluster)
    assert "edge" not in tiers_used(out["chosen"])
    if cluster == "edge-down":
        assert all("edge" not in tiers_used(alt) for alt in out["alternatives"])


def test_pinned_flow_reports_the_objective_and_the_per_hop_breakdown(capsys):
    out = plan_json(capsys, "examples/captioning.yaml", "thin-uplink", "--alternatives", "1")
    chosen = out["chosen"]
    assert chosen["placement"] == {"head": "device", "drafter": "edge", "verifier": "cloud"}
    assert [(h["fromTier"], h["toTier"], h["payload"]) for h in chosen["hops"]] == [
        ("device", "device", "image"), ("device", "edge", "features"), ("edge", "cloud", "drafts")]
    total = sum(h["ms"] for h in chosen["hops"]) + sum(s["computeMs"] for s in chosen["stages"])
    assert total == pytest.approx(chosen["latencyMs"], abs=0.01)
    assert out["objectiveMs"] == 250 and out["objectiveMet"] == (chosen["latencyMs"] <= 250)
    assert len(out["alternatives"]) == 1


def test_table_output_explains_the_choice(capsys):
    assert main(["plan", "-f", AUTO_FLOW, "--cluster", "examples/cluster-thin-uplink.yaml"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("flow auto-placement: head@device")
    assert "chosen plan, step by step:" in text and "link device->edge: 1 Mbit/s, 30 ms RTT (measured)" in text
    assert "plausible defaults, not measurements" in text


def test_a_pinned_stage_on_a_tier_that_is_down_is_a_clear_error(capsys):
    assert main(["plan", "-f", "examples/captioning.yaml", "--cluster", "examples/cluster-edge-down.yaml"]) == 2
    assert "stage 'drafter' (pinned to edge) fits no tier: edge has no Ready node" in capsys.readouterr().err


def test_an_unreachable_quality_floor_is_a_clear_error(capsys):
    assert main(["plan", "-f", AUTO_FLOW, "--cluster", "examples/cluster-thin-uplink.yaml", "--min-quality", "99.5"]) == 2
    assert "no codec reaches the quality floor 99.5" in capsys.readouterr().err


def test_bad_inputs_are_clear_errors(capsys, tmp_path):
    bad_snapshot = tmp_path / "cluster.yaml"
    bad_snapshot.write_text(yaml.safe_dump({"kind": "ClusterSnapshot", "tiers": {"edge": {"nodes": "two"}}}))
    assert main(["plan", "-f", AUTO_FLOW, "--cluster", str(bad_snapshot)]) == 2
    assert "tiers.edge.nodes: 'two' is not of type 'integer'" in capsys.readouterr().err

    bad_flow = tmp_path / "flow.yaml"
    bad_flow.write_text(yaml.safe_dump({"apiVersion": "aiflow.io/v1alpha1", "kind": "AIFlow", "metadata": {"name": "x"},
                                        "spec": {"stages": [{"name": "a", "model": "nope"}]}}))
    assert main(["plan", "-f", str(bad_flow), "--cluster", "examples/cluster-thin-uplink.yaml"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err

    assert main(["plan", "-f", AUTO_FLOW, "--cluster", "examples/cluster-thin-uplink.yaml", "--profile", str(tmp_path / "none.yaml")]) == 2
    assert "cannot read profile" in capsys.readouterr().err
