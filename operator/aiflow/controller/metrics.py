"""The operator's Prometheus metrics, and the HTTP server that exposes them.

Names follow the Prometheus conventions: an `aiflow_` prefix, base units (seconds, bytes), `_total` on
counters. Label values are closed sets (checked here) or a flow's namespace and name, whose series are
dropped when the flow is deleted, so cardinality stays bounded. The handlers call the small functions
below; they never touch the metric objects.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from aiflow import TIERS, __version__

# The port the operator serves /metrics on (the chart sets it); unset, empty or 0: no server.
METRICS_PORT_ENV = "AIFLOW_METRICS_PORT"

# Closed sets of label values.
RECONCILE_RESULTS = ("success", "invalid", "error")
PLAN_DECISIONS = ("placed", "kept", "migrated", "rejected")
MIGRATION_OUTCOMES = ("started", "completed", "failed")
LINK_SOURCES = ("measured", "declared")

BUILD_INFO = Info("aiflow_operator_build", "Version of the running aiflow operator.")
BUILD_INFO.info({"version": __version__})

RECONCILES = Counter(
    "aiflow_reconciles",
    "Reconciliations of AIFlows, by result: success, invalid (the spec cannot work; see the flow's "
    "conditions) or error (will be retried).",
    ["result"],
)
RECONCILE_ERRORS = Counter(
    "aiflow_reconcile_errors",
    "Reconciliations that failed with an exception, by exception type.",
    ["error"],
)
RECONCILE_DURATION = Histogram(
    "aiflow_reconcile_duration_seconds",
    "Time one reconciliation of an AIFlow takes.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
PLAN_DECISIONS_TOTAL = Counter(
    "aiflow_plan_decisions",
    "Placement decisions: placed (first plan), kept (no better plan), migrated (a better plan was "
    "applied), rejected (a better plan fell short of the minimum improvement or the cooldown).",
    ["decision"],
)
MIGRATIONS = Counter(
    "aiflow_migrations",
    "Make-before-break migrations of a flow to a new plan, by outcome.",
    ["outcome"],
)
FLOW_PREDICTED_LATENCY = Gauge(
    "aiflow_flow_predicted_latency_seconds",
    "End-to-end latency the current plan of a flow predicts for one request.",
    ["namespace", "flow"],
)
FLOW_STAGES = Gauge("aiflow_flow_stages", "Stages of a flow.", ["namespace", "flow"])
FLOW_READY_STAGES = Gauge(
    "aiflow_flow_ready_stages", "Stages of a flow whose Deployment reports ready.", ["namespace", "flow"]
)
LINK_BANDWIDTH = Gauge(
    "aiflow_link_bandwidth_bytes_per_second",
    "Bandwidth between two tiers the planner uses, measured by the link probe or declared in a flow.",
    ["from_tier", "to_tier", "source"],
)
LINK_RTT = Gauge(
    "aiflow_link_rtt_seconds",
    "Round-trip time between two tiers the planner uses, measured or declared.",
    ["from_tier", "to_tier", "source"],
)

_FLOW_GAUGES = (FLOW_PREDICTED_LATENCY, FLOW_STAGES, FLOW_READY_STAGES)


def _check(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")
    return value


@dataclass
class Reconcile:
    """The outcome of one reconciliation; set `result = "invalid"` when the spec cannot work."""

    result: str = "success"


@contextmanager
def reconciling() -> Iterator[Reconcile]:
    """Time one reconciliation and count it: success, what the body set, or error if it raised."""
    outcome = Reconcile()
    start = time.perf_counter()
    try:
        yield outcome
    except BaseException as exc:
        RECONCILES.labels(result="error").inc()
        RECONCILE_ERRORS.labels(error=type(exc).__name__).inc()
        raise
    else:
        RECONCILES.labels(result=_check(outcome.result, RECONCILE_RESULTS, "reconcile result")).inc()
    finally:
        RECONCILE_DURATION.observe(time.perf_counter() - start)


def record_plan_decision(decision: str) -> None:
    """Count one decision of the planner or the rescheduler (see PLAN_DECISIONS)."""
    PLAN_DECISIONS_TOTAL.labels(decision=_check(decision, PLAN_DECISIONS, "plan decision")).inc()


def record_migration(outcome: str) -> None:
    """Count a migration starting, completing or failing (see MIGRATION_OUTCOMES)."""
    MIGRATIONS.labels(outcome=_check(outcome, MIGRATION_OUTCOMES, "migration outcome")).inc()


def set_flow_state(
    namespace: str,
    flow: str,
    *,
    stages: int | None = None,
    ready_stages: int | None = None,
    predicted_latency_s: float | None = None,
) -> None:
    """Publish what a flow looks like after a reconciliation; None leaves a value as it was."""
    if stages is not None:
        FLOW_STAGES.labels(namespace=namespace, flow=flow).set(stages)
    if ready_stages is not None:
        FLOW_READY_STAGES.labels(namespace=namespace, flow=flow).set(ready_stages)
    if predicted_latency_s is not None:
        FLOW_PREDICTED_LATENCY.labels(namespace=namespace, flow=flow).set(predicted_latency_s)


def forget_flow(namespace: str, flow: str) -> None:
    """Drop a deleted flow's series, so they do not linger with their last value."""
    for gauge in _FLOW_GAUGES:
        try:
            gauge.remove(namespace, flow)
        except KeyError:
            pass


def set_link(from_tier: str, to_tier: str, *, bandwidth_bps: float, rtt_s: float, source: str) -> None:
    """Publish the bandwidth (bytes per second) and RTT the planner uses between two tiers."""
    _check(from_tier, TIERS, "tier")
    _check(to_tier, TIERS, "tier")
    labels = {"from_tier": from_tier, "to_tier": to_tier, "source": _check(source, LINK_SOURCES, "link source")}
    LINK_BANDWIDTH.labels(**labels).set(bandwidth_bps)
    LINK_RTT.labels(**labels).set(rtt_s)


def start_metrics_server(port: int, addr: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY):
    """Serve /metrics on `addr:port` (0: any free port) from a daemon thread; returns the server
    (`server_port` says where, `shutdown()` stops it). A port in use raises OSError naming the port."""
    if not 0 <= port < 65536:
        raise ValueError(f"metrics port must be between 0 and 65535, not {port}")
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on {addr}:{port}: {exc.strerror}") from exc
    return server


def start_metrics_server_from_env(environ: Mapping[str, str] = os.environ):
    """Start the metrics server on $AIFLOW_METRICS_PORT, as the chart configures it; None when unset.

    Called once from the operator's startup handler.
    """
    raw = environ.get(METRICS_PORT_ENV, "").strip()
    if raw in ("", "0"):
        return None
    if not raw.isdigit():
        raise ValueError(f"{METRICS_PORT_ENV} must be a port number, not {raw!r}")
    return start_metrics_server(int(raw))
