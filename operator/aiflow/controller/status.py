"""The status of an AIFlow, computed from what reconcile found (pure).

Conditions follow the Kubernetes API conventions: `type`, `status`, `reason` (CamelCase),
`message`, `lastTransitionTime` (changes only when `status` flips) and `observedGeneration`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from aiflow.api.placement import Placement
from aiflow.api.problems import Problem
from aiflow.api.spec import Flow
from aiflow.render.manifests import CONTAINER, MODEL_ANNOTATION, TIER_ANNOTATION, service_endpoint
from aiflow.render.names import STAGE_LABEL, object_name
from aiflow.render.rollout import max_unavailable

READY, SPEC_VALID, TIERS_SCHEDULABLE, DEGRADED = "Ready", "SpecValid", "TiersSchedulable", "Degraded"
ROLLOUT_STUCK, MODELS_LOADED = "RolloutStuck", "ModelsLoaded"
# Conditions whose True is the bad news (Kubernetes conventions allow both polarities).
ABNORMAL_TRUE = (DEGRADED, ROLLOUT_STUCK)
# Status fields the rescheduler owns, kept as they are while the spec is invalid.
PLAN_FIELDS = ("plan", "migration", "lastMigrationTime", "lastDecision", "latency", "observations")
PENDING, PHASE_READY, INVALID, UNSCHEDULABLE = "Pending", "Ready", "Invalid", "Unschedulable"


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool | None  # None = Unknown
    reason: str
    message: str

    def as_dict(self, generation: int, now: str, previous: dict | None) -> dict:
        status = {True: "True", False: "False", None: "Unknown"}[self.status]
        unchanged = previous is not None and previous.get("status") == status
        return {
            "type": self.type,
            "status": status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": previous.get("lastTransitionTime", now) if unchanged else now,
            "observedGeneration": generation,
        }


@dataclass(frozen=True)
class StageState:
    """What the cluster says about one stage's Deployment."""

    name: str
    model: str = ""
    tier: str = ""
    tier_reason: str = ""
    replicas: int = 0
    ready_replicas: int = 0  # ready pods of every ReplicaSet of the Deployment, old and new
    exists: bool = False
    max_unavailable: int = 0  # the Deployment's rollout may take this many replicas out of service
    deployment: str = ""  # names of the serving revision's objects (default: <flow>-<stage>)
    service: str = ""
    endpoint: str = ""

    @property
    def ready(self) -> bool:
        """Serving at the availability its rollout strategy allows: at least `replicas -
        maxUnavailable` replicas (and one) ready, counted over the old pods and the new alike, as
        the Deployment's own Available condition counts them."""
        return self.exists and self.replicas > 0 and self.ready_replicas >= max(1, self.replicas - self.max_unavailable)


@dataclass(frozen=True)
class Observation:
    """Everything the status is computed from."""

    generation: int
    spec_problems: tuple[Problem, ...] = ()
    tier_problems: tuple[Problem, ...] = ()
    conflict: str = ""  # a NameConflict message
    stages: tuple[StageState, ...] = ()
    placement: Placement | None = None
    links: tuple[dict, ...] = field(default_factory=tuple)
    degraded: tuple[str, ...] | None = None  # tiers the flow runs on or left that have no usable node; None: unknown
    degraded_message: str = ""
    plan_status: dict = field(default_factory=dict)  # the rescheduler's fields (PLAN_FIELDS)
    stuck: tuple[tuple[str, str, tuple[str, str]], ...] = ()  # (stage, Deployment, (reason, message)) per stuck rollout
    load_failures: tuple[tuple[str, str, str, str], ...] = ()  # (stage, model, pod, Triton's message)


def readiness_signature(deployment: dict) -> tuple:
    """What of a Deployment bears on the flow's status (readiness and rollout progress): a change
    event without a change here needs no reconcile."""
    meta, spec, status = (deployment.get(k) or {} for k in ("metadata", "spec", "status"))
    progressing = progressing_condition(deployment)
    return (meta.get("generation"), spec.get("replicas"), status.get("observedGeneration"), status.get("readyReplicas"),
            status.get("replicas"), status.get("updatedReplicas"), status.get("unavailableReplicas"),
            progressing.get("status"), progressing.get("reason"))


