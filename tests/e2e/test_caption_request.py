"""The last step of the kind demo, `scripts/caption_request.py`, against real Triton servers: the
local runtime's three tiers wired as the captioning example (device vision_head -> edge
caption_drafter -> cloud caption_verifier), reached at the first stage's gRPC address as the
port-forward would expose it. Runs wherever the data-plane tests run; no cluster needed."""

from __future__ import annotations

import json
import runpy
import sys

import pytest

from aiflow.local.schemes import RunningFlow, get_scheme, startup_wiring, wiring
from aiflow.model import scenes
from tests.chart.rendering import REPO

WEIGHTS = REPO / "operator" / "aiflow" / "model" / "weights"

pytestmark = [pytest.mark.triton, pytest.mark.timeout(900)]


@pytest.fixture
def captioning_flow(local_runtime):
    flow = RunningFlow.of(local_runtime)
    scheme = get_scheme("split-spec")
    assert [(p.tier, p.model) for p in scheme.chain] == [
        ("device", "vision_head"), ("edge", "caption_drafter"), ("cloud", "caption_verifier")]
    flow.apply(wiring(scheme))
    yield flow, scheme
    flow.apply(startup_wiring())  # as the other data-plane tests expect the shared servers


def test_caption_request_prints_the_caption_and_the_route(captioning_flow, capsys, monkeypatch):
    flow, scheme = captioning_flow
    url = flow.entry_address(scheme)
    monkeypatch.setattr(sys, "argv", ["caption_request.py", "--url", url, "--model", "vision_head"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / "scripts" / "caption_request.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exited.value.code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("generated scene:") and lines[1].strip().startswith("reference: a ")
    caption = lines[0].split(":", 1)[1].split()
    # What the caption says is the data plane's to test; here: it came through the three stages and
    # speaks the scenes' language (and says something, once the bundled weights are trained).
    assert set(caption) <= set(scenes.vocabulary()), out
    if json.loads((WEIGHTS / "manifest.json").read_text()).get("trained"):
        assert caption, out
    assert "device:vision_head -> edge:caption_drafter -> cloud:caption_verifier" in lines[2]


def test_caption_request_names_an_unreachable_stage(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["caption_request.py", "--url", "127.0.0.1:9", "--model",
                                      "vision_head", "--wait", "1"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / "scripts" / "caption_request.py"), run_name="__main__")
    assert "127.0.0.1:9 is not reachable" in str(exited.value.code)
