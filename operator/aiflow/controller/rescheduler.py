"""The rescheduler's thinking (pure): which plan a flow runs, when it moves, and what it reports.

A flow's plan lives in its status (`status.plan`, and `status.migration` while a move is under way),
so every reconcile starts from what runs, never from scratch:

- no plan yet, or a spec change the running plan no longer satisfies: plan now (in place: the objects
  of the serving revision are patched, Deployments roll their pods as usual);
- a move under way goes through the phases of `planner.migration` (the same as the local runtime's):
  Starting until every Deployment of the new revision is Ready, Switching (the entry Service selects
  the new revision) until the entry's EndpointSlices list only the new revision's pods, Draining for
  the drain grace (from the flow's latency objective), then Done: the new revision serves and the
  old one is deleted; a move whose tiers lost their nodes is given up (the entry goes back);
- a tier the serving plan uses has no Ready node: re-plan on the tiers that remain and move at once
  (failover; no cooldown, whether rescheduling is enabled or not) — the flow is `Degraded` until
  that tier is back;
- on the rescheduler's interval, with `spec.rescheduling.enabled`: assess the serving plan under the
  fresh observations, plan anew, and move only when `hysteresis.decide` says so (minimum improvement,
  cooldown).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace

from aiflow.api.cluster import ClusterView
from aiflow.api.placement import Placement, StagePlacement
from aiflow.api.spec import AUTO, Flow
from aiflow.planner.cluster import ClusterState
from aiflow.planner.cost import Candidate
from aiflow.planner.hysteresis import Policy, decide
from aiflow.planner.migration import RETIRE, STARTING, SWITCHING, Move, Seen, advance, drain_grace_s
from aiflow.planner.placement import assess_candidate, placement_of, plan_flow, resolve_placement
from aiflow.planner.problem import PlanError
from aiflow.planner.profile import ProfileError
from aiflow.planner.solver import describe

SOLVER, RULE = "Solver", "Rule"
KEPT, REJECTED, MIGRATING, FAILOVER, SKIPPED = "Kept", "Rejected", "Migrating", "Failover", "Skipped"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def stamp(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.timezone.utc).strftime(TIME_FORMAT)


def parse_stamp(text) -> float | None:
    try:
        return dt.datetime.strptime(str(text), TIME_FORMAT).replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class PlanRecord:
    """A plan as status keeps it: enough to render it again and to assess it under new conditions."""

    revision: int
    generation: int
    placement: tuple[tuple[str, str], ...]  # (stage, tier) in flow order
    split_layer: int | None = None
    codec: str | None = None
    decoding: str | None = None
    predicted_ms: float | None = None
    planner: str = SOLVER
    reason: str = ""
    planned_at: str = ""
    fallback_from: tuple[str, ...] = ()  # tiers the flow had to leave (failover) and may come back to

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(t for _, t in self.placement)

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(s for s, _ in self.placement)

    def candidate(self) -> Candidate:
        return Candidate(self.tiers, self.split_layer, self.codec, self.decoding or "greedy")

    def same_plan(self, other: "PlanRecord") -> bool:
        return (self.placement, self.split_layer, self.codec, self.decoding) == \
            (other.placement, other.split_layer, other.codec, other.decoding)

    def to_status(self) -> dict:
        out = {"revision": self.revision, "generation": self.generation, "placement": dict(self.placement),
               "planner": self.planner, "reason": self.reason, "plannedAt": self.planned_at}
        for key, value in (("splitLayer", self.split_layer), ("codec", self.codec), ("decoding", self.decoding)):
            if value is not None:
                out[key] = value
        if self.predicted_ms is not None:
            out["predictedLatencyMs"] = round(self.predicted_ms, 3)
        if self.fallback_from:
            out["fallbackFrom"] = list(self.fallback_from)
        return out

    @classmethod
    def from_status(cls, doc, flow: Flow | None = None) -> "PlanRecord | None":
        """A record from status (None when absent or unusable, e.g. written by hand). With `flow`, its
        placement is ordered like the flow's stages."""
        if not isinstance(doc, dict) or not isinstance(doc.get("placement"), dict):
            return None
        try:
            placement = doc["placement"]
            order = [s.name for s in flow.stages] if flow else list(placement)
            return cls(
                revision=int(doc.get("revision") or 1),
                generation=int(doc.get("generation") or 0),
                placement=tuple((s, str(placement[s])) for s in order if s in placement),
                split_layer=doc.get("splitLayer"),
                codec=doc.get("codec"),
                decoding=doc.get("decoding"),
                predicted_ms=doc.get("predictedLatencyMs"),
                planner=doc.get("planner") or SOLVER,
                reason=doc.get("reason") or "",
                planned_at=doc.get("plannedAt") or "",
                fallback_from=tuple(doc.get("fallbackFrom") or ()),
            )
        except (TypeError, ValueError):
            return None


