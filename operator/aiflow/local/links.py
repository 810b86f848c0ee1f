"""Emulated network links between tiers: user-space TCP relays that shape bandwidth and add latency.

A `Link` is one physical link between two tiers, with an `up` (towards the cloud) and a `down`
direction. Each direction is a rate schedule (bytes leave the link back to back at the configured
bandwidth, shared by every connection that crosses it) followed by a delay line (each chunk is handed
on `latency` seconds after it left), so latency never lowers throughput. A `LinkProxy` listens on a
loopback port and relays every TCP connection to a target through one link; two proxies in series
chain two links. Relays run on one asyncio loop in a daemon thread of the calling process (the model
compute runs in tritonserver processes, so the GIL is not contended). `Link.set()` changes a link live.

No root is needed (tc netem is unavailable on these machines, and user space runs in CI as it is).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiflow.local.tritonserver import LOOPBACK, check_ports_free

GRANULARITY = 0.002  # seconds of link time per relayed chunk: bounds burstiness at any bandwidth
MIN_CHUNK, MAX_CHUNK = 1024, 256 * 1024
MAX_BACKLOG = 0.02  # seconds of link time a relay reads ahead of the link (a router queue)
MAX_QUEUED_BYTES = 8 * 1024 * 1024  # delay-line bound when the receiver stops reading


# -- configuration (pure) ------------------------------------------------------------------------

_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([kmg]?)(bit|bps|bit/s|b/s)?\s*$", re.I)
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|ms|s)\s*$", re.I)
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_rate(text: str | float | None) -> float | None:
    """'10mbit', '2.5Mbps', '800kbit', 1e6 -> bits/s; None/'unlimited'/'inf' -> None (no shaping)."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        if text.strip().lower() in ("", "none", "unlimited", "inf"):
            return None
        match = _RATE.match(text)
        if not match:
            raise ValueError(
                f"bad bandwidth {text!r}: use a number with a unit, e.g. 10mbit, 800kbit, 1gbit "
                "(bits per second), or 'unlimited'"
            )
        value = float(match.group(1)) * _SCALE[match.group(2).lower()]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"bad bandwidth {text!r}: must be a positive number of bits per second")
    return value


def parse_duration(text: str | float) -> float:
    """'20ms', '0.5s', '300us', 0.02 -> seconds."""
    if isinstance(text, (int, float)):
        value = float(text)
    elif text.strip() == "0":
        value = 0.0
    else:
        match = _DURATION.match(text)
        if not match:
            raise ValueError(f"bad latency {text!r}: use a number with a unit, e.g. 20ms, 0.1s, 500us")
        value = float(match.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[match.group(2).lower()]
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"bad latency {text!r}: must be zero or more seconds")
    return value


def format_rate(bps: float | None) -> str:
    if bps is None:
        return "unlimited"
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bps >= scale:
            return f"{bps / scale:g}{unit}"
    return f"{bps:g}bit"


@dataclass(frozen=True)
class LinkConfig:
    """Bandwidth (bits/s, None = unlimited) and one-way latency (s) per direction; up = to the cloud."""

    bandwidth_up: float | None = None
    bandwidth_down: float | None = None
    latency_up: float = 0.0
    latency_down: float = 0.0

    def __post_init__(self):
        for name in ("bandwidth_up", "bandwidth_down"):
            object.__setattr__(self, name, parse_rate(getattr(self, name)))
        for name in ("latency_up", "latency_down"):
            object.__setattr__(self, name, parse_duration(getattr(self, name)))

    @classmethod
    def symmetric(cls, bandwidth: float | str | None = None, latency: float | str = 0.0) -> LinkConfig:
        return cls(bandwidth, bandwidth, latency, latency)

    def updated(self, **changes) -> LinkConfig:
        unknown = set(changes) - set(asdict(self))
        if unknown:
            raise ValueError(f"unknown link setting(s) {sorted(unknown)}; known: {sorted(asdict(self))}")
        return replace(self, **changes)

    def describe(self) -> str:
        return (
            f"up {format_rate(self.bandwidth_up)} +{self.latency_up * 1e3:g}ms, "
            f"down {format_rate(self.bandwidth_down)} +{self.latency_down * 1e3:g}ms"
        )


