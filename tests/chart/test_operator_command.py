"""The operator container exactly as the chart renders it (command, args, env), run as a process
against the emulated API server: its probes answer, its metrics are served where the chart scrapes
them, and it reconciles the captioning example."""

from __future__ import annotations

import urllib.request

import pytest

from aiflow import TIERS
from tests.chart.processes import container_process, free_port, http_ok, ready
from tests.chart.rendering import containers, render


@pytest.fixture
def chart_operator(chart, apiserver, tmp_path):
    """The default install's operator container, on free ports; yields the process and its URLs."""
    health_port, metrics_port = free_port(), free_port()
    rendered = render(chart, {"health": {"port": health_port, "path": "/healthz"},
                              "metrics": {"port": metrics_port}})
    container = containers(rendered.one("Deployment"))[0]
    apiserver.kubectl("apply", "--validate=false", "-f", "crds/")
    with container_process(container, apiserver.kubeconfig, tmp_path / "operator.log") as process:
        urls = {"health": f"http://127.0.0.1:{health_port}/healthz",
                "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
        apiserver.wait_for(lambda: http_ok(urls["health"]) or process.poll() is not None, timeout=60,
                           message="the operator's health endpoint")
        assert process.poll() is None, (tmp_path / "operator.log").read_text()[-3000:]
        yield process, urls


def test_the_rendered_operator_command_serves_probes_and_reconciles_the_example(apiserver, chart_operator):
    process, urls = chart_operator
    for tier in TIERS:
        apiserver.seed_node(f"{tier}-1", tier)
    apiserver.start_deployment_controller()
    apiserver.kubectl("apply", "--validate=false", "-f", "examples/captioning.yaml")
    flow = apiserver.wait_for(lambda: ready(apiserver.get("aiflows", "captioning", "default")) and
                              apiserver.get("aiflows", "captioning", "default"),
                              timeout=90, message="the captioning flow to become Ready")
    stages = [s["name"] for s in flow["spec"]["stages"]]
    deployments = apiserver.list("deployments", "default", label_selector="aiflow.io/flow=captioning")
    assert sorted(d["metadata"]["labels"]["aiflow.io/stage"] for d in deployments) == sorted(stages)
    assert http_ok(urls["health"])


def test_the_rendered_operator_serves_its_metrics_where_the_chart_scrapes(chart_operator):
    _, urls = chart_operator
    assert http_ok(urls["metrics"]), (
        "nothing serves /metrics on $AIFLOW_METRICS_PORT: the operator's startup handler must call "
        "aiflow.controller.metrics.start_metrics_server_from_env()")
    body = urllib.request.urlopen(urls["metrics"], timeout=5).read().decode()
    assert "aiflow_operator_build_info" in body and "aiflow_reconciles_total" in body
