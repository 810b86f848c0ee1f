"""The flow's plans as its objects record them, for when status is lost (pure).

Status is the operator's memory of the plan a flow runs and of a move under way, but status can be
lost: restored from a backup without it, recreated by a GitOps tool, cleared by hand. So each
Deployment also carries its revision's plan (`aiflow.io/plan`: revision, placement and the planner's
knobs, nothing that changes while the revision lives), and the entry Service's selector says which
revision serves. While a move is under way the entry Service also carries it (`aiflow.io/move`: from,
to, phase and since when, `planner.migration.Move`), so a move that has switched the traffic and
drains the old chain is neither taken for finished nor started again. `recovered_plans` reads them
back, so a reconcile without status carries on with the revision that serves (and the move under way)
instead of starting again at revision 1 and deleting it.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

from aiflow.api.spec import AUTO, Flow
from aiflow.controller.rescheduler import PlanRecord, parse_stamp, stamp
from aiflow.controller.revisions import REVISION_LABEL, revision_of
from aiflow.planner.migration import Move

PLAN_ANNOTATION = "aiflow.io/plan"
MOVE_ANNOTATION = "aiflow.io/move"
# What of a PlanRecord's status form a Deployment keeps: the fields fixed for the revision's life.
_KEPT = ("revision", "placement", "planner", "splitLayer", "codec", "decoding", "fallbackFrom")


def plan_annotation(record: PlanRecord) -> str:
    doc = record.to_status()
    return json.dumps({k: doc[k] for k in _KEPT if k in doc}, sort_keys=True, separators=(",", ":"))


def annotate(objects: list[dict], record: PlanRecord) -> list[dict]:
    """The revision's Deployments with its plan annotated (in place; returns `objects`)."""
    for obj in objects:
        if obj["kind"] == "Deployment" and revision_of(obj) == record.revision:
            obj["metadata"].setdefault("annotations", {})[PLAN_ANNOTATION] = plan_annotation(record)
    return objects


def annotate_move(objects: list[dict], move: Move | None) -> list[dict]:
    """The entry Service with the move under way annotated (in place; returns `objects`)."""
    if move is not None:
        for obj in objects:
            if obj["kind"] == "Service" and revision_of(obj) is None:
                obj["metadata"].setdefault("annotations", {})[MOVE_ANNOTATION] = move.to_annotation(stamp_up)
    return objects


def stamp_up(t: float) -> str:
    """A time to the second, rounded up: a drain read back from it is never shorter than meant."""
    return stamp(math.ceil(t))


def entry_service(live: dict[tuple[str, str], dict]) -> dict | None:
    return next((o for (k, _), o in sorted(live.items()) if k == "Service" and revision_of(o) is None), None)


def recorded_move(live: dict[tuple[str, str], dict]) -> Move | None:
    """The move under way as the entry Service records it (None: none, or unreadable)."""
    raw = (((entry_service(live) or {}).get("metadata") or {}).get("annotations") or {}).get(MOVE_ANNOTATION)
    return Move.from_record(raw, parse_stamp) if raw else None


def _recorded(flow: Flow, obj: dict) -> PlanRecord | None:
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(PLAN_ANNOTATION)
    try:
        record = PlanRecord.from_status(json.loads(raw), flow) if raw else None
    except (ValueError, TypeError):
        return None
    return record if record is not None and record.revision == revision_of(obj) else None


def _fits(flow: Flow, record: PlanRecord) -> bool:
    """Whether the record places exactly the flow's stages, each pinned one on its tier."""
    tiers = dict(record.placement)
    return record.stages == tuple(s.name for s in flow.stages) and \
        all(s.tier in (AUTO, tiers[s.name]) for s in flow.stages)


def recovered_plans(flow: Flow, live: dict[tuple[str, str], dict]) -> tuple[PlanRecord | None, PlanRecord | None]:
    """(serving plan, move under way) as the flow's live objects record them; (None, None) when they
    record none. The serving revision is the one the entry Service selects (the oldest recorded one
    without it); a newer recorded revision is the move under way. A record that still fits the spec
    counts as planned for the current generation (no re-plan), else as planned for none (the
    rescheduler re-plans it for the spec, in place)."""
    records: dict[int, PlanRecord] = {}
    for (kind, _), obj in live.items():
        record = _recorded(flow, obj) if kind == "Deployment" else None
        if record is not None:
            records[record.revision] = record
    if not records:
        return None, None
    entry = entry_service(live)
    try:
        selected = int(((entry or {}).get("spec") or {}).get("selector", {}).get(REVISION_LABEL))
    except (TypeError, ValueError):
        selected = None
    move = recorded_move(live)
    if move is not None and move.source in records and move.target in records:
        selected = move.source  # switched but not finished: the old revision still drains
    serving_revision = selected if selected in records else min(records)
    newer = [r for r in records if r > serving_revision]

    def current(record: PlanRecord) -> PlanRecord:
        return replace(record, generation=flow.generation if _fits(flow, record) else 0,
                       reason="recovered from the flow's objects (status was lost)")

    return current(records[serving_revision]), current(records[max(newer)]) if newer else None
