"""The cost model on cases small enough to check by hand, and its wire sizes against the real wire format."""

from __future__ import annotations

import numpy as np
import pytest

from aiflow import contract
from aiflow.api.spec import parse_flow
from aiflow.planner.cluster import UTILISATION_CAP, LinkState, TierState, cluster_state
from aiflow.planner.cost import Candidate, evaluate
from aiflow.planner.problem import Problem
from aiflow.planner.profile import load_profile
from aiflow.stage import codecs, wire
from tests.planner.instances import manifest

PROFILE = load_profile()
TIERS3 = [
    TierState("device", 1, 1, compute_factor=4.0, utilisation=0.5),
    TierState("edge", 1, 1, compute_factor=1.0, utilisation=0.0),
    TierState("cloud", 1, 1, compute_factor=0.5, utilisation=0.0),
]
LINKS = [LinkState("device", "edge", 8.0, 10.0), LinkState("edge", "cloud", 80.0, 30.0)]
CLUSTER = cluster_state(TIERS3, observed_links=LINKS)


def problem(*models: str) -> Problem:
    flow = parse_flow(manifest("f", [{"name": f"s{i}", "model": m} for i, m in enumerate(models)]))
    return Problem(flow, CLUSTER, PROFILE)


def rpc(nbytes: float) -> float:
    return PROFILE.rpc_overhead_ms + nbytes * PROFILE.rpc_ms_per_mb / 1e6


def test_device_only_captioner_is_compute_times_slowdown_plus_one_local_call():
    est = evaluate(problem("captioner"), Candidate(("device",), None, None))
    work = PROFILE.embed_ms + sum(PROFILE.layer_ms) + PROFILE.tokens_per_caption * PROFILE.large_token_ms
    assert est.latency_ms == pytest.approx(rpc(PROFILE.png_bytes) + work * 4.0 / (1 - 0.5))
    assert est.bytes_upstream == 0 and est.link_bytes == ()
    assert est.quality == PROFILE.quality_of(None)


def test_cloud_only_uploads_the_raw_image_over_both_links():
    est = evaluate(problem("captioner"), Candidate(("cloud",), None, None))
    # Relayed through the edge: both RTTs, and the bytes at each link's bandwidth in turn.
    transfer = 10.0 + 30.0 + PROFILE.png_bytes * 8 / 8e3 + PROFILE.png_bytes * 8 / 80e3
    work = (PROFILE.embed_ms + sum(PROFILE.layer_ms) + PROFILE.tokens_per_caption * PROFILE.large_token_ms) * 0.5
    assert est.latency_ms == pytest.approx(rpc(PROFILE.png_bytes) + transfer + work)
    assert est.bytes_upstream == PROFILE.png_bytes
    assert est.link_bytes == (("device", "edge", PROFILE.png_bytes), ("edge", "cloud", PROFILE.png_bytes))


def test_split_sends_features_at_the_split_and_tokens_reduction_shortens_later_layers():
    codec, split = "topk:16+int8+zstd", 4
    est = evaluate(problem("vision_head", "caption_decoder"), Candidate(("device", "edge"), split, codec))
    head, decoder = est.stages
    enc, dec = PROFILE.codec_cost(codec)
    assert head.ms == pytest.approx((PROFILE.embed_ms + sum(PROFILE.layer_ms[:split]) + enc) * 8.0)
    rest = sum(PROFILE.layer_ms[split:]) * 17 / PROFILE.tokens
    assert decoder.ms == pytest.approx(dec + rest + PROFILE.tokens_per_caption * PROFILE.large_token_ms)
    features = est.hops[1]
    assert (features.payload, features.src_tier, features.dst_tier) == ("features", "device", "edge")
    assert features.bytes == PROFILE.feature_bytes(split, codec)
    assert features.ms == pytest.approx(rpc(features.bytes) + 10.0 + features.bytes * 8 / 8e3)
    assert est.quality == PROFILE.quality_of(codec, split)


