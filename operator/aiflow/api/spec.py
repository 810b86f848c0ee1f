"""The AIFlow spec as plain, typed data.

`parse_flow` takes a manifest that passed validation, fills in the CRD's defaults and returns a
`Flow`; the planner and the renderer work on that, never on raw dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiflow.api.images import DEFAULT_TIER_IMAGES, configured_tier_images
from aiflow.api.schema import apply_defaults

AUTO = "auto"


@dataclass(frozen=True)
class StageParameters:
    """Partition knobs; None keeps the model's config.pbtxt value."""

    split_layer: int | None = None
    codec: str | None = None
    decoding: str | None = None

    def as_env(self) -> dict[str, str]:
        """The knobs as the stage runtime reads them: AIFLOW_SPLIT_LAYER, AIFLOW_CODEC, AIFLOW_DECODING
        (environment in a cluster, load-time parameters on the local runtime); unset knobs omitted."""
        knobs = {"SPLIT_LAYER": self.split_layer, "CODEC": self.codec, "DECODING": self.decoding}
        return {f"AIFLOW_{k}": str(v) for k, v in knobs.items() if v is not None}


@dataclass(frozen=True)
class ValueFrom:
    """An environment variable's value from a key of a Secret or ConfigMap of the flow's namespace."""

    source: str  # secretKeyRef | configMapKeyRef
    name: str
    key: str
    optional: bool | None = None

    def as_dict(self) -> dict:
        ref = {"name": self.name, "key": self.key}
        if self.optional is not None:
            ref["optional"] = self.optional
        return {self.source: ref}


@dataclass(frozen=True)
class Stage:
    name: str
    model: str
    tier: str = AUTO  # device | edge | cloud | auto
    replicas: int = 1
    resources: dict = field(default_factory=dict)  # Kubernetes ResourceRequirements
    parameters: StageParameters = StageParameters()
    env: tuple[tuple[str, str | ValueFrom], ...] = ()  # name -> value, or where to take it from
    serving: dict = field(default_factory=dict)  # spec.stages[].serving as written (aiflow.serving reads it)
    autoscaling: dict | None = None  # spec.stages[].autoscaling: minReplicas, maxReplicas, targetQueueMilliseconds
    image: str | None = None  # this stage's own image (spec.stages[].image)


@dataclass(frozen=True)
class ModelRepository:
    path: str = "/opt/aiflow/model_repo"
    claim_name: str | None = None  # PersistentVolumeClaim mounted read-only at `path`
    sub_path: str | None = None


@dataclass(frozen=True)
class Triton:
    image: str | None = None  # spec.triton.image: every stage's, unless its tier or itself names one
    tier_images: dict[str, str] = field(default_factory=dict)  # spec.triton.tierImages
    image_pull_policy: str = "IfNotPresent"
    model_repository: ModelRepository = ModelRepository()
    # The operator's image per tier for flows that name none (aiflow.api.images).
    default_images: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TIER_IMAGES))

    def image_for(self, stage: "Stage", tier: str) -> str:
        """The image of `stage` placed on `tier`: the stage's own, else its tier's, else the flow's,
        else the operator's default for the tier."""
        return stage.image or self.tier_images.get(tier) or self.image or self.default_images[tier]


@dataclass(frozen=True)
class Link:
    """Declared network conditions from one tier to another."""

    from_tier: str
    to_tier: str
    bandwidth_mbps: float
    rtt_ms: float = 0.0


@dataclass(frozen=True)
class Objective:
    latency_ms: float | None = None
    min_quality: float | None = None  # the planner's quality floor (0..100); None: its default


@dataclass(frozen=True)
class Rescheduling:
    enabled: bool = False
    interval_seconds: int = 60
    min_improvement_percent: int = 10
    cooldown_seconds: int = 300


@dataclass(frozen=True)
class Flow:
    """One AIFlow: identity (for names and ownerReferences) plus its defaulted spec."""

    name: str
    namespace: str
    stages: tuple[Stage, ...]
    triton: Triton
    uid: str = ""
    generation: int = 0
    links: tuple[Link, ...] = ()
    objective: Objective = Objective()
    rescheduling: Rescheduling = Rescheduling()

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def link(self, from_tier: str, to_tier: str) -> Link | None:
        """The declared link from -> to, else the reverse one (links are symmetric unless both
        directions are declared), else None."""
        for a, b in ((from_tier, to_tier), (to_tier, from_tier)):
            for link in self.links:
                if (link.from_tier, link.to_tier) == (a, b):
                    return link
        return None


def parse_flow(manifest: dict, namespace: str = "default", default_images: dict[str, str] | None = None) -> Flow:
    """A validated AIFlow manifest -> Flow, with the CRD's defaults applied. `namespace` is used
    when the manifest does not name one; `default_images` are the stage images per tier of a flow
    that names none (default: the operator's, `configured_tier_images`)."""
    doc = apply_defaults(manifest)
    meta = doc.get("metadata") or {}
    spec = doc["spec"]
    return Flow(
        name=meta["name"],
        namespace=meta.get("namespace") or namespace,
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation") or 0),
        stages=tuple(_stage(s) for s in spec["stages"]),
        triton=_triton(spec["triton"], configured_tier_images() if default_images is None else default_images),
        links=tuple(
            Link(l["from"], l["to"], float(l["bandwidthMbps"]), float(l.get("rttMs", 0)))
            for l in spec.get("links") or ()
        ),
        objective=Objective(latency_ms=(spec.get("objective") or {}).get("latencyMs"),
                            min_quality=(spec.get("objective") or {}).get("minQuality")),
        rescheduling=Rescheduling(
            enabled=spec["rescheduling"]["enabled"],
            interval_seconds=spec["rescheduling"]["intervalSeconds"],
            min_improvement_percent=spec["rescheduling"]["minImprovementPercent"],
            cooldown_seconds=spec["rescheduling"]["cooldownSeconds"],
        ),
    )


def _stage(s: dict) -> Stage:
    p = s.get("parameters") or {}
    return Stage(
        name=s["name"],
        model=s["model"],
        tier=s["tier"],
        replicas=int(s["replicas"]),
        resources={k: dict(v) for k, v in (s.get("resources") or {}).items()},
        parameters=StageParameters(p.get("splitLayer"), p.get("codec"), p.get("decoding")),
        env=tuple((e["name"], _env_value(e)) for e in s.get("env") or ()),
        serving=dict(s.get("serving") or {}),
        autoscaling=dict(s["autoscaling"]) if s.get("autoscaling") else None,
        image=s.get("image"),
    )


def _env_value(e: dict) -> str | ValueFrom:
    source = e.get("valueFrom") or {}
    for kind in ("secretKeyRef", "configMapKeyRef"):
        if kind in source:
            ref = source[kind]
            return ValueFrom(kind, ref["name"], ref["key"], ref.get("optional"))
    return e.get("value", "")


def _triton(t: dict, default_images: dict[str, str]) -> Triton:
    repo = t["modelRepository"]
    pvc = repo.get("persistentVolumeClaim") or {}
    return Triton(
        image=t.get("image"),
        tier_images=dict(t.get("tierImages") or {}),
        default_images={**DEFAULT_TIER_IMAGES, **default_images},
        image_pull_policy=t["imagePullPolicy"],
        model_repository=ModelRepository(
            path=repo["path"], claim_name=pvc.get("claimName"), sub_path=pvc.get("subPath") or None
        ),
    )
