"""The rescheduler's pure parts: node observations, the plan steps, revisions and status patches."""

from __future__ import annotations

import datetime as dt

import pytest

from aiflow import linkprobe
from aiflow.api.cluster import ClusterView, NodeInfo
from aiflow.api.spec import parse_flow
from aiflow.controller import rescheduler
from aiflow.controller.observe import node_record, observations, with_links
from aiflow.controller.rescheduler import PlanRecord, step
from aiflow.controller.revisions import REVISION_LABEL, render_revision
from aiflow.controller.status import status_patch
from aiflow.planner.cluster import LinkState, TierState, cluster_state
from aiflow.planner.placement import resolve_placement


def node(name, tier, ready=True, labels=None, annotations=None, cpu="4"):
    return {"metadata": {"name": name, "labels": {"aiflow.io/tier": tier, **(labels or {})},
                         "annotations": annotations or {}},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                       "allocatable": {"cpu": cpu, "memory": "8Gi"}}}


def flow(generation=1, **rescheduling):
    stages = [{"name": "head", "model": "vision_head"}, {"name": "drafter", "model": "caption_drafter"},
              {"name": "verifier", "model": "caption_verifier"}]
    return parse_flow({"apiVersion": "aiflow.io/v1alpha1", "kind": "AIFlow",
                       "metadata": {"name": "f", "namespace": "ns", "uid": "u", "generation": generation},
                       "spec": {"stages": stages, "rescheduling": {"enabled": True, **rescheduling}}})


def world(uplink_mbps=20.0, tiers=("device", "edge", "cloud")):
    """A slow device, an edge, a fast cloud; the device's uplink as measured."""
    factors = {"device": 8.0, "edge": 1.0, "cloud": 0.5}
    states = [TierState(t, 1, int(t in tiers), factors[t]) for t in factors]
    state = cluster_state(states, [LinkState("device", "edge", uplink_mbps, 10.0, "measured")])
    return state, ClusterView(tuple(NodeInfo(f"{t}-1", t) for t in tiers))


NOW = dt.datetime(2026, 1, 1, 0, 1, 0, tzinfo=dt.timezone.utc)


def measured(node_name, tier, at=NOW, valid=180, **links):
    """What a node's link probe published: tier -> (bandwidth Mbit/s, RTT ms)."""
    data = linkprobe.measurement_data(node_name, tier, {t: linkprobe.Link(rtt, bw) for t, (bw, rtt) in links.items()},
                                      at, valid)
    return linkprobe.read_measurements(data)


def test_node_records_keep_good_numbers_and_say_what_garbage_they_dropped():
    good = node_record(node("d", "device", labels={"aiflow.io/compute-factor": "8"}))
    data = {**linkprobe.measurement_data("d", "device", {"edge": linkprobe.Link(10, 20)}, NOW, 180),
            "cloud.bandwidth-mbps": "0", "cloud.rtt-ms": "5", "cloud.measured-at": "2026-01-01T00:00:00Z"}
    (good,), notes = with_links([good], [linkprobe.read_measurements(data)], NOW)
    assert good.compute_factor == 8.0 and dict(good.links)["edge"].bandwidth_mbps == 20.0
    assert "cloud" not in dict(good.links)  # no bandwidth is no link
    assert notes == ("node d: link measurement towards cloud ignored (cloud.rtt-ms='5', cloud.bandwidth-mbps='0', "
                     "cloud.measured-at='2026-01-01T00:00:00Z')",)
    for raw in ("fast", "-1", "0", "nan", "inf"):
        bad = node_record(node("e", "edge", annotations={"aiflow.io/compute-factor": raw}))
        assert bad.compute_factor is None and "is not a positive number" in bad.problems[0]
    assert node_record({"metadata": {"name": "x"}}) is None


