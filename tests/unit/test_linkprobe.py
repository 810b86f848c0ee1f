"""The link probe: measures a real local peer over TCP, and publishes/reads node annotations."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import subprocess
import sys

import pytest

from aiflow import linkprobe
from aiflow.linkprobe import Link, LinkSample


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
    sample = await linkprobe.measure_peer(host, port, payload_bytes=1 << 20, pings=3)
    assert sample.tier == "edge"
    assert 0 < sample.rtt_s < 5
    assert sample.bandwidth_bps > 0


async def test_a_round_skips_the_own_tier_and_survives_a_dead_peer(edge_peer):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[:2]
    samples = await linkprobe.measure_round([dead, edge_peer], "device", payload_bytes=1 << 16)
    assert [s.tier for s in samples] == ["edge"]
    assert await linkprobe.measure_round([edge_peer], "edge", payload_bytes=1 << 16) == []


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
            await linkprobe.measure_peer(host, port, payload_bytes=1 << 16)
    finally:
        server.close()
        await server.wait_closed()


def test_links_are_medians_per_tier_and_round_trip_through_annotations():
    samples = [
        LinkSample("edge", 0.010, 80e6),
        LinkSample("edge", 0.030, 20e6),
        LinkSample("edge", 0.020, 40e6),
        LinkSample("cloud", 0.050, 10e6),
    ]
    links = linkprobe.summarise(samples)
    assert links == {"cloud": Link(rtt_ms=50.0, bandwidth_mbps=10.0), "edge": Link(rtt_ms=20.0, bandwidth_mbps=40.0)}
    published = linkprobe.annotations(links, dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc))
    assert published == {
        "aiflow.io/link.measured-at": "2026-01-02T03:04:05Z",
        "aiflow.io/link.edge.rtt-ms": "20",
        "aiflow.io/link.edge.bandwidth-mbps": "40",
        "aiflow.io/link.cloud.rtt-ms": "50",
        "aiflow.io/link.cloud.bandwidth-mbps": "10",
    }
    assert linkprobe.read_links({**published, "unrelated": "x"}) == links


def test_garbage_annotations_are_skipped_not_raised():
    assert linkprobe.read_links({
        "aiflow.io/link.edge.rtt-ms": "fast",
        "aiflow.io/link.edge.bandwidth-mbps": "10",
        "aiflow.io/link.moon.rtt-ms": "1",
        "aiflow.io/link.moon.bandwidth-mbps": "1",
        "aiflow.io/link.cloud.rtt-ms": "-3",
        "aiflow.io/link.cloud.bandwidth-mbps": "nan",
        "aiflow.io/link.device.rtt-ms": "4",  # half a pair
    }) == {}


async def test_the_command_measures_once_and_prints_the_annotations(edge_peer):
    """The program the DaemonSet runs, against a local peer and without a cluster."""
    _, port = edge_peer
    code, out, err = await run_probe("--tier", "device", "--peers", "127.0.0.1", "--port", str(port),
                                     "--payload-bytes", "65536")
    assert code == 0, err
    printed = dict(line.split("=", 1) for line in out.splitlines())
    assert set(printed) == {"aiflow.io/link.measured-at", "aiflow.io/link.edge.rtt-ms",
                            "aiflow.io/link.edge.bandwidth-mbps"}
    assert float(printed["aiflow.io/link.edge.bandwidth-mbps"]) > 0


def test_bad_arguments_get_a_clear_error(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exited:
        linkprobe.main(["--peers", "x", "--payload-bytes", "0"])
    assert exited.value.code == 2
    assert "--payload-bytes: must be at least 1, not 0" in capsys.readouterr().err
    monkeypatch.delenv("NODE_NAME", raising=False)
    assert linkprobe.main(["--peers", "x"]) == 2
    assert "no node name: pass --node or set NODE_NAME" in capsys.readouterr().err


async def test_the_probe_annotates_its_node_with_only_the_access_the_chart_grants(edge_peer, apiserver):
    """One round as the DaemonSet's pod on a device node: it reads its tier from the Node, measures
    the edge peer, writes the annotations, and needs exactly the chart's link-probe rules."""
    from tests.chart.rendering import load_chart, rbac_rules, render

    apiserver.seed_node("device-1", "device")
    apiserver.clear_request_log()
    _, port = edge_peer
    code, _, err = await run_probe("--node", "device-1", "--peers", "127.0.0.1", "--port", str(port),
                                   "--payload-bytes", "65536", kubeconfig=apiserver.kubeconfig)
    assert code == 0, err
    node = apiserver.get("nodes", "device-1")
    links = linkprobe.read_links(node["metadata"]["annotations"])
    assert set(links) == {"edge"} and links["edge"].bandwidth_mbps > 0
    used = {(r.group, r.resource, r.verb) for r in apiserver.request_log
            if r.user_agent.startswith("aiflow-linkprobe/") and r.resource}
    with load_chart() as chart:
        rendered = render(chart, {"linkProbe": {"enabled": True}})
    sa = rendered.one("DaemonSet", "link-probe")["spec"]["template"]["spec"]["serviceAccountName"]
    granted = {(g, res, v) for _, rule in rbac_rules(rendered, sa)
               for g in rule["apiGroups"] for res in rule["resources"] for v in rule["verbs"]}
    assert used == granted


async def test_a_node_it_may_not_read_is_a_clear_error(edge_peer, apiserver):
    _, port = edge_peer
    code, _, err = await run_probe("--node", "nowhere", "--peers", "127.0.0.1", "--port", str(port),
                                   kubeconfig=apiserver.kubeconfig)
    assert code == 2
    assert "cannot read node nowhere: HTTP 404" in err