# -- shaping -------------------------------------------------------------------------------------


@dataclass
class Shaper:
    """One direction of a link: a rate schedule shared by all its connections, then a delay line."""

    bandwidth: float | None = None
    latency: float = 0.0
    bytes: int = 0  # delivered across the link
    _free_at: float = field(default=0.0, repr=False)  # when the link finishes what it was given

    def chunk_size(self) -> int:
        if self.bandwidth is None:
            return MAX_CHUNK
        return int(min(MAX_CHUNK, max(MIN_CHUNK, self.bandwidth / 8 * GRANULARITY)))

    def schedule(self, nbytes: int, now: float) -> float:
        """When `nbytes` arriving at `now` come out of the far end of the link."""
        if self.bandwidth is None:
            return now + self.latency
        self._free_at = max(now, self._free_at) + nbytes * 8 / self.bandwidth
        return self._free_at + self.latency

    def backlog(self, now: float) -> float:
        """Seconds of link time already committed ahead of `now`."""
        return max(0.0, self._free_at - now) if self.bandwidth is not None else 0.0


@dataclass(frozen=True)
class LinkStats:
    name: str
    config: LinkConfig
    bytes_up: int
    bytes_down: int
    connections: int


class Link:
    """A link between two tiers; every proxy that crosses it shares its bandwidth and counters."""

    def __init__(self, name: str, config: LinkConfig | None = None):
        self.name = name
        self.up = Shaper()
        self.down = Shaper()
        self.connections = 0
        self._config = LinkConfig()
        self.configure(config or LinkConfig())

    @property
    def config(self) -> LinkConfig:
        return self._config

    def configure(self, config: LinkConfig) -> None:
        # Plain attribute writes: the relay loop reads them per chunk, so changes apply live.
        self.up.bandwidth, self.up.latency = config.bandwidth_up, config.latency_up
        self.down.bandwidth, self.down.latency = config.bandwidth_down, config.latency_down
        self._config = config

    def set(self, **changes) -> LinkConfig:
        """Change some settings live, e.g. `set(bandwidth_up="5mbit", latency_up="40ms")`."""
        self.configure(self._config.updated(**changes))
        return self._config

    def stats(self) -> LinkStats:
        return LinkStats(self.name, self._config, self.up.bytes, self.down.bytes, self.connections)


# -- the relay loop ------------------------------------------------------------------------------


class _LoopThread:
    """One asyncio loop in a daemon thread, shared by all proxies of this process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="aiflow-links", daemon=True).start()
                self._loop = loop
            return self._loop

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.get()).result(timeout)


_LOOP = _LoopThread()


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shaper: Shaper) -> None:
    """Copy reader -> writer through `shaper`; half-close the far side on EOF."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    queued = 0

    async def feed():
        nonlocal queued
        try:
            while data := await reader.read(shaper.chunk_size()):
                queued += len(data)
                queue.put_nowait((shaper.schedule(len(data), loop.time()), data))
                # Read ahead of the link only as far as a router queue would hold; TCP does the rest.
                while (ahead := shaper.backlog(loop.time()) - MAX_BACKLOG) > 0 or queued > MAX_QUEUED_BYTES:
                    await asyncio.sleep(max(ahead, 0.001))
        except OSError:
            pass  # a reset: the far side gets what was read, then EOF
        finally:
            queue.put_nowait(None)  # EOF or reset: what was read still crosses, then half-close

    async def deliver():
        nonlocal queued
        while (item := await queue.get()) is not None:
            due, data = item
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
            queued -= len(data)
            shaper.bytes += len(data)
        if writer.can_write_eof():
            writer.write_eof()

    feeder = asyncio.ensure_future(feed())
    try:
        await deliver()
    finally:
        feeder.cancel()


