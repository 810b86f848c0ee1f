"""The link probe: measures round-trip time and bandwidth from this node to the nodes of other tiers.

One probe runs on every tier node (the chart's DaemonSet). Each serves a tiny TCP protocol, finds its
peers through a headless Service, and every interval measures each peer of another tier:

    HELLO            -> "<tier>"            which tier the peer's node is in
    PING             -> "PONG"              repeated; the median is the RTT
    SINK <n> + n bytes -> "OK <n>"          upload; bandwidth = n / (elapsed - RTT)

It writes the per-tier medians to its own Node as annotations (`ANNOTATION_PREFIX<tier>.rtt-ms`,
`...bandwidth-mbps`, megabits per second, plus `aiflow.io/link.measured-at`); `read_links` turns a
Node's annotations back into measurements, for the planner's cluster observation.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import socket
import statistics
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiflow import TIER_LABEL, TIERS, __version__

log = logging.getLogger("aiflow.linkprobe")

ANNOTATION_PREFIX = "aiflow.io/link."
RTT_SUFFIX = ".rtt-ms"
BANDWIDTH_SUFFIX = ".bandwidth-mbps"
MEASURED_AT = "aiflow.io/link.measured-at"
MAX_LINE = 64
CHUNK = 64 * 1024


class ProbeError(Exception):
    """A peer that cannot be measured (unreachable, wrong protocol, closed mid-way)."""


@dataclass(frozen=True)
class LinkSample:
    """One measurement of the link to one peer."""

    tier: str
    rtt_s: float
    bandwidth_bps: float  # bits per second, upload from this node to the peer


@dataclass(frozen=True)
class Link:
    """What this node measured towards a tier: medians over that tier's peers."""

    rtt_ms: float
    bandwidth_mbps: float


# ---- pure: samples -> per-tier links -> annotations, and back ----------------------------------


def summarise(samples: Iterable[LinkSample]) -> dict[str, Link]:
    """The median RTT and bandwidth towards each tier."""
    by_tier: dict[str, list[LinkSample]] = {}
    for s in samples:
        by_tier.setdefault(s.tier, []).append(s)
    return {
        tier: Link(
            rtt_ms=round(statistics.median(s.rtt_s for s in group) * 1e3, 3),
            bandwidth_mbps=round(statistics.median(s.bandwidth_bps for s in group) / 1e6, 3),
        )
        for tier, group in sorted(by_tier.items())
    }


