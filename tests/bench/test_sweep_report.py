"""The sweep's arithmetic (pure): headline ratios, target verdicts, adaptive plans as runnable chains."""

import dataclasses

import pytest

from aiflow import TIERS
from aiflow.local.schemes import Placement
from bench.sweep import (
    ADAPTIVE,
    Settings,
    adaptive_choice,
    chain_key,
    deployment,
    grid,
    headline,
    load_planner_profile,
    main,
    normalised,
    static_schemes,
    targets,
    with_device_factor,
)


def row(scheme, ms, bw=1.0, rtt=5.0, factor=1.0, kind="static", coop=False, bleu4=90.0, exact=90.0, predicted=None):
    return {"bandwidth_mbps": bw, "rtt_ms": rtt, "device_factor": factor, "scheme": scheme, "kind": kind,
            "cooperative": coop, "median_ms": ms, "bleu4": bleu4, "exact_match": exact, "cider": 500.0,
            "predicted_ms": predicted, "plan": "p", "same_as": ""}


def test_headline_divides_adaptive_by_the_best_and_by_each_static_scheme():
    rows = [row("device-only", 200.0), row("split fp16", 100.0, coop=True), row(ADAPTIVE, 110.0, kind=ADAPTIVE, predicted=99.0)]
    (h,) = headline(rows)
    assert h["best_static"] == "split fp16" and h["vs_best"] == pytest.approx(1.1)
    assert h["vs"] == {"device-only": pytest.approx(0.55), "split fp16": pytest.approx(1.1)}
    assert h["prediction_error"] == pytest.approx(-0.1)


def test_targets_report_a_miss_with_where_and_by_how_much():
    rows = [
        row("cloud-only", 300.0, bw=0.25), row("split fp16", 90.0, bw=0.25, coop=True),
        row(ADAPTIVE, 100.0, bw=0.25, kind=ADAPTIVE),
        row("cloud-only", 50.0, bw=100.0), row("split fp16", 60.0, bw=100.0, coop=True),
        row(ADAPTIVE, 50.0, bw=100.0, kind=ADAPTIVE),
    ]
    within, beats, low = targets(rows, headline(rows))
    assert not within["met"] and "0.25 Mbit/s" in within["detail"] and "1.11x" in within["detail"]
    assert beats["met"]  # faster than split at 100 Mbit/s... and than cloud-only at 0.25
    assert low["met"] and "3.33x" in low["detail"]


def test_low_bandwidth_target_skips_cooperative_schemes_that_lose_quality():
    rows = [
        row("cloud-only", 300.0, bw=0.25), row("split topk", 50.0, bw=0.25, coop=True, exact=80.0),
        row("split fp16", 120.0, bw=0.25, coop=True, exact=89.5), row(ADAPTIVE, 50.0, bw=0.25, kind=ADAPTIVE, coop=True, exact=80.0),
    ]
    low = targets(rows, headline(rows))[2]
    assert not low["met"]  # split fp16 keeps quality but is only 2.5x faster
    assert "split fp16 2.50x" in low["detail"] and "fastest cooperative: split topk 6.00x" in low["detail"]


def test_adaptive_never_beating_a_static_scheme_is_a_miss():
    rows = [row("device-only", 100.0), row(ADAPTIVE, 100.0, kind=ADAPTIVE)]
    assert not targets(rows, headline(rows))[1]["met"]


def test_a_planned_chain_equal_to_a_static_scheme_is_recognised_as_that_scheme():
    split = static_schemes(Settings())["split fp16"]
    planned = dataclasses.replace(split, name="x", chain=(
        split.chain[0], dataclasses.replace(split.chain[1], knobs={"AIFLOW_DECODING": "greedy"})))
    assert chain_key(normalised(planned)) == chain_key(split)
    slow = with_device_factor(split, 4)
    assert slow.chain[0].knobs["AIFLOW_COMPUTE_FACTOR"] == "4" and "AIFLOW_COMPUTE_FACTOR" not in slow.chain[1].knobs


def test_adaptive_plans_run_up_the_tiers_with_a_prediction():
    profile, _ = load_planner_profile("default")
    statics = static_schemes(Settings())
    for point in grid(Settings()):
        choice = adaptive_choice(point, Settings(), profile, statics)
        order = [TIERS.index(p.tier) for p in choice.scheme.chain]
        assert order == sorted(order) and choice.predicted_ms > 0
        assert choice.same_as == "" or choice.scheme is statics[choice.same_as]
        assert all(isinstance(p, Placement) for p in choice.scheme.chain)


@pytest.mark.parametrize("argv", [["--requests", "0"], ["--report-only", "--out", "/nonexistent/aiflow-sweep"]])
def test_bad_arguments_get_a_clear_error_and_measure_nothing(argv, capsys):
    assert main(argv) == 2
    assert "sweep:" in capsys.readouterr().err


def test_deployment_loads_each_distinct_stage_once_and_wires_chains_through_their_aliases():
    statics = static_schemes(Settings())
    spec_label = next(label for label in statics if label.startswith("split-spec"))
    dep = deployment([statics["split fp16"], statics["split int8"], statics[spec_label]], 7)
    by_alias = {w.model: w for w in dep.wires}
    assert sorted(by_alias) == [  # one decoder shared by both splits; one head per codec and successor
        "caption_decoder.r7", "caption_drafter.r11", "caption_verifier.r10", "vision_head.r12", "vision_head.r8", "vision_head.r9"]
    fp16, int8 = dep.chains["split fp16"].chain, dep.chains["split int8"].chain
    assert fp16[1].model == int8[1].model and fp16[0].model != int8[0].model
    head = by_alias[fp16[0].model]
    assert head.next_stage == ("edge", fp16[1].model) and head.parameters["AIFLOW_CODEC"] == "fp16"
    spec = dep.chains[spec_label].chain
    assert [by_alias[p.model].next_stage for p in spec] == [("edge", spec[1].model), ("cloud", spec[2].model), None]
