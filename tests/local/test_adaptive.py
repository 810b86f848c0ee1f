"""Adaptive mode of the local runtime: the plan -> chain mapping (pure), and a live re-partition on
real Triton servers under a steady stream of caption requests.

The live test starts the three tiers with a fast uplink (100 Mbit/s: the planner uploads the raw
image to the edge), then `aiflow link set` drops it to 500 kbit/s (the planner keeps the encoder's
first layers on the device and sends compressed features). Every request of the stream must
succeed with the caption the same chain gives in process; the flow moves exactly once, and setting
the uplink back inside the cooldown does not move it again.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from aiflow.local.adaptive import (
    STATE_KEY,
    UNSHAPED_MBPS,
    AdaptiveController,
    caption_serving,
    captioning_flow,
    cluster_of,
    copy_name,
    scheme_dict,
    scheme_from_dict,
    scheme_of,
    serving_scheme,
    source_model,
)
from aiflow.local.links import LinkConfig
from aiflow.local.runtime import read_state
from aiflow.local.schemes import Conditions, start_runtime, wiring
from aiflow.local.tritonserver import model_config_json
from aiflow.model import scenes
from aiflow.planner.hysteresis import Policy
from aiflow.planner.problem import Problem
from aiflow.planner.profile import load_profile
from aiflow.planner.solver import plan
from aiflow.stage.config import stage_config
from aiflow.stage.triton import model_parameters
from tests.local.fixtures import assert_group_gone
from tests.local.test_chain import in_process as chain_in_process
from tests.local.test_chain import png

FACTORS = Conditions().compute_factors()
FAST, THIN = 100.0, 0.5  # Mbit/s up from the device


def links(up_mbps: float, edge_up_mbps: float | None = 50.0) -> dict[str, LinkConfig]:
    return {
        "device->edge": LinkConfig(up_mbps * 1e6, 20e6, 0.01, 0.01),
        "edge->cloud": LinkConfig(None if edge_up_mbps is None else edge_up_mbps * 1e6, 200e6, 0.02, 0.02),
    }


def best_plan(up_mbps: float):
    return plan(Problem(captioning_flow(), cluster_of(links(up_mbps), FACTORS), load_profile()))


# ---- pure: the cluster the planner sees, the chain a plan runs as ---------------------------------


def test_the_runtime_becomes_the_planners_cluster():
    cluster = cluster_of(links(2.0, edge_up_mbps=None), {"device": 8.0, "edge": 2.0})
    up, down = cluster.link("device", "edge"), cluster.link("edge", "device")
    assert (up.bandwidth_mbps, up.rtt_ms) == pytest.approx((2.0, 20.0))
    assert (down.bandwidth_mbps, down.rtt_ms) == pytest.approx((20.0, 20.0))
    assert cluster.link("edge", "cloud").bandwidth_mbps == UNSHAPED_MBPS  # unshaped: no limit to speak of
    assert cluster.link("device", "cloud").rtt_ms == pytest.approx(20.0 + 40.0)  # relayed through the edge
    assert cluster.tier("device").compute_factor == 8.0 and cluster.tier("device").available
    assert not cluster.tier("cloud").available  # a tier the runtime does not run has no node


def test_a_thin_uplink_moves_the_encoder_onto_the_device():
    fast, thin = best_plan(FAST), best_plan(THIN)
    assert fast.tier_of("head") != "device"  # raw image up: the device is slow, the link is not
    assert thin.tier_of("head") == "device"  # compressed features up instead of pixels
    assert thin.chosen.estimate.bytes_upstream < fast.chosen.estimate.bytes_upstream


@pytest.mark.parametrize("up_mbps", [FAST, THIN])
def test_a_plan_maps_onto_a_runnable_chain_of_model_copies(up_mbps, model_repo_path):
    result, flow = best_plan(up_mbps), captioning_flow()
    scheme = scheme_of(result, flow, revision=3)
    assert [p.tier for p in scheme.chain] == [result.tier_of(s.name) for s in flow.stages]
    assert [p.model for p in scheme.chain] == ["vision_head.r3", "caption_drafter.r3", "caption_verifier.r3"]
    assert [source_model(p.model) for p in scheme.chain] == [s.model for s in flow.stages]
    head, drafter, verifier = scheme.chain
    assert head.knobs == {"AIFLOW_SPLIT_LAYER": str(result.candidate.split), "AIFLOW_CODEC": result.candidate.codec}
    assert drafter.knobs == {"AIFLOW_CODEC": "passthrough"}  # forwards the head's features untouched
    assert verifier.knobs == {}
    # Each stage forwards to the next one; the last is unwired.
    wires = {w.model: w for w in wiring(scheme)}
    assert wires[head.model].next_stage == (drafter.tier, drafter.model)
    assert wires[drafter.model].next_stage == (verifier.tier, verifier.model)
    assert wires[verifier.model].next_stage is None
    # The knobs are ones the stage runtime accepts.
    for p in scheme.chain:
        config = json.loads(model_config_json(model_repo_path / source_model(p.model), p.knobs))
        stage_config(p.model, model_parameters(config), {})
    assert scheme_from_dict(json.loads(json.dumps(scheme_dict(scheme)))) == scheme


def test_copy_names_round_trip_and_leave_other_names_alone():
    assert source_model(copy_name("caption_verifier", 12)) == "caption_verifier"
    assert source_model("vision_head") == "vision_head"
    assert source_model("vision_head.rx") == "vision_head.rx"


def test_a_flow_that_is_not_adaptive_says_how_to_start_one():
    with pytest.raises(ValueError, match="aiflow up --adaptive"):
        serving_scheme({"tiers": {}})


# ---- live: a stream of requests while the flow re-partitions -------------------------------------


def in_process(scheme, family, repo):
    """The chain's stages called directly, configured like the copies: the captions to expect."""
    chain = tuple(replace(p, model=source_model(p.model)) for p in scheme.chain)
    return chain_in_process(replace(scheme, chain=chain), family, repo)


