"""The link probe: measures round-trip time and bandwidth from this node to the nodes of other tiers.

One probe runs on every tier node (the chart's DaemonSet). Each serves a tiny TCP protocol, finds its
peers through a headless Service, and every interval measures each peer of another tier:

    HELLO            -> "<tier>"            which tier the peer's node is in
    PING             -> "PONG"              repeated; the median is the RTT
    SINK <n> + n bytes -> "OK <n>"          upload; bandwidth = n / (elapsed - RTT)

Uploads are sized to the link: the first is small (`FIRST_PAYLOAD`), and each next one grows (at most
`MAX_GROWTH` times) until one takes at least `MIN_TRANSFER_SECONDS`, long enough that the RTT's jitter
and the timer do not matter; one more of that size follows when the budget allows, and the bandwidth
is the faster of the two (interference only ever slows an upload). So a 0.1 Mbit/s uplink is measured
with a few KiB and a 1 Gbit/s one with about a hundred MiB.

The budget: every round, each peer's uploads together occupy the link for at most `budget` (default
2 %) of the interval, i.e. at most budget x bandwidth x interval bytes (1.2 s of link time, 15 KB at
0.1 Mbit/s, 150 MB at 1 Gbit/s, with the default 60 s interval), and never more than `MAX_ROUND_BYTES`.
An upload that would break the budget is not sent; the last one that fit is used, and said so.

What it measured goes to a ConfigMap of its own in its namespace (`measurement_name(node)`, labelled
`MEASUREMENT_LABELS`), one entry per tier with its own time (`<tier>.measured-at`): a round that fails
for a tier leaves that tier's old entry and old time, which then expire (`valid-seconds`) instead of
looking fresh. The probe never writes a Node; it only reads its own Node's tier label.
`read_measurements` turns a ConfigMap's data back into measurements, for the operator.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import logging
import math
import os
import socket
import statistics
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiflow import TIER_LABEL, TIERS, __version__

log = logging.getLogger("aiflow.linkprobe")

MEASUREMENT_LABELS = {"app.kubernetes.io/part-of": "aiflow", "app.kubernetes.io/component": "link-measurement"}
RTT_SUFFIX = ".rtt-ms"
BANDWIDTH_SUFFIX = ".bandwidth-mbps"
MEASURED_AT_SUFFIX = ".measured-at"
NODE_KEY, TIER_KEY, VALID_KEY = "node", "tier", "valid-seconds"
STAMP = "%Y-%m-%dT%H:%M:%SZ"
MAX_LINE = 64
CHUNK = 256 * 1024
FIRST_PAYLOAD = 4 * 1024
MIN_TRANSFER_SECONDS = 0.25
MAX_GROWTH = 8
MAX_ROUND_BYTES = 256 * 1024 * 1024
DEFAULT_BUDGET = 0.02
# Measurements older than this many intervals are stale: the probe missed two rounds in a row.
VALID_INTERVALS = 3


class ProbeError(Exception):
    """A peer that cannot be measured (unreachable, wrong protocol, closed mid-way)."""


@dataclass(frozen=True)
class LinkSample:
    """One measurement of the link to one peer."""

    tier: str
    rtt_s: float
    bandwidth_bps: float  # bits per second, upload from this node to the peer
    bytes_sent: int = 0  # by the uploads of this measurement
    note: str = ""  # what limited it, when something did


@dataclass(frozen=True)
class Link:
    """What this node measured towards a tier: medians over that tier's peers."""

    rtt_ms: float
    bandwidth_mbps: float


@dataclass(frozen=True)
class Measured:
    """A published measurement towards one tier, with when it was taken."""

    link: Link
    measured_at: dt.datetime


