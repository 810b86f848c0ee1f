"""The solver against its exhaustive reference, its constraints, monotonicity and determinism."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aiflow import TIERS
from aiflow.planner.cluster import cluster_state
from aiflow.planner.cost import evaluate
from aiflow.planner.problem import PlanError, Problem, memory_need_mib, quality_floor
from aiflow.planner.solver import plan, plan_exhaustive
from tests.planner.instances import problems, source_links

PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def plan_or_error(problem: Problem, solver=plan):
    try:
        return solver(problem)
    except PlanError as exc:
        return str(exc)


def summary(result):
    """What two solvers must agree on: candidates in rank order and their predictions."""
    if isinstance(result, str):
        return result
    return [(o.candidate, o.estimate) for o in (result.chosen, *result.alternatives)]


@PROPERTY
@given(problems())
def test_solver_equals_exhaustive_search(problem):
    assert summary(plan_or_error(problem)) == summary(plan_or_error(problem, plan_exhaustive))


@PROPERTY
@given(problems())
def test_every_option_respects_the_constraints(problem):
    result = plan_or_error(problem)
    assume(not isinstance(result, str))
    floor = quality_floor(problem)
    for option in (result.chosen, *result.alternatives):
        c = option.candidate
        for stage, tier in zip(problem.flow.stages, c.tiers):
            assert stage.tier in ("auto", tier), "pinned tier moved"
            state = problem.cluster.tier(tier)
            assert state.ready_nodes > 0, f"{stage.name} placed on {tier}, which has no Ready node"
            assert not state.memory_mib or memory_need_mib(problem.profile, stage) <= state.memory_mib
            if stage.parameters.split_layer is not None:
                assert c.split == stage.parameters.split_layer
        assert option.estimate.quality >= floor
        assert result.feasible


@PROPERTY
@given(problems(), st.sampled_from([("device", "edge"), ("edge", "cloud")]), st.floats(0.01, 0.99))
def test_less_bandwidth_never_sends_more_bytes_over_that_link(problem, link, factor):
    before = plan_or_error(problem)
    assume(not isinstance(before, str))
    observed = [
        dataclasses.replace(l, bandwidth_mbps=l.bandwidth_mbps * factor) if (l.src, l.dst) == link else l
        for l in source_links(problem.cluster)
    ]
    thinner = dataclasses.replace(problem, cluster=cluster_state(problem.cluster.tiers.values(), observed_links=observed))
    after = plan(thinner)
    sent_before, sent_after = before.chosen.estimate.bytes_over(*link), after.chosen.estimate.bytes_over(*link)
    # Only an exact tie in predicted latency (within float rounding) may pick the heavier candidate.
    old_choice_now = evaluate(thinner, before.candidate).latency_ms
    assert sent_after <= sent_before or old_choice_now <= after.latency_ms * (1 + 1e-9)


@PROPERTY
@given(problems())
def test_plans_are_deterministic(problem):
    first, second = plan_or_error(problem), plan_or_error(problem)
    assert summary(first) == summary(second)
    if not isinstance(first, str):
        assert first.reason == second.reason


@PROPERTY
@given(problems())
def test_tiers_without_ready_nodes_are_never_used(problem):
    down = TIERS[1]
    tiers = [dataclasses.replace(t, ready_nodes=0) if t.tier == down else t for t in problem.cluster.tiers.values()]
    degraded = dataclasses.replace(problem, cluster=cluster_state(tiers, observed_links=source_links(problem.cluster)))
    result = plan_or_error(degraded)
    if isinstance(result, str):
        assert "no Ready node" in result or "quality floor" in result or "fits no tier" in result
    else:
        assert down not in {t for o in (result.chosen, *result.alternatives) for t in o.candidate.tiers}
