"""Emulated links: the shaper's arithmetic, and measured throughput/latency through real relays.

Throughput and latency here are correctness checks of the emulator against its own configuration
(with tolerances), not speed claims; bench/links_bench.py prints the full table.
"""

from __future__ import annotations

import socket
import statistics
import threading

import pytest

from aiflow.local.links import (
    Link,
    LinkConfig,
    LinkControlServer,
    LinkProxy,
    ProbeServer,
    Shaper,
    format_rate,
    parse_duration,
    parse_rate,
    probe_download,
    probe_rtt,
    probe_upload,
    remote_links,
)
from aiflow.local.tritonserver import PortInUseError

RATE_TOLERANCE = 0.05  # the target: within 5% of the configured throughput
SECONDS_OF_DATA = 1.2  # enough bytes that a few ms of scheduling jitter stays far below 5%


@pytest.fixture(scope="module")
def peer():
    with ProbeServer() as server:
        yield server


def through(link: Link, target) -> LinkProxy:
    return LinkProxy(link, target).start()


def direct_rtt(peer) -> float:
    return min(probe_rtt(peer.address, 20))


# Latency checks compare minimum round trips: CPU contention only ever adds delay, so the minimum is
# the emulator's own delay, with ~1 ms of timer granularity per direction.
LATENCY_SLACK = 0.005


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, bps", [
    ("10mbit", 10e6), ("2.5Mbps", 2.5e6), ("800kbit", 800e3), ("1gbit", 1e9), ("64000", 64e3),
    (5e6, 5e6), ("unlimited", None), (None, None),
])
def test_parse_rate(text, bps):
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text", ["fast", "10 mbyte", "-1mbit", "0", 0, "nanmbit"])
def test_parse_rate_rejects_nonsense_with_a_hint(text):
    with pytest.raises(ValueError, match="bad bandwidth"):
        parse_rate(text)