@dataclass(frozen=True)
class Published:
    """One probe's ConfigMap, read back: whose node, what it measured, how long that stays valid."""

    node: str
    tier: str
    links: dict[str, Measured]
    valid_seconds: float
    problems: tuple[str, ...] = ()

    def fresh(self, now: dt.datetime) -> tuple[dict[str, Link], tuple[str, ...]]:
        """The measurements still valid at `now`, and a note for each one that expired."""
        links, notes = {}, []
        for tier, m in sorted(self.links.items()):
            age = (now - m.measured_at).total_seconds()
            if age > self.valid_seconds:
                notes.append(f"node {self.node}: link measurement towards {tier} is stale (taken "
                             f"{m.measured_at.strftime(STAMP)}, {age:.0f} s ago; valid for {self.valid_seconds:g} s); "
                             "not used")
            else:
                links[tier] = m.link
        return links, tuple(notes)


# ---- pure: samples -> per-tier links -> ConfigMap data, and back --------------------------------


def summarise(samples: Iterable[LinkSample]) -> dict[str, Link]:
    """The median RTT and bandwidth towards each tier."""
    by_tier: dict[str, list[LinkSample]] = {}
    for s in samples:
        by_tier.setdefault(s.tier, []).append(s)
    return {
        tier: Link(
            rtt_ms=round(statistics.median(s.rtt_s for s in group) * 1e3, 3),
            bandwidth_mbps=round(statistics.median(s.bandwidth_bps for s in group) / 1e6, 4),
        )
        for tier, group in sorted(by_tier.items())
    }


