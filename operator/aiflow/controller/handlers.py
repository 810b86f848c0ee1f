"""The kopf handlers: thin, all calling the one `reconcile`.

Create, update and resume of an AIFlow, a periodic resync timer (a backstop for what no event
announces), every change of a Deployment the operator owns (readiness), and a node joining, leaving
or changing tier or readiness all queue a reconcile of the flows concerned. Reconciles of one flow
never overlap, and a burst of triggers while one runs collapses into a single follow-up run, which
reads the latest state anyway.

Deletion is left to Kubernetes garbage collection through ownerReferences: there is no deletion
handler, and reconcile leaves a flow that is being deleted alone.
"""

from __future__ import annotations

import asyncio
import logging
import os

import kopf
import urllib3
from kubernetes.client.exceptions import ApiException

from aiflow import GROUP, KIND, PLURAL, VERSION
from aiflow.api.cluster import ClusterView, NodeInfo, node_info
from aiflow.controller import metrics
from aiflow.controller.kube import ApiError, KubeApi
from aiflow.controller.reconcile import Result, object_reference, reconcile
from aiflow.controller.status import INVALID, UNSCHEDULABLE, readiness_signature
from aiflow.render.names import MANAGED_BY, MANAGED_BY_LABEL

RESYNC_SECONDS = float(os.environ.get("AIFLOW_RESYNC_SECONDS", "30"))
RETRY_SECONDS = 10.0
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

    def node_changed(self, name: str, state: tuple | None) -> bool:
        """Records a node's (tier, usable) state; True when it differs from the last one seen."""
        before = self._nodes.get(name)
        if state is None:
            self._nodes.pop(name, None)
        else:
            self._nodes[name] = state
        return before != state

    async def reconcile(self, api: KubeApi, namespace: str, name: str, logger: logging.Logger,
                        tier_nodes: kopf.Index | None = None, delay: float = 0.0) -> Result | None:
        """Runs reconcile for the flow after `delay` seconds (triggers during the delay join this
        run), unless a run is already queued."""
        key = (namespace, name)
        if key in self._pending:
            return None  # a run is queued and has not started: it will read the latest state
        self._pending.add(key)
        if delay:
            await asyncio.sleep(delay)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            self._pending.discard(key)
            cluster = None if tier_nodes is None else cluster_of(tier_nodes)
            with metrics.reconciling() as outcome:
                result = await asyncio.to_thread(reconcile, api, namespace, name, None, cluster)
                if result.phase in (INVALID, UNSCHEDULABLE):
                    outcome.result = "invalid"
        if result.flow is None:
            self._locks.pop(key, None)
            self.flows.discard(key)
            metrics.forget_flow(namespace, name)
            return result
        self.flows.add(key)
        metrics.set_flow_state(namespace, name, stages=result.stages, ready_stages=result.ready_stages)
        if result.placed:
            metrics.record_plan_decision("placed")
        self._deployments.update({(namespace, n): sig for n, sig in result.deployments.items()})
        for event in result.events:
            kopf.event(object_reference(result.flow), type=event.type, reason=event.reason,
                       message=event.message[:EVENT_MESSAGE_LIMIT])
        if result.actions or result.status_written:
            logger.info("%s/%s %s: %s", namespace, name, result.phase,
                        "; ".join(map(str, result.actions)) or "status updated")
        return result


@kopf.index("", "v1", "nodes")
def tier_nodes(body, **_) -> dict[str, NodeInfo] | None:
    """Nodes by tier, kept current by kopf's watch: reconcile reads the cluster from here instead
    of listing nodes every time (kopf fills indexes before it calls any other handler)."""
    info = node_info(body)
    return {info.tier: info} if info else None


def cluster_of(index: kopf.Index) -> ClusterView:
    return ClusterView(tuple(sorted((n for tier in index for n in index[tier]), key=lambda n: (n.tier, n.name))))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    """Operator settings; the API client (tests may hand one in through the memo)."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.INFO
    settings.posting.loggers = False  # only the decisions reconcile reports become Events
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


@kopf.on.event("apps", "v1", "deployments", labels={MANAGED_BY_LABEL: MANAGED_BY})
async def owned_deployment_changed(body, event, namespace, memo, logger, tier_nodes, **_):
    gone = event.get("type") == "DELETED"
    signature = None if gone else readiness_signature(body)
    if not memo.queue.deployment_changed(namespace, body["metadata"]["name"], signature):
        return
    for ref in body.get("metadata", {}).get("ownerReferences") or ():
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/") and ref.get("controller"):
            try:
                await memo.queue.reconcile(memo.api, namespace, ref["name"], logger, tier_nodes, READINESS_DEBOUNCE)
            except TRANSIENT as exc:  # the timer retries
                logger.warning("reconcile of %s/%s failed: %s", namespace, ref["name"], exc)


@kopf.on.event("", "v1", "nodes")
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
