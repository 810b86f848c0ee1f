"""Triton stage metrics as the rescheduler reads them, from a real tritonserver's metrics port."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from aiflow.controller.stage_metrics import (
    StageMetricsError, StageSample, parse_triton_metrics, read_stage_metrics, stage_times,
)
from tests.kube.apiserver import wait_for

REQUESTS = 3


def infer(url: str) -> None:
    client = grpcclient.InferenceServerClient(url)
    try:
        a = np.ones(4, np.float32)
        inputs = [grpcclient.InferInput("A", [4], "FP32"), grpcclient.InferInput("B", [4], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(a)
        client.infer("relay", inputs, client_timeout=60)
    finally:
        client.close()


@pytest.fixture(scope="module")
def relay(triton_factory, tiny_model_repo):
    return triton_factory(tiny_model_repo, models=["relay"])


def test_counters_of_a_real_server_give_the_mean_request_duration(relay):
    before = read_stage_metrics(relay.ports.metrics_url, "relay")
    for _ in range(REQUESTS):
        infer(relay.ports.grpc_url)
    # Triton refreshes its metrics every couple of seconds: wait (bounded) for the requests to show.
    after = wait_for(lambda: (m := read_stage_metrics(relay.ports.metrics_url, "relay")).success >= before.success + REQUESTS and m,
                     timeout=30, message="the requests in Triton's metrics")
    assert after.success - before.success == REQUESTS and after.failure == 0
    assert after.request_us > before.request_us and after.compute_us > 0 and after.executions >= REQUESTS
    times = stage_times(before, after)
    assert times.requests == REQUESTS
    assert 0 < times.request_ms == pytest.approx((after.request_us - before.request_us) / REQUESTS / 1e3)
    assert 0 < times.compute_ms <= times.request_ms and times.queue_ms >= 0
    assert stage_times(after, after) is None  # no request in between: nothing measured

    # The same text through the parser alone; another model's samples are not this one's.
    import urllib.request

    text = urllib.request.urlopen(relay.ports.metrics_url, timeout=5).read().decode()
    assert 'nv_inference_request_success{model="relay"' in text
    assert parse_triton_metrics(text, "relay").success == after.success
    with pytest.raises(StageMetricsError, match="no nv_inference"):
        parse_triton_metrics(text, "captioner")


def test_garbage_and_unreachable_metrics_are_errors_not_crashes():
    with pytest.raises(StageMetricsError, match="not Prometheus"):
        parse_triton_metrics('nv_inference_request_success{model="relay" 3\n{{{', "relay")
    with pytest.raises(StageMetricsError, match="is -1"):
        parse_triton_metrics('nv_inference_request_success{model="relay",version="1"} -1\n', "relay")
    with pytest.raises(StageMetricsError):
        read_stage_metrics("http://127.0.0.1:9/metrics", "relay", timeout=1)
    # A restarted server's counters start again: the mean since its start.
    restarted = stage_times(StageSample(success=10, request_us=1e6), StageSample(success=2, executions=2, request_us=4000))
    assert restarted.requests == 2 and restarted.request_ms == 2.0