def test_observations_take_median_speed_mean_load_and_links_of_usable_nodes():
    records = [node_record(n) for n in (
        node("e1", "edge", labels={"aiflow.io/compute-factor": "1"}),
        node("e2", "edge", labels={"aiflow.io/compute-factor": "3"}),
        node("e3", "edge", ready=False, labels={"aiflow.io/compute-factor": "100"}),
        node("d1", "device"), node("d2", "device"), node("d3", "device"),
    )]
    records, notes = with_links(records, [measured("d1", "device", edge=(4, 8)), measured("d2", "device", edge=(6, 12)),
                                          measured("d3", "device", at=NOW - dt.timedelta(seconds=181), edge=(500, 1))],
                                NOW)
    assert len(notes) == 1 and notes[0].startswith("node d3: link measurement towards edge is stale")
    seen = observations(records, {"e1": 0.2, "e2": 0.6, "e3": 1.0}, ("a note",))
    edge = next(t for t in seen.tiers if t.tier == "edge")
    assert (edge.nodes, edge.ready_nodes, edge.compute_factor, edge.utilisation) == (3, 2, 2.0, pytest.approx(0.4))
    assert next(t for t in seen.tiers if t.tier == "cloud").ready_nodes == 0
    (link,) = seen.links
    assert (link.src, link.dst, link.bandwidth_mbps, link.rtt_ms, link.source) == ("device", "edge", 5.0, 10.0, "measured")
    assert seen.notes == ("a note",)


def initial(f, state, cluster):
    out = step(f, None, None, state=state, cluster=cluster, now=0.0, last_migration_at=None, target_ready=False, due=False)
    return out.serving


def test_a_first_plan_then_nothing_moves_without_a_turn():
    f = flow(cooldownSeconds=100)
    state, cluster = world(20.0)
    serving = initial(f, state, cluster)
    assert serving.revision == 1 and serving.planner == "Solver" and serving.tiers == ("edge", "edge", "edge")
    thin, _ = world(0.5)
    out = step(f, serving, None, state=thin, cluster=cluster, now=10, last_migration_at=None, target_ready=False, due=False)
    assert out.serving == serving and out.migration is None and out.decision is None


def test_oscillating_links_move_at_most_once_per_cooldown():
    f = flow(cooldownSeconds=100, minImprovementPercent=10)
    state, cluster = world(20.0)
    serving, migration, last, moves, decisions = initial(f, state, cluster), None, None, 0, []
    move = None
    for tick in range(1, 61):  # a turn every 5 s for 300 s, the uplink flapping every turn
        now = tick * 5.0
        state, _ = world(0.5 if tick % 2 else 20.0)
        # A move's revision is Ready at the next turn, its endpoints follow the switch at once.
        out = step(f, serving, migration, state=state, cluster=cluster, now=now, last_migration_at=last,
                   target_ready=migration is not None, due=True, move=move, switched=True, taken=True)
        moves += out.completed is not None
        serving, migration, last, move = out.serving, out.migration, out.last_migration_at, out.move
        decisions.append(out.decision.decision if out.decision else None)
    assert 1 <= moves <= 300 / 100 + 1
    assert "Rejected" in decisions and all(d in ("Kept", "Rejected", "Migrating", None) for d in decisions)


def test_a_lost_tier_fails_over_at_once_even_without_rescheduling_and_is_given_back_later():
    f = flow(enabled=False)
    state, cluster = world(0.5)
    serving = initial(f, state, cluster)
    assert "edge" in serving.tiers
    down, down_cluster = world(0.5, tiers=("device", "cloud"))
    out = step(f, serving, None, state=down, cluster=down_cluster, now=5, last_migration_at=4.0, target_ready=False, due=False)
    assert out.started and out.decision.decision == "Failover" and "edge has no Ready node" in out.decision.reason
    assert out.migration.revision == 2 and "edge" not in out.migration.tiers and out.migration.fallback_from == ("edge",)
    assert rescheduler.degraded_tiers(out, down_cluster) == ["edge"]
    switching = step(f, out.serving, out.migration, state=down, cluster=down_cluster, now=9, last_migration_at=4.0,
                     target_ready=True, due=False, move=out.move)
    assert switching.move.phase == "Switching" and switching.entry_revision == 2 and switching.completed is None
    kwargs = dict(state=down, cluster=down_cluster, last_migration_at=4.0, target_ready=True, due=False)
    held = step(f, serving, out.migration, now=10, move=switching.move, switched=True, taken=False, **kwargs)
    assert held.move.phase == "Switching" and held.serving == serving  # its endpoints have not followed
    draining = step(f, serving, out.migration, now=11, move=held.move, switched=True, taken=True, **kwargs)
    assert draining.move.phase == "Draining" and draining.completed is None
    assert draining.grace_s == 5.0 and draining.wait_s == 5.0  # the floor: the flow has no objective
    early = step(f, serving, out.migration, now=15.9, move=draining.move, switched=True, taken=True, **kwargs)
    assert early.completed is None and early.migration == out.migration
    done = step(f, serving, out.migration, now=16, move=early.move, switched=True, taken=True, **kwargs)
    assert done.serving.revision == 2 and done.completed == serving and done.last_migration_at == 16
    assert done.move is None and done.entry_revision == 2
    assert rescheduler.degraded_tiers(done, cluster) == []  # the edge is back: no longer degraded


