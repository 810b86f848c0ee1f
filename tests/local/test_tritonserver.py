"""A real tritonserver from the nvidia-pytriton wheel: start, infer, reload, fail clearly, stop cleanly."""

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
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from aiflow.local.tritonserver import (
    ModelLoadError,
    PortInUseError,
    TritonError,
    TritonPorts,
    TritonServer,
    backend_directory,
    free_ports,
    model_config_json,
    port_in_use,
    process_group_members,
    server_env,
)
from tests.local.fixtures import assert_group_gone

pytestmark = pytest.mark.triton


def infer_grpc(url: str, model: str, a: np.ndarray, b: np.ndarray):
    client = grpcclient.InferenceServerClient(url)
    inputs = [grpcclient.InferInput("A", list(a.shape), "FP32"), grpcclient.InferInput("B", list(b.shape), "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    try:
        result = client.infer(model, inputs, client_timeout=60)
        return result.as_numpy("SUM"), json.loads(result.as_numpy("INFO")[0])
    finally:
        client.close()


@pytest.fixture(scope="module")
def relay_server(triton_factory, tiny_model_repo):
    return triton_factory(tiny_model_repo, models=["relay"], env={"AIFLOW_TIER": "edge"})


def test_backend_directory_holds_backend_and_stub_for_this_python():
    python_dir = backend_directory() / "python"
    assert {p.name for p in python_dir.iterdir()} >= {
        "libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"}
    assert os.access(python_dir / "triton_python_backend_stub", os.X_OK)


def test_server_env_puts_venv_first_and_both_library_dirs():
    env = server_env({"AIFLOW_NEXT_URL": "127.0.0.1:1"}, base={"PATH": "/usr/bin"})
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    assert "nvidia_pytriton.libs" in env["LD_LIBRARY_PATH"]
    import sysconfig

    assert sysconfig.get_config_var("LIBDIR") in env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert env["AIFLOW_NEXT_URL"] == "127.0.0.1:1"


def test_inference_over_grpc_and_http(relay_server):
    a, b = np.arange(5, dtype=np.float32), np.full(5, 2, dtype=np.float32)
    total, hops = infer_grpc(relay_server.grpc_url, "relay", a, b)
    np.testing.assert_array_equal(total, a + b)
    assert hops[0]["env_tier"] == "edge"  # per-process env reached the Python stub

    client = httpclient.InferenceServerClient(relay_server.http_url)
    inputs = [httpclient.InferInput("A", [5], "FP32"), httpclient.InferInput("B", [5], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    np.testing.assert_array_equal(client.infer("relay", inputs).as_numpy("SUM"), a + b)
    client.close()


def test_reload_with_parameters_overrides_config_and_keeps_the_rest(relay_server):
    relay_server.load_model("relay", parameters={"AIFLOW_SPLIT_LAYER": "3"})
    _, hops = infer_grpc(relay_server.grpc_url, "relay", np.ones(2, np.float32), np.ones(2, np.float32))
    assert hops[0]["params"] == {"greeting": "hello", "AIFLOW_SPLIT_LAYER": "3"}
    relay_server.load_model("relay", parameters={"greeting": "hi"})
    _, hops = infer_grpc(relay_server.grpc_url, "relay", np.ones(2, np.float32), np.ones(2, np.float32))
    assert hops[0]["params"] == {"greeting": "hi"}  # an override starts from config.pbtxt again


def test_model_config_json_rejects_a_malformed_config(tmp_path):
    (tmp_path / "config.pbtxt").write_text("backend: python\ninput [ { nme: 'A' } ]\n")
    with pytest.raises(ModelLoadError, match="not a valid Triton model config"):
        model_config_json(tmp_path, {"x": "1"})


def test_model_failing_to_load_at_runtime_gives_its_error(relay_server):
    with pytest.raises(ModelLoadError, match="broken on purpose: weights file missing"):
        relay_server.load_model("broken")
    assert relay_server.is_model_ready("relay")  # the server keeps serving the rest
    with pytest.raises(ModelLoadError, match="'absent' not found"):
        relay_server.load_model("absent")


def test_model_failing_to_load_at_startup_stops_the_start_with_its_error(triton_factory, tiny_model_repo):
    with pytest.raises(ModelLoadError, match="broken on purpose: weights file missing"):
        triton_factory(tiny_model_repo, models=["broken"])


def test_unload_then_model_is_gone(triton_factory, tiny_model_repo):
    server = triton_factory(tiny_model_repo, models=["relay"])
    server.unload_model("relay")
    assert not server.is_model_ready("relay")


def test_bad_repository_and_unknown_model_are_clear_errors(tmp_path, tiny_model_repo):
    with pytest.raises(TritonError, match="is not a directory"):
        TritonServer(tmp_path / "nope").start()
    with pytest.raises(ModelLoadError, match=r"\['nope'\] not found"):
        TritonServer(tiny_model_repo, models=["nope"]).start()


def test_cpus_the_machine_lacks_are_refused(tiny_model_repo):
    with pytest.raises(ValueError, match="bad cpus"):
        TritonServer(tiny_model_repo, cpus=[4096])


def test_port_in_use_is_refused_before_start(tiny_model_repo):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        http, metrics = free_ports(2)
        server = TritonServer(tiny_model_repo, ports=TritonPorts(http, port, metrics))
        with pytest.raises(PortInUseError, match=f"127.0.0.1:{port} already in use"):
            server.start()
        assert server.pid is None


def test_port_lost_in_a_race_is_detected_from_the_log(tiny_model_repo, tmp_path):
    ports = TritonPorts(*free_ports(3))
    servers = [TritonServer(tiny_model_repo, ports=ports, name=f"twin{i}", log_dir=tmp_path) for i in range(2)]
    for server in servers:  # both pass the port check: neither has bound yet
        server.launch()
    outcomes = []
    try:
        for server in servers:
            try:
                server.wait_ready(timeout=60)
                outcomes.append("ready")
            except PortInUseError as exc:
                outcomes.append(str(exc))
    finally:
        for server in servers:
            server.stop()
    assert outcomes.count("ready") == 1, outcomes
    assert "already in use" in [o for o in outcomes if o != "ready"][0]


def test_pinned_server_stops_with_its_python_stubs(triton_factory, tiny_model_repo):
    server = triton_factory(tiny_model_repo, models=["relay"], cpus=[0])
    pgid = server.pid
    members = process_group_members(pgid)
    assert len(members) >= 2, "expected tritonserver plus a Python stub process"
    assert all(os.sched_getaffinity(pid) == {0} for pid in members)
    server.stop()
    assert_group_gone(pgid)
    assert not port_in_use(server.ports.grpc)
    server.stop()  # idempotent


def test_server_dies_with_a_hard_killed_parent(tiny_model_repo, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from aiflow.local.tritonserver import TritonServer
        server = TritonServer({str(tiny_model_repo)!r}, models=["relay"], log_dir={str(tmp_path)!r}).start()
        print(server.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pgid = None
    try:
        pgid = int(parent.stdout.readline())
        assert process_group_members(pgid)
        parent.send_signal(signal.SIGKILL)  # no atexit, no handler: only PDEATHSIG can help
        parent.wait()
        deadline = time.monotonic() + 60
        while process_group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert_group_gone(pgid)
    finally:
        parent.kill()
        parent.wait()
        if pgid and process_group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)
