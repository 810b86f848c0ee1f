"""What the planner is asked: a flow, the cluster, the profile and the user's constraints; and the
space of candidate plans those admit."""

from __future__ import annotations

from dataclasses import dataclass

from aiflow import TIERS
from aiflow.api.spec import AUTO, Flow
from aiflow.contract import PASSTHROUGH
from aiflow.planner.cluster import ClusterState, quantity_mib
from aiflow.planner.profile import Profile, parse_codec

GREEDY, SPECULATIVE = "greedy", "speculative"
MODES = (GREEDY, SPECULATIVE)

# The models the cost model knows (model_repo/ of the data plane); a flow starts with one that takes the image.
IMAGE_MODELS = ("captioner", "vision_head")
MODELS = ("captioner", "vision_head", "vision_tail", "caption_decoder", "caption_drafter", "caption_verifier")


# Quality a plan may lose against uncompressed features when the flow sets no floor (points of 100).
DEFAULT_QUALITY_LOSS = 1.0


class PlanError(ValueError):
    """No plan can satisfy the flow's constraints on this cluster; the message says why and what to change."""


@dataclass(frozen=True)
class Problem:
    flow: Flow
    cluster: ClusterState
    profile: Profile
    min_quality: float | None = None  # quality floor (0..100, the profile's metric); None: see quality_floor


@dataclass(frozen=True)
class Space:
    """The knob values and per-stage tiers a flow admits; None for a knob the chain does not have."""

    modes: tuple[str, ...]
    splits: tuple[int | None, ...]
    codecs: tuple[str | None, ...]
    stage_tiers: tuple[tuple[str, ...], ...]


def quality_floor(problem: Problem) -> float:
    """The least quality a plan may have: the flow's floor, else uncompressed quality minus
    DEFAULT_QUALITY_LOSS."""
    if problem.min_quality is not None:
        return problem.min_quality
    return problem.profile.quality_of(None) - DEFAULT_QUALITY_LOSS


def models_of(flow: Flow) -> tuple[str, ...]:
    """The stage models, checked to be ones the cost model knows."""
    models = tuple(s.model for s in flow.stages)
    for stage in flow.stages:
        if stage.model not in MODELS:
            raise PlanError(f"stage {stage.name!r}: the planner has no cost model for model {stage.model!r}; it plans flows of {', '.join(MODELS)}")
    if models[0] not in IMAGE_MODELS:
        raise PlanError(f"the first stage must take the image ({' or '.join(IMAGE_MODELS)}), not {models[0]!r}")
    return models


def search_space(problem: Problem) -> Space:
    """Every knob value and tier the constraints allow: pinned tiers and knobs, Ready nodes, memory,
    quality floor. PlanError when a stage or knob is left with nothing."""
    flow, profile = problem.flow, problem.profile
    models = models_of(flow)
    params = [s.parameters for s in flow.stages]

    # A drafter always drafts for the verifier after it; a captioner or caption_decoder decodes
    # greedily or speculates on its own tier.
    modes = (SPECULATIVE,) if "caption_drafter" in models else MODES
    pinned_modes = {p.decoding for p in params if p.decoding}
    if len(pinned_modes) > 1:
        raise PlanError(f"stages pin different decoding modes {sorted(pinned_modes)}; the flow decodes one way")
    if pinned_modes:
        mode = pinned_modes.pop()
        if mode not in modes:
            raise PlanError(f"decoding {mode!r} is pinned, but a caption_drafter always drafts for its verifier (speculative); use caption_decoder for greedy decoding")
        modes = (mode,)

    splits: tuple[int | None, ...] = (None,)
    if "vision_head" in models:
        pinned = {p.split_layer for s, p in zip(flow.stages, params) if s.model == "vision_head" and p.split_layer is not None}
        splits = tuple(range(profile.layers + 1))
        if pinned:
            layer = pinned.pop()
            if layer > profile.layers:
                raise PlanError(f"splitLayer {layer} is pinned but the encoder has {profile.layers} layers (0..{profile.layers})")
            splits = (layer,)

    codecs: tuple[str | None, ...] = (None,)
    if any(m != "captioner" for m in models):
        pinned_codecs = {_canonical_codec(p.codec) for p in params if p.codec and p.codec != PASSTHROUGH}
        if len(pinned_codecs) > 1:
            raise PlanError(f"stages pin different codecs {sorted(pinned_codecs)}; the planner plans one codec per flow")
        codecs = tuple(pinned_codecs) or profile.codecs
        unknown = [c for c in codecs if c not in profile.quality["large"]]
        if unknown:
            raise PlanError(f"codec {unknown[0]!r} is pinned but the profile has no quality for it; add it to the profile's quality.large")
    floor = quality_floor(problem)
    split_idx = [profile.layers if s is None else s for s in splits]
    kept = tuple(c for c in codecs if (profile.quality_by_layer(c)[split_idx] >= floor).any())
    if not kept:
        score, best, split = max((profile.quality_of(c, s), c or "uncompressed", s) for c in codecs for s in splits)
        at = f" at split layer {split}" if split is not None else ""
        raise PlanError(
            f"no codec reaches the quality floor {floor:g} ({profile.quality_metric}); the best, {best}{at}, scores "
            f"{score:g}: lower the floor or profile better codecs"
        )
    codecs = kept

    stage_tiers = []
    for stage in flow.stages:
        allowed, why_not = [], []
        for tier in TIERS if stage.tier == AUTO else (stage.tier,):
            problem_here = tier_problem(problem, stage, tier)
            if problem_here:
                why_not.append(problem_here)
            else:
                allowed.append(tier)
        if not allowed:
            pin = f" (pinned to {stage.tier})" if stage.tier != AUTO else ""
            raise PlanError(f"stage {stage.name!r}{pin} fits no tier: {'; '.join(why_not)}")
        stage_tiers.append(tuple(allowed))
    return Space(modes=modes, splits=splits, codecs=codecs, stage_tiers=tuple(stage_tiers))


def tier_problem(problem: Problem, stage, tier: str) -> str | None:
    """Why `stage` cannot run on `tier` now (None when it can): pinned elsewhere, no Ready node, or
    its model does not fit the tier's largest node."""
    if stage.tier not in (AUTO, tier):
        return f"stage {stage.name!r} is pinned to {stage.tier}, not {tier}"
    state = problem.cluster.tier(tier)
    need = memory_need_mib(problem.profile, stage)
    if not state.available:
        return f"{tier} has no Ready node"
    if state.memory_mib and need > state.memory_mib:
        return f"{tier} nodes have {state.memory_mib:g} MiB allocatable, stage {stage.name!r} needs {need:g} MiB"
    return None


def memory_need_mib(profile: Profile, stage) -> float:
    """What a stage's pod needs on one node: its memory request (what the scheduler checks), or the
    model's profiled memory when that is more."""
    request = ((stage.resources or {}).get("requests") or {}).get("memory")
    return max(quantity_mib(str(request)) if request else 0.0, profile.memory_mib.get(stage.model, 0.0))


def _canonical_codec(spec: str) -> str:
    try:
        return parse_codec(spec).spec
    except ValueError as exc:
        raise PlanError(f"pinned codec: {exc}") from exc
