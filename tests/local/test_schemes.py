"""Schemes as stage chains, their wiring, and the client's per-link accounting (pure)."""

import pytest

from aiflow.local.client import add_link_times, link_bytes
from aiflow.local.schemes import SCHEME_NAMES, Conditions, get_scheme, startup_wiring, wiring

TIERS = ("device", "edge", "cloud")


def test_the_five_schemes_of_the_issue():
    assert SCHEME_NAMES == ("device-only", "edge-only", "cloud-only", "split", "split-spec")
    chains = {n: [(p.tier, p.model) for p in get_scheme(n).chain] for n in SCHEME_NAMES}
    assert chains["cloud-only"] == [("cloud", "captioner")]
    assert chains["split-spec"] == [("device", "vision_head"), ("edge", "caption_drafter"), ("cloud", "caption_verifier")]


def test_wiring_points_each_stage_at_the_next_and_leaves_the_last_unwired():
    wires = {w.model: w for w in wiring(get_scheme("split-spec", split_layer=3, codec="merge:8+fp16"))}
    assert wires["vision_head"].next_stage == ("edge", "caption_drafter")
    assert wires["caption_drafter"].next_stage == ("cloud", "caption_verifier")
    assert wires["caption_verifier"].next_stage is None
    assert wires["vision_head"].parameters["AIFLOW_SPLIT_LAYER"] == "3"
    assert wires["vision_head"].parameters["AIFLOW_CODEC"] == "merge:8+fp16"


def test_startup_wiring_loads_each_model_once_per_tier():
    keys = [(w.tier, w.model) for w in startup_wiring()]
    assert len(keys) == len(set(keys)) == 7


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"name": "fog-only"}, "unknown scheme"),
        ({"name": "edge-only", "split_layer": 1}, "apply to the split schemes"),
        ({"name": "split", "codec": "lz4"}, "unknown step"),
        ({"name": "split", "upload": "webp"}, "unknown upload"),
    ],
)
def test_bad_scheme_requests_are_rejected(kwargs, says):
    with pytest.raises(ValueError, match=says):
        get_scheme(**kwargs)


def hop(tier, sent=0, total=10.0, wait=0.0):
    return {"tier": tier, "bytes_to_next": sent, "total_ms": total, "wait_next_ms": wait}


def test_link_bytes_follow_the_route_of_each_crossing():
    assert link_bytes(TIERS, 1000, [hop("cloud")]) == {"device->edge": 1000, "edge->cloud": 1000}
    assert link_bytes(TIERS, 1000, [hop("device")]) == {"device->edge": 0, "edge->cloud": 0}
    spec = [hop("device", 300), hop("edge", 350), hop("cloud")]
    assert link_bytes(TIERS, 1000, spec) == {"device->edge": 300, "edge->cloud": 350}


def test_link_times_are_what_each_hop_waited_beyond_the_next_hops_own_time():
    hops = add_link_times([hop("device", total=100, wait=80), hop("edge", total=50)], latency_ms=110)
    assert [h["link_ms"] for h in hops] == [10, 30]


def test_conditions_become_link_settings_and_factors():
    c = Conditions(uplink_mbps=2, downlink_mbps=None, rtt_ms=20)
    link = c.links()["device->edge"]
    assert (link.bandwidth_up, link.bandwidth_down, link.latency_up) == (2e6, None, 0.01)
    assert c.compute_factors() == {"device": c.device_factor, "edge": c.edge_factor, "cloud": c.cloud_factor}
