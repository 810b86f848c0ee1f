"""The kopf handlers: thin, all calling the one `reconcile`.

Create, update and resume of an AIFlow, a periodic resync timer (a backstop for what no event
announces), every change of a Deployment the operator owns (readiness, a hand edit), a change of a
Service it owns that it did not make (a hand edit, a deletion), and a node joining, leaving or
changing tier or readiness all queue a reconcile of the flows concerned.

The watches of Deployments, Services and Nodes are filtered by the API server (label selectors, in
`configure`): the operator receives only the objects it owns and the nodes of a tier, not every
Deployment and Node of the cluster. Reconciles of one flow
never overlap, and a burst of triggers while one runs collapses into a single follow-up run, which
reads the latest state anyway.

The rescheduler's timer ticks every AIFLOW_RESCHEDULE_TICK_SECONDS (default 5) for every flow and
acts when the flow's `spec.rescheduling.intervalSeconds` have passed since its last turn: it reads
the nodes' load (metrics.k8s.io) and the first stage's Triton metrics, then runs the same reconcile
as the rescheduler's turn (`Tick`), which re-plans and may start a move.

Deletion is left to Kubernetes garbage collection through ownerReferences: there is no deletion
handler, and reconcile leaves a flow that is being deleted alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import kopf
import urllib3
from kubernetes.client.exceptions import ApiException

from aiflow import GROUP, KIND, PLURAL, TIER_LABEL, VERSION
from aiflow.api.cluster import node_info
from aiflow.controller import metrics, rescheduler
from aiflow.controller.kube import ApiError, KubeApi
from aiflow.controller.observe import NodeRecord, node_record, node_utilisation, read_link_measurements
from aiflow.controller.reconcile import Load, Result, Tick, object_reference, reconcile
from aiflow.controller.revisions import stage_service
from aiflow.controller.stage_metrics import StageMetricsError, StageSample, metrics_url, read_stage_metrics, stage_times
from aiflow.controller.status import INVALID, UNSCHEDULABLE, readiness_signature
from aiflow.render.names import MANAGED_BY, MANAGED_BY_LABEL

OWNED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"  # the Deployments and Services the operator owns
# Server-side filters of the operator's watches (and of kopf's initial lists).
WATCH_SELECTORS = {("apps", "v1", "deployments"): OWNED_SELECTOR, ("", "v1", "services"): OWNED_SELECTOR,
                   ("", "v1", "nodes"): TIER_LABEL}

RESYNC_SECONDS = float(os.environ.get("AIFLOW_RESYNC_SECONDS", "30"))
RETRY_SECONDS = 10.0
RESCHEDULE_TICK_SECONDS = float(os.environ.get("AIFLOW_RESCHEDULE_TICK_SECONDS", "5"))
# Node load older than this is read again before a reconcile uses it.
LOAD_MAX_AGE_SECONDS = 15.0
# The namespace of the link probes' measurement ConfigMaps (the chart's release namespace); unset: none.
LINK_NAMESPACE_ENV = "AIFLOW_LINK_NAMESPACE"
# "0" turns off reading the stages' Triton metrics (e.g. an operator outside the cluster network).
STAGE_METRICS_ENV = "AIFLOW_STAGE_METRICS"
# The replicas of a flow's stages become ready in bursts: one status update per burst is enough.
READINESS_DEBOUNCE = 0.5
EVENT_MESSAGE_LIMIT = 1000
# API errors and lost connections: worth retrying later, never a reason to give up on a flow.
TRANSIENT = (ApiError, ApiException, urllib3.exceptions.HTTPError, OSError)


class FlowQueue:
    """Serialises reconciles per flow and collapses bursts of triggers; remembers the flows it has
    seen and the tier nodes, so that a node joining or leaving a tier re-checks every flow."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._pending: set[tuple[str, str]] = set()
        self.flows: set[tuple[str, str]] = set()
        self._nodes: dict[str, tuple] = {}
        self._deployments: dict[tuple[str, str], tuple] = {}  # readiness as last seen
        self._services: dict[tuple[str, str], str] = {}  # resourceVersion as the operator last left it
        self._ticks: dict[tuple[str, str], Tick] = {}  # rescheduler turns that joined a queued run
        self.last_tick: dict[tuple[str, str], float] = {}
        self.stage_samples: dict[tuple[str, str], dict[str, StageSample]] = {}  # per flow, per stage Service
        self.load = Load()
        self._load_at: float | None = None
        self._load_lock = asyncio.Lock()
        self._follow_ups: set[tuple[str, str]] = set()  # flows with a follow-up reconcile waiting
        self._tasks: set[asyncio.Task] = set()

    async def node_load(self, api: KubeApi, nodes: list[NodeRecord], max_age: float = LOAD_MAX_AGE_SECONDS) -> Load:
        """The nodes' CPU utilisation and the link probes' measurements (when `AIFLOW_LINK_NAMESPACE`
        names where they are), read again when older than `max_age` seconds."""
        async with self._load_lock:
            if self._load_at is None or time.monotonic() - self._load_at >= max_age:
                utilisation, notes = await asyncio.to_thread(node_utilisation, api, nodes)
                links, link_notes = (), ()
                if namespace := os.environ.get(LINK_NAMESPACE_ENV):
                    links, link_notes = await asyncio.to_thread(read_link_measurements, api, namespace)
                self.load, self._load_at = Load(utilisation, notes + link_notes, links), time.monotonic()
        return self.load

    def deployment_changed(self, namespace: str, name: str, signature: tuple | None) -> bool:
        """Records a Deployment's readiness signature; True when it differs from the last one seen
        (the operator's own writes are seen through reconcile's results, so they do not count)."""
        key = (namespace, name)
        before = self._deployments.get(key)
        if signature is None:
            self._deployments.pop(key, None)
        else:
            self._deployments[key] = signature
        return before != signature or signature is None

    def service_changed(self, namespace: str, name: str, version: str | None) -> bool:
        """Records a Service's resourceVersion; True when it is not the one the operator's own last
        write (or read) left, i.e. someone else changed or deleted it."""
        key = (namespace, name)
        before = self._services.pop(key, None) if version is None else self._services.get(key)
        if version is not None:
            self._services[key] = version
        return before != version

    def node_changed(self, name: str, state: tuple | None) -> bool:
        """Records a node's (tier, usable) state; True when it differs from the last one seen."""
        before = self._nodes.get(name)
        if state is None:
            self._nodes.pop(name, None)
        else:
            self._nodes[name] = state
        return before != state

    async def reconcile(self, api: KubeApi, namespace: str, name: str, logger: logging.Logger,
                        tier_nodes: kopf.Index | None = None, delay: float = 0.0,
                        tick: Tick | None = None) -> Result | None:
        """Runs reconcile for the flow after `delay` seconds (triggers during the delay join this
        run), unless a run is already queued (a rescheduler `tick` then joins that run)."""
        key = (namespace, name)
        if key in self._pending:
            if tick is not None:
                self._ticks[key] = tick
            return None  # a run is queued and has not started: it will read the latest state
        self._pending.add(key)
        if delay:
            await asyncio.sleep(delay)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            self._pending.discard(key)
            tick = self._ticks.pop(key, tick)
            nodes = None if tier_nodes is None else nodes_of(tier_nodes)
            try:
                load = await self.node_load(api, nodes, 0.0 if tick else LOAD_MAX_AGE_SECONDS) if nodes is not None else None
                with metrics.reconciling() as outcome:
                    result = await asyncio.to_thread(reconcile, api, namespace, name, None, None, nodes, load, tick)
                    if result.phase in (INVALID, UNSCHEDULABLE):
                        outcome.result = "invalid"
            except BaseException:
                if tick is not None:
                    self.last_tick.pop(key, None)  # the turn did not happen: the next tick retries
                raise
        if result.flow is None:
            self._locks.pop(key, None)
            self.flows.discard(key)
            for table in (self.last_tick, self.stage_samples):
                table.pop(key, None)
            metrics.forget_flow(namespace, name)
            return result
        self.flows.add(key)
        metrics.set_flow_state(namespace, name, stages=result.stages, ready_stages=result.ready_stages,
                               predicted_latency_s=result.predicted_latency_s)
        for link in result.links:
            if link.source in metrics.LINK_SOURCES:  # the planner's defaults and compositions are no news
                metrics.set_link(link.src, link.dst, bandwidth_bps=link.bandwidth_mbps * 1e6 / 8,
                                 rtt_s=link.rtt_ms / 1e3, source=link.source)
        record_step(result.step)
        if result.placed:
            metrics.record_plan_decision("placed")
        self._deployments.update({(namespace, n): sig for n, sig in result.deployments.items()})
        self._services.update({(namespace, n): version for n, version in result.services.items()})
        for event in result.events:
            kopf.event(object_reference(result.flow), type=event.type, reason=event.reason,
                       message=event.message[:EVENT_MESSAGE_LIMIT])
        if result.requeue_s is not None:  # a move's switch or drain: no event says when it is over
            self._follow_up(api, namespace, name, logger, tier_nodes, result.requeue_s)
        if result.actions or result.status_written:
            logger.info("%s/%s %s: %s", namespace, name, result.phase,
                        "; ".join(map(str, result.actions)) or "status updated")
        return result


    def _follow_up(self, api: KubeApi, namespace: str, name: str, logger: logging.Logger,
                   tier_nodes, after_s: float) -> None:
        """Reconcile the flow again in `after_s` seconds (once: a follow-up already waiting stays)."""
        key = (namespace, name)
        if key in self._follow_ups:
            return

        async def later() -> None:
            try:
                await asyncio.sleep(after_s)
                self._follow_ups.discard(key)
                await self.reconcile(api, namespace, name, logger, tier_nodes)
            except TRANSIENT as exc:  # the resync timer retries
                logger.warning("follow-up reconcile of %s/%s failed: %s", namespace, name, exc)

        self._follow_ups.add(key)
        task = asyncio.get_running_loop().create_task(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def record_step(step) -> None:
    """The rescheduler's decisions and moves as operator metrics."""
    if step is None:
        return
    decision = step.decision.decision if step.decision else None
    if decision in (rescheduler.MIGRATING, rescheduler.FAILOVER):
        metrics.record_plan_decision("migrated")
    elif decision == rescheduler.REJECTED:
        metrics.record_plan_decision("rejected")
    elif decision == rescheduler.KEPT:
        metrics.record_plan_decision("kept")
    if step.started:
        metrics.record_migration("started")
    if step.completed is not None:
        metrics.record_migration("completed")
    if step.abandoned is not None:
        metrics.record_migration("failed")


@kopf.index("", "v1", "nodes", labels={TIER_LABEL: kopf.PRESENT})
def tier_nodes(body, **_) -> dict[str, NodeRecord] | None:
    """Nodes by tier (with their speed and link measurements), kept current by kopf's watch:
    reconcile reads the cluster from here instead of listing nodes every time (kopf fills indexes
    before it calls any other handler)."""
    record = node_record(body)
    return {record.info.tier: record} if record else None


def nodes_of(index: kopf.Index) -> list[NodeRecord]:
    return sorted((n for tier in index for n in index[tier]), key=lambda n: (n.info.tier, n.info.name))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    """Operator settings; the API client (tests may hand one in through the memo)."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.INFO
    settings.posting.loggers = False  # only the decisions reconcile reports become Events
    for resource, selector in WATCH_SELECTORS.items():
        settings.watching.label_selectors[resource] = selector
    if getattr(memo, "api", None) is None:
        memo.api = KubeApi.from_environment()
    memo.queue = FlowQueue()
    memo.metrics_server = metrics.start_metrics_server_from_env()


@kopf.on.cleanup()
def stop_metrics(memo: kopf.Memo, **_) -> None:
    if getattr(memo, "metrics_server", None) is not None:
        memo.metrics_server.shutdown()


async def _reconcile_or_retry(namespace: str, name: str, memo: kopf.Memo, logger, tier_nodes) -> None:
    try:
        await memo.queue.reconcile(memo.api, namespace, name, logger, tier_nodes)
    except TRANSIENT as exc:
        raise kopf.TemporaryError(f"reconcile failed, retrying: {exc}", delay=RETRY_SECONDS) from exc


@kopf.on.resume(GROUP, VERSION, PLURAL)
async def flow_resumed(namespace, name, memo, logger, tier_nodes, **_):
    await _reconcile_or_retry(namespace, name, memo, logger, tier_nodes)


@kopf.on.create(GROUP, VERSION, PLURAL)
async def flow_created(namespace, name, memo, logger, tier_nodes, **_):
    await _reconcile_or_retry(namespace, name, memo, logger, tier_nodes)


@kopf.on.update(GROUP, VERSION, PLURAL)
async def flow_updated(namespace, name, memo, logger, tier_nodes, **_):
    await _reconcile_or_retry(namespace, name, memo, logger, tier_nodes)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
async def flow_resync(namespace, name, memo, logger, tier_nodes, **_):
    try:
        await memo.queue.reconcile(memo.api, namespace, name, logger, tier_nodes)
    except TRANSIENT as exc:  # the next tick retries; no retry storm
        logger.warning("resync of %s/%s failed: %s", namespace, name, exc)


def read_stages(spec: dict, status: dict, namespace: str, name: str,
                previous: dict[str, StageSample]) -> tuple[dict[str, StageSample], Tick]:
    """Reads every stage's Triton metrics through the serving revision's Services: the samples by
    Service, and a Tick (time, the first stage's request time as the measured latency, per-stage
    times). A Service sends each reading to one of its pods: with several replicas the times are that
    pod's (a pod whose counters differ from the last reading counts from its start)."""
    now = time.time()
    stages = [s for s in spec.get("stages") or () if isinstance(s, dict) and s.get("name") and s.get("model")]
    if os.environ.get(STAGE_METRICS_ENV, "1") == "0":
        return {}, Tick(now, latency_source=f"not read ({STAGE_METRICS_ENV}=0)")
    if not stages:
        return {}, Tick(now, latency_source="not read: the flow has no stages")
    revision = int(((status or {}).get("plan") or {}).get("revision") or 1)
    samples, times, failed = {}, [], []
    first_read = False
    for i, stage in enumerate(stages):
        host = f"{stage_service(name, stages[0]['name'], stage['name'], revision)}.{namespace}.svc"
        try:
            samples[host] = sample = read_stage_metrics(metrics_url(host), stage["model"])
        except StageMetricsError as exc:
            failed.append(f"{stage['name']}: {exc}")
            continue
        first_read = first_read or i == 0
        measured = stage_times(previous.get(host), sample)
        if measured is not None:
            times.append((stage["name"], measured))
    first = dict(times).get(stages[0]["name"])
    if first is not None:
        source = f"Triton metrics of stage {stages[0]['name']} (request time, later stages included)"
    elif first_read:
        source = f"Triton metrics of stage {stages[0]['name']}: no request completed since the last reading"
    else:
        source = "unavailable: " + failed[0]
    if failed and first_read:
        source += f"; not read: {'; '.join(failed)}"
    return samples, Tick(now, first.request_ms if first else None, source, tuple(times))


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESCHEDULE_TICK_SECONDS, initial_delay=RESCHEDULE_TICK_SECONDS)
async def flow_reschedule(spec, status, namespace, name, memo, logger, tier_nodes, **_):
    """The rescheduler's turn for a flow whose interval has come round (and rescheduling is enabled)."""
    rescheduling = spec.get("rescheduling") or {}
    key = (namespace, name)
    now = time.time()
    if not rescheduling.get("enabled") or key not in memo.queue.flows:
        return
    if not rescheduler.due(memo.queue.last_tick.get(key), float(rescheduling.get("intervalSeconds") or 60), now):
        return
    memo.queue.last_tick[key] = now
    samples, tick = await asyncio.to_thread(read_stages, dict(spec), dict(status or {}), namespace, name,
                                            memo.queue.stage_samples.get(key, {}))
    memo.queue.stage_samples[key] = samples
    try:
        await memo.queue.reconcile(memo.api, namespace, name, logger, tier_nodes,
                                   tick=tick)
    except TRANSIENT as exc:  # the next tick retries
        logger.warning("rescheduling of %s/%s failed: %s", namespace, name, exc)


