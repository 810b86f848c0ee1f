"""The local runtime: three real tritonservers, stages wired through emulated links, clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from aiflow.local.links import LinkConfig
from aiflow.local.runtime import (
    LocalRuntime,
    RuntimeNotRunning,
    address_via_state,
    check_tiers,
    link_key,
    plan_ports,
    read_state,
    route_links,
    routes,
    set_link,
)
from aiflow.local.tritonserver import PortInUseError, TritonError, process_group_members
from tests.local.fixtures import assert_group_gone, running
from tests.local.test_tritonserver import infer_grpc

TIERS3 = ("device", "edge", "cloud")


# -- pure ----------------------------------------------------------------------------------------


def test_routes_go_upwards_through_consecutive_links():
    assert routes(TIERS3) == [("device", "edge"), ("device", "cloud"), ("edge", "cloud")]
    assert route_links(TIERS3, "device", "cloud") == [("device", "edge"), ("edge", "cloud")]
    assert route_links(("device", "cloud"), "device", "cloud") == [("device", "cloud")]
    with pytest.raises(ValueError, match="from a lower tier to a higher one"):
        route_links(TIERS3, "cloud", "edge")


def test_tiers_are_checked_and_ordered():
    assert check_tiers(["cloud", "device"]) == ("device", "cloud")
    for bad in ([], ["fog"], ["edge", "edge"]):
        with pytest.raises(ValueError, match="choose distinct tiers"):
            check_tiers(bad)


def test_link_keys():
    assert link_key("device->edge") == ("device", "edge") == link_key(("device", "edge"))
    with pytest.raises(ValueError, match="LOWER->HIGHER"):
        link_key("device-edge")


def test_port_plan_from_a_base_port_is_consecutive_and_distinct():
    plan = plan_ports(TIERS3, 20000)
    assert plan.tiers["device"].as_list() == [20000, 20001, 20002]
    assert plan.tiers["cloud"].grpc == 20007
    assert plan.routes == {"device->edge": 20009, "device->cloud": 20010, "edge->cloud": 20011}
    assert plan.control == 20012
    assert sorted(plan.all_ports()) == list(range(20000, 20013))
    with pytest.raises(ValueError, match="bad base port"):
        plan_ports(TIERS3, 80)


@pytest.mark.parametrize("kwargs, message", [
    ({"links": {"device->cloud": LinkConfig()}}, "links join consecutive tiers"),
    ({"compute_factors": {"device": 0.5}}, "must be >= 1"),
    ({"compute_factors": {"fog": 2}}, "unknown tier"),
    ({"env": {"fog": {}}}, "unknown tier"),
])
def test_bad_runtime_settings_are_refused_before_anything_starts(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalRuntime(tmp_path, state_path=tmp_path / "state", **kwargs)


def test_no_running_runtime_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeNotRunning, match="start one with `aiflow up`"):
        read_state(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps({"pid": 2**22 + 12345}))
    with pytest.raises(RuntimeNotRunning, match="is gone"):
        read_state(tmp_path)


# -- three real servers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime(tiny_model_repo, tmp_path_factory):
    rt = LocalRuntime(
        tiny_model_repo,
        links={"device->edge": LinkConfig.symmetric("20mbit", "15ms"),
               ("edge", "cloud"): LinkConfig.symmetric("100mbit", "25ms")},
        compute_factors={"device": 4},
        models={"cloud": ["relay"]},
        state_path=tmp_path_factory.mktemp("state"),
        log_dir=tmp_path_factory.mktemp("logs"),
    )
    with running(rt):
        yield rt



@pytest.mark.triton
def test_stages_chain_device_edge_cloud_through_the_links(runtime):
    runtime.load("edge", "relay", next_stage=("cloud", "relay"))
    runtime.load("device", "relay", next_stage=("edge", "relay"))
    before = {name: link.stats() for name, link in runtime.links.items()}
    a = np.arange(1000, dtype=np.float32)
    total, hops = infer_grpc(runtime.address("device"), "relay", a, a)
    np.testing.assert_array_equal(total, 3 * (a + a))  # every tier added its share
    assert [h["env_tier"] for h in hops] == ["device", "edge", "cloud"]
    assert [h["compute_factor"] for h in hops] == ["4", "1", "1"]
    assert hops[0]["params"]["AIFLOW_NEXT_URL"] == runtime.address_via("device", "edge")
    assert hops[1]["params"]["AIFLOW_NEXT_URL"] == runtime.address_via("edge", "cloud")
    for key, link in runtime.links.items():
        assert link.stats().bytes_up - before[key].bytes_up > 8000  # two 4 KB tensors crossed
        assert link.stats().bytes_down > before[key].bytes_down


@pytest.mark.triton
def test_client_on_the_device_reaches_the_cloud_through_both_links(runtime):
    a = np.ones(10, dtype=np.float32)
    start = time.perf_counter()
    total, hops = infer_grpc(runtime.address_via("device", "cloud"), "relay", a, a)
    elapsed = time.perf_counter() - start
    np.testing.assert_array_equal(total, a + a)
    assert [h["env_tier"] for h in hops] == ["cloud"]
    # Correctness of the wiring, not speed: one round trip cannot beat both links' latencies.
    assert elapsed >= 2 * (0.015 + 0.025)


@pytest.mark.triton
def test_state_file_lets_another_process_find_the_runtime(runtime):
    state = read_state(runtime.state_dir)
    assert state["pid"] == os.getpid()
    assert state["tiers"]["edge"]["grpc"] == runtime.address("edge")
    assert state["tiers"]["device"]["compute_factor"] == 4
    assert address_via_state(state, "device", "cloud") == runtime.address_via("device", "cloud")
    assert address_via_state(state, "cloud", "cloud") == runtime.address("cloud")
    with pytest.raises(TritonError, match="already running"):
        LocalRuntime(runtime.model_repo, state_path=runtime.state_dir).start()


@pytest.mark.triton
def test_links_change_live_from_another_process(runtime):
    set_link("edge->cloud", runtime.state_dir, latency_up="40ms")
    try:
        assert runtime.link("edge->cloud").config.latency_up == 0.04
        assert runtime.link("edge->cloud").config.latency_down == 0.025
    finally:
        runtime.link("edge->cloud").set(latency_up="25ms")


@pytest.mark.triton
def test_taken_port_fails_the_start_with_the_port_named(tiny_model_repo, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        rt = LocalRuntime(tiny_model_repo, tiers=("edge", "cloud"), base_port=port - 4,
                          state_path=tmp_path)
        with pytest.raises(PortInUseError, match="already in use") as error:
            rt.start()
    assert f"127.0.0.1:{port}" in str(error.value)
    assert all(s.pid is None for s in rt.servers.values())
    assert not (tmp_path / "state.json").exists()


@pytest.mark.triton
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_a_serving_runtime_without_orphans(tiny_model_repo, tmp_path, sig):
    script = textwrap.dedent(f"""
        import json
        from aiflow.local.runtime import LocalRuntime
        try:
            with LocalRuntime({str(tiny_model_repo)!r}, tiers=("device", "edge"), models={{"edge": ["relay"]}},
                              state_path={str(tmp_path)!r}) as rt:
                print(json.dumps([s.pid for s in rt.servers.values()]), flush=True)
                rt.serve_forever(poll=0.2)
        except KeyboardInterrupt:  # a signal before serve_forever: `with` cleaned up all the same
            pass
        print("stopped", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    groups = []
    try:
        groups = json.loads(proc.stdout.readline())
        assert read_state(tmp_path)["pid"] == proc.pid
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped" in out
        for pgid in groups:
            assert_group_gone(pgid)
        assert not (tmp_path / "state.json").exists()
    finally:
        proc.kill()
        proc.wait()
        for pgid in groups:
            if process_group_members(pgid):
                os.killpg(pgid, signal.SIGKILL)