def test_a_move_whose_tier_is_lost_is_given_up_and_a_spec_change_replans_in_place():
    f = flow(cooldownSeconds=0)
    state, cluster = world(20.0)
    serving = initial(f, state, cluster)
    target = PlanRecord(2, 1, (("head", "device"), ("drafter", "cloud"), ("verifier", "cloud")))
    _, no_cloud = world(20.0, tiers=("device", "edge"))
    out = step(f, serving, target, state=state, cluster=no_cloud, now=1, last_migration_at=None, target_ready=True, due=False)
    assert out.abandoned == target and out.migration is None and out.serving == serving
    changed = step(flow(generation=2, cooldownSeconds=0), serving, target, state=state, cluster=cluster, now=1,
                   last_migration_at=None, target_ready=False, due=False)
    assert changed.serving.revision == 1 and changed.serving.generation == 2 and changed.abandoned == target


def test_status_round_trip_and_repeated_decisions():
    state, cluster = world()
    record = initial(flow(), state, cluster)
    assert PlanRecord.from_status(record.to_status(), flow()) == record
    assert PlanRecord.from_status({"placement": "garbage"}) is None
    decision = rescheduler.DecisionRecord("Rejected", "why", "T", "target")
    assert decision.repeats({"decision": "Rejected", "target": "target", "time": "older"})
    assert not decision.repeats({"decision": "Kept"})


def test_a_revision_is_a_chain_of_its_own_behind_the_stable_entry_service():
    f = flow()
    placement = resolve_placement(f, ClusterView.every_tier())
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render_revision(f, placement, 3, 2)}
    assert set(objects) == {("Service", "f-head"), ("Deployment", "f-head-r3"), ("Service", "f-drafter-r3"),
                            ("Deployment", "f-drafter-r3"), ("Service", "f-verifier-r3"), ("Deployment", "f-verifier-r3")}
    assert objects[("Service", "f-head")]["spec"]["selector"][REVISION_LABEL] == "2"  # still the serving one
    assert REVISION_LABEL not in objects[("Service", "f-head")]["metadata"]["labels"]
    head = objects[("Deployment", "f-head-r3")]
    assert head["spec"]["selector"]["matchLabels"][REVISION_LABEL] == "3"
    env = {e["name"]: e["value"] for e in head["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AIFLOW_NEXT_URL"] == "f-drafter-r3.ns.svc:8001"
    first = {(o["kind"], o["metadata"]["name"]) for o in render_revision(f, placement, 1, 1)}
    assert first == {("Service", "f-head"), ("Deployment", "f-head"), ("Service", "f-drafter"),
                     ("Deployment", "f-drafter"), ("Service", "f-verifier"), ("Deployment", "f-verifier")}


def test_status_patch_removes_nested_keys_a_merge_patch_would_keep():
    old = {"plan": {"revision": 2, "fallbackFrom": ["edge"]}, "gone": 1}
    new = {"plan": {"revision": 3}}
    assert status_patch(new, old) == {"status": {"plan": {"revision": 3, "fallbackFrom": None}, "gone": None}}
    assert status_patch(new, new) is None