class LinkProxy:
    """Listens on host:port and relays each connection to `target` through `link`.

    Client-to-target bytes travel the link's `up` direction (clients sit on the lower tier), unless
    `upstream=False`.
    """

    def __init__(
        self,
        link: Link,
        target: tuple[str, int] | str,
        port: int = 0,
        host: str = LOOPBACK,
        upstream: bool = True,
    ):
        self.link = link
        self.target = _split_address(target) if isinstance(target, str) else target
        self.host, self.port = host, port
        self.upstream = upstream
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> LinkProxy:
        if self.port:
            check_ports_free([self.port], self.host, what=f"link proxy {self.link.name}")
        self._server = _LOOP.run(asyncio.start_server(self._handle, self.host, self.port))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None

        async def close():
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

        with contextlib.suppress(RuntimeError):  # loop already gone at interpreter exit
            _LOOP.run(close())

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.link.connections += 1
        target_w = None
        try:
            target_r, target_w = await asyncio.open_connection(*self.target)
            for w in (client_w, target_w):
                with contextlib.suppress(OSError):  # small gRPC frames must not wait for Nagle
                    w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up, down = (self.link.up, self.link.down) if self.upstream else (self.link.down, self.link.up)
            relays = [asyncio.ensure_future(_relay(client_r, target_w, up)),
                      asyncio.ensure_future(_relay(target_r, client_w, down))]
            try:
                await asyncio.gather(*relays)
            finally:
                for relay in relays:
                    relay.cancel()
        except (OSError, asyncio.IncompleteReadError):
            pass  # a reset on either side ends the connection, as on a real link
        except asyncio.CancelledError:
            pass  # the proxy stops; ending quietly spares asyncio's stream callback a traceback
        finally:
            self.link.connections -= 1
            for w in (client_w, target_w):
                if w is not None:
                    w.close()
            self._tasks.discard(task)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad address {address!r}: expected host:port")
    return host, int(port)


# -- remote control: `aiflow link set` from another process -------------------------------------


def link_view(link: Link) -> dict:
    stats = link.stats()
    return {"config": asdict(stats.config), "bytes_up": stats.bytes_up,
            "bytes_down": stats.bytes_down, "connections": stats.connections}


class LinkControlServer:
    """A loopback JSON endpoint: GET /links, POST /links/NAME {"bandwidth_up": "5mbit", ...}."""

    def __init__(self, links: Mapping[str, Link], port: int = 0, host: str = LOOPBACK):
        self.links = links
        self.host, self.port = host, port
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LinkControlServer:
        if self.port:
            check_ports_free([self.port], self.host, what="link control")
        links = self.links

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/") != "/links":
                    return self._reply(404, {"error": f"unknown path {self.path}; use /links"})
                self._reply(200, {name: link_view(link) for name, link in links.items()})

            def do_POST(self):
                name = self.path.rstrip("/").removeprefix("/links/")
                if name not in links:
                    return self._reply(404, {"error": f"unknown link {name!r}; links: {sorted(links)}"})
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    changes = json.loads(self.rfile.read(length) or b"{}")
                    if not isinstance(changes, dict):
                        raise ValueError("body must be a JSON object of link settings")
                    links[name].set(**changes)
                except (ValueError, TypeError) as exc:
                    return self._reply(400, {"error": str(exc)})
                self._reply(200, {name: link_view(links[name])})

            def log_message(self, *args):  # keep the runtime's terminal clean
                pass

        self._httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, name="aiflow-link-control", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


