"""The link probe: measures real local peers over TCP (directly and through the project's emulated
links), and publishes/reads its measurement ConfigMap."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import subprocess
import sys

import pytest

from aiflow import linkprobe
from aiflow.linkprobe import Budget, Link, LinkSample
from aiflow.local.links import Link as EmulatedLink
from aiflow.local.links import LinkConfig, LinkProxy
from tests.unit.linkprobe_peers import peer_behind_link


async def run_probe(*args: str, kubeconfig=None) -> tuple[int, str, str]:
    """`python -m aiflow.linkprobe --once ...` as a process; (exit code, stdout, stderr)."""
    env = {**os.environ, **({"KUBECONFIG": str(kubeconfig)} if kubeconfig else {})}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiflow.linkprobe", "--once", *args, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def edge_peer():
    server = await linkprobe.serve("edge", "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[:2]
    server.close()
    await server.wait_closed()


async def test_measures_tier_rtt_and_bandwidth_of_a_local_peer(edge_peer):
    host, port = edge_peer
    sample = await linkprobe.measure_peer(host, port, pings=3)
    assert sample.tier == "edge"
    assert 0 < sample.rtt_s < 5
    assert sample.bandwidth_bps > 0


async def test_a_round_skips_the_own_tier_and_survives_a_dead_peer(edge_peer):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[:2]
    samples = await linkprobe.measure_round([dead, edge_peer], "device")
    assert [s.tier for s in samples] == ["edge"]
    assert await linkprobe.measure_round([edge_peer], "edge") == []


async def test_a_peer_speaking_another_protocol_is_a_probe_error():
    async def liar(reader, writer):
        await reader.readline()
        writer.write(b"HTTP/1.1 400 Bad Request\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(liar, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        with pytest.raises(linkprobe.ProbeError, match="reports tier"):
            await linkprobe.measure_peer(host, port)
    finally:
        server.close()
        await server.wait_closed()


WHEN = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def test_links_are_medians_per_tier_and_round_trip_through_the_configmap():
    samples = [
        LinkSample("edge", 0.010, 80e6),
        LinkSample("edge", 0.030, 20e6),
        LinkSample("edge", 0.020, 40e6),
        LinkSample("cloud", 0.050, 10e6),
    ]
    links = linkprobe.summarise(samples)
    assert links == {"cloud": Link(rtt_ms=50.0, bandwidth_mbps=10.0), "edge": Link(rtt_ms=20.0, bandwidth_mbps=40.0)}
    data = linkprobe.measurement_data("device-1", "device", links, WHEN, 190)
    assert data == {
        "node": "device-1", "tier": "device", "valid-seconds": "190",
        "edge.rtt-ms": "20", "edge.bandwidth-mbps": "40", "edge.measured-at": "2026-01-02T03:04:05Z",
        "cloud.rtt-ms": "50", "cloud.bandwidth-mbps": "10", "cloud.measured-at": "2026-01-02T03:04:05Z",
    }
    published = linkprobe.read_measurements(data)
    assert (published.node, published.tier, published.valid_seconds, published.problems) == ("device-1", "device", 190, ())
    assert published.fresh(WHEN + dt.timedelta(seconds=100)) == (links, ())


def test_a_measurement_expires_tier_by_tier():
    old = linkprobe.measurement_data("d", "device", {"edge": Link(10, 20)}, WHEN, 180)
    new = linkprobe.measurement_data("d", "device", {"cloud": Link(40, 5)}, WHEN + dt.timedelta(seconds=170), 180)
    # A later round that reached only the cloud: the edge entry keeps its own, older time.
    links, notes = linkprobe.read_measurements({**old, **new}).fresh(WHEN + dt.timedelta(seconds=200))
    assert links == {"cloud": Link(40, 5)}
    assert notes == ("node d: link measurement towards edge is stale (taken 2026-01-02T03:04:05Z, 200 s ago; "
                     "valid for 180 s); not used",)


def test_garbage_measurements_are_skipped_not_raised():
    stamp = "2026-01-02T03:04:05Z"
    published = linkprobe.read_measurements({
        "node": "d", "valid-seconds": "soon",
        "edge.rtt-ms": "fast", "edge.bandwidth-mbps": "10", "edge.measured-at": stamp,
        "moon.rtt-ms": "1", "moon.bandwidth-mbps": "1", "moon.measured-at": stamp,
        "cloud.rtt-ms": "-3", "cloud.bandwidth-mbps": "nan", "cloud.measured-at": stamp,
        "device.rtt-ms": "4", "device.bandwidth-mbps": "0", "device.measured-at": stamp,
    })
    assert published.links == {} and published.valid_seconds == 180
    assert [p.split(" towards ")[1].split(" ")[0] for p in published.problems] == ["cloud", "device", "edge", "moon"]
    assert linkprobe.read_measurements({"edge.rtt-ms": "1"}) is None  # no node: not a probe's


# The project's user-space link emulation (aiflow.local.links), as the local runtime shapes its tiers.
RATES_MBIT = (0.1, 1, 10, 100, 1000)


@pytest.mark.parametrize("latency", ["5ms", "40ms"])
@pytest.mark.parametrize("mbit", RATES_MBIT)
async def test_the_probe_measures_shaped_links_within_15_percent_and_within_its_budget(mbit, latency):
    budget = Budget.of(60.0)  # the chart's default interval and 2 % share
    # The peer and the link each in a process of their own, as on separate machines.
    with peer_behind_link(f"{mbit}mbit", latency) as port:
        sample = await linkprobe.measure_peer("127.0.0.1", port, budget=budget)
    assert sample.bandwidth_bps == pytest.approx(mbit * 1e6, rel=0.15)
    # Bounded bytes per round: at most the budget's share of what the link carries in one interval.
    assert sample.bytes_sent * 8 <= budget.seconds * mbit * 1e6


async def test_the_probe_counts_the_bytes_it_sends(edge_peer):
    host, port = edge_peer
    link = EmulatedLink("device->edge", LinkConfig.symmetric("10mbit", "5ms"))
    with LinkProxy(link, (host, port)) as proxy:
        sample = await linkprobe.measure_peer(proxy.host, proxy.port)
    # What the budget is checked on is what crossed the link (plus the probe's few protocol lines).
    assert sample.bytes_sent <= link.stats().bytes_up <= sample.bytes_sent + 1024
    assert sample.bytes_sent > 4096  # it grew past the first upload on a 10 Mbit/s link


async def test_the_command_measures_once_and_prints_the_data(edge_peer):
    """The program the DaemonSet runs, against a local peer and without a cluster."""
    _, port = edge_peer
    code, out, err = await run_probe("--tier", "device", "--peers", "127.0.0.1", "--port", str(port))
    assert code == 0, err
    printed = dict(line.split("=", 1) for line in out.splitlines())
    assert set(printed) == {"node", "tier", "valid-seconds", "edge.measured-at", "edge.rtt-ms", "edge.bandwidth-mbps"}
    assert float(printed["edge.bandwidth-mbps"]) > 0
    assert float(printed["valid-seconds"]) == 3 * 60 + 1.2  # three intervals and one round's budget


def test_bad_arguments_get_a_clear_error(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exited:
        linkprobe.main(["--peers", "x", "--budget-percent", "50"])
    assert exited.value.code == 2
    assert "--budget-percent: must be between 0.1 and 10 (percent), not 50" in capsys.readouterr().err
    monkeypatch.delenv("NODE_NAME", raising=False)
    assert linkprobe.main(["--peers", "x"]) == 2
    assert "no node name: pass --node or set NODE_NAME" in capsys.readouterr().err
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    assert linkprobe.main(["--peers", "x", "--node", "n"]) == 2
    assert "no namespace for the measurements: pass --namespace or set POD_NAMESPACE" in capsys.readouterr().err


async def test_the_probe_publishes_to_its_own_configmap_with_only_the_access_the_chart_grants(edge_peer, apiserver):
    """Two rounds as the DaemonSet's pod on a device node: it reads its tier from the Node, measures
    the edge peer, creates then updates its ConfigMap, never writes the Node, and needs exactly the
    chart's link-probe rules."""
    from tests.chart.rendering import NAMESPACE, load_chart, rbac_rules, render

    apiserver.seed_node("device-1", "device")
    apiserver.create_namespace(NAMESPACE)  # the release's namespace, where the probe's Role is
    apiserver.clear_request_log()
    _, port = edge_peer
    for _ in range(2):
        code, _, err = await run_probe("--node", "device-1", "--namespace", NAMESPACE, "--peers", "127.0.0.1",
                                       "--port", str(port), kubeconfig=apiserver.kubeconfig)
        assert code == 0, err
    cm = apiserver.get("configmaps", linkprobe.measurement_name("device-1"), NAMESPACE)
    assert cm["metadata"]["labels"] == linkprobe.MEASUREMENT_LABELS
    published = linkprobe.read_measurements(cm["data"])
    assert published.node == "device-1" and set(published.links) == {"edge"}
    assert published.links["edge"].link.bandwidth_mbps > 0
    assert "annotations" not in apiserver.get("nodes", "device-1")["metadata"]
    used = {(r.namespace, r.group, r.resource, r.verb) for r in apiserver.request_log
            if r.user_agent.startswith("aiflow-linkprobe/") and r.resource}
    with load_chart() as chart:
        rendered = render(chart, {"linkProbe": {"enabled": True}})
    sa = rendered.one("DaemonSet", "link-probe")["spec"]["template"]["spec"]["serviceAccountName"]
    granted = {(scope, g, res, v) for scope, rule in rbac_rules(rendered, sa)
               for g in rule["apiGroups"] for res in rule["resources"] for v in rule["verbs"]}
    assert used == {(None, "", "nodes", "get"), (NAMESPACE, "", "configmaps", "create"), (NAMESPACE, "", "configmaps", "patch")}
    assert used == granted


async def test_a_node_it_may_not_read_is_a_clear_error(edge_peer, apiserver):
    _, port = edge_peer
    code, _, err = await run_probe("--node", "nowhere", "--namespace", "default", "--peers", "127.0.0.1",
                                   "--port", str(port), kubeconfig=apiserver.kubeconfig)
    assert code == 2
    assert "cannot read node nowhere: HTTP 404" in err
