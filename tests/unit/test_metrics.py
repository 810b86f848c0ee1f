"""The operator's Prometheus metrics: counted as the handlers report, served over HTTP."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from aiflow.controller import metrics


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_reconciling_counts_success_invalid_and_errors_and_times_each():
    before = {r: sample("aiflow_reconciles_total", result=r) for r in metrics.RECONCILE_RESULTS}
    timed = sample("aiflow_reconcile_duration_seconds_count")
    with metrics.reconciling():
        pass
    with metrics.reconciling() as outcome:
        outcome.result = "invalid"
    with pytest.raises(TimeoutError), metrics.reconciling():
        raise TimeoutError("api server slow")
    assert sample("aiflow_reconciles_total", result="success") == before["success"] + 1
    assert sample("aiflow_reconciles_total", result="invalid") == before["invalid"] + 1
    assert sample("aiflow_reconciles_total", result="error") == before["error"] + 1
    assert sample("aiflow_reconcile_errors_total", error="TimeoutError") >= 1
    assert sample("aiflow_reconcile_duration_seconds_count") == timed + 3


@pytest.mark.parametrize(
    "call",
    [
        lambda: metrics.record_plan_decision("maybe"),
        lambda: metrics.record_migration("halfway"),
        lambda: metrics.set_link("device", "moon", bandwidth_bps=1, rtt_s=1, source="measured"),
        lambda: metrics.set_link("device", "edge", bandwidth_bps=1, rtt_s=1, source="guessed"),
    ],
)
def test_label_values_outside_their_closed_set_are_refused(call):
    with pytest.raises(ValueError, match="must be one of"):
        call()


def test_an_unknown_reconcile_result_is_refused():
    with pytest.raises(ValueError, match="reconcile result"), metrics.reconciling() as outcome:
        outcome.result = "meh"


def test_plan_decisions_and_migrations_are_counted_by_kind():
    before = sample("aiflow_plan_decisions_total", decision="rejected")
    metrics.record_plan_decision("rejected")
    metrics.record_migration("completed")
    assert sample("aiflow_plan_decisions_total", decision="rejected") == before + 1
    assert sample("aiflow_migrations_total", outcome="completed") >= 1


def test_flow_series_are_published_and_dropped_when_the_flow_goes():
    metrics.set_flow_state("ns", "captioning", stages=3, ready_stages=2, predicted_latency_s=0.12)
    metrics.set_flow_state("ns", "captioning", ready_stages=3)
    assert sample("aiflow_flow_stages", namespace="ns", flow="captioning") == 3
    assert sample("aiflow_flow_ready_stages", namespace="ns", flow="captioning") == 3
    assert sample("aiflow_flow_predicted_latency_seconds", namespace="ns", flow="captioning") == 0.12
    metrics.forget_flow("ns", "captioning")
    metrics.forget_flow("ns", "captioning")  # twice is harmless
    assert REGISTRY.get_sample_value("aiflow_flow_stages", {"namespace": "ns", "flow": "captioning"}) is None


def test_metrics_are_served_over_http_in_prometheus_text_format():
    metrics.set_link("device", "edge", bandwidth_bps=1.25e6, rtt_s=0.02, source="measured")
    server = metrics.start_metrics_server(0, addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("aiflow_reconciles", "aiflow_reconcile_duration_seconds", "aiflow_plan_decisions",
                 "aiflow_migrations", "aiflow_link_bandwidth_bytes_per_second", "aiflow_operator_build_info"):
        assert name in families, name
    (bandwidth,) = [s for s in families["aiflow_link_bandwidth_bytes_per_second"].samples
                    if s.labels == {"from_tier": "device", "to_tier": "edge", "source": "measured"}]
    assert bandwidth.value == 1.25e6


def test_a_port_in_use_is_named_in_the_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            metrics.start_metrics_server(port, addr="127.0.0.1")


def test_the_server_starts_from_the_environment_the_chart_sets():
    assert metrics.start_metrics_server_from_env({}) is None
    assert metrics.start_metrics_server_from_env({"AIFLOW_METRICS_PORT": "0"}) is None
    with pytest.raises(ValueError, match="AIFLOW_METRICS_PORT must be a port number"):
        metrics.start_metrics_server_from_env({"AIFLOW_METRICS_PORT": "nine"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = metrics.start_metrics_server_from_env({"AIFLOW_METRICS_PORT": str(port)})
    try:
        assert server.server_port == port
    finally:
        server.shutdown()
        server.server_close()