def progressing_condition(deployment: dict) -> dict:
    return next((c for c in (deployment.get("status") or {}).get("conditions") or ()
                 if c.get("type") == "Progressing"), {})


def deployment_ready_replicas(deployment: dict) -> int:
    """Ready replicas of the stage: `readyReplicas` counts the pods of every ReplicaSet of the
    Deployment, so the old pods that serve during a rollout count as well as the new ones."""
    return int((deployment.get("status") or {}).get("readyReplicas") or 0)


def rolled_out(deployment: dict) -> bool:
    """Whether the Deployment controller has seen the current spec and every replica runs it and is
    available (a rollout that finished)."""
    meta, spec, status = (deployment.get(k) or {} for k in ("metadata", "spec", "status"))
    want = int(spec.get("replicas", 1))
    observed, generation = status.get("observedGeneration"), meta.get("generation")
    if observed is None or (generation is not None and observed < generation):
        return False
    return (int(status.get("updatedReplicas") or 0) >= want and int(status.get("availableReplicas") or 0) >= want
            and int(status.get("replicas") or 0) <= want)


def stuck_reason(deployment: dict, pods: list[dict]) -> tuple[str, str] | None:
    """(reason, message) when the Deployment's rollout cannot finish: a pod the scheduler cannot place
    (its PodScheduled=False condition, with the scheduler's message), or the controller's
    ProgressDeadlineExceeded; None otherwise. `pods` are the Deployment's pods."""
    for pod in sorted(pods, key=lambda p: p["metadata"].get("name", "")):
        if pod["metadata"].get("deletionTimestamp"):
            continue
        for c in (pod.get("status") or {}).get("conditions") or ():
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                return "PodsUnschedulable", (f"pod {pod['metadata'].get('name')} cannot be scheduled "
                                             f"({c.get('reason') or 'Unschedulable'}): {c.get('message') or 'no message'}")
    progressing = progressing_condition(deployment)
    if progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
        return "ProgressDeadlineExceeded", progressing.get("message") or "the rollout exceeded its progress deadline"
    return None


def stage_states(flow: Flow, placement: Placement | None, deployments: dict[str, dict],
                 names: dict[str, tuple[str, str, str]] | None = None) -> tuple[StageState, ...]:
    """Per stage of the spec, from its live Deployment (by stage name) and its placement; `names`
    gives each stage's (deployment, service, endpoint) when they are not the default ones."""
    states = []
    for stage in flow.stages:
        dep = deployments.get(stage.name)
        deployment, service, endpoint = (names or {}).get(stage.name, ("", "", ""))
        placed = placement.of(stage.name) if placement else None
        annotations = ((dep or {}).get("metadata") or {}).get("annotations") or {}
        states.append(StageState(
            name=stage.name,
            model=stage.model,
            tier=placed.tier if placed else annotations.get(TIER_ANNOTATION, ""),
            tier_reason=placed.reason if placed else "",
            replicas=int(((dep or {}).get("spec") or {}).get("replicas", stage.replicas)),
            ready_replicas=deployment_ready_replicas(dep) if dep else 0,
            exists=dep is not None,
            max_unavailable=max_unavailable(dep) if dep else 0,
            deployment=deployment,
            service=service,
            endpoint=endpoint,
        ))
    return tuple(states)


def deployments_by_stage(objects: dict[tuple[str, str], dict]) -> dict[str, dict]:
    return {
        (obj["metadata"].get("labels") or {}).get(STAGE_LABEL, name): obj
        for (kind, name), obj in objects.items() if kind == "Deployment"
    }


def _problems_message(problems) -> str:
    return "; ".join(str(p) for p in problems)


