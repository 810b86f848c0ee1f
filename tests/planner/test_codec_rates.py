"""The learned codec as a planner knob: measured bytes, quality and draft acceptance per codec from the
weights manifest, used by the cost model and held to the quality floor."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aiflow.api.spec import parse_flow
from aiflow.planner.cluster import LinkState, TierState, cluster_state
from aiflow.planner.cost import Candidate, evaluate
from aiflow.planner.problem import Problem, search_space
from aiflow.planner.profile import DEFAULT_PROFILE_PATH, WEIGHTS_MANIFEST_PATH, ProfileError, load_profile
from aiflow.planner.solver import plan
from tests.planner.instances import manifest

PROFILE = load_profile()
BUNDLED = json.loads(WEIGHTS_MANIFEST_PATH.read_text())
LEARNED = sorted(BUNDLED.get("bytes_by_codec", {}))


def thin_uplink_problem(min_quality=None) -> Problem:
    tiers = [TierState("device", 1, 1, compute_factor=4.0), TierState("edge", 1, 1), TierState("cloud", 1, 1)]
    links = [LinkState("device", "edge", 0.25, 20.0), LinkState("edge", "cloud", 50.0, 5.0)]
    stages = [{"name": "head", "model": "vision_head", "tier": "device"}, {"name": "dec", "model": "caption_decoder", "tier": "edge"}]
    return Problem(parse_flow(manifest("f", stages)), cluster_state(tiers, observed_links=links), PROFILE, min_quality)


def test_the_bundled_weights_ship_a_learned_codec_with_measured_rate_quality_and_acceptance():
    assert LEARNED, "the weights manifest lists no learned codec"
    for spec in LEARNED:
        assert spec in PROFILE.codecs
        layer = int(next(iter(BUNDLED["codecs"][spec])))
        measured = BUNDLED["codecs"][spec][str(layer)]
        assert PROFILE.feature_bytes(layer, spec) == measured["bytes_mean"]
        assert PROFILE.quality_of(spec, layer) == measured["exact_match"]
        assert PROFILE.acceptance_by_layer(spec)[layer] == measured["acceptance"]
        # No bottleneck at the other layers: quality 0 there, so the planner never picks it there.
        assert all(PROFILE.quality_of(spec, s) == 0 for s in range(PROFILE.layers + 1) if s != layer)


def test_the_cost_model_charges_each_codec_its_own_acceptance():
    spec = LEARNED[0]
    layer = int(next(iter(BUNDLED["codecs"][spec])))
    stages = [{"name": "h", "model": "vision_head"}, {"name": "d", "model": "caption_drafter"}, {"name": "v", "model": "caption_verifier"}]
    p = Problem(parse_flow(manifest("f", stages)), thin_uplink_problem().cluster, PROFILE)
    tiers = ("device", "edge", "cloud")
    ours = evaluate(p, Candidate(tiers, layer, spec, "speculative")).stages[2].ms
    plain = evaluate(p, Candidate(tiers, layer, "int8", "speculative")).stages[2].ms
    greedy_large = PROFILE.tokens_per_caption * PROFILE.large_token_ms
    accept = PROFILE.acceptance_by_layer(spec)[layer]
    decode = PROFILE.codec_cost(spec)[1] - PROFILE.codec_cost("int8")[1]
    assert ours - plain == pytest.approx(decode + (PROFILE.acceptance - accept) * greedy_large)


def test_the_planner_takes_the_learned_codec_on_a_thin_uplink_only_above_the_floor():
    spec = LEARNED[0]
    layer = int(next(iter(BUNDLED["codecs"][spec])))
    quality = PROFILE.quality_of(spec, layer)
    chosen = plan(thin_uplink_problem(min_quality=quality)).candidate
    assert (chosen.codec, chosen.split) == (spec, layer)  # the fewest bytes by far, at 0.25 Mbit/s
    above = plan(thin_uplink_problem(min_quality=quality + 0.01)).candidate
    assert above.codec != spec
    assert spec not in search_space(thin_uplink_problem(min_quality=quality + 0.01)).codecs


def test_a_learned_codec_without_measured_bytes_is_a_clear_error(tmp_path):
    import yaml

    doc = yaml.safe_load(DEFAULT_PROFILE_PATH.read_text())
    doc["features"]["codecs"].append("learned:3")
    doc["quality"]["large"]["learned:3"] = 90.0
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ProfileError, match="no measured size for learned codec"):
        load_profile(path, manifest=None)


def test_manifest_tables_must_be_well_formed(tmp_path):
    bad = dict(BUNDLED, acceptance_by_codec={LEARNED[0]: 1.5})
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ProfileError, match="acceptance_by_codec"):
        load_profile(None, manifest=path)
    assert np.all(PROFILE.acceptance_by_layer(None) == PROFILE.acceptance)
