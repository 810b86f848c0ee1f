"""`aiflow profile` on real Triton: the measured profile loads, the solver plans with it, and what it
measures is consistent with the wire format and the model; broken profiles get errors that say what to fix."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from aiflow.cli import main
from aiflow.contract import WIRE_HEADER_BYTES, parse_codec, payload_size
from aiflow.local.profiling import configmap_manifest, fit_rpc, layer_costs, render
from aiflow.model.family import load_family
from aiflow.planner.problem import MODELS
from aiflow.planner.profile import ProfileError, load_profile, profile_from_dict

AUTO_FLOW = "examples/auto-placement.yaml"


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One `aiflow profile --quick` run on a real tritonserver: (file path, parsed document)."""
    path = tmp_path_factory.mktemp("profile") / "profile.yaml"
    assert main(["profile", "--quick", "--out", str(path)]) == 0
    return path, yaml.safe_load(path.read_text())


@pytest.mark.timeout(900)
def test_quick_profile_loads_and_the_solver_plans_with_it(measured, capsys):
    path, doc = measured
    profile = load_profile(path)
    family = load_family()
    assert profile.source == "measured"
    assert (profile.layers, profile.tokens, profile.dims) == (family.num_layers, family.config.num_tokens, family.config.hidden_size)
    assert {"cpu", "cores", "tritonserver", "measuredAt"} <= set(profile.machine)
    assert profile.embed_ms > 0 and sum(profile.layer_ms) > 0 and profile.large_token_ms > 0
    assert 1 <= profile.tokens_per_caption <= family.config.max_caption_tokens
    assert 0 <= profile.acceptance <= 1
    assert set(doc["memoryMiB"]) == set(MODELS), "every stage model's memory measured"

    capsys.readouterr()
    assert main(["plan", "-f", AUTO_FLOW, "--cluster", "examples/cluster-thin-uplink.yaml", "--profile", str(path), "-o", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["feasible"] and out["profile"]["source"] == "measured"
    assert out["chosen"]["hops"][0]["bytes"] == round(profile.png_bytes)


@pytest.mark.timeout(900)
def test_measured_bytes_are_the_real_wire_messages(measured):
    """Without entropy coding the size of a message is known exactly: the measured table must match it."""
    path, doc = measured
    profile = load_profile(path)
    for spec in ("fp16", "int8"):
        expected = WIRE_HEADER_BYTES + len(spec) + payload_size(parse_codec(spec).quant, (1, profile.tokens, profile.dims))
        assert doc["features"]["bytes"][spec] == [expected] * (profile.layers + 1)
    for layer in range(profile.layers + 1):
        assert profile.feature_bytes(layer, "topk:16+int8+zstd") < profile.feature_bytes(layer, "int8") < profile.feature_bytes(layer, "fp16")
    assert set(doc["quality"]["large"]) == {"fp32", *profile.codecs} == set(doc["quality"]["small"])


@pytest.mark.timeout(900)
def test_the_profile_renders_as_a_configmap_the_planner_reads_back(measured, tmp_path):
    _, doc = measured
    manifest = yaml.safe_load(render(doc, "configmap", name="edge-profile", namespace="aiflow"))
    assert manifest["kind"] == "ConfigMap" and manifest["metadata"] == configmap_manifest(doc, "edge-profile", "aiflow")["metadata"]
    inner = tmp_path / "from-configmap.yaml"
    inner.write_text(manifest["data"]["profile.yaml"])
    assert load_profile(inner).source == "measured"
    assert profile_from_dict(json.loads(render(doc, "json"))).layer_ms == load_profile(inner).layer_ms


# ---- broken profiles ------------------------------------------------------------------------------

MEASURED_STUB = yaml.safe_load(open("operator/aiflow/planner/default_profile.yaml").read()) | {
    "source": "measured",
    "machine": {"cpu": "test", "cores": 2},
}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "is empty"),
        ("\x00\x01garbage: [", "is not valid YAML"),
        ("- just\n- a list\n", "is not of type 'object'"),
        ("kind: PlannerProfile\nsource: measured\n", "'encoder' is a required property"),
    ],
    ids=["empty", "garbage", "list", "incomplete"],
)
def test_garbage_and_incomplete_profile_files_are_refused(tmp_path, content, expected):
    path = tmp_path / "profile.yaml"
    path.write_text(content)
    with pytest.raises(ProfileError, match=expected):
        load_profile(path)


def test_a_measured_profile_must_say_what_it_was_measured_on():
    doc = copy.deepcopy(MEASURED_STUB)
    profile_from_dict(doc)
    del doc["machine"]
    with pytest.raises(ProfileError, match="'machine' is a required property"):
        profile_from_dict(doc)


def test_plan_with_a_broken_profile_is_a_clear_cli_error(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    doc = copy.deepcopy(MEASURED_STUB)
    doc["decoder"].pop("verifyMs")
    path.write_text(yaml.safe_dump(doc))
    assert main(["plan", "-f", AUTO_FLOW, "--cluster", "examples/cluster-thin-uplink.yaml", "--profile", str(path)]) == 2
    assert "decoder: 'verifyMs' is a required property" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["--images", "0"], "choose 1..64 held-out scenes"), (["--repeats", "0"], "repeats >= 1")],
)
def test_bad_profile_arguments_are_refused_before_measuring(capsys, args, expected):
    assert main(["profile", *args]) == 2
    assert expected in capsys.readouterr().err


def test_out_must_be_a_file(tmp_path, capsys):
    assert main(["profile", "--quick", "--out", str(tmp_path)]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err


# ---- the arithmetic -------------------------------------------------------------------------------


def test_layer_costs_add_up_to_the_whole_encoder_despite_noise():
    # vision_tail fed at layer s runs layers [s, 4): noise made layer 2 look faster than layer 3
    tail = {0: [9.0, 9.2, 8.8], 1: [7.0], 2: [4.9], 3: [5.0], 4: [1.0]}
    costs = layer_costs(tail, 4)
    assert all(c >= 0 for c in costs)
    assert sum(costs) == pytest.approx(8.0)
    assert costs[2] == 0


def test_rpc_fit_recovers_overhead_and_per_megabyte_cost():
    samples = [(b, 2.0 + 3.0 * b / 1e6) for b in (1e4, 2e4, 5e5, 1e6)]
    overhead, per_mb = fit_rpc(samples)
    assert overhead == pytest.approx(2.0) and per_mb == pytest.approx(3.0)
    assert fit_rpc([(1e4, 1.5), (1e4, 2.5)]) == (2.0, 0.0)
