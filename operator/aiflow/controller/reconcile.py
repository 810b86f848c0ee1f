"""One level-triggered reconcile of one AIFlow: read it, validate it, observe the cluster, place,
render, apply, write status. It depends only on what it reads, never on which event started it,
so running it again changes nothing.

Nothing is created before everything is validated: an invalid spec or a tier without nodes leaves
the cluster as it was and says why in status (and in an Event when that news is new).

The plan the flow runs is kept in its status (and, for when status is lost, on its objects:
`recovery`), and `rescheduler.step` decides from it what runs next. A move goes through the phases
of `planner.migration`: the new revision's objects come up beside the serving ones (`revisions`);
the reconcile that sees them all Ready switches the entry Service; the one that sees the entry's
EndpointSlices list only the new revision's pods starts the drain; the first after the drain grace
deletes the old revision. The phase is kept on the entry Service (and in status.migration).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field

from aiflow import GROUP, KIND, PLURAL, VERSION
from aiflow.api.catalog import ModelInfo
from aiflow.api.cluster import ClusterView
from aiflow.api.problems import INVALID_SPEC
from aiflow.api.spec import Flow, parse_flow
from aiflow.api.validate import validate_manifest
from aiflow.controller import rescheduler
from aiflow.controller.apply import Action, NameConflict, apply_flow, list_owned
from aiflow.controller.kube import ENDPOINT_SLICES, PODS, KubeApi, Resource
from aiflow.controller.observe import NodeRecord, cluster_view, observations, observe_nodes, with_links
from aiflow.controller.recovery import (
    annotate, annotate_move, entry_service, recorded_move, recovered_plans, stamp_up,
)
from aiflow.controller.rescheduler import DecisionRecord, PlanRecord, Step, parse_stamp, stamp
from aiflow.controller.revisions import (
    REVISION_LABEL, deployment_name, endpoint, merge_revisions, render_revision, revision_of, service_name,
)
from aiflow.controller.stage_metrics import StageTimes
from aiflow.controller.status import (
    ABNORMAL_TRUE, PLAN_FIELDS, READY, Observation, build_status, changed_conditions, deployments_by_stage,
    hop_links, load_failure, readiness_signature, rolled_out, stage_states, status_patch, stuck_reason,
)
from aiflow.render.manifests import MODEL_ANNOTATION, stage_serving
from aiflow.planner.cluster import cluster_state, declared_links
from aiflow.planner.migration import SWITCHING, Move
from aiflow.render.names import STAGE_LABEL, flow_selector, selector_string

AIFLOWS = Resource(f"{GROUP}/{VERSION}", PLURAL)


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Load:
    """Per-node CPU utilisation (metrics.k8s.io), the link probes' published measurements, and notes
    on what could not be read."""

    utilisation: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    links: tuple = ()  # aiflow.linkprobe.Published, one per probing node


@dataclass(frozen=True)
class Tick:
    """The rescheduler's turn for a flow: its time, the measured latency (None: not measured,
    `latency_source` says why) and each stage's measured times."""

    now: float
    latency_ms: float | None = None
    latency_source: str = ""
    stages: tuple[tuple[str, StageTimes], ...] = ()


@dataclass
class Result:
    """What one reconcile did; `flow` is the AIFlow as read (None when it is gone or going)."""

    flow: dict | None = None
    phase: str = ""
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    status_written: bool = False
    deployments: dict[str, tuple] = field(default_factory=dict)  # name -> readiness_signature
    services: dict[str, str] = field(default_factory=dict)  # name -> resourceVersion
    stages: int = 0
    ready_stages: int = 0
    placed: bool = False  # the placement changed
    requeue_s: float | None = None  # look again after this long, event or not (a move's switch or drain)
    step: Step | None = None  # what the rescheduler decided
    predicted_latency_s: float | None = None
    links: tuple = ()  # planner LinkStates of the hops the flow crosses


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def revision_ready(flow: Flow, revision: int, live: dict[tuple[str, str], dict]) -> bool:
    """Whether every stage's Deployment of `revision` exists and has rolled out: every replica runs
    the current spec and is available."""
    for stage in flow.stages:
        dep = live.get(("Deployment", deployment_name(flow, stage.name, revision)))
        if dep is None or revision_of(dep) != revision or not rolled_out(dep):
            return False
    return True