def conditions(obs: Observation) -> list[Condition]:
    ready_count = sum(s.ready for s in obs.stages)
    total = len(obs.stages)
    if obs.spec_problems:
        valid = Condition(SPEC_VALID, False, "InvalidSpec", _problems_message(obs.spec_problems))
    else:
        valid = Condition(SPEC_VALID, True, "Valid", "the spec is valid")
    if obs.tier_problems:
        tiers = Condition(TIERS_SCHEDULABLE, False, "NoNodesForTier", _problems_message(obs.tier_problems))
    elif obs.spec_problems:
        tiers = Condition(TIERS_SCHEDULABLE, None, "InvalidSpec", "placement waits for a valid spec")
    else:
        tiers = Condition(TIERS_SCHEDULABLE, True, "NodesAvailable", "every stage's tier has ready nodes")
    if obs.spec_problems:
        ready = Condition(READY, False, "InvalidSpec", "the spec is invalid, see SpecValid: " + valid.message)
    elif obs.tier_problems:
        ready = Condition(READY, False, "NoNodesForTier", tiers.message)
    elif obs.conflict:
        ready = Condition(READY, False, "NameConflict", obs.conflict)
    elif total and ready_count == total:
        ready = Condition(READY, True, "AllStagesReady", f"{ready_count}/{total} stages ready")
    else:
        waiting = ", ".join(f"{s.name} ({s.ready_replicas}/{s.replicas} replicas ready)" for s in obs.stages if not s.ready)
        ready = Condition(READY, False, "StagesNotReady", f"{ready_count}/{total} stages ready; waiting for {waiting}")
    if obs.spec_problems:
        degraded = Condition(DEGRADED, None, "InvalidSpec", "placement waits for a valid spec")
    elif obs.degraded:
        degraded = Condition(DEGRADED, True, "TierUnavailable", obs.degraded_message or
                             f"{', '.join(obs.degraded)} has no Ready node")
    else:
        degraded = Condition(DEGRADED, False, "AllTiersAvailable", "every tier the flow runs on has Ready nodes")
    return [ready, valid, tiers, degraded, rollout_condition(obs), models_condition(obs)]


def models_condition(obs: Observation) -> Condition:
    if obs.spec_problems:
        return Condition(MODELS_LOADED, None, "InvalidSpec", "the stages wait for a valid spec")
    if not obs.load_failures:
        return Condition(MODELS_LOADED, True, "NoLoadFailure", "no stage's Triton reports a model that failed to load")
    return Condition(MODELS_LOADED, False, "ModelLoadFailed", "; ".join(
        f"stage {stage}: model {model} did not load (pod {pod}): {message}"
        for stage, model, pod, message in obs.load_failures))


_TRITON_ERROR = re.compile(r'^E\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] "?(?P<text>.*?)"?$')
# Errors Triton logs on every start of a CPU-only pod; they say nothing about the model.
_NOISE = ("CudaDriverHelper has not been initialized",)


def triton_errors(log_tail: str) -> str:
    """What went wrong, from the tail of a Triton log: its `E...` lines and its final `error:` line
    (the first line of each; tracebacks and the option tables left out); else the last line."""
    picked: list[str] = []
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    for line in lines:
        match = _TRITON_ERROR.match(line)
        text = match.group("text") if match else line[len("error: "):] if line.startswith("error: ") else None
        if text and not any(n in text for n in _NOISE) and text not in picked:
            picked.append(text)
    return "; ".join(picked) or (lines[-1] if lines else "no log")