def annotations(links: Mapping[str, Link], measured_at: dt.datetime) -> dict[str, str]:
    """Node annotations that publish `links`."""
    out = {MEASURED_AT: measured_at.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    for tier, link in links.items():
        out[f"{ANNOTATION_PREFIX}{tier}{RTT_SUFFIX}"] = f"{link.rtt_ms:g}"
        out[f"{ANNOTATION_PREFIX}{tier}{BANDWIDTH_SUFFIX}"] = f"{link.bandwidth_mbps:g}"
    return out


def read_links(node_annotations: Mapping[str, str]) -> dict[str, Link]:
    """The links a probe published on a Node. Garbage (unparsable, negative, unknown tier, half a
    pair) is skipped, never raised: the planner falls back to declared values for what is missing."""
    values: dict[str, dict[str, float]] = {}
    for key, raw in node_annotations.items():
        if not key.startswith(ANNOTATION_PREFIX):
            continue
        rest = key[len(ANNOTATION_PREFIX):]
        for suffix, field in ((RTT_SUFFIX, "rtt_ms"), (BANDWIDTH_SUFFIX, "bandwidth_mbps")):
            if rest.endswith(suffix) and rest[: -len(suffix)] in TIERS:
                try:
                    number = float(raw)
                except (TypeError, ValueError):
                    break
                if number >= 0 and number == number and number != float("inf"):
                    values.setdefault(rest[: -len(suffix)], {})[field] = number
                break
    return {tier: Link(**v) for tier, v in sorted(values.items()) if len(v) == 2}


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


async def measure_peer(
    host: str, port: int, *, payload_bytes: int, pings: int = 5, timeout_s: float = 30.0
) -> LinkSample:
    """Measure one peer: its tier, the median of `pings` round trips, and the upload bandwidth."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, asyncio.TimeoutError) as exc:
        raise ProbeError(f"cannot reach peer {host}:{port}: {exc or 'timeout'}") from exc
    try:
        async def exchange() -> LinkSample:
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
            rtt = statistics.median(rtts)
            payload = b"\0" * CHUNK
            start = time.perf_counter()
            writer.write(f"SINK {payload_bytes}\n".encode())
            left = payload_bytes
            while left:
                writer.write(payload[: min(left, CHUNK)])
                left -= min(left, CHUNK)
                await writer.drain()
            if await _readline(reader) != f"OK {payload_bytes}":
                raise ProbeError(f"peer {host}:{port} did not acknowledge the payload")
            # The acknowledgement costs one round trip on top of the transfer itself.
            transfer = max(time.perf_counter() - start - rtt, 1e-6)
            return LinkSample(tier=tier, rtt_s=rtt, bandwidth_bps=payload_bytes * 8 / transfer)

        return await asyncio.wait_for(exchange(), timeout_s)
    except asyncio.TimeoutError as exc:
        raise ProbeError(f"peer {host}:{port} timed out after {timeout_s:g}s") from exc
    except ConnectionError as exc:
        raise ProbeError(f"peer {host}:{port} dropped the connection: {exc}") from exc
    finally:
        writer.close()


async def measure_round(
    peers: Iterable[tuple[str, int]], own_tier: str, *, payload_bytes: int, pings: int = 5
) -> list[LinkSample]:
    """Measure every peer in turn (one at a time, so transfers do not share the link); peers of the
    own tier and peers that fail are left out, the failures logged."""
    samples = []
    for host, port in peers:
        try:
            sample = await measure_peer(host, port, payload_bytes=payload_bytes, pings=pings)
        except ProbeError as exc:
            log.warning("%s", exc)
            continue
        if sample.tier != own_tier:
            samples.append(sample)
    return samples


# ---- the edges: DNS, the Node ------------------------------------------------------------------


def resolve_peers(name: str, port: int, own_ip: str | None) -> list[tuple[str, int]]:
    """Every address behind `name` (a headless Service) but this pod's own."""
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        log.warning("cannot resolve peers %s: %s", name, exc)
        return []
    return sorted({(info[4][0], port) for info in infos if info[4][0] != own_ip})


class NodeClient:
    """Reads this node's tier and patches its annotations: in-cluster credentials in a pod, else the
    kubeconfig ($KUBECONFIG or ~/.kube/config)."""

    def __init__(self, node: str):
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        api_client = client.ApiClient()
        api_client.user_agent = f"aiflow-linkprobe/{__version__}"
        self.node = node
        self.api = client.CoreV1Api(api_client)

    def _call(self, what: str, fn, *args):
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args)
        except ApiException as exc:
            raise ProbeError(f"cannot {what} node {self.node}: HTTP {exc.status} {exc.reason}") from exc
        except HTTPError as exc:
            raise ProbeError(f"cannot {what} node {self.node}: {exc}") from exc

    def tier(self) -> str:
        labels = self._call("read", self.api.read_node, self.node).metadata.labels or {}
        tier = labels.get(TIER_LABEL)
        if tier not in TIERS:
            raise ProbeError(f"node {self.node} has {TIER_LABEL}={tier!r}; label it one of {TIERS}")
        return tier

    def publish(self, node_annotations: Mapping[str, str]) -> None:
        patch = {"metadata": {"annotations": dict(node_annotations)}}
        self._call("annotate", self.api.patch_node, self.node, patch)


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aiflow.linkprobe", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=7070, help="port to serve and to reach peers on")
    p.add_argument("--peers", required=True, help="DNS name resolving to every probe (headless Service)")
    p.add_argument("--interval", type=_positive(float), default=60.0, help="seconds between rounds")
    p.add_argument("--payload-bytes", type=_positive(int), default=4 << 20, help="bytes uploaded to each peer")
    p.add_argument("--pings", type=_positive(int), default=5, help="round trips per peer")
    p.add_argument("--node", default=os.environ.get("NODE_NAME"), help="this node (default $NODE_NAME)")
    p.add_argument("--pod-ip", default=os.environ.get("POD_IP"), help="own address, skipped as a peer")
    p.add_argument("--tier", choices=TIERS, help="this node's tier (default: read from the Node)")
    p.add_argument("--once", action="store_true", help="measure one round without serving, publish (with a node) and print the annotations, exit")
    return p


async def run(args: argparse.Namespace) -> int:
    # With --once and --tier but no node, nothing touches the cluster (a local check).
    node = NodeClient(args.node) if args.node else None
    if node is None and not (args.once and args.tier):
        raise ProbeError("no node name: pass --node or set NODE_NAME (the chart sets it)")
    tier = args.tier or node.tier()
    # A one-off measurement only asks; the DaemonSet's probes also answer their peers.
    server = None if args.once else await serve(tier, "0.0.0.0", args.port)
    log.info("probe of tier %s on port %d, peers at %s", tier, args.port, args.peers)
    try:
        while True:
            peers = resolve_peers(args.peers, args.port, args.pod_ip)
            samples = await measure_round(peers, tier, payload_bytes=args.payload_bytes, pings=args.pings)
            published = annotations(summarise(samples), dt.datetime.now(dt.timezone.utc))
            if node is not None:
                try:
                    await asyncio.to_thread(node.publish, published)
                except ProbeError as exc:
                    if args.once:
                        raise
                    log.warning("%s; retrying next round", exc)  # the API server may be back by then
            log.info("measured %d peer(s): %s", len(samples), published)
            if args.once:
                for key, value in sorted(published.items()):
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