@pytest.mark.parametrize("text, seconds", [("20ms", 0.02), ("0.5s", 0.5), ("300us", 3e-4), ("0", 0.0), (0.01, 0.01)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["20", "fast", "-5ms", -1.0])
def test_parse_duration_rejects_missing_unit_or_negative(text):
    with pytest.raises(ValueError, match="bad latency"):
        parse_duration(text)


def test_link_config_parses_and_describes():
    config = LinkConfig.symmetric("10mbit", "20ms")
    assert (config.bandwidth_up, config.latency_down) == (10e6, 0.02)
    assert config.describe() == "up 10mbit +20ms, down 10mbit +20ms"
    assert format_rate(None) == "unlimited"
    with pytest.raises(ValueError, match="unknown link setting"):
        config.updated(bandwidth="5mbit")


# -- the shaper's schedule (pure) ----------------------------------------------------------------


def test_schedule_sends_back_to_back_at_the_bandwidth_then_adds_latency():
    shaper = Shaper(bandwidth=8e6, latency=0.05)  # 1 MB/s
    assert shaper.schedule(1000, now=10.0) == pytest.approx(10.001 + 0.05)
    assert shaper.schedule(1000, now=10.0) == pytest.approx(10.002 + 0.05)  # queued behind the first
    assert shaper.backlog(10.0) == pytest.approx(0.002)
    assert shaper.schedule(1000, now=20.0) == pytest.approx(20.001 + 0.05)  # an idle link starts afresh


def test_unlimited_shaper_only_delays():
    shaper = Shaper(bandwidth=None, latency=0.01)
    assert shaper.schedule(10**9, now=1.0) == pytest.approx(1.01)
    assert shaper.backlog(1.0) == 0


# -- measured through real relays ----------------------------------------------------------------


@pytest.mark.parametrize("mbit", [1, 10, 100])
def test_upload_throughput_matches_configuration(peer, mbit):
    link = Link("t", LinkConfig(bandwidth_up=mbit * 1e6, latency_up="5ms"))
    proxy = through(link, peer.address)
    try:
        nbytes = int(mbit * 1e6 / 8 * SECONDS_OF_DATA)
        measured = probe_upload(("127.0.0.1", proxy.port), nbytes)
    finally:
        proxy.stop()
    assert measured == pytest.approx(mbit * 1e6, rel=RATE_TOLERANCE)
    assert link.stats().bytes_up == nbytes + 1  # the probe's mode byte crossed too


def test_download_throughput_matches_configuration(peer):
    link = Link("t", LinkConfig(bandwidth_up="1mbit", bandwidth_down="10mbit", latency_down="5ms"))
    proxy = through(link, peer.address)
    try:
        nbytes = int(10e6 / 8 * SECONDS_OF_DATA)
        measured = probe_download(("127.0.0.1", proxy.port), nbytes)
    finally:
        proxy.stop()
    assert measured == pytest.approx(10e6, rel=RATE_TOLERANCE)
    assert link.stats().bytes_down == nbytes


def test_added_latency_is_one_way_up_plus_down(peer):
    base = direct_rtt(peer)
    link = Link("t", LinkConfig(latency_up="20ms", latency_down="10ms"))
    proxy = through(link, peer.address)
    try:
        rtts = probe_rtt(("127.0.0.1", proxy.port), 15)
    finally:
        proxy.stop()
    assert min(rtts) >= 0.030  # never less than configured
    assert min(rtts) - base <= 0.030 + LATENCY_SLACK


def test_latency_does_not_lower_throughput(peer):
    link = Link("t", LinkConfig(bandwidth_up="10mbit", latency_up="100ms"))
    proxy = through(link, peer.address)
    try:
        measured = probe_upload(("127.0.0.1", proxy.port), int(10e6 / 8 * SECONDS_OF_DATA))
    finally:
        proxy.stop()
    assert measured == pytest.approx(10e6, rel=RATE_TOLERANCE)


def test_set_changes_a_live_link(peer):
    link = Link("t", LinkConfig(latency_up="40ms"))
    proxy = through(link, peer.address)
    try:
        before = statistics.median(probe_rtt(("127.0.0.1", proxy.port), 5))
        link.set(latency_up=0, bandwidth_up="5mbit")
        after = statistics.median(probe_rtt(("127.0.0.1", proxy.port), 5))
        rate = probe_upload(("127.0.0.1", proxy.port), int(5e6 / 8 * SECONDS_OF_DATA))
    finally:
        proxy.stop()
    assert before >= 0.040 > after
    assert rate == pytest.approx(5e6, rel=RATE_TOLERANCE)


def test_connections_share_the_link_bandwidth(peer):
    link = Link("t", LinkConfig(bandwidth_up="8mbit"))
    proxy = through(link, peer.address)
    nbytes = int(8e6 / 8 * SECONDS_OF_DATA / 2)
    rates = []
    try:
        threads = [threading.Thread(target=lambda: rates.append(probe_upload(("127.0.0.1", proxy.port), nbytes)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        proxy.stop()
    assert sum(rates) == pytest.approx(8e6, rel=0.15)  # the two overlap almost fully


def test_chained_links_take_the_slower_rate_and_add_latencies(peer):
    fast = Link("edge->cloud", LinkConfig.symmetric("50mbit", "10ms"))
    slow = Link("device->edge", LinkConfig.symmetric("5mbit", "5ms"))
    second = through(fast, peer.address)
    first = through(slow, ("127.0.0.1", second.port))
    try:
        base = direct_rtt(peer)
        rtts = probe_rtt(("127.0.0.1", first.port), 10)
        rate = probe_upload(("127.0.0.1", first.port), int(5e6 / 8 * SECONDS_OF_DATA))
    finally:
        first.stop()
        second.stop()
    assert 0.030 <= min(rtts) <= 0.030 + base + 2 * LATENCY_SLACK
    assert rate == pytest.approx(5e6, rel=RATE_TOLERANCE)
    assert slow.stats().bytes_up == fast.stats().bytes_up > 0


def test_half_close_is_relayed(peer):
    proxy = through(Link("t", LinkConfig(latency_up="5ms")), peer.address)
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as conn:
            conn.sendall(b"S" + b"x" * 1000)
            conn.shutdown(socket.SHUT_WR)  # the peer answers only after it sees EOF
            assert conn.recv(100).startswith(b"[1000,")
    finally:
        proxy.stop()


def test_unreachable_target_closes_the_client_connection():
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        dead_port = placeholder.getsockname()[1]
    proxy = through(Link("t"), ("127.0.0.1", dead_port))
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
            assert conn.recv(10) == b""
    finally:
        proxy.stop()


def test_proxy_port_in_use_is_a_clear_error():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"link proxy t.*{port}"):
            LinkProxy(Link("t"), ("127.0.0.1", 1), port=port).start()


def test_control_endpoint_reads_and_sets_links():
    link = Link("device->edge", LinkConfig.symmetric("10mbit", "10ms"))
    control = LinkControlServer({link.name: link}).start()
    try:
        view = remote_links(control.url)
        assert view["device->edge"]["config"]["bandwidth_up"] == 10e6
        remote_links(control.url, "device->edge", bandwidth_up="2mbit", latency_down="30ms")
        assert (link.config.bandwidth_up, link.config.latency_down) == (2e6, 0.03)
        with pytest.raises(ValueError, match="bad bandwidth"):
            remote_links(control.url, "device->edge", bandwidth_up="fast")
        with pytest.raises(ValueError, match="unknown link 'x'"):
            remote_links(control.url, "x", latency_up="1ms")
    finally:
        control.stop()
    with pytest.raises(ConnectionError, match="is `aiflow up` running"):
        remote_links(control.url)
