"""The flow's plans as its objects record them, for when status is lost (pure).

Status is the operator's memory of the plan a flow runs and of a move under way, but status can be
lost: restored from a backup without it, recreated by a GitOps tool, cleared by hand. So each
Deployment also carries its revision's plan (`aiflow.io/plan`: revision, placement and the planner's
knobs, nothing that changes while the revision lives), and the entry Service's selector says which
revision serves. `recovered_plans` reads them back, so a reconcile without status carries on with
the revision that serves instead of starting again at revision 1 and deleting it.
"""

from __future__ import annotations

import json
from dataclasses import replace

from aiflow.api.spec import AUTO, Flow
from aiflow.controller.rescheduler import PlanRecord
from aiflow.controller.revisions import REVISION_LABEL, revision_of

PLAN_ANNOTATION = "aiflow.io/plan"
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
    entry = next((o for (k, _), o in sorted(live.items()) if k == "Service" and revision_of(o) is None), None)
    try:
        selected = int(((entry or {}).get("spec") or {}).get("selector", {}).get(REVISION_LABEL))
    except (TypeError, ValueError):
        selected = None
    serving_revision = selected if selected in records else min(records)
    newer = [r for r in records if r > serving_revision]

    def current(record: PlanRecord) -> PlanRecord:
        return replace(record, generation=flow.generation if _fits(flow, record) else 0,
                       reason="recovered from the flow's objects (status was lost)")

    return current(records[serving_revision]), current(records[max(newer)]) if newer else None