def wait_for(condition, what: str, timeout_s: float = 300.0):
    """Poll until `condition()` is truthy; fail naming `what` (a hang guard, not a timing assert)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.2)
    return value


class Stream:
    """A camera sending one image after another through whatever the state file says serves."""

    def __init__(self, state_dir, images, limit: int = 400):
        self.state_dir, self.images, self.limit = state_dir, images, limit
        self.results, self.errors = [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        i = 0
        while not self._stop.is_set() and i < self.limit:
            name, blob = self.images[i % len(self.images)]
            try:
                self.results += caption_serving(self.state_dir, [(name, blob)], timeout_s=120)
            except Exception as exc:  # every failure counts; the stream goes on
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            i += 1

    def revisions(self) -> list[int]:
        return [int(r.hops[0]["model"].rpartition(".r")[2]) for r in self.results]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=300)


@pytest.fixture(scope="module")
def adaptive(model_repo_path, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("adaptive-state")
    runtime, _ = start_runtime(Conditions(uplink_mbps=FAST), wires=[], state_path=state_dir, model_repo=model_repo_path)
    groups = [s.pid for s in runtime.servers.values()]
    said: list[str] = []
    # No grace after the switch: the old entry is unloaded at once, so requests race the unload (the
    # drain and the client's re-send of an entry-less request must cover it).
    controller = AdaptiveController(runtime, load_profile(), Policy(min_improvement=0.10, cooldown_s=600.0),
                                    interval_s=5.0, grace_s=0.0, say=said.append)
    try:
        controller.start()
        yield runtime, controller, state_dir, said
    finally:
        controller.stop()
        runtime.stop()
    for pgid in groups:
        assert_group_gone(pgid)


def test_a_stream_of_requests_survives_the_repartition(adaptive, model_repo_path, capsys):
    from aiflow.cli import main
    from aiflow.model.family import load_family

    runtime, controller, state_dir, said = adaptive
    first = controller.serving
    assert first.number == 1 and first.scheme.entry.tier != "device"  # fast uplink: the image goes up
    arrays, _ = scenes.make_batch(seed=5, start=0, count=3, split="heldout")
    images = [(f"scene{i}.png", png(a)) for i, a in enumerate(arrays)]

    with Stream(state_dir, images) as stream:
        wait_for(lambda: len(stream.results) >= 2 or stream.errors, "captions on revision 1")
        assert main(["link", "set", "--bandwidth-up", "500kbit", "--state-dir", str(state_dir)]) == 0
        wait_for(lambda: read_state(state_dir)[STATE_KEY]["revision"] == 2, "the move to revision 2")
        wait_for(lambda: any("revision 1 removed" in line for line in said), "revision 1 to be removed")
        served = len(stream.results)
        wait_for(lambda: len(stream.results) >= served + 2 or stream.errors, "captions after the move")
        # Back to a fast uplink inside the cooldown: the planner prefers the old plan, hysteresis keeps the new.
        assert main(["link", "set", "--bandwidth-up", "100mbit", "--state-dir", str(state_dir)]) == 0
        wait_for(lambda: "cooldown" in controller.decisions[-1].reason, "the decision on the restored uplink")
        served = len(stream.results)
        wait_for(lambda: len(stream.results) >= served + 1 or stream.errors, "captions after that decision")

    assert stream.errors == []
    moves = [d for d in controller.decisions if d.decision == "moved"]
    assert len(moves) == 1 and controller.serving.number == 2, [d.line() for d in controller.decisions]
    second = controller.serving
    assert second.scheme.entry.tier == "device"  # features, not pixels, over the thin uplink
    assert set(stream.revisions()) == {1, 2}
    assert stream.revisions() == sorted(stream.revisions())  # once on the new revision, never back

    family = load_family()
    expected = {}
    for rev in (first, second):
        head = in_process(rev.scheme, family, model_repo_path)
        out = head.run({"IMAGE": np.array([b for _, b in images], dtype=object)})["CAPTION"]
        expected[rev.number] = {name: c.decode() for (name, _), c in zip(images, out)}
    for result, rev in zip(stream.results, stream.revisions()):
        assert result.caption == expected[rev][result.image]
        assert [h["tier"] for h in result.hops] == [p.tier for p in (first if rev == 1 else second).scheme.chain]

    # The old copies are gone, the new ones serve; `aiflow caption` follows the plan by default.
    for p in first.scheme.chain:
        assert not runtime.server(p.tier).is_model_ready(p.model)
    capsys.readouterr()
    assert main(["caption", _write(images[0], state_dir), "--state-dir", str(state_dir), "-o", "json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["scheme"] == "adaptive-r2" and shown["caption"] == expected[2][images[0][0]]
    assert main(["link", "show", "--state-dir", str(state_dir), "-o", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["device->edge"]["config"]["bandwidth_up"] == 100e6


def _write(image, state_dir) -> str:
    path = state_dir / image[0]
    path.write_bytes(image[1])
    return str(path)