def record_of(flow: Flow, placement: Placement, revision: int, now: float, fallback_from=()) -> PlanRecord:
    """The record of a freshly resolved placement."""
    result = placement.plan
    knobs = result.candidate if result else None
    return PlanRecord(
        revision=revision,
        generation=flow.generation,
        placement=tuple((p.stage, p.tier) for p in placement.stages),
        split_layer=knobs.split if knobs else None,
        codec=knobs.codec if knobs else None,
        decoding=knobs.decoding if knobs else None,
        predicted_ms=round(result.latency_ms, 3) if result else None,
        planner=SOLVER if result else RULE,
        reason=result.reason if result else placement.note or "placed by the simple rule",
        planned_at=stamp(now),
        fallback_from=tuple(sorted(set(fallback_from))),
    )


def placement_of_record(flow: Flow, record: PlanRecord, state: ClusterState, cluster: ClusterView) -> Placement:
    """The Placement to render for a record: the solver's plan re-assessed (for its knobs), or the rule's."""
    if record.planner == SOLVER:
        try:
            return placement_of(flow, assess_candidate(flow, state, record.candidate()))
        except (PlanError, ProfileError, ValueError, KeyError):
            pass  # the profile changed under the record: render its tiers with the spec's knobs
    rule = resolve_placement(flow, cluster, state) if record.planner == RULE else None
    tiers = dict(record.placement)
    return Placement(tuple(
        StagePlacement(s.name, tiers[s.name], (rule.of(s.name).reason if rule else "as planned"), s.parameters)
        for s in flow.stages))


@dataclass(frozen=True)
class DecisionRecord:
    """The rescheduler's last decision, as `status.lastDecision` keeps it."""

    decision: str
    reason: str
    time: str
    target: str = ""  # the plan it was about (describe()), to tell a new decision from a repeated one
    gain: float | None = None

    def to_status(self) -> dict:
        out = {"decision": self.decision, "reason": self.reason, "time": self.time}
        if self.target:
            out["target"] = self.target
        if self.gain is not None:
            out["gainPercent"] = round(self.gain * 100, 2)
        return out

    def repeats(self, previous) -> bool:
        """Whether `previous` (status.lastDecision) was the same decision about the same plan."""
        return isinstance(previous, dict) and previous.get("decision") == self.decision and \
            previous.get("target", "") == self.target


