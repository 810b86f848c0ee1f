"""resolve_placement: pinned tiers stay, auto tiers follow the documented rule."""

import pytest

from aiflow.api.cluster import ClusterView, NodeInfo
from aiflow.api.spec import Flow, Stage, StageParameters, Triton
from aiflow.planner.placement import resolve_placement


def cluster(*tiers):
    return ClusterView(tuple(NodeInfo(f"{t}-1", t) for t in tiers))


def flow(*tiers):
    return Flow("f", "ns", tuple(Stage(f"s{i}", "m", tier=t, parameters=StageParameters(codec=f"c{i}"))
                                 for i, t in enumerate(tiers)), Triton("img"))


@pytest.mark.parametrize("tiers, available, expected", [
    (("device", "edge", "cloud"), ("device", "edge", "cloud"), ("device", "edge", "cloud")),
    (("auto", "auto", "auto"), ("device", "edge", "cloud"), ("device", "edge", "cloud")),
    (("auto", "auto", "auto"), ("edge", "cloud"), ("edge", "cloud", "cloud")),
    (("auto", "auto"), ("device", "cloud"), ("device", "cloud")),
    (("auto",), ("cloud",), ("cloud",)),
    (("cloud", "auto"), ("device", "edge"), ("cloud", "edge")),  # pinned tier without nodes: validation's job
    (("edge", "auto", "auto"), ("device", "edge", "cloud"), ("edge", "cloud", "cloud")),
])
def test_auto_tiers_follow_the_rule(tiers, available, expected):
    placement = resolve_placement(flow(*tiers), cluster(*available))
    assert tuple(p.tier for p in placement.stages) == expected


def test_placement_carries_reasons_knobs_and_a_summary():
    placement = resolve_placement(flow("device", "auto"), cluster("device", "edge", "cloud"))
    assert placement.of("s0").reason == "pinned to device by the spec"
    assert placement.of("s1").reason.startswith("auto:")
    assert placement.of("s1").parameters == StageParameters(codec="c1")
    assert placement.summary == "s0:device, s1:edge"


def test_auto_without_any_tier_is_an_error():
    with pytest.raises(ValueError, match="no tier has nodes"):
        resolve_placement(flow("auto"), ClusterView())
