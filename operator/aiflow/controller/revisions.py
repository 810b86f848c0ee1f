"""The objects of one revision of a flow, for make-before-break moves (pure).

Each plan the flow runs is a revision: 1 for the first, one more for every move. The objects of a
revision form a complete chain: its Deployments are named `<flow>-<stage>` for revision 1 and
`<flow>-<stage>-r<N>` after, as are the Services between its stages, and each stage's
`AIFLOW_NEXT_URL` names its successor's Service of the same revision. The first stage's Service,
`<flow>-<first stage>`, is the flow's stable entry point: it belongs to no revision and selects the
pods of the serving one. A move brings up the new revision beside the serving one, flips the entry
Service's selector once every new Deployment is Ready, and only then deletes the old revision: requests
in flight finish on the chain they entered.
"""

from __future__ import annotations

import copy

from aiflow.api.cluster import ClusterView
from aiflow.api.spec import Flow
from aiflow.api.placement import Placement
from aiflow.render.manifests import CONFIG_HASH_ANNOTATION, GRPC_PORT, config_hash, disruption_budget, render, render_autoscaler
from aiflow.render.names import STAGE_LABEL, bounded, label_value, object_name

REVISION_LABEL = "aiflow.io/revision"


def revision_name(flow: str, stage: str, revision: int) -> str:
    base = object_name(flow, stage)
    return base if revision <= 1 else bounded(f"{base}-r{revision}")


def deployment_name(flow: Flow, stage: str, revision: int) -> str:
    return revision_name(flow.name, stage, revision)


def service_name(flow: Flow, stage: str, revision: int) -> str:
    """The entry Service (first stage) is shared by all revisions; the others are per revision."""
    return stage_service(flow.name, flow.stages[0].name, stage, revision)


def stage_service(flow: str, first_stage: str, stage: str, revision: int) -> str:
    return object_name(flow, stage) if stage == first_stage else revision_name(flow, stage, revision)


def endpoint(flow: Flow, stage: str, revision: int) -> str:
    return f"{service_name(flow, stage, revision)}.{flow.namespace}.svc:{GRPC_PORT}"


def revision_of(obj: dict) -> int | None:
    """The revision an object belongs to (None for the entry Service and foreign objects)."""
    raw = ((obj.get("metadata") or {}).get("labels") or {}).get(REVISION_LABEL)
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


def render_revision(flow: Flow, placement: Placement, revision: int, serving: int,
                    cluster: ClusterView | None = None) -> list[dict]:
    """The objects of `revision` of the flow; the entry Service selects revision `serving`.
    `cluster` decides the Deployments' rollout strategies (`render`)."""
    objects = copy.deepcopy(render(flow, placement, cluster))
    by_stage = {(o["kind"], o["metadata"]["labels"][STAGE_LABEL]): o for o in objects}
    label = {REVISION_LABEL: str(revision)}
    out = []
    for i, stage in enumerate(flow.stages):
        key = label_value(stage.name)
        service, deployment = by_stage[("Service", key)], by_stage[("Deployment", key)]
        if i == 0:
            service["spec"]["selector"][REVISION_LABEL] = str(serving)
        else:
            service["metadata"]["name"] = service_name(flow, stage.name, revision)
            service["metadata"]["labels"].update(label)
            service["spec"]["selector"].update(label)
        deployment["metadata"]["name"] = deployment_name(flow, stage.name, revision)
        deployment["metadata"]["labels"].update(label)
        spec = deployment["spec"]
        spec["selector"]["matchLabels"].update(label)
        spec["template"]["metadata"]["labels"].update(label)
        pod = spec["template"]["spec"]
        if i + 1 < len(flow.stages):
            for var in pod["containers"][0]["env"]:
                if var["name"] == "AIFLOW_NEXT_URL":
                    var["value"] = endpoint(flow, flow.stages[i + 1].name, revision)
        spec["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] = config_hash(pod)
        out += [service, deployment]
        budget = disruption_budget(deployment)  # named and selecting as the revision's Deployment
        if budget is not None:
            out.append(budget)
    for stage in flow.stages:  # autoscalers follow their revision's Deployment
        if stage.autoscaling:
            hpa = render_autoscaler(flow, stage, deployment_name(flow, stage.name, revision))
            hpa["metadata"]["labels"].update(label)
            out.append(hpa)
    return out


def merge_revisions(serving: list[dict], target: list[dict]) -> list[dict]:
    """The serving revision's objects, then the target's that are not shared (the entry Service)."""
    names = {(o["kind"], o["metadata"]["name"]) for o in serving}
    return serving + [o for o in target if (o["kind"], o["metadata"]["name"]) not in names]