def load_failure(pod: dict, container: str = CONTAINER) -> str | None:
    """Triton's message when the stage container of `pod` exited with an error (its termination
    message: the kubelet keeps the log's tail there, `terminationMessagePolicy: FallbackToLogsOnError`)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or ():
        if status.get("name") != container:
            continue
        for state in ("state", "lastState"):
            ended = (status.get(state) or {}).get("terminated") or {}
            if ended and int(ended.get("exitCode") or 0) != 0:
                return triton_errors(ended.get("message") or ended.get("reason") or "")
    return None


def rollout_condition(obs: Observation) -> Condition:
    if obs.spec_problems:
        return Condition(ROLLOUT_STUCK, None, "InvalidSpec", "rollouts wait for a valid spec")
    if not obs.stuck:
        return Condition(ROLLOUT_STUCK, False, "RolloutsProgressing", "no stage's rollout is stuck")
    reasons = {reason for _, _, (reason, _) in obs.stuck}
    reason = "PodsUnschedulable" if "PodsUnschedulable" in reasons else sorted(reasons)[0]
    message = "; ".join(f"stage {stage} (Deployment {name}): {why}" for stage, name, (_, why) in obs.stuck)
    return Condition(ROLLOUT_STUCK, True, reason, message)


def phase(obs: Observation) -> str:
    if obs.spec_problems:
        return INVALID
    if obs.tier_problems:
        return UNSCHEDULABLE
    if obs.stages and all(s.ready for s in obs.stages) and not obs.conflict:
        return PHASE_READY
    return PENDING


def build_status(flow: Flow | None, obs: Observation, previous: dict | None, now: str) -> dict:
    """The full status; `previous` (the current status) keeps lastTransitionTimes. Without a flow
    (the spec is invalid) the last known stages, placement and links are kept."""
    previous = previous or {}
    old_conditions = {c.get("type"): c for c in previous.get("conditions") or ()}
    status = {
        "observedGeneration": obs.generation,
        "phase": phase(obs),
        "conditions": [c.as_dict(obs.generation, now, old_conditions.get(c.type)) for c in conditions(obs)],
    }
    if flow is None:
        for key in ("readyStages", "placement", "stages", "links") + PLAN_FIELDS:
            if key in previous:
                status[key] = previous[key]
        return status
    stages = []
    for s in obs.stages:
        entry = {"name": s.name, "model": s.model, "tier": s.tier, "replicas": s.replicas,
                 "readyReplicas": s.ready_replicas, "ready": s.ready}
        if s.tier_reason:
            entry["tierReason"] = s.tier_reason
        if s.exists:
            entry["deployment"] = s.deployment or object_name(flow.name, s.name)
            entry["service"] = s.service or object_name(flow.name, s.name)
            entry["endpoint"] = s.endpoint or service_endpoint(flow, flow.stage(s.name))
        stages.append(entry)
    status["readyStages"] = f"{sum(s.ready for s in obs.stages)}/{len(obs.stages)}"
    status["placement"] = ", ".join(f"{s.name}:{s.tier}" for s in obs.stages if s.tier)
    status["stages"] = stages
    status["links"] = list(obs.links)
    status.update({k: v for k, v in obs.plan_status.items() if v is not None})
    return status


def hop_links(flow: Flow, placement: Placement, state=None) -> tuple[dict, ...]:
    """The network conditions of every hop of the flow that crosses tiers, in flow order: as the
    planner saw them (`state`, a planner ClusterState: measured, declared, composed or default; the
    hop from the client on the device to the first stage included), else as declared."""
    hops = []
    tiers = [placement.of(s.name).tier for s in flow.stages]
    if state is not None:
        tiers.insert(0, "device")  # the planner's clients send from the device tier
    for a, b in zip(tiers, tiers[1:]):
        if a == b or any(h["from"] == a and h["to"] == b for h in hops):
            continue
        if state is not None:
            used = state.link(a, b)
            hops.append({"from": a, "to": b, "bandwidthMbps": round(used.bandwidth_mbps, 3),
                         "rttMs": round(used.rtt_ms, 3), "source": used.source.split()[0].capitalize()})
            continue
        link = flow.link(a, b)
        if link is None:
            hops.append({"from": a, "to": b, "source": "Unknown"})
        else:
            hops.append({"from": a, "to": b, "bandwidthMbps": link.bandwidth_mbps,
                         "rttMs": link.rtt_ms, "source": "Declared"})
    return tuple(hops)


def status_patch(new: dict, old: dict | None) -> dict | None:
    """A merge patch from the old status to the new one (None when equal); keys the new status
    lacks are removed, at any depth (a merge patch keeps what it does not mention)."""
    old = old or {}
    if new == old:
        return None
    return {"status": _with_removals(new, old)}


def _with_removals(new: dict, old: dict) -> dict:
    patch = {k: _with_removals(v, old[k]) if isinstance(v, dict) and isinstance(old.get(k), dict) else v
             for k, v in new.items()}
    patch.update({k: None for k in old if k not in new})
    return patch


def changed_conditions(new: dict, old: dict | None) -> list[dict]:
    """Conditions that changed in a way a user should hear about: Ready and Degraded when their
    status or reason changes, the others also when their message (the list of problems) changes."""
    before = {c.get("type"): c for c in (old or {}).get("conditions") or ()}
    out = []
    for c in new["conditions"]:
        prev = before.get(c["type"]) or {}
        keys = ("status", "reason") if c["type"] in (READY,) + ABNORMAL_TRUE else ("status", "reason", "message")
        if any(prev.get(k) != c[k] for k in keys):
            out.append(c)
    return out
