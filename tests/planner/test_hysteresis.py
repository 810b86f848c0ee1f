"""Rescheduling decisions: hysteresis, cooldown, and leaving a plan whose tier is gone."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from aiflow.api.spec import parse_flow
from aiflow.planner.cluster import LinkState, TierState, cluster_state
from aiflow.planner.hysteresis import Policy, decide
from aiflow.planner.problem import PlanError, Problem
from aiflow.planner.profile import load_profile
from aiflow.planner.solver import assess, plan
from tests.planner.instances import manifest

PROFILE = load_profile()
FLOW = parse_flow(manifest("adaptive", [
    {"name": "head", "model": "vision_head"},
    {"name": "drafter", "model": "caption_drafter"},
    {"name": "verifier", "model": "caption_verifier"},
]))


def problem_at(uplink_mbps: float, edge_ready: int = 2) -> Problem:
    tiers = [
        TierState("device", 1, 1, compute_factor=4.0, utilisation=0.1, memory_mib=4096),
        TierState("edge", 2, edge_ready, compute_factor=1.0, utilisation=0.3, memory_mib=16384),
        TierState("cloud", 4, 4, compute_factor=0.5, utilisation=0.4, memory_mib=65536),
    ]
    links = [LinkState("device", "edge", uplink_mbps, 10.0), LinkState("edge", "cloud", 200.0, 30.0)]
    return Problem(FLOW, cluster_state(tiers, observed_links=links), PROFILE)


def run_rescheduler(uplinks, interval_s: float, policy: Policy, edge_ready=None):
    """Re-plan every `interval_s` with the uplink of each tick, as the rescheduler does; return the
    times of the migrations after the initial placement, and the decisions."""
    deployed, last, moves, decisions = None, None, [], []
    for tick, uplink in enumerate(uplinks):
        now = tick * interval_s
        problem = problem_at(uplink, edge_ready[tick] if edge_ready else 2)
        best = plan(problem)
        current = assess(problem, deployed) if deployed else None
        decision = decide(current, best, policy, now, last)
        decisions.append(decision)
        if decision.migrate:
            if deployed is not None:
                moves.append(now)
            deployed, last = best.candidate, now
    return moves, decisions


def test_the_uplink_moves_the_best_plan():
    """The premise of the oscillation tests: 0.5 and 50 Mbit/s call for different placements."""
    assert plan(problem_at(0.5)).candidate != plan(problem_at(50.0)).candidate


@settings(max_examples=25, deadline=None)
@given(
    uplinks=st.lists(st.sampled_from([0.5, 0.8, 5.0, 50.0]), min_size=2, max_size=30),
    interval=st.sampled_from([5.0, 20.0, 60.0]),
    min_improvement=st.sampled_from([0.0, 0.05, 0.2]),
    cooldown=st.sampled_from([30.0, 120.0, 600.0]),
)
def test_oscillating_uplink_moves_at_most_once_per_cooldown(uplinks, interval, min_improvement, cooldown):
    moves, _ = run_rescheduler(uplinks, interval, Policy(min_improvement, cooldown))
    assert all(b - a >= cooldown for a, b in zip(moves, moves[1:])), moves


def test_a_flapping_uplink_inside_the_cooldown_never_moves_the_placed_flow():
    moves, decisions = run_rescheduler([0.5, 50.0] * 10, 10.0, Policy(0.0, 1000.0))
    assert decisions[0].migrate and decisions[0].reason.startswith("initial placement")
    assert moves == []
    assert sum("cooldown" in d.reason for d in decisions) >= 9


def test_a_flapping_uplink_moves_once_per_cooldown_when_every_move_pays():
    moves, _ = run_rescheduler([0.5, 50.0] * 10, 10.0, Policy(0.0, 45.0))
    assert moves == [50.0, 100.0, 150.0]


def test_gains_below_the_minimum_improvement_are_rejected():
    current = assess(problem_at(50.0), plan(problem_at(0.5)).candidate)
    best = plan(problem_at(50.0))
    assert best.candidate != current.candidate and best.latency_ms < current.latency_ms
    gain = (current.latency_ms - best.latency_ms) / current.latency_ms
    kept = decide(current, best, Policy(min_improvement=gain + 0.01, cooldown_s=0), now=1000, last_migration_at=0)
    assert not kept.migrate and "minimum improvement" in kept.reason
    moved = decide(current, best, Policy(min_improvement=gain - 0.01, cooldown_s=0), now=1000, last_migration_at=0)
    assert moved.migrate and moved.gain == pytest.approx(gain)


def test_a_lost_tier_forces_a_move_inside_the_cooldown_and_return_waits_for_it():
    uplinks = [5.0] * 6
    edge_ready = [2, 0, 0, 2, 2, 2]
    moves, decisions = run_rescheduler(uplinks, 10.0, Policy(0.0, 25.0), edge_ready)
    assert plan(problem_at(5.0)).candidate.tiers.count("edge") > 0, "premise: the edge is used when it is up"
    assert decisions[1].migrate and "can no longer run" in decisions[1].reason and "edge has no Ready node" in decisions[1].reason
    assert not decisions[3].migrate and "cooldown" in decisions[3].reason  # edge back, 20 s after the forced move
    assert decisions[4].migrate  # 30 s after: the cooldown has passed
    assert moves == [10.0, 40.0]


def test_the_same_plan_is_never_a_move():
    best = plan(problem_at(5.0))
    decision = decide(assess(problem_at(5.0), best.candidate), best, Policy(0.0, 0.0), 0.0, None)
    assert not decision.migrate and "still the best" in decision.reason


def test_policy_from_the_flow_spec():
    flow = parse_flow(yaml.safe_load(open("examples/captioning.yaml")))
    assert Policy.from_spec(flow.rescheduling) == Policy(0.15, 300.0)


def test_a_deployed_candidate_the_profile_cannot_describe_is_a_plan_error():
    stale = dataclasses.replace(plan(problem_at(5.0)).candidate, split=PROFILE.layers + 1)
    with pytest.raises(PlanError, match="does not fit a flow of 3 stages and an encoder of 4 layers"):
        assess(problem_at(5.0), stale)