def rollout_findings(api: KubeApi, namespace: str, name: str, live: dict[tuple[str, str], dict]) -> tuple[tuple, tuple]:
    """What the pods of the flow's unfinished rollouts say: (stage, Deployment, (reason, message)) of
    every rollout that cannot finish, and (stage, model, pod, Triton's message) of every stage whose
    Triton exited because its model failed to load. The flow's Pods are listed only when some
    Deployment has not rolled out."""
    pending = sorted((n, d) for (k, n), d in live.items() if k == "Deployment" and not rolled_out(d))
    if not pending:
        return (), ()
    pods = api.list(PODS.path(namespace), selector_string(flow_selector(name)))
    stuck, failures = [], []
    for dep_name, dep in pending:
        meta = dep.get("metadata") or {}
        stage = (meta.get("labels") or {}).get(STAGE_LABEL, dep_name)
        selector = ((dep.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        mine = sorted((p for p in pods if selector and all(
            ((p.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in selector.items())),
            key=lambda p: p["metadata"].get("name", ""))
        why = stuck_reason(dep, mine)
        if why is not None:
            stuck.append((stage, dep_name, why))
        for pod in mine:
            message = load_failure(pod)
            if message is not None:
                model = (meta.get("annotations") or {}).get(MODEL_ANNOTATION, "?")
                failures.append((stage, model, pod["metadata"].get("name", ""), message))
                break
    return tuple(stuck), tuple(failures)


def with_stage_load(state, flow, placement, measured) -> object:
    """The cluster state with each tier's `busy` from its stages' Triton compute metric: the busiest
    stage placed there, per instance (its busy share over replicas x Triton instances)."""
    from dataclasses import replace as _replace

    tiers = dict(placement)
    busy: dict[str, float] = {}
    for name, times in measured:
        if times.busy is None or name not in tiers:
            continue
        stage = flow.stage(name)
        per_instance = times.busy / max(1, stage.replicas * stage_serving(stage).instances)
        busy[tiers[name]] = max(busy.get(tiers[name], 0.0), per_instance)
    if not busy:
        return state
    return _replace(state, tiers={t: _replace(s, busy=busy.get(t, s.busy)) for t, s in state.tiers.items()})


def entry_switched(live: dict[tuple[str, str], dict], revision: int) -> bool:
    """Whether the entry Service selects `revision`."""
    selector = ((entry_service(live) or {}).get("spec") or {}).get("selector") or {}
    return selector.get(REVISION_LABEL) == str(revision)


def pod_owner(pod_name: str) -> str:
    """The Deployment a Deployment's pod belongs to (`<deployment>-<replicaset hash>-<suffix>`)."""
    return pod_name.rsplit("-", 2)[0]


def traffic_taken(slices: list[dict], deployment: str) -> bool:
    """Whether the EndpointSlices of the entry Service list ready endpoints, all of them pods of
    `deployment` (the first stage of the new revision): the old chain gets no new request."""
    ready = [e for s in slices for e in s.get("endpoints") or ()
             if (e.get("conditions") or {}).get("ready") is not False]
    return bool(ready) and all((e.get("targetRef") or {}).get("kind") == "Pod" and
                               pod_owner((e.get("targetRef") or {}).get("name", "")) == deployment for e in ready)


def observe_switch(api: KubeApi, flow: Flow, live: dict, migration: PlanRecord | None, move: Move | None) -> tuple[bool, bool]:
    """(switched, taken) of a move in its Switching phase; the EndpointSlices are read only then."""
    if migration is None or move is None or move.phase != SWITCHING:
        return False, False
    if not entry_switched(live, migration.revision):
        return False, False
    entry = service_name(flow, flow.stages[0].name, migration.revision)
    slices = api.list(ENDPOINT_SLICES.path(flow.namespace), f"kubernetes.io/service-name={entry}")
    return True, traffic_taken(slices, deployment_name(flow, flow.stages[0].name, migration.revision))


def reconcile(api: KubeApi, namespace: str, name: str, catalog: dict[str, ModelInfo] | None = None,
              cluster: ClusterView | None = None, nodes: list[NodeRecord] | None = None,
              load: Load | None = None, tick: Tick | None = None) -> Result:
    """Brings the objects and the status of AIFlow `namespace/name` in line with its spec and its
    plan. The cluster's tier nodes are listed unless `nodes` (the operator's node index) or `cluster`
    is given; `load` is the nodes' CPU utilisation; `tick` makes this the rescheduler's turn."""
    body = api.get(AIFLOWS.path(namespace, name))
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Result()  # deletion is garbage collection's job: never recreate or patch anything
    if nodes is None:
        nodes = [NodeRecord(n) for n in cluster.nodes] if cluster is not None else observe_nodes(api)
    cluster = cluster_view(nodes)
    problems = validate_manifest(body, catalog, cluster)
    spec_problems = tuple(p for p in problems if p.reason == INVALID_SPEC)
    tier_problems = tuple(p for p in problems if p.reason != INVALID_SPEC)
    old = body.get("status") or {}
    run = Run(live=list_owned(api, namespace, flow_selector(name)), plan_status={k: old.get(k) for k in PLAN_FIELDS})
    flow = parse_flow(body, namespace) if not spec_problems else None
    if flow is not None and not tier_problems:
        run = run_plan(api, flow, body, run.live, nodes, load or Load(), cluster, tick)
    elif flow is not None:
        run.degraded = tuple(rescheduler.lost_tiers(PlanRecord.from_status(old.get("plan"), flow), cluster))
    findings = rollout_findings(api, namespace, name, run.live) if flow is not None else ((), ())
    obs = observation(flow, body, run, spec_problems, tier_problems, findings)
    return write_status(api, body, flow, run, obs)


@dataclass
class Run:
    """What planning and applying a valid, schedulable flow did and found."""

    live: dict[tuple[str, str], dict]  # the flow's objects as they are now, by (kind, name)
    plan_status: dict  # the rescheduler's part of the status (PLAN_FIELDS)
    actions: list[Action] = field(default_factory=list)
    conflict: str = ""
    step: Step | None = None
    placement: object = None  # the serving revision's Placement
    names: dict | None = None  # stage -> (Deployment, Service, endpoint) of the serving revision
    links: tuple = ()  # status.links of the hops the flow crosses
    link_states: tuple = ()  # planner LinkStates of those hops
    degraded: tuple | None = None


def current_plans(flow: Flow, old: dict, live: dict, now: float):
    """(serving plan, plan moved to, the move's phase, time of the last move) from status; from the
    flow's objects when status has no plan (lost), with the last move taken as just now when the flow
    has moved (the cooldown holds rather than a move at once). The phase of a move is read from the
    entry Service, where the operator writes it, else from status."""
    serving = PlanRecord.from_status(old.get("plan"), flow)
    migration = PlanRecord.from_status(old.get("migration"), flow)
    last_move = parse_stamp(old.get("lastMigrationTime"))
    if serving is None and not old.get("plan"):
        serving, migration = recovered_plans(flow, live)
        if serving is not None and serving.revision > 1 and last_move is None:
            last_move = now
    move = recorded_move(live) or Move.from_record((old.get("migration") or {}).get("move"), parse_stamp)
    if move is not None and (serving is None or migration is None or
                             (move.source, move.target) != (serving.revision, migration.revision)):
        move = None  # about another move: the one under way starts from its first phase
    return serving, migration, move, last_move


def desired_objects(flow: Flow, step: Step, state, cluster: ClusterView):
    """The objects of the serving revision (and of the one moving in, beside it) and the serving
    revision's Placement."""
    revision, entry = step.serving.revision, step.entry_revision
    placement = rescheduler.placement_of_record(flow, step.serving, state, cluster)
    desired = annotate(render_revision(flow, placement, revision, entry, cluster), step.serving)
    if step.migration is not None:
        target = rescheduler.placement_of_record(flow, step.migration, state, cluster)
        incoming = annotate(render_revision(flow, target, step.migration.revision, entry, cluster), step.migration)
        desired = annotate_move(merge_revisions(desired, incoming), step.move)
    return desired, placement


def run_plan(api: KubeApi, flow: Flow, body: dict, live: dict, nodes: list[NodeRecord], load: Load,
             cluster: ClusterView, tick: Tick | None) -> Run:
    """The rescheduler's step for the flow, its objects applied, and what status reports of them."""
    now = tick.now if tick else time.time()
    old = body.get("status") or {}
    measured, link_notes = with_links(nodes, load.links, dt.datetime.fromtimestamp(now, dt.timezone.utc))
    seen = observations(measured, load.utilisation, load.notes + link_notes)
    state = cluster_state(seen.tiers, seen.links, declared_links(flow))
    serving, migration, move, last_move = current_plans(flow, old, live, now)
    if tick is not None and serving is not None:
        state = with_stage_load(state, flow, serving.placement, tick.stages)
    switched, taken = observe_switch(api, flow, live, migration, move)
    step = rescheduler.step(
        flow, serving, migration, state=state, cluster=cluster, now=now, last_migration_at=last_move,
        target_ready=migration is not None and revision_ready(flow, migration.revision, live),
        due=tick is not None, move=move, switched=switched, taken=taken)
    desired, placement = desired_objects(flow, step, state, cluster)
    run = Run(live=live, plan_status={}, step=step, placement=placement)
    try:
        run.actions, run.live = apply_flow(api, desired, live, body["metadata"].get("uid", ""))
    except NameConflict as exc:
        run.conflict = str(exc)
    revision = step.serving.revision
    run.names = {s.name: (deployment_name(flow, s.name, revision), service_name(flow, s.name, revision),
                          endpoint(flow, s.name, revision)) for s in flow.stages}
    run.links = hop_links(flow, placement, state)
    run.link_states = tuple(state.link(h["from"], h["to"]) for h in run.links)
    run.degraded = tuple(rescheduler.degraded_tiers(step, cluster))
    predicted = placement.plan.latency_ms if placement.plan else None
    run.plan_status = plan_fields(step, old, seen, predicted, tick, now)
    return run


def observation(flow: Flow | None, body: dict, run: Run, spec_problems, tier_problems,
                findings: tuple = ((), ())) -> Observation:
    """What status reports: problems, the serving revision's stages, placement, links, degradation,
    and what the pods of unfinished rollouts say (`rollout_findings`)."""
    serving = {n[0] for n in run.names.values()} if run.names is not None else None
    deployments = {k: v for k, v in run.live.items() if k[0] == "Deployment" and (serving is None or k[1] in serving)}
    return Observation(
        generation=int(body["metadata"].get("generation") or 0),
        spec_problems=spec_problems,
        tier_problems=tier_problems,
        conflict=run.conflict,
        stages=stage_states(flow, run.placement, deployments_by_stage(deployments), run.names) if flow else (),
        placement=run.placement,
        links=run.links,
        degraded=run.degraded,
        degraded_message=degraded_message(run.degraded, run.step),
        plan_status=run.plan_status,
        stuck=findings[0],
        load_failures=findings[1],
    )


def write_status(api: KubeApi, body: dict, flow: Flow | None, run: Run, obs: Observation) -> Result:
    """Writes the status when it changed, and reports what this reconcile did."""
    meta, old = body["metadata"], body.get("status") or {}
    new = build_status(flow, obs, old, _now())
    result = Result(flow=body, phase=new["phase"], actions=run.actions, step=run.step, links=run.link_states,
                    requeue_s=run.step.wait_s if run.step is not None else None)
    patch = status_patch(new, old)
    if patch is not None:
        api.patch(AIFLOWS.path(meta.get("namespace"), meta["name"], "status"), patch)
        result.status_written = True
    result.events = decisions(run.actions, new, old) + plan_events(flow, run.step, old)
    result.deployments = {n: readiness_signature(o) for (k, n), o in run.live.items() if k == "Deployment"}
    result.services = {n: o["metadata"].get("resourceVersion", "") for (k, n), o in run.live.items() if k == "Service"}
    result.stages, result.ready_stages = len(obs.stages), sum(s.ready for s in obs.stages)
    result.placed = bool(new.get("placement")) and new.get("placement") != old.get("placement")
    predicted = obs.placement.plan.latency_ms if obs.placement is not None and obs.placement.plan else None
    result.predicted_latency_s = predicted / 1e3 if predicted is not None else None
    return result


def plan_fields(step: Step, old: dict, seen, predicted: float | None, tick: Tick | None, now: float) -> dict:
    """The rescheduler's part of the status (PLAN_FIELDS)."""
    latency = dict(old.get("latency") or {})
    if predicted is not None:
        latency["predictedMs"] = round(predicted, 3)
    else:
        latency.pop("predictedMs", None)
    if tick is not None:
        for key in ("measuredMs", "stages"):
            latency.pop(key, None)
        if tick.latency_ms is not None:
            latency["measuredMs"] = round(tick.latency_ms, 3)
        if tick.stages:
            latency["stages"] = [times.to_status(stage) for stage, times in tick.stages]
        latency["source"] = tick.latency_source
    tiers = [{"tier": t.tier, "nodes": t.nodes, "readyNodes": t.ready_nodes,
              "computeFactor": round(t.compute_factor, 4), "utilisation": round(t.utilisation, 4)} for t in seen.tiers]
    observed = {"tiers": tiers, "notes": list(seen.notes)}
    previous = old.get("observations") or {}
    # The time moves only with what was seen, so that a reconcile that sees nothing new writes nothing.
    same = {k: previous.get(k) for k in ("tiers", "notes")} == observed
    observed["time"] = previous.get("time") if same and previous.get("time") else stamp(now)
    decision = step.decision.to_status() if step.decision else old.get("lastDecision")
    return {
        "plan": step.serving.to_status(),
        "migration": migration_status(step),
        "lastMigrationTime": stamp(step.last_migration_at) if step.last_migration_at is not None else None,
        "lastDecision": decision,
        "latency": latency or None,
        "observations": observed,
    }


def migration_status(step: Step) -> dict | None:
    """status.migration: the plan moved to, and the move's phase (`planner.migration`)."""
    if step.migration is None:
        return None
    out = step.migration.to_status()
    if step.move is not None:
        out["move"] = step.move.to_record(stamp_up)
        out["phase"] = step.move.phase
        out["drainSeconds"] = round(step.grace_s, 3)
    return out


def degraded_message(tiers, step: Step | None) -> str:
    if not tiers:
        return ""
    where = ""
    if step is not None and step.serving is not None:
        runs = sorted(set(step.serving.tiers) - set(tiers))
        where = f"; the flow {'moves' if step.migration else 'runs'} on {', '.join(runs) or 'no tier'} instead"
        if step.migration is not None:
            where = f"; moving to {', '.join(sorted(set(step.migration.tiers)))}"
    return f"{', '.join(tiers)} has no Ready node{where}; it comes back, subject to the rescheduling policy, when the tier returns"


def plan_events(flow: Flow | None, step: Step | None, old: dict) -> list[Event]:
    """Events that explain the rescheduler's decisions: every move started, finished or given up,
    and every rejected move (once per decision, not per tick)."""
    if flow is None or step is None:
        return []
    events = []
    if step.abandoned is not None:
        events.append(Event("Warning", "MigrationAbandoned",
                            f"gave up the move to revision {step.abandoned.revision}: " +
                            ("; ".join(step.notes) or "the spec changed")))
    decision: DecisionRecord | None = step.decision
    if step.started and decision is not None:
        kind, reason = ("Warning", "Failover") if decision.decision == rescheduler.FAILOVER else ("Normal", "Migrating")
        events.append(Event(kind, reason, f"{decision.reason}; revision {step.migration.revision} starts beside "
                                          f"revision {step.serving.revision}, traffic switches when it is Ready, and revision "
                                          f"{step.serving.revision} drains for {step.grace_s:g} s once the new one has taken it"))
    elif decision is not None and decision.decision in (rescheduler.REJECTED, rescheduler.SKIPPED) \
            and not decision.repeats(old.get("lastDecision")):
        kind, reason = ("Normal", "MigrationRejected") if decision.decision == rescheduler.REJECTED else ("Warning", "ReplanFailed")
        events.append(Event(kind, reason, decision.reason))
    if step.completed is not None:
        events.append(Event("Normal", "Migrated",
                            f"revision {step.serving.revision} is Ready and serves the flow "
                            f"({', '.join(f'{s}:{t}' for s, t in step.serving.placement)}); "
                            f"revision {step.completed.revision} drained for {step.grace_s:g} s and deleted"))
    return events


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
        if kind in ABNORMAL_TRUE:
            if status == "True":
                events.append(Event("Warning", reason, message))
            elif status == "False" and before.get(kind) == "True":
                events.append(Event("Normal", reason, message))
        elif kind == READY:
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