@dataclass
class Step:
    """What one reconcile decided about the flow's plans."""

    serving: PlanRecord | None = None
    migration: PlanRecord | None = None
    decision: DecisionRecord | None = None
    completed: PlanRecord | None = None  # the revision a finished move left (its objects go now)
    abandoned: PlanRecord | None = None  # a move given up
    started: bool = False
    last_migration_at: float | None = None
    notes: list[str] = field(default_factory=list)
    move: Move | None = None  # the phase of the move under way (planner.migration)
    grace_s: float = 0.0  # its drain grace
    now: float = 0.0

    @property
    def entry_revision(self) -> int:
        """The revision the entry Service selects."""
        return self.move.entry if self.move is not None and self.migration is not None else self.serving.revision

    @property
    def wait_s(self) -> float | None:
        """When to look again without an event to wait for: the endpoints of a switch are polled
        (nothing watches EndpointSlices), and a drain ends at its grace."""
        if self.move is None or self.migration is None:
            return None
        if self.move.phase == SWITCHING:
            return SWITCH_POLL_S
        if self.move.since is not None and self.move.phase != STARTING:
            return max(0.5, self.grace_s - (self.now - self.move.since))
        return None


# How often a switched entry's EndpointSlices are read until the new chain is behind it.
SWITCH_POLL_S = 1.0


def grace_of(flow: Flow, serving: PlanRecord | None) -> float:
    """The drain grace of a move away from `serving`."""
    return drain_grace_s(flow.objective.latency_ms, serving.predicted_ms if serving else None)


def lost_tiers(record: PlanRecord | None, cluster: ClusterView) -> list[str]:
    """Tiers the record runs on that have no usable node now."""
    if record is None:
        return []
    available = set(cluster.tiers_with_nodes)
    return sorted({t for t in record.tiers if t not in available})


def degraded_tiers(step: Step, cluster: ClusterView) -> list[str]:
    """Tiers the flow runs on, or had to leave, that have no usable node now."""
    available = set(cluster.tiers_with_nodes)
    tiers = set()
    for record in (step.serving, step.migration):
        if record is not None:
            tiers |= set(record.tiers) | set(record.fallback_from)
    return sorted(t for t in tiers if t not in available)


def _plan(flow: Flow, state: ClusterState, cluster: ClusterView) -> Placement:
    return resolve_placement(flow, cluster, state)


def step(flow: Flow, serving: PlanRecord | None, migration: PlanRecord | None, *, state: ClusterState,
         cluster: ClusterView, now: float, last_migration_at: float | None, target_ready: bool,
         due: bool, move: Move | None = None, switched: bool = False, taken: bool = False) -> Step:
    """The plans after this reconcile. `target_ready`: every Deployment of `migration`'s revision is
    Ready; `move`: the phase the move under way was in (None: Starting); `switched`: the entry
    Service selects `migration`'s revision; `taken`: its EndpointSlices list only that revision's
    pods; `due`: the rescheduler's interval has come round for this flow."""
    out = Step(serving, migration, last_migration_at=last_migration_at, now=now, grace_s=grace_of(flow, serving))
    names = tuple(s.name for s in flow.stages)

    if serving is None or serving.stages != names or serving.generation != flow.generation:
        out.serving = _replan_for_spec(flow, serving, state, cluster, now)
        if migration is not None:
            out.migration, out.abandoned = None, migration
        return out

    if migration is not None:
        if migration.stages != names or lost_tiers(migration, cluster):
            out.migration, out.abandoned = None, migration
            out.notes.append(f"the move to revision {migration.revision} was given up: "
                             f"{', '.join(lost_tiers(migration, cluster)) or 'the stages changed'}")
        else:
            if move is None or (move.source, move.target) != (serving.revision, migration.revision):
                move = Move(serving.revision, migration.revision, STARTING, now)
            out.move, action = advance(move, Seen(now, target_ready, switched, taken), out.grace_s)
            if action == RETIRE:
                out.serving, out.migration, out.completed, out.move = migration, None, serving, None
                out.last_migration_at = now
            return out

    lost = lost_tiers(out.serving, cluster)
    if lost and any(s.tier == AUTO for s in flow.stages):
        try:
            placement = _plan(flow, state, cluster)
        except ValueError as exc:
            out.decision = DecisionRecord(SKIPPED, f"{', '.join(lost)} lost its nodes and nothing else fits: {exc}", stamp(now))
            return out
        target = record_of(flow, placement, serving.revision + 1, now, set(serving.fallback_from) | set(lost))
        if lost_tiers(target, cluster):  # a pinned stage keeps the lost tier: nothing to move to
            return out
        out.migration, out.started, out.move = target, True, Move(serving.revision, target.revision, STARTING, now)
        out.decision = DecisionRecord(
            FAILOVER, f"{', '.join(lost)} has no Ready node: moving to {_summary(flow, target)} at once "
            f"({target.reason})", stamp(now), _summary(flow, target))
        return out

    if due and flow.rescheduling.enabled and not lost:
        out.decision, target = _reschedule(flow, out.serving, state, cluster, now, last_migration_at)
        if target is not None:
            out.migration, out.started = target, True
            out.move = Move(out.serving.revision, target.revision, STARTING, now)
    return out


