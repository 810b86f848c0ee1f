"""Two operator replicas as the chart runs them with peering (the chart's kopf peering CRDs and
peering object, the rendered args and POD_ID), against the emulated API server: the flow is served,
both replicas meet on the peering object, only one acts, and the peering requests are granted."""

from __future__ import annotations

import contextlib

import pytest

from aiflow import TIERS
from tests.chart.processes import OPERATOR_AGENTS, container_process, free_port, http_ok, ready
from tests.chart.rendering import CHART_DIR, containers, granted_permissions, load_yaml, render

# Cluster-wide replicas meet on a ClusterKopfPeering, namespaced ones on a KopfPeering per namespace.
MODES = {
    "cluster-wide": {"replicaCount": 2, "peering": {"enabled": True}},
    "namespaced": {"replicaCount": 2, "peering": {"enabled": True}, "watchNamespaces": ["default"]},
}
REPLICAS = ("aiflow-operator-7d9f-a", "aiflow-operator-7d9f-b")


@pytest.fixture(params=sorted(MODES))
def two_replicas(request, chart, apiserver, tmp_path):
    values = MODES[request.param]
    rendered = render(chart, values)
    apiserver.kubectl("apply", "--validate=false", "-f", "crds/")
    for crd in load_yaml(CHART_DIR / "crds" / "kopf.dev_peerings.yaml"):
        apiserver.create(crd)
    (peering,) = rendered.of_kind("ClusterKopfPeering") + rendered.of_kind("KopfPeering")
    apiserver.create(peering)
    apiserver.clear_request_log()
    with contextlib.ExitStack() as stack:
        processes = []
        for pod in REPLICAS:
            # Replicas of one Deployment share their args; only the ports differ here, on one host.
            port = free_port()
            own = render(chart, {**values, "health": {"port": port, "path": "/healthz"},
                                 "metrics": {"port": free_port()}})
            container = containers(own.one("Deployment"))[0]
            log = tmp_path / f"{pod}.log"
            process = stack.enter_context(container_process(container, apiserver.kubeconfig, log,
                                                             field_refs={"POD_ID": pod}))
            apiserver.wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/healthz") or process.poll() is not None,
                               timeout=60, message=f"the health endpoint of {pod}")
            assert process.poll() is None, log.read_text()[-3000:]
            processes.append((pod, process, log))
        yield rendered, peering, processes


def test_two_replicas_elect_one_that_serves_the_flow(apiserver, two_replicas):
    rendered, peering, processes = two_replicas
    for tier in TIERS:
        apiserver.seed_node(f"{tier}-1", tier)
    apiserver.start_deployment_controller()
    apiserver.kubectl("apply", "--validate=false", "-f", "examples/captioning.yaml")
    try:
        apiserver.wait_for(lambda: ready(apiserver.get("aiflows", "captioning", "default")), timeout=90,
                           message="the flow to become Ready with two peering replicas")
    except TimeoutError as exc:
        logs = "\n".join(f"--- {pod}\n{log.read_text()[-2000:]}" for pod, _, log in processes)
        raise AssertionError(f"{exc}\n{logs}") from None
    meta = peering["metadata"]
    peers = (apiserver.get(peering["kind"], meta["name"], meta.get("namespace")) or {}).get("status") or {}
    assert set(peers) == set(REPLICAS)
    assert len({info["priority"] for info in peers.values()}) == 2, (
        f"replicas with equal priorities pause each other: {peers}")
    acting = [pod for pod, _, log in processes if "captioning" in log.read_text()]
    assert len(acting) == 1, f"exactly one replica must act, these did: {acting}"

    # The peering requests of both replicas are granted by the chart's rules.
    grants = {g[1:] for g in granted_permissions(rendered)}
    needed = {(r.group, r.resource, r.verb) for r in apiserver.request_log
              if r.user_agent.startswith(OPERATOR_AGENTS) and r.group == "kopf.dev"}
    assert needed and needed <= grants, sorted(needed - grants)
    peering_grants = {g for g in grants if g[0] == "kopf.dev"}
    assert peering_grants <= needed | {("kopf.dev", resource, "get") for resource in ("clusterkopfpeerings", "kopfpeerings")}, \
        sorted(peering_grants - needed)
