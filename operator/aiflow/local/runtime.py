"""The process layer of `aiflow up`: one real tritonserver per tier, emulated links between them.

Traffic into a higher tier crosses the links on the way: a stage on the device reaches the edge
through the device->edge link, and the cloud through both links in series. Each tier's slowness is a
declared compute factor handed to its stages as `AIFLOW_COMPUTE_FACTOR`. A state file lets other
processes (`aiflow caption`, `aiflow link set`) find the running runtime.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from aiflow import TIERS
from aiflow.local.links import Link, LinkConfig, LinkControlServer, LinkProxy, remote_links
from aiflow.local.tritonserver import (
    DEFAULT_STARTUP_TIMEOUT,
    LOOPBACK,
    TritonError,
    TritonPorts,
    TritonServer,
    check_ports_free,
    free_ports,
)

STATE_FILE = "state.json"
PORTS_PER_TIER = 3  # http, grpc, metrics


class RuntimeNotRunning(TritonError):
    """No `aiflow up` is running (or its state file is stale)."""


# -- the pure part: tiers, links, routes, ports --------------------------------------------------


def link_key(key: tuple[str, str] | str) -> tuple[str, str]:
    """('device', 'edge') or 'device->edge' -> ('device', 'edge')."""
    if isinstance(key, str):
        low, sep, high = key.partition("->")
        if not sep:
            raise ValueError(f"bad link {key!r}: write it as LOWER->HIGHER, e.g. device->edge")
        key = (low.strip(), high.strip())
    return tuple(key)


def link_name(key: tuple[str, str]) -> str:
    return f"{key[0]}->{key[1]}"


def check_tiers(tiers: Iterable[str]) -> tuple[str, ...]:
    tiers = tuple(tiers)
    unknown = [t for t in tiers if t not in TIERS]
    if not tiers or unknown or len(set(tiers)) != len(tiers):
        raise ValueError(f"bad tiers {list(tiers)}: choose distinct tiers among {list(TIERS)}")
    return tuple(t for t in TIERS if t in tiers)  # always ordered device -> cloud


def tier_links(tiers: tuple[str, ...]) -> list[tuple[str, str]]:
    """The links between consecutive tiers, lower first."""
    return list(zip(tiers, tiers[1:]))


def routes(tiers: tuple[str, ...]) -> list[tuple[str, str]]:
    """Every (from, to) pair with `to` above `from`: each gets a proxy path through the links."""
    return [(a, b) for i, a in enumerate(tiers) for b in tiers[i + 1 :]]


def route_links(tiers: tuple[str, ...], src: str, dst: str) -> list[tuple[str, str]]:
    """The links a connection from `src` to `dst` crosses, in order."""
    i, j = tiers.index(src), tiers.index(dst)
    if j <= i:
        raise ValueError(f"no route from {src} to {dst}: connections go from a lower tier to a higher one")
    return tier_links(tiers)[i:j]


@dataclass(frozen=True)
class PortPlan:
    """Every port of a runtime: triton ports per tier, one proxy port per route, the link control."""

    tiers: dict[str, TritonPorts]
    routes: dict[str, int]  # "device->cloud" -> proxy port
    control: int

    def all_ports(self) -> list[int]:
        ports = [p for tp in self.tiers.values() for p in tp.as_list()]
        return ports + list(self.routes.values()) + [self.control]


def plan_ports(tiers: tuple[str, ...], base_port: int | None, host: str = LOOPBACK) -> PortPlan:
    """Consecutive ports from `base_port` (tiers first, then routes, then control), or free ones."""
    rts = routes(tiers)
    count = PORTS_PER_TIER * len(tiers) + len(rts) + 1
    if base_port is None:
        ports = free_ports(count, host)
    else:
        if not 1024 <= base_port <= 65535 - count:
            raise ValueError(f"bad base port {base_port}: choose one in 1024..{65535 - count}")
        ports = list(range(base_port, base_port + count))
    tier_ports = {
        t: TritonPorts(*ports[PORTS_PER_TIER * i : PORTS_PER_TIER * (i + 1)], host=host)
        for i, t in enumerate(tiers)
    }
    rest = ports[PORTS_PER_TIER * len(tiers) :]
    return PortPlan(tier_ports, {link_name(r): p for r, p in zip(rts, rest)}, rest[-1])


def check_compute_factor(tier: str, factor: float) -> float:
    factor = float(factor)
    if not factor >= 1.0:
        raise ValueError(
            f"bad compute factor {factor} for {tier}: must be >= 1 (a tier can only be emulated "
            "slower than this machine; 4 means four times slower)"
        )
    return factor


# -- state file ----------------------------------------------------------------------------------


def state_dir(path: str | os.PathLike | None = None) -> Path:
    """Where a running runtime records itself: `path`, $AIFLOW_STATE_DIR, or ~/.cache/aiflow/local."""
    if path:
        return Path(path)
    if env := os.environ.get("AIFLOW_STATE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aiflow" / "local"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(path: str | os.PathLike | None = None) -> dict:
    """The state of the running `aiflow up`; RuntimeNotRunning if there is none."""
    file = state_dir(path) / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise RuntimeNotRunning(f"no local flow is running (no {file}); start one with `aiflow up`") from None
    except (OSError, ValueError) as exc:
        raise RuntimeNotRunning(f"unreadable state file {file} ({exc}); restart `aiflow up`") from exc
    if not _pid_alive(int(state.get("pid", 0))):
        raise RuntimeNotRunning(
            f"the local flow recorded in {file} (pid {state.get('pid')}) is gone; start it again with "
            "`aiflow up`"
        )
    return state


# -- the runtime ---------------------------------------------------------------------------------


class LocalRuntime:
    """One tritonserver per tier on loopback ports, emulated links between consecutive tiers.

    `links` maps ('device', 'edge') or 'device->edge' to a LinkConfig (missing = unshaped);
    `compute_factors` maps a tier to how many times slower than this machine it is; `env` maps a
    tier to extra environment for its server; `models` maps a tier to models loaded at startup;
    `cpus` pins a tier's server to some cores (e.g. a one-core device).
    """

    def __init__(
        self,
        model_repo: str | os.PathLike,
        tiers: Iterable[str] = TIERS,
        base_port: int | None = None,
        links: Mapping[tuple[str, str] | str, LinkConfig] | None = None,
        compute_factors: Mapping[str, float] | None = None,
        env: Mapping[str, Mapping[str, str]] | None = None,
        models: Mapping[str, Iterable[str]] | None = None,
        cpus: Mapping[str, Iterable[int]] | None = None,
        state_path: str | os.PathLike | None = None,
        log_dir: str | os.PathLike | None = None,
        host: str = LOOPBACK,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    ):
        self.model_repo = Path(model_repo).resolve()
        self.tiers = check_tiers(tiers)
        self.host = host
        self.ports = plan_ports(self.tiers, base_port, host)
        self.state_dir = state_dir(state_path)
        self.log_dir = Path(log_dir) if log_dir else self.state_dir / "logs"

        self.links = self._links(links or {})
        self.compute_factors = self._compute_factors(compute_factors or {})
        extra_env, tier_models, tier_cpus = dict(env or {}), {t: list(m) for t, m in (models or {}).items()}, dict(cpus or {})
        if unknown := (set(extra_env) | set(tier_models) | set(tier_cpus)) - set(self.tiers):
            raise ValueError(f"settings for unknown tier(s) {sorted(unknown)}; tiers: {list(self.tiers)}")
        self.servers = {
            t: self._server(t, tier_models.get(t, ()), extra_env.get(t, {}), tier_cpus.get(t), startup_timeout)
            for t in self.tiers
        }
        self.proxies: dict[tuple[str, str], LinkProxy] = {}
        self.control = LinkControlServer({link.name: link for link in self.links.values()},
                                         self.ports.control, host)
        self._started = False
        self._started_at = 0.0
        self._signals: dict = {}
        self._published: dict = {}  # more the state file carries (e.g. the adaptive plan)
        self._state_lock = threading.Lock()

    def _links(self, links: Mapping[tuple[str, str] | str, LinkConfig]) -> dict[tuple[str, str], Link]:
        """One Link per pair of consecutive tiers, configured as asked (unshaped otherwise)."""
        wanted = {link_key(k): v for k, v in links.items()}
        known = tier_links(self.tiers)
        if unknown := set(wanted) - set(known):
            raise ValueError(
                f"bad link(s) {[link_name(k) for k in unknown]}: links join consecutive tiers, "
                f"here {[link_name(k) for k in known]}"
            )
        return {k: Link(link_name(k), wanted.get(k, LinkConfig())) for k in known}

    def _compute_factors(self, factors: Mapping[str, float]) -> dict[str, float]:
        if unknown := set(factors) - set(self.tiers):
            raise ValueError(f"compute factor for unknown tier(s) {sorted(unknown)}; tiers: {list(self.tiers)}")
        return {t: check_compute_factor(t, factors.get(t, 1.0)) for t in self.tiers}

    def _server(self, tier: str, models: Iterable[str], env: Mapping[str, str], cpus, startup_timeout: float) -> TritonServer:
        """The tier's tritonserver (not started): its stages learn their tier and compute factor by env."""
        return TritonServer(
            self.model_repo,
            models=models,
            ports=self.ports.tiers[tier],
            env={"AIFLOW_TIER": tier, "AIFLOW_COMPUTE_FACTOR": f"{self.compute_factors[tier]:g}", **env},
            name=f"tritonserver-{tier}",
            log_dir=self.log_dir,
            startup_timeout=startup_timeout,
            cpus=cpus,
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> LocalRuntime:
        """Start proxies and servers, wait until every server is ready, record the state file."""
        self._refuse_second_runtime()
        check_ports_free(self.ports.all_ports(), self.host, what="aiflow up")
        self._signals = install_termination_handlers()
        self._started = True
        self._started_at = time.time()
        try:
            self._start_proxies()
            self.control.start()
            for server in self.servers.values():
                server.launch()  # from this thread: servers boot side by side
            for server in self.servers.values():
                server.wait_ready()
            self._write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def _refuse_second_runtime(self) -> None:
        with contextlib.suppress(RuntimeNotRunning):
            state = read_state(self.state_dir)
            raise TritonError(
                f"a local flow is already running (pid {state['pid']}, state {self.state_dir / STATE_FILE}); "
                f"stop it first (Ctrl-C in its terminal, or `kill {state['pid']}`)"
            )

    def _start_proxies(self) -> None:
        # Start with the highest tier so a chained route can point at the proxy of the next link.
        for src, dst in sorted(routes(self.tiers), key=lambda r: -self.tiers.index(r[0])):
            first, *rest = route_links(self.tiers, src, dst)
            if rest:  # beyond the first link, continue along the route that starts one tier up
                target = (self.host, self.proxies[(first[1], dst)].port)
            else:
                target = (self.host, self.ports.tiers[dst].grpc)
            port = self.ports.routes[link_name((src, dst))]
            self.proxies[(src, dst)] = LinkProxy(self.links[first], target, port, self.host).start()

    def stop(self) -> None:
        """Stop servers (process groups, no orphans), proxies and control; remove the state file."""
        errors = []
        for server in self.servers.values():  # shut down side by side, then reap
            server.terminate()
        for server in self.servers.values():
            try:
                server.stop()
            except Exception as exc:  # keep stopping the rest
                errors.append(exc)
        for proxy in self.proxies.values():
            proxy.stop()
        self.proxies.clear()
        self.control.stop()
        restore_signal_handlers(self._signals)
        self._signals = {}
        if self._started:
            with contextlib.suppress(FileNotFoundError):
                state = json.loads((self.state_dir / STATE_FILE).read_text())
                if state.get("pid") == os.getpid():
                    (self.state_dir / STATE_FILE).unlink()
        self._started = False
        if errors:
            raise TritonError(f"errors while stopping the local flow: {errors}")

    def __enter__(self) -> LocalRuntime:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self, poll: float = 1.0) -> None:
        """Block until Ctrl-C or SIGTERM, then stop; raise if a server dies meanwhile."""
        try:
            while True:
                for tier, server in self.servers.items():
                    if not server.alive:
                        raise TritonError(
                            f"the {tier} tritonserver exited unexpectedly; log tail:\n{server.log_tail()}"
                        )
                time.sleep(poll)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    # -- addresses -------------------------------------------------------------------------------

    def address(self, tier: str) -> str:
        """gRPC host:port of a tier's server, directly (no link)."""
        return self.server(tier).grpc_url

    def address_via(self, src: str, dst: str) -> str:
        """gRPC host:port that reaches `dst` from `src` through the links between them."""
        if src == dst:
            return self.address(dst)
        self.server(src), self.server(dst)  # clear error for unknown tiers
        route_links(self.tiers, src, dst)
        return self.proxies[(src, dst)].address

    def server(self, tier: str) -> TritonServer:
        try:
            return self.servers[tier]
        except KeyError:
            raise ValueError(f"no tier {tier!r} in this runtime; tiers: {list(self.tiers)}") from None

    def link(self, key: tuple[str, str] | str) -> Link:
        try:
            return self.links[link_key(key)]
        except KeyError:
            raise ValueError(
                f"no link {key!r}; links: {[link.name for link in self.links.values()]}"
            ) from None

    # -- models ----------------------------------------------------------------------------------

    def load(
        self,
        tier: str,
        model: str,
        next_stage: tuple[str, str] | None = None,
        parameters: Mapping[str, str] | None = None,
    ) -> None:
        """Load (or re-wire) `model` on `tier`; `next_stage=(tier, model)` points it through the links.

        Per-model settings go in as config parameters named like the environment variables
        (AIFLOW_NEXT_URL, AIFLOW_NEXT_MODEL, AIFLOW_SPLIT_LAYER, ...), since one server hosts
        several models with different successors.
        """
        params = {"AIFLOW_TIER": tier, **(parameters or {})}
        if next_stage is not None:
            next_tier, next_model = next_stage
            params["AIFLOW_NEXT_URL"] = self.address_via(tier, next_tier)
            params["AIFLOW_NEXT_MODEL"] = next_model
        self.server(tier).load_model(model, parameters=params)

    def unload(self, tier: str, model: str) -> None:
        self.server(tier).unload_model(model)

    # -- reporting -------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "pid": os.getpid(),
            "started_at": self._started_at,
            "model_repo": str(self.model_repo),
            "control_url": self.control.url,
            "tiers": {
                t: {
                    "grpc": s.grpc_url,
                    "http": s.http_url,
                    "metrics": s.metrics_url,
                    "pid": s.pid,
                    "compute_factor": self.compute_factors[t],
                    "log": str(s.log_path),
                }
                for t, s in self.servers.items()
            },
            "links": {link.name: asdict(link.config) for link in self.links.values()},
            "routes": {link_name(r): p.address for r, p in self.proxies.items()},
            **self._published,
        }

    def publish(self, key: str, value) -> None:
        """Record `value` under `key` in the state file, for other processes (e.g. the adaptive plan
        `aiflow caption` follows)."""
        with self._state_lock:
            self._published[key] = value
            if self._started:
                self._write_state()

    def _write_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / f".{STATE_FILE}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(json.dumps(self.state(), indent=2))
        tmp.replace(self.state_dir / STATE_FILE)

    def describe(self) -> list[str]:
        """Human-readable lines: tiers with ports and compute factors, links with their settings."""
        lines = []
        for t, s in self.servers.items():
            factor = self.compute_factors[t]
            slow = f"compute factor {factor:g}x" + (" (emulated slower device)" if factor > 1 else "")
            lines.append(f"{t:<7} grpc {s.grpc_url}  http {s.http_url}  metrics {s.metrics_url}  {slow}")
        for link in self.links.values():
            lines.append(f"link {link.name}: {link.config.describe()}")
        for (src, dst), proxy in self.proxies.items():
            via = " -> ".join(link_name(k) for k in route_links(self.tiers, src, dst))
            lines.append(f"route {src} -> {dst}: {proxy.address} (via {via})")
        return lines


def address_via_state(state: Mapping, src: str, dst: str) -> str:
    """The same as LocalRuntime.address_via, read from a running runtime's state."""
    if src == dst:
        return state["tiers"][dst]["grpc"]
    key = link_name((src, dst))
    if key not in state["routes"]:
        raise ValueError(f"no route {key} in the running flow; routes: {sorted(state['routes'])}")
    return state["routes"][key]


def set_link(key: tuple[str, str] | str, state_path: str | os.PathLike | None = None, **changes) -> dict:
    """Change a link of the running `aiflow up` from another process (`aiflow link set`)."""
    return remote_links(read_state(state_path)["control_url"], link_name(link_key(key)), **changes)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install_termination_handlers() -> dict:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt (main thread only), so cleanup runs as on Ctrl-C.

    Returns the previous handlers for `restore_signal_handlers`.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}


def restore_signal_handlers(previous: Mapping) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def handle_termination():
    """Within the block, SIGTERM/SIGHUP raise KeyboardInterrupt (main thread), so `with` cleans up."""
    previous = install_termination_handlers()
    try:
        yield
    finally:
        restore_signal_handlers(previous)