def _stamp(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime(STAMP)


def measurement_data(node: str, tier: str, links: Mapping[str, Link], measured_at: dt.datetime,
                     valid_seconds: float) -> dict[str, str]:
    """ConfigMap data that publishes `links` (only the tiers measured this round: the others keep
    their earlier entries and times)."""
    out = {NODE_KEY: node, TIER_KEY: tier, VALID_KEY: f"{valid_seconds:g}"}
    for to, link in links.items():
        out[f"{to}{RTT_SUFFIX}"] = f"{link.rtt_ms:g}"
        out[f"{to}{BANDWIDTH_SUFFIX}"] = f"{link.bandwidth_mbps:g}"
        out[f"{to}{MEASURED_AT_SUFFIX}"] = _stamp(measured_at)
    return out


def measurement_name(node: str) -> str:
    """The ConfigMap of a node's measurements: `aiflow-links-<node>`, bounded to a valid name."""
    name = f"aiflow-links-{node}"
    return name if len(name) <= 253 else name[:240] + "-" + hashlib.sha256(node.encode()).hexdigest()[:12]


def _number(raw) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


def read_measurements(data: Mapping[str, str], default_valid_seconds: float = 180.0) -> Published | None:
    """A probe's ConfigMap data -> what it published; None when it names no node. Garbage (an
    unparsable, negative or zero value, an unknown tier, half an entry, no time) is left out and
    described in `problems`, never raised: the planner falls back to declared values."""
    node = data.get(NODE_KEY)
    if not node:
        return None
    problems = []
    valid = _number(data.get(VALID_KEY))
    if not valid:
        valid = default_valid_seconds
    links = {}
    tiers = {key.split(".", 1)[0] for key in data if "." in key}
    for to in sorted(tiers):
        raw = {s: data.get(f"{to}{s}") for s in (RTT_SUFFIX, BANDWIDTH_SUFFIX, MEASURED_AT_SUFFIX)}
        rtt, bandwidth = _number(raw[RTT_SUFFIX]), _number(raw[BANDWIDTH_SUFFIX])
        try:
            at = dt.datetime.strptime(str(raw[MEASURED_AT_SUFFIX]), STAMP).replace(tzinfo=dt.timezone.utc)
        except ValueError:
            at = None
        if to not in TIERS or rtt is None or not bandwidth or at is None:
            shown = ", ".join(f"{to}{s}={v!r}" for s, v in raw.items())
            problems.append(f"node {node}: link measurement towards {to} ignored ({shown})")
            continue
        links[to] = Measured(Link(rtt, bandwidth), at)
    return Published(node, str(data.get(TIER_KEY, "")), links, valid, tuple(problems))


# ---- the protocol ------------------------------------------------------------------------------


async def _readline(reader: asyncio.StreamReader) -> str:
    line = await reader.readline()
    if not line.endswith(b"\n") or len(line) > MAX_LINE:
        raise ProbeError("connection closed or sent garbage")
    return line.decode("ascii", "replace").strip()


async def serve(tier: str, host: str, port: int) -> asyncio.Server:
    """Answer peers' HELLO, PING and SINK on host:port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                command, _, arg = (await _readline(reader)).partition(" ")
                if command == "HELLO":
                    writer.write(f"{tier}\n".encode())
                elif command == "PING":
                    writer.write(b"PONG\n")
                elif command == "SINK" and arg.isdigit():
                    left = int(arg)
                    while left:
                        chunk = await reader.read(min(left, CHUNK))
                        if not chunk:
                            raise ProbeError("connection closed during SINK")
                        left -= len(chunk)
                    writer.write(f"OK {arg}\n".encode())
                else:
                    writer.write(b"ERR unknown command\n")
                await writer.drain()
        except (ProbeError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


@dataclass(frozen=True)
class Budget:
    """What one measurement of one peer may spend: `seconds` of link time (the budget share of the
    interval) and at most `max_bytes`."""

    seconds: float
    max_bytes: int = MAX_ROUND_BYTES

    @classmethod
    def of(cls, interval_s: float, share: float = DEFAULT_BUDGET) -> "Budget":
        return cls(seconds=interval_s * share)


async def _upload(reader, writer, size: int, timeout_s: float, payload: bytes) -> float:
    """One SINK of `size` bytes; the seconds from the first byte sent to the acknowledgement."""
    async def go() -> float:
        start = time.perf_counter()
        writer.write(f"SINK {size}\n".encode())
        left = size
        while left:
            n = min(left, len(payload))
            writer.write(payload[:n] if n < len(payload) else payload)
            left -= n
            await writer.drain()
        if await _readline(reader) != f"OK {size}":
            raise ProbeError("the peer did not acknowledge the payload")
        return time.perf_counter() - start

    return await asyncio.wait_for(go(), timeout_s)


async def measure_bandwidth(reader, writer, rtt_s: float, budget: Budget) -> tuple[float, int, str]:
    """Uploads sized to the link (see the module's docstring): (bits per second, bytes sent, a note
    when the budget cut the growth short)."""
    payload = b"\0" * CHUNK
    size, sent, spent = FIRST_PAYLOAD, 0, 0.0
    # The first upload is tiny; a link so thin that even it takes long still gets a generous bound.
    timeout = max(30.0, 4 * budget.seconds)
    while True:
        elapsed = await _upload(reader, writer, size, timeout, payload)
        sent += size
        spent += elapsed
        # The acknowledgement costs one round trip on top of the transfer itself.
        transfer = max(elapsed - rtt_s, 1e-6)
        bps = size * 8 / transfer
        if transfer >= MIN_TRANSFER_SECONDS:
            # Once more at this size when the budget allows: cross traffic or a busy CPU only ever
            # slows an upload down, so the faster of the two is the nearer to the link's rate.
            if spent + elapsed <= budget.seconds and sent + size <= budget.max_bytes:
                again = await _upload(reader, writer, size, timeout, payload)
                sent += size
                bps = max(bps, size * 8 / max(again - rtt_s, 1e-6))
            return bps, sent, ""
        grow = min(MAX_GROWTH, max(2.0, 1.5 * MIN_TRANSFER_SECONDS / transfer))
        following = int(size * grow)
        predicted = following * 8 / bps + rtt_s
        if sent + following > budget.max_bytes or spent + predicted > budget.seconds:
            return bps, sent, (f"budget reached after {sent} bytes: the last upload took {transfer * 1e3:.1f} ms, "
                               f"shorter than the {MIN_TRANSFER_SECONDS * 1e3:g} ms that measures well")
        size = following
        timeout = max(30.0, 4 * predicted)


async def measure_peer(
    host: str, port: int, *, budget: Budget | None = None, pings: int = 5, timeout_s: float = 30.0
) -> LinkSample:
    """Measure one peer: its tier, the median of `pings` round trips, and the upload bandwidth with
    uploads sized to the link within `budget` (default: 2 % of a 60 s interval)."""
    budget = budget or Budget.of(60.0)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, asyncio.TimeoutError) as exc:
        raise ProbeError(f"cannot reach peer {host}:{port}: {exc or 'timeout'}") from exc
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:  # PING lines must not wait for Nagle's algorithm
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    try:
        async def hello_and_pings() -> tuple[str, float]:
            writer.write(b"HELLO\n")
            await writer.drain()
            tier = await _readline(reader)
            if tier not in TIERS:
                raise ProbeError(f"peer {host}:{port} reports tier {tier!r}, not one of {TIERS}")
            rtts = []
            for _ in range(pings):
                start = time.perf_counter()
                writer.write(b"PING\n")
                await writer.drain()
                if await _readline(reader) != "PONG":
                    raise ProbeError(f"peer {host}:{port} did not answer PING")
                rtts.append(time.perf_counter() - start)
            return tier, statistics.median(rtts)

        tier, rtt = await asyncio.wait_for(hello_and_pings(), timeout_s)
        try:
            bps, sent, note = await measure_bandwidth(reader, writer, rtt, budget)
        except ProbeError as exc:
            raise ProbeError(f"peer {host}:{port}: {exc}") from exc
        return LinkSample(tier=tier, rtt_s=rtt, bandwidth_bps=bps, bytes_sent=sent, note=note)
    except asyncio.TimeoutError as exc:
        raise ProbeError(f"peer {host}:{port} timed out") from exc
    except ConnectionError as exc:
        raise ProbeError(f"peer {host}:{port} dropped the connection: {exc}") from exc
    finally:
        writer.close()


async def measure_round(
    peers: Iterable[tuple[str, int]], own_tier: str, *, budget: Budget | None = None, pings: int = 5
) -> list[LinkSample]:
    """Measure every peer in turn (one at a time, so transfers do not share the link); peers of the
    own tier and peers that fail are left out, the failures logged."""
    samples = []
    for host, port in peers:
        try:
            sample = await measure_peer(host, port, budget=budget, pings=pings)
        except ProbeError as exc:
            log.warning("%s", exc)
            continue
        if sample.note:
            log.info("peer %s:%d: %s", host, port, sample.note)
        if sample.tier != own_tier:
            samples.append(sample)
    return samples


# ---- the edges: DNS, the Node, the ConfigMap ---------------------------------------------------


def resolve_peers(name: str, port: int, own_ip: str | None) -> list[tuple[str, int]]:
    """Every address behind `name` (a headless Service) but this pod's own."""
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        log.warning("cannot resolve peers %s: %s", name, exc)
        return []
    return sorted({(info[4][0], port) for info in infos if info[4][0] != own_ip})


class ProbeClient:
    """Reads this node's tier and publishes the measurements to the node's ConfigMap in `namespace`:
    in-cluster credentials in a pod, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""

    def __init__(self, node: str, namespace: str):
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        api_client = client.ApiClient()
        api_client.user_agent = f"aiflow-linkprobe/{__version__}"
        self.node, self.namespace = node, namespace
        self.api = client.CoreV1Api(api_client)

    def _call(self, what: str, fn, *args):
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args)
        except ApiException as exc:
            if exc.status == 404 and what == "update":
                return None
            raise ProbeError(f"cannot {what} {self._what(what)}: HTTP {exc.status} {exc.reason}") from exc
        except HTTPError as exc:
            raise ProbeError(f"cannot {what} {self._what(what)}: {exc}") from exc

    def _what(self, verb: str) -> str:
        if verb == "read":
            return f"node {self.node}"
        return f"ConfigMap {self.namespace}/{measurement_name(self.node)}"

    def tier(self) -> str:
        labels = self._call("read", self.api.read_node, self.node).metadata.labels or {}
        tier = labels.get(TIER_LABEL)
        if tier not in TIERS:
            raise ProbeError(f"node {self.node} has {TIER_LABEL}={tier!r}; label it one of {TIERS}")
        return tier

    def publish(self, data: Mapping[str, str]) -> None:
        """Merge `data` into the node's ConfigMap (entries of tiers not in `data` stay as they were),
        creating it on the first round."""
        name = measurement_name(self.node)
        body = {"metadata": {"labels": dict(MEASUREMENT_LABELS)}, "data": dict(data)}
        if self._call("update", self.api.patch_namespaced_config_map, name, self.namespace, body) is None:
            created = {"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": name, "namespace": self.namespace, "labels": dict(MEASUREMENT_LABELS)},
                       "data": dict(data)}
            self._call("create", self.api.create_namespaced_config_map, self.namespace, created)


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
        return value
    return parse


def _share(text: str) -> float:
    value = float(text)
    if not 0.1 <= value <= 10:
        raise argparse.ArgumentTypeError(f"must be between 0.1 and 10 (percent), not {text}")
    return value / 100


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aiflow.linkprobe", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=7070, help="port to serve and to reach peers on")
    p.add_argument("--peers", required=True, help="DNS name resolving to every probe (headless Service)")
    p.add_argument("--interval", type=_positive(float), default=60.0, help="seconds between rounds")
    p.add_argument("--budget-percent", type=_share, default=DEFAULT_BUDGET,
                   help="share of each link's time per interval the uploads to one peer may take (percent, default 2)")
    p.add_argument("--pings", type=_positive(int), default=5, help="round trips per peer")
    p.add_argument("--node", default=os.environ.get("NODE_NAME"), help="this node (default $NODE_NAME)")
    p.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE"),
                   help="namespace of the measurement ConfigMaps (default $POD_NAMESPACE)")
    p.add_argument("--pod-ip", default=os.environ.get("POD_IP"), help="own address, skipped as a peer")
    p.add_argument("--tier", choices=TIERS, help="this node's tier (default: read from the Node)")
    p.add_argument("--once", action="store_true", help="measure one round without serving, publish (with a node) and print the data, exit")
    return p


async def run(args: argparse.Namespace) -> int:
    # With --once and --tier but no node, nothing touches the cluster (a local check).
    if args.node and not args.namespace:
        raise ProbeError("no namespace for the measurements: pass --namespace or set POD_NAMESPACE (the chart sets it)")
    client = ProbeClient(args.node, args.namespace) if args.node else None
    if client is None and not (args.once and args.tier):
        raise ProbeError("no node name: pass --node or set NODE_NAME (the chart sets it)")
    tier = args.tier or client.tier()
    budget = Budget.of(args.interval, args.budget_percent)
    valid = VALID_INTERVALS * args.interval + budget.seconds
    # A one-off measurement only asks; the DaemonSet's probes also answer their peers.
    server = None if args.once else await serve(tier, "0.0.0.0", args.port)
    log.info("probe of tier %s on port %d, peers at %s, %.2f s of link time per peer and round",
             tier, args.port, args.peers, budget.seconds)
    try:
        while True:
            peers = resolve_peers(args.peers, args.port, args.pod_ip)
            samples = await measure_round(peers, tier, budget=budget, pings=args.pings)
            data = measurement_data(args.node or "", tier, summarise(samples), dt.datetime.now(dt.timezone.utc), valid)
            if client is not None:
                try:
                    await asyncio.to_thread(client.publish, data)
                except ProbeError as exc:
                    if args.once:
                        raise
                    log.warning("%s; retrying next round", exc)  # the API server may be back by then
            log.info("measured %d peer(s) with %d bytes: %s", len(samples), sum(s.bytes_sent for s in samples), data)
            if args.once:
                for key, value in sorted(data.items()):
                    print(f"{key}={value}")
                return 0
            await asyncio.sleep(args.interval)
    finally:
        if server is not None:
            server.close()
            await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return asyncio.run(run(args))
    except ProbeError as exc:
        print(f"linkprobe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