def remote_links(url: str, name: str | None = None, timeout: float = 5.0, **changes) -> dict:
    """Read (or with `changes`, set) the links of a running runtime through its control endpoint."""
    path = f"/links/{name}" if changes else "/links"
    data = json.dumps(changes).encode() if changes else None
    request = urllib.request.Request(url + path, data=data, method="POST" if changes else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise ValueError(json.loads(exc.read() or b"{}").get("error", str(exc))) from exc
    except urllib.error.URLError as exc:
        raise ConnectionError(f"no link control at {url} ({exc.reason}); is `aiflow up` running?") from exc


# -- probing a link: throughput and round-trip time ----------------------------------------------
# A tiny TCP peer: the first byte picks the test ('S' sink: count what arrives; 'D' download: send
# the requested byte count; 'E' echo). Used by the tests, the bench, and any link probe.

_PROBE_CHUNK = 64 * 1024


class ProbeServer:
    """A loopback peer for `probe_upload`, `probe_download` and `probe_rtt` (one thread per client)."""

    def __init__(self, host: str = LOOPBACK, port: int = 0):
        self._sock = socket.create_server((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        self.uploads: list[tuple[int, float]] = []  # (bytes, receiver-measured bits/s) per sink run
        self._closed = False
        threading.Thread(target=self._accept, name="aiflow-probe", daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = conn.recv(1)
            if mode == b"S":
                nbytes, rate = _receive_rate(conn, None)
                self.uploads.append((nbytes, rate))
                conn.sendall(json.dumps([nbytes, rate]).encode())
            elif mode == b"D":
                remaining = int.from_bytes(_recv_exact(conn, 8), "big")
                block = b"\0" * _PROBE_CHUNK
                while remaining > 0:
                    conn.sendall(block[: min(remaining, _PROBE_CHUNK)])
                    remaining -= _PROBE_CHUNK
            elif mode == b"E":
                while data := conn.recv(_PROBE_CHUNK):
                    conn.sendall(data)

    def close(self) -> None:
        self._closed = True
        self._sock.close()

    def __enter__(self) -> ProbeServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        if not (chunk := conn.recv(n - len(data))):
            raise ConnectionError("probe peer closed early")
        data += chunk
    return data


def _receive_rate(conn: socket.socket, expected: int | None) -> tuple[int, float]:
    """Read until EOF (or `expected` bytes): bytes and the rate from first to last byte (bits/s).

    Timing from the first byte received leaves the link's latency out of the rate.
    """
    total, first_len, first_at, last_at = 0, 0, 0.0, 0.0
    while expected is None or total < expected:
        if not (data := conn.recv(_PROBE_CHUNK)):
            break
        last_at = time.perf_counter()
        if not total:
            first_at, first_len = last_at, len(data)
        total += len(data)
    span = last_at - first_at
    rate = (total - first_len) * 8 / span if span > 0 else float("inf")
    return total, rate


def probe_upload(address: tuple[str, int], nbytes: int) -> float:
    """Send `nbytes` to a ProbeServer (possibly through links); the rate it received, bits/s."""
    with socket.create_connection(address) as conn:
        conn.sendall(b"S")
        block = b"\0" * _PROBE_CHUNK
        for start in range(0, nbytes, _PROBE_CHUNK):
            conn.sendall(block[: min(_PROBE_CHUNK, nbytes - start)])
        conn.shutdown(socket.SHUT_WR)
        received, rate = json.loads(conn.recv(4096))
    if received != nbytes:
        raise ConnectionError(f"probe sent {nbytes} bytes but the peer received {received}")
    return rate


def probe_download(address: tuple[str, int], nbytes: int) -> float:
    """Fetch `nbytes` from a ProbeServer; the rate received here, bits/s."""
    with socket.create_connection(address) as conn:
        conn.sendall(b"D" + nbytes.to_bytes(8, "big"))
        received, rate = _receive_rate(conn, nbytes)
    if received != nbytes:
        raise ConnectionError(f"probe asked for {nbytes} bytes but received {received}")
    return rate


def probe_rtt(address: tuple[str, int], count: int = 10) -> list[float]:
    """Round-trip times (s) of one-byte pings through an echoing ProbeServer."""
    with socket.create_connection(address) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"E")
        rtts = []
        for _ in range(count):
            start = time.perf_counter()
            conn.sendall(b"p")
            _recv_exact(conn, 1)
            rtts.append(time.perf_counter() - start)
    return rtts