async def _reconcile_owner(body, namespace, memo, logger, tier_nodes) -> None:
    for ref in body.get("metadata", {}).get("ownerReferences") or ():
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/") and ref.get("controller"):
            try:
                await memo.queue.reconcile(memo.api, namespace, ref["name"], logger, tier_nodes, READINESS_DEBOUNCE)
            except TRANSIENT as exc:  # the timer retries
                logger.warning("reconcile of %s/%s failed: %s", namespace, ref["name"], exc)


@kopf.on.event("apps", "v1", "deployments", labels={MANAGED_BY_LABEL: MANAGED_BY})
async def owned_deployment_changed(body, event, namespace, memo, logger, tier_nodes, **_):
    gone = event.get("type") == "DELETED"
    signature = None if gone else readiness_signature(body)
    if memo.queue.deployment_changed(namespace, body["metadata"]["name"], signature):
        await _reconcile_owner(body, namespace, memo, logger, tier_nodes)


@kopf.on.event("", "v1", "services", labels={MANAGED_BY_LABEL: MANAGED_BY})
async def owned_service_changed(body, event, namespace, memo, logger, tier_nodes, **_):
    """A Service of a flow changed or went, and not by the operator's hand: put it back at once."""
    version = None if event.get("type") == "DELETED" else body["metadata"].get("resourceVersion")
    if memo.queue.service_changed(namespace, body["metadata"]["name"], version):
        await _reconcile_owner(body, namespace, memo, logger, tier_nodes)


@kopf.on.event("", "v1", "nodes", labels={TIER_LABEL: kopf.PRESENT})
async def node_changed(body, event, memo, logger, tier_nodes, **_):
    """A node joined, left or changed tier or readiness: re-check every flow (a tier without nodes
    heals at once, not at the next resync)."""
    info = node_info(body)
    state = None if event.get("type") == "DELETED" or info is None else (info.tier, info.usable)
    if not memo.queue.node_changed(body["metadata"]["name"], state):
        return
    flows = sorted(memo.queue.flows)
    results = await asyncio.gather(
        *(memo.queue.reconcile(memo.api, ns, name, logger, tier_nodes) for ns, name in flows), return_exceptions=True)
    for (ns, name), outcome in zip(flows, results):
        if isinstance(outcome, BaseException):
            logger.warning("reconcile of %s/%s after a node change failed: %s", ns, name, outcome)