def test_drafter_forwards_features_as_received_and_the_verifier_finishes_the_encoder():
    p = problem("vision_head", "caption_drafter", "caption_verifier")
    est = evaluate(p, Candidate(("device", "edge", "cloud"), 2, "int8", "speculative"))
    t, large = PROFILE.tokens_per_caption, PROFILE.large_token_ms
    dec, rest = PROFILE.codec_cost("int8")[1], sum(PROFILE.layer_ms[2:])
    assert est.stages[1].ms == pytest.approx(dec + rest + t * PROFILE.small_token_ms)
    assert est.stages[2].ms == pytest.approx((dec + rest + PROFILE.verify_ms + (1 - PROFILE.acceptance) * t * large) * 0.5)
    assert est.hops[2].payload == "drafts"
    assert est.hops[2].bytes == PROFILE.feature_bytes(2, "int8") + PROFILE.draft_bytes


def test_local_speculation_trades_large_steps_for_small_ones_and_one_verify_pass():
    p = problem("captioner")
    spec = evaluate(p, Candidate(("edge",), None, None, "speculative"))
    greedy = evaluate(p, Candidate(("edge",), None, None, "greedy"))
    t = PROFILE.tokens_per_caption
    saved = t * PROFILE.large_token_ms - (t * PROFILE.small_token_ms + PROFILE.verify_ms + (1 - PROFILE.acceptance) * t * PROFILE.large_token_ms)
    assert greedy.latency_ms - spec.latency_ms == pytest.approx(saved)
    assert spec.quality == greedy.quality


def test_a_tier_at_full_load_is_slow_but_bounded():
    busy = cluster_state([TierState("device", 1, 1, utilisation=1.0)], observed_links=LINKS)
    assert busy.tier("device").slowdown == pytest.approx(1 / (1 - UTILISATION_CAP))


@pytest.mark.parametrize("spec", ["fp32", "fp16", "int8", "topk:16+int8", "merge:16+fp16"])
def test_feature_bytes_formula_matches_the_wire_format(spec):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(1, PROFILE.tokens, PROFILE.dims)).astype(np.float32)
    codec = contract.parse_codec(spec)
    positions = None
    if codec.reduce == "topk":
        hidden, positions = codecs.prune_tokens(hidden, rng.random((1, PROFILE.tokens)), codec.keep)
    elif codec.reduce == "merge":
        hidden = codecs.merge_tokens(hidden, codec.keep)
    drafts = [[7] * int(PROFILE.tokens_per_caption)]
    assert len(wire.encode(3, hidden, codec, positions=positions)) == PROFILE.feature_bytes(3, spec)
    with_drafts = len(wire.encode(3, hidden, codec, positions=positions, drafts=drafts))
    assert with_drafts == PROFILE.feature_bytes(3, spec) + PROFILE.draft_bytes


# ---- queueing at a shared tier --------------------------------------------------------------------


def test_a_busy_tier_adds_queueing_rho_over_one_minus_rho_of_the_stage_compute():
    idle = evaluate(problem("captioner"), Candidate(("edge",), None, None))
    busy_cluster = cluster_state([TIERS3[0], TierState("edge", 1, 1, compute_factor=1.0, busy=0.75), TIERS3[2]], observed_links=LINKS)
    busy = evaluate(Problem(problem("captioner").flow, busy_cluster, PROFILE), Candidate(("edge",), None, None))
    (stage_idle,), (stage_busy,) = idle.stages, busy.stages
    assert stage_idle.queue_ms == 0
    assert stage_busy.queue_ms == pytest.approx(stage_idle.ms * 0.75 / 0.25)
    assert stage_busy.ms == pytest.approx(stage_idle.ms + stage_busy.queue_ms)
    assert busy.latency_ms == pytest.approx(idle.latency_ms + stage_busy.queue_ms)
    capped = TierState("edge", 1, 1, busy=1.0)
    assert capped.queueing == pytest.approx(UTILISATION_CAP / (1 - UTILISATION_CAP))


def test_a_saturated_edge_pushes_the_work_elsewhere():
    from aiflow.planner.solver import plan

    flow = problem("vision_head", "caption_decoder").flow
    quiet = plan(Problem(flow, CLUSTER, PROFILE)).chosen.candidate.tiers
    assert "edge" in quiet, "the test needs a case whose best plan uses the edge when it is idle"
    saturated = cluster_state([TIERS3[0], TierState("edge", 1, 1, compute_factor=1.0, busy=0.95), TIERS3[2]], observed_links=LINKS)
    chosen = plan(Problem(flow, saturated, PROFILE)).chosen
    assert "edge" not in chosen.candidate.tiers
    assert all(s.queue_ms == 0 for s in chosen.estimate.stages)
