"""One level-triggered reconcile of one AIFlow: read it, validate it, observe the cluster, place,
render, apply, write status. It depends only on what it reads, never on which event started it,
so running it again changes nothing.

Nothing is created before everything is validated: an invalid spec or a tier without nodes leaves
the cluster as it was and says why in status (and in an Event when that news is new).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from aiflow import GROUP, KIND, PLURAL, VERSION
from aiflow.api.catalog import ModelInfo
from aiflow.api.cluster import ClusterView
from aiflow.api.problems import INVALID_SPEC
from aiflow.api.spec import parse_flow
from aiflow.api.validate import validate_manifest
from aiflow.controller.apply import Action, NameConflict, apply_flow, list_owned
from aiflow.controller.kube import KubeApi, Resource
from aiflow.controller.observe import observe_cluster
from aiflow.controller.status import (
    READY, Observation, build_status, changed_conditions, deployments_by_stage, hop_links,
    readiness_signature, stage_states, status_patch,
)
from aiflow.planner.placement import resolve_placement
from aiflow.render.manifests import render
from aiflow.render.names import flow_selector

AIFLOWS = Resource(f"{GROUP}/{VERSION}", PLURAL)


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Result:
    """What one reconcile did; `flow` is the AIFlow as read (None when it is gone or going)."""

    flow: dict | None = None
    phase: str = ""
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    status_written: bool = False
    deployments: dict[str, tuple] = field(default_factory=dict)  # name -> readiness_signature
    stages: int = 0
    ready_stages: int = 0
    placed: bool = False  # the placement changed


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def reconcile(api: KubeApi, namespace: str, name: str, catalog: dict[str, ModelInfo] | None = None,
              cluster: ClusterView | None = None) -> Result:
    """Brings the objects and the status of AIFlow `namespace/name` in line with its spec. The
    cluster's tier nodes are listed unless `cluster` (e.g. the operator's node index) is given."""
    body = api.get(AIFLOWS.path(namespace, name))
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Result()  # deletion is garbage collection's job: never recreate or patch anything
    uid = body["metadata"].get("uid", "")
    generation = int(body["metadata"].get("generation") or 0)
    result = Result(flow=body)

    if cluster is None:
        cluster = observe_cluster(api)
    problems = validate_manifest(body, catalog, cluster)
    spec_problems = tuple(p for p in problems if p.reason == INVALID_SPEC)
    tier_problems = tuple(p for p in problems if p.reason != INVALID_SPEC)
    live = list_owned(api, namespace, flow_selector(name))

    flow = placement = None
    conflict = ""
    if not spec_problems:
        flow = parse_flow(body, namespace)
    if flow is not None and not tier_problems:
        placement = resolve_placement(flow, cluster)
        try:
            result.actions, live = apply_flow(api, render(flow, placement), live, uid)
        except NameConflict as exc:
            conflict = str(exc)
    obs = Observation(
        generation=generation,
        spec_problems=spec_problems,
        tier_problems=tier_problems,
        conflict=conflict,
        stages=stage_states(flow, placement, deployments_by_stage(live)) if flow else (),
        placement=placement,
        links=hop_links(flow, placement) if placement else (),
    )
    old = body.get("status") or {}
    new = build_status(flow, obs, old, _now())
    result.phase = new["phase"]
    patch = status_patch(new, old)
    if patch is not None:
        api.patch(AIFLOWS.path(namespace, name, "status"), patch)
        result.status_written = True
    result.events = decisions(result.actions, new, old)
    result.deployments = {n: readiness_signature(o) for (k, n), o in live.items() if k == "Deployment"}
    result.stages, result.ready_stages = len(obs.stages), sum(s.ready for s in obs.stages)
    result.placed = bool(new.get("placement")) and new.get("placement") != old.get("placement")
    return result


def decisions(actions: list[Action], new: dict, old: dict) -> list[Event]:
    """The Events a user should see in `kubectl describe af`: placements, objects created, updated
    or deleted, and every condition that changed."""
    events = []
    placed = ""
    if new.get("placement") and new.get("placement") != old.get("placement"):
        reasons = "; ".join(f"{s['name']}: {s.get('tierReason', '')}" for s in new.get("stages", ()))
        placed = f"placed {new['placement']} ({reasons})"
    for verb in ("Created", "Updated", "Deleted"):  # one Event per verb, not per object
        done = [a for a in actions if a.verb == verb]
        if done:
            parts = ([placed] if placed else []) + [str(a) for a in done]
            events.append(Event("Normal", verb, "; ".join(parts)))
            placed = ""
    if placed:
        events.insert(0, Event("Normal", "Placed", placed))
    before = {c.get("type"): c.get("status") for c in old.get("conditions") or ()}
    for c in changed_conditions(new, old):
        kind, status, reason, message = c["type"], c["status"], c["reason"], c["message"]
        if kind == READY:
            if status == "True":
                events.append(Event("Normal", "FlowReady", message))
            elif reason == "NameConflict" or (reason == "StagesNotReady" and before.get(READY) == "True"):
                events.append(Event("Warning", reason, message))
        elif status == "False":
            events.append(Event("Warning", reason, message))
        elif status == "True" and before.get(kind) == "False":
            events.append(Event("Normal", reason, message))
    return events


def object_reference(body: dict) -> dict:
    """The AIFlow as an Event's involvedObject."""
    meta = body["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": meta["name"], "namespace": meta.get("namespace"), "uid": meta.get("uid")},
    }