def _summary(flow: Flow, record: PlanRecord) -> str:
    if record.planner == SOLVER:
        return describe(flow, record.candidate())
    return " -> ".join(f"{s}@{t}" for s, t in record.placement)


def _replan_for_spec(flow: Flow, serving: PlanRecord | None, state, cluster, now) -> PlanRecord:
    """A plan for a new or changed spec: the serving plan when the new spec still admits it (same
    stages, feasible now), else a fresh one; the revision stays (objects are patched in place)."""
    revision = serving.revision if serving else 1
    same_stages = serving is not None and serving.stages == tuple(s.name for s in flow.stages)
    if same_stages and serving.planner == SOLVER:
        try:
            current = assess_candidate(flow, state, serving.candidate())
        except (PlanError, ProfileError, ValueError, KeyError):
            current = None
        if current is not None and current.feasible:
            return replace(serving, generation=flow.generation, predicted_ms=round(current.latency_ms, 3))
    fallback = serving.fallback_from if same_stages else ()
    return record_of(flow, _plan(flow, state, cluster), revision, now, fallback)


def _reschedule(flow, serving: PlanRecord, state, cluster, now, last_migration_at):
    """assess -> plan -> decide; the decision and the plan to move to (None: stay)."""
    when = stamp(now)
    if serving.planner != SOLVER:
        placement = _plan(flow, state, cluster)
        target = record_of(flow, placement, serving.revision + 1, now)
        if placement.plan is None or target.same_plan(serving):
            return DecisionRecord(KEPT, placement.note or "the simple rule places the flow as it runs", when), None
        return DecisionRecord(MIGRATING, f"the planner can plan the flow now: {target.reason}", when,
                              _summary(flow, target)), target
    try:
        best = plan_flow(flow, state)
    except (PlanError, ProfileError) as exc:
        return DecisionRecord(SKIPPED, f"no plan: {exc}", when), None
    try:
        current = assess_candidate(flow, state, serving.candidate())
    except (PlanError, ProfileError, ValueError, KeyError) as exc:
        current = None  # the profile no longer describes it: it must move
        reason = f"the running plan cannot be assessed ({exc})"
    decision = decide(current, best, Policy.from_spec(flow.rescheduling), now, last_migration_at)
    target = record_of(flow, placement_of(flow, best), serving.revision + 1, now,
                       [t for t in serving.fallback_from if t not in cluster.tiers_with_nodes])
    summary = _summary(flow, target)
    if current is None:
        return DecisionRecord(MIGRATING, f"{reason}; moving to {best.reason}", when, summary), target
    if decision.migrate:
        return DecisionRecord(MIGRATING, decision.reason, when, summary, decision.gain), target
    if best.candidate == current.candidate:
        return DecisionRecord(KEPT, decision.reason, when, "", decision.gain), None
    return DecisionRecord(REJECTED, f"{summary}: {decision.reason}", when, summary, decision.gain), None


def due(last_tick: float | None, interval_s: float, now: float) -> bool:
    """Whether the rescheduler's interval has passed since its last look at the flow."""
    return last_tick is None or now - last_tick >= interval_s
