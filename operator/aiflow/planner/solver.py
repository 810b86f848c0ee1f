"""The solver: the fastest plan for a flow on a cluster, its runner-ups, and why. Pure and deterministic.

`plan(problem)` searches split layer x codec x decoding mode x the tier of every stage. Constraints
(pinned tiers and knobs, Ready nodes, memory, quality floor) shrink the space first (`search_space`).
The latency is a sum of one step per stage (the call into it, which depends on the tiers at both
ends, plus its compute), so each step is computed once for the whole knob grid and every tier pair
(M x S x C x 3 x 3 numbers), and the steps are chained by broadcasting into every tier assignment:
no candidate is evaluated on its own. Ties break by fewer bytes upstream, then higher quality, then
the order modes x splits x codecs x tier assignments (device before edge before cloud).

`plan_exhaustive` evaluates every candidate one by one with `cost.evaluate`: the reference the tests
hold `plan` to.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from aiflow import TIERS
from aiflow.api.spec import StageParameters
from aiflow.planner.cost import (
    DEVICE,
    Candidate,
    Estimate,
    chain_terms,
    estimate,
    evaluate,
    hop_ms,
    link_tables,
    make_grid,
    stage_ms_on_tiers,
)
from aiflow.planner.problem import PASSTHROUGH, SPECULATIVE, PlanError, Problem, models_of, quality_floor, search_space, tier_problem

DEFAULT_ALTERNATIVES = 3


@dataclass(frozen=True)
class Option:
    candidate: Candidate
    estimate: Estimate


@dataclass(frozen=True)
class Plan:
    """The chosen candidate with its prediction, the runner-ups (best of each other tier assignment x
    codec x mode), a one-line reason, and whether it meets the latency objective. `assess` also makes
    Plans of a fixed candidate, which may be infeasible (`violations` says why)."""

    flow: str
    stages: tuple[str, ...]
    chosen: Option
    alternatives: tuple[Option, ...]
    reason: str
    objective_ms: float | None = None
    violations: tuple[str, ...] = ()

    @property
    def feasible(self) -> bool:
        return not self.violations

    @property
    def candidate(self) -> Candidate:
        return self.chosen.candidate

    @property
    def latency_ms(self) -> float:
        return self.chosen.estimate.latency_ms

    @property
    def objective_met(self) -> bool | None:
        return None if self.objective_ms is None else self.latency_ms <= self.objective_ms

    def tier_of(self, stage: str) -> str:
        return self.candidate.tiers[self.stages.index(stage)]

    def parameters(self, stage: str) -> StageParameters:
        """The partition knobs of one stage (what becomes AIFLOW_SPLIT_LAYER, AIFLOW_CODEC, AIFLOW_DECODING)."""
        est = self.chosen.estimate.stages[self.stages.index(stage)]
        c = self.candidate
        codec = {"vision_head": c.codec, "vision_tail": c.codec, "caption_drafter": PASSTHROUGH}.get(est.model)
        return StageParameters(
            split_layer=c.split if est.model == "vision_head" else None,
            codec=codec,
            decoding=c.decoding if est.model in ("captioner", "caption_decoder") else None,
        )

    def to_dict(self) -> dict:
        """JSON-ready: what `aiflow plan -o json` prints and status can carry."""
        return {
            "flow": self.flow,
            "feasible": self.feasible,
            "violations": list(self.violations),
            "reason": self.reason,
            "objectiveMs": self.objective_ms,
            "objectiveMet": self.objective_met,
            "chosen": option_dict(self.stages, self.chosen),
            "alternatives": [option_dict(self.stages, o) for o in self.alternatives],
        }


def option_dict(stages: tuple[str, ...], option: Option) -> dict:
    c, e = option.candidate, option.estimate
    return {
        "placement": dict(zip(stages, c.tiers)),
        "splitLayer": c.split,
        "codec": c.codec,
        "decoding": c.decoding,
        "latencyMs": round(e.latency_ms, 3),
        "bytesUpstream": round(e.bytes_upstream),
        "quality": e.quality,
        "stages": [{"stage": s.stage, "model": s.model, "tier": s.tier, "computeMs": round(s.ms, 3),
                    "queueMs": round(s.queue_ms, 3)} for s in e.stages],
        "hops": [
            {"from": h.src, "to": h.dst, "fromTier": h.src_tier, "toTier": h.dst_tier, "payload": h.payload, "bytes": round(h.bytes), "ms": round(h.ms, 3)}
            for h in e.hops
        ],
        "linkBytes": [{"from": a, "to": b, "bytes": round(n)} for a, b, n in e.link_bytes],
    }


def plan(problem: Problem, alternatives: int = DEFAULT_ALTERNATIVES) -> Plan:
    """The best plan and up to `alternatives` runner-ups. PlanError when nothing is feasible."""
    space = search_space(problem)
    profile, models = problem.profile, models_of(problem.flow)
    grid = make_grid(profile, space.modes, space.splits, space.codecs)
    terms = chain_terms(profile, models, grid)
    tables = link_tables(problem.cluster)
    n = len(models)

    # One step per stage: the call into it from tier a plus its compute on tier b, (M,S,C,3,3); a tier
    # the stage may not use costs inf. Chaining the steps by broadcasting gives every tier assignment
    # at once: axes (M,S,C, tier of stage 0, ..., tier of stage n-1), device < edge < cloud.
    is_up = np.array([[a == DEVICE and b != DEVICE for b in range(3)] for a in range(3)], dtype=float)
    total = upstream = None
    for i, (ref, (_, nbytes)) in enumerate(zip(*terms)):
        step = hop_ms(profile, tables, nbytes) + stage_ms_on_tiers(tables, ref)[..., None, :]
        step = np.where([t in space.stage_tiers[i] for t in TIERS], step, np.inf)
        up = nbytes[..., None, None] * is_up
        if i == 0:
            total, upstream = 0.0 + step[..., DEVICE, :], 0.0 + up[..., DEVICE, :]
            continue
        lead = (slice(None),) * 3 + (None,) * (i - 1)
        total = total[..., None] + step[lead]
        upstream = upstream[..., None] + up[lead]
    shape = grid.shape + (3**n,)
    total, upstream = total.reshape(shape), upstream.reshape(shape)
    split_idx = [profile.layers if s is None else s for s in space.splits]
    quality = np.stack([profile.quality_by_layer(c) for c in space.codecs], axis=1)[split_idx][None, :, :, None]
    total = np.where(quality >= quality_floor(problem), total, np.inf)

    # Rank by (latency, bytes upstream, -quality, index). Candidates that differ only in the split layer
    # are one group, shown once: first the best split of every group, then the groups in order.
    quality = np.broadcast_to(quality, shape)
    lat = total.min(axis=1, keepdims=True)
    tied = total == lat
    up = np.where(tied, upstream, np.inf).min(axis=1, keepdims=True)
    tied &= upstream == up
    q = np.where(tied, quality, -np.inf).max(axis=1, keepdims=True)
    tied &= quality == q
    split = tied.argmax(axis=1)  # first split of the group with the best keys
    mode, codec, assignment = np.indices(split.shape)
    index = ((mode * shape[1] + split) * shape[2] + codec) * shape[3] + assignment
    lat, up, q = lat[:, 0], up[:, 0], q[:, 0]
    feasible = np.isfinite(lat)
    ranked = index[feasible][np.lexsort((index[feasible], -q[feasible], up[feasible], lat[feasible]))]
    assignments = ranked % shape[3]
    # The best other placement, for the reason line even when it is not among the alternatives.
    other = ranked[assignments != assignments[0]][:1] if len(ranked) else ranked

    def option(flat) -> Option:
        mode, split, codec, assignment = np.unravel_index(flat, shape)
        tiers = tuple(TIERS[(assignment // 3 ** (n - 1 - i)) % 3] for i in range(n))
        candidate = Candidate(tiers, space.splits[split], space.codecs[codec], space.modes[mode])
        return Option(candidate, estimate(problem, candidate, terms, tables, (mode, split, codec)))

    return _make_plan(problem, [option(f) for f in ranked[: alternatives + 1]], next(map(option, other), None))


def plan_exhaustive(problem: Problem, alternatives: int = DEFAULT_ALTERNATIVES) -> Plan:
    """Reference solver: every candidate evaluated on its own, sorted by the same keys as `plan`."""
    space, floor = search_space(problem), quality_floor(problem)
    scored = []
    for index, (mode, split, codec, tiers) in enumerate(itertools.product(space.modes, space.splits, space.codecs, itertools.product(*space.stage_tiers))):
        candidate = Candidate(tuple(tiers), split, codec, mode)
        est = evaluate(problem, candidate)
        if est.quality < floor:
            continue
        scored.append(((est.latency_ms, est.bytes_upstream, -est.quality, index), candidate))
    scored.sort(key=lambda item: item[0])
    ranked = [c for _, c in scored]
    other = next((Option(c, evaluate(problem, c)) for c in ranked if c.tiers != ranked[0].tiers), None)
    return _make_plan(problem, [Option(c, evaluate(problem, c)) for c in _distinct(ranked, alternatives + 1)], other)


def _distinct(ranked: Iterable[Candidate], count: int) -> list[Candidate]:
    """The first `count` candidates that differ in more than the split layer."""
    seen, out = set(), []
    for candidate in ranked:
        key = (candidate.tiers, candidate.codec, candidate.decoding)
        if key not in seen:
            seen.add(key)
            out.append(candidate)
            if len(out) == count:
                break
    return out


def _make_plan(problem: Problem, options: list[Option], other_placement: Option | None) -> Plan:
    if not options:
        raise PlanError(f"flow {problem.flow.name!r}: no candidate meets the quality floor {quality_floor(problem):g} on the tiers it may use")
    chosen, rest = options[0], tuple(options[1:])
    return Plan(
        flow=problem.flow.name,
        stages=tuple(s.name for s in problem.flow.stages),
        chosen=chosen,
        alternatives=rest,
        reason=explain(problem, chosen, other_placement or (rest[0] if rest else None)),
        objective_ms=problem.flow.objective.latency_ms,
    )


def assess(problem: Problem, candidate: Candidate) -> Plan:
    """A Plan of a fixed candidate (e.g. the deployed one) under the problem's current conditions,
    with every constraint it violates now. PlanError when the profile cannot describe it."""
    flow = problem.flow
    violations = [p for s, t in zip(flow.stages, candidate.tiers) if (p := tier_problem(problem, s, t))]
    chosen = Option(candidate, evaluate(problem, candidate))
    if chosen.estimate.quality < quality_floor(problem):
        violations.append(f"{candidate.codec} at split layer {candidate.split} scores {chosen.estimate.quality:g}, under the quality floor {quality_floor(problem):g}")
    return Plan(
        flow=flow.name,
        stages=tuple(s.name for s in flow.stages),
        chosen=chosen,
        alternatives=(),
        reason="; ".join(violations) or f"{describe(flow, candidate)}: {chosen.estimate.latency_ms:.0f} ms predicted",
        objective_ms=flow.objective.latency_ms,
        violations=tuple(violations),
    )


def describe(flow, candidate: Candidate) -> str:
    """`head@device -> drafter@edge -> verifier@cloud, split at layer 2, int8+zstd, speculative`."""
    parts = [" -> ".join(f"{s.name}@{t}" for s, t in zip(flow.stages, candidate.tiers))]
    if candidate.split is not None:
        parts.append(f"split at layer {candidate.split}")
    if candidate.codec is not None:
        parts.append(candidate.codec)
    if candidate.decoding == SPECULATIVE:
        parts.append("speculative")
    return ", ".join(parts)


def explain(problem: Problem, chosen: Option, rival: Option | None) -> str:
    """One line: what was chosen, its prediction, and what would make `rival` (the best other
    placement) slower."""
    line = f"{describe(problem.flow, chosen.candidate)}: {chosen.estimate.latency_ms:.0f} ms predicted"
    if problem.flow.objective.latency_ms is not None:
        met = chosen.estimate.latency_ms <= problem.flow.objective.latency_ms
        line += f" ({'meets' if met else 'misses'} the {problem.flow.objective.latency_ms:g} ms objective)"
    if rival is None:
        return line
    delta = rival.estimate.latency_ms - chosen.estimate.latency_ms
    mine = _components(problem, chosen)
    diffs = {k: rival_ms - mine.get(k, 0.0) for k, rival_ms in _components(problem, rival).items()}
    cause, extra = max(diffs.items(), key=lambda kv: (kv[1], kv[0]))
    return f"{line}; {describe(problem.flow, rival.candidate)} would be {delta:.0f} ms slower, mostly {cause} (+{extra:.0f} ms)"


def _components(problem: Problem, option: Option) -> dict[str, float]:
    """Latency split into what a user can act on: compute per tier, transfer per link."""
    out: dict[str, float] = {}
    for s in option.estimate.stages:
        state = problem.cluster.tier(s.tier)
        key = f"compute on {s.tier} (x{state.compute_factor:g}, {state.utilisation:.0%} busy, queueing x{state.queueing:.2f})"
        out[key] = out.get(key, 0.0) + s.ms
    for h in option.estimate.hops:
        if h.crosses:
            link = problem.cluster.link(h.src_tier, h.dst_tier)
            key = f"{h.payload} over {h.src_tier}->{h.dst_tier} ({link.bandwidth_mbps:.3g} Mbit/s, {link.rtt_ms:.3g} ms RTT)"
            out[key] = out.get(key, 0.0) + h.ms
    return out


__all__ = ["Option", "Plan", "PlanError", "assess", "describe", "explain", "plan", "plan_exhaustive"]
