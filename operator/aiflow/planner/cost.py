"""The cost model: predicted end-to-end latency, bytes and quality of a candidate plan. Pure.

A request is a chain of nested Triton calls: the client (on the device) calls the first stage, each
stage calls the next, and the caption returns the same way. So the latency is the sum over stages of
their compute, plus per call an RPC cost and, when the call crosses tiers, the link's RTT plus the
request bytes at the link's bandwidth (responses are a caption: a few bytes, covered by the RTT).

Compute is profile milliseconds x the tier's slowdown (compute factor / (1 - utilisation), bounded).
A shared tier also queues: a stage there waits in Triton's queue about rho / (1 - rho) times its own
compute, rho being how busy the tier's stage instances are (Triton's compute metric, `TierState.busy`),
so a saturated edge pushes work to the device or the cloud.
The same arithmetic serves one candidate (`evaluate`) and the solver's whole grid (`chain_terms` works
on numpy arrays that broadcast over modes x splits x codecs), so both predict bit-identical numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aiflow import TIERS
from aiflow.planner.cluster import ClusterState
from aiflow.planner.problem import GREEDY, SPECULATIVE, PlanError, Problem, models_of
from aiflow.planner.profile import Profile

CLIENT = "client"
DEVICE = TIERS.index("device")
IMAGE, FEATURES, DRAFTS = "image", "features", "drafts"


@dataclass(frozen=True)
class Candidate:
    """One point of the search space: a tier per stage, the split layer, the codec, the decoding mode
    (None for a knob the flow does not have)."""

    tiers: tuple[str, ...]
    split: int | None
    codec: str | None
    decoding: str = GREEDY


@dataclass(frozen=True)
class StageCost:
    stage: str
    model: str
    tier: str
    ms: float  # compute, queueing included
    queue_ms: float = 0.0  # of which predicted wait in the tier's queue


@dataclass(frozen=True)
class HopCost:
    """One call: `src` (a stage, or the client) sends `payload` of `bytes` to stage `dst`."""

    src: str
    dst: str
    src_tier: str
    dst_tier: str
    payload: str
    bytes: float
    ms: float

    @property
    def crosses(self) -> bool:
        return self.src_tier != self.dst_tier


@dataclass(frozen=True)
class Estimate:
    latency_ms: float
    stages: tuple[StageCost, ...]
    hops: tuple[HopCost, ...]
    bytes_upstream: float  # bytes that leave the device
    link_bytes: tuple[tuple[str, str, float], ...]  # per physical link (from, to, bytes), crossing links only
    quality: float

    def bytes_over(self, src: str, dst: str) -> float:
        return sum(b for a, z, b in self.link_bytes if (a, z) == (src, dst))


@dataclass(frozen=True)
class Grid:
    """Knob values as numpy arrays shaped to broadcast to (modes, splits, codecs)."""

    modes: tuple[str, ...]
    splits: tuple[int | None, ...]
    codecs: tuple[str | None, ...]
    speculative: np.ndarray  # (M,1,1) 1.0 where speculative
    done_at_split: np.ndarray  # (1,S,1) encoder ms of layers [0, split)
    encode_ms: np.ndarray  # (1,1,C)
    decode_ms: np.ndarray  # (1,1,C)
    token_scale: np.ndarray  # (1,1,C) tokens after the codec's reduction / all tokens
    bytes_at_split: np.ndarray  # (1,S,C) features message taken at the split
    bytes_final: np.ndarray  # (1,1,C) features message after the whole encoder
    acceptance: np.ndarray  # (1,S,C) share of draft tokens accepted on features through the codec at the split

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.modes), len(self.splits), len(self.codecs))


def make_grid(profile: Profile, modes, splits, codecs) -> Grid:
    """The knob grid (one mode, split, codec each for a single candidate) as broadcastable arrays."""
    cum = np.concatenate([[0.0], np.cumsum(profile.layer_ms)])
    split_idx = np.array([s or 0 for s in splits])
    enc = np.array([profile.codec_cost(c)[0] if c else 0.0 for c in codecs])
    dec = np.array([profile.codec_cost(c)[1] if c else 0.0 for c in codecs])
    scale = np.array([profile.kept_tokens(c) / profile.tokens if c else 1.0 for c in codecs])
    table = np.stack([profile.feature_bytes_by_layer(c) if c else np.zeros(profile.layers + 1) for c in codecs], axis=1)
    accept = np.stack([profile.acceptance_by_layer(c) for c in codecs], axis=1)
    return Grid(
        modes=tuple(modes),
        splits=tuple(splits),
        codecs=tuple(codecs),
        speculative=np.array([m == SPECULATIVE for m in modes], dtype=float)[:, None, None],
        done_at_split=cum[split_idx][None, :, None],
        encode_ms=enc[None, None, :],
        decode_ms=dec[None, None, :],
        token_scale=scale[None, None, :],
        bytes_at_split=table[split_idx][None, :, :],
        bytes_final=table[-1][None, None, :],
        acceptance=accept[split_idx][None, :, :],
    )


def chain_terms(profile: Profile, models: tuple[str, ...], grid: Grid) -> tuple[list[np.ndarray], list[tuple[str, np.ndarray]]]:
    """Per stage its compute at reference speed, per call (client->stage 0, stage i-1 -> stage i) its
    payload and bytes; arrays broadcast to the grid's shape. What each model computes follows
    aiflow.stage: a features consumer finishes the encoder from the layer the message carries;
    the drafter always drafts and forwards the features as received (codec `passthrough`), so the
    verifier finishes the encoder too; captioner and caption_decoder decode greedily or speculate
    locally (draft, then verify, on their own tier)."""
    p, g = profile, grid
    total = sum(p.layer_ms)
    tokens = p.tokens_per_caption
    greedy_large = tokens * p.large_token_ms
    # Drafts from coarser features are accepted less: the acceptance is the codec's, at the split.
    speculate = tokens * p.small_token_ms + p.verify_ms + (1 - g.acceptance) * greedy_large
    decode = (1 - g.speculative) * greedy_large + g.speculative * speculate
    stage_ms, hops = [], [(IMAGE, np.full(g.shape, float(p.png_bytes)))]
    rest, message = 0.0, None  # encoder work left in the message that reaches the next stage, its bytes
    for i, model in enumerate(models):
        if model == "captioner":
            ms = p.embed_ms + total + decode
        elif model == "vision_head":
            ms = p.embed_ms + g.done_at_split + g.encode_ms
            rest, message = (total - g.done_at_split) * g.token_scale, (FEATURES, g.bytes_at_split)
        elif model == "vision_tail":
            ms = g.decode_ms + rest + g.encode_ms
            rest, message = 0.0, (FEATURES, g.bytes_final)
        elif model == "caption_decoder":
            ms = g.decode_ms + rest + decode
        elif model == "caption_drafter":
            ms = g.decode_ms + rest + tokens * p.small_token_ms
            message = (DRAFTS, message[1] + p.draft_bytes)
        else:  # caption_verifier: finish the encoder, one pass over the drafts, greedy from the first rejection
            ms = g.decode_ms + rest + p.verify_ms + (1 - g.acceptance) * greedy_large
        stage_ms.append(np.broadcast_to(ms, g.shape))
        if i < len(models) - 1:  # every stage but the last sends its message on
            hops.append((message[0], np.broadcast_to(message[1], g.shape)))
    return stage_ms, hops


@dataclass(frozen=True)
class LinkTables:
    """Per ordered tier pair (device, edge, cloud indices): RTT and ms per byte, zero within a tier;
    per tier its slowdown and its queueing (wait per unit of service time)."""

    rtt: np.ndarray  # (3,3)
    ms_per_byte: np.ndarray  # (3,3)
    slowdown: np.ndarray  # (3,)
    queueing: np.ndarray  # (3,)


def link_tables(cluster: ClusterState) -> LinkTables:
    rtt, per_byte = np.zeros((3, 3)), np.zeros((3, 3))
    for a, src in enumerate(TIERS):
        for b, dst in enumerate(TIERS):
            if a != b:
                link = cluster.link(src, dst)
                rtt[a, b], per_byte[a, b] = link.rtt_ms, 8.0 / (link.bandwidth_mbps * 1e3)
    return LinkTables(rtt, per_byte, np.array([cluster.tier(t).slowdown for t in TIERS]),
                      np.array([cluster.tier(t).queueing for t in TIERS]))


def hop_ms(profile: Profile, tables: LinkTables, nbytes: np.ndarray) -> np.ndarray:
    """Cost of one call carrying `nbytes`, for every (from tier, to tier): shape nbytes.shape + (3,3)."""
    b = nbytes[..., None, None]
    return (profile.rpc_overhead_ms + b * (profile.rpc_ms_per_mb / 1e6)) + tables.rtt + b * tables.ms_per_byte


def stage_ms_on_tiers(tables: LinkTables, ms: np.ndarray) -> np.ndarray:
    """Compute of a stage on every tier, its wait in the tier's queue included: shape ms.shape + (3,)."""
    return ms[..., None] * tables.slowdown * (1.0 + tables.queueing)


def evaluate(problem: Problem, candidate: Candidate) -> Estimate:
    """Predict latency (with its per-stage and per-call breakdown), bytes and quality of one candidate.
    PlanError when the candidate does not fit the flow or the profile (a deployed plan from before a
    profile change)."""
    profile, n = problem.profile, len(problem.flow.stages)
    if len(candidate.tiers) != n or candidate.split is not None and not 0 <= candidate.split <= profile.layers:
        raise PlanError(f"candidate {candidate} does not fit a flow of {n} stages and an encoder of {profile.layers} layers")
    if candidate.codec is not None and candidate.codec not in profile.quality["large"]:
        raise PlanError(f"candidate codec {candidate.codec!r} is not in the profile")
    grid = make_grid(problem.profile, (candidate.decoding,), (candidate.split,), (candidate.codec,))
    terms = chain_terms(problem.profile, models_of(problem.flow), grid)
    return estimate(problem, candidate, terms, link_tables(problem.cluster), (0, 0, 0))


def estimate(problem: Problem, candidate: Candidate, terms, tables: LinkTables, at: tuple[int, int, int]) -> Estimate:
    """The Estimate of `candidate` from `chain_terms` over a grid, read at grid index `at` (mode,
    split, codec): the solver's tables give the same numbers as `evaluate` without recomputing them."""
    stage_ref, hops_ref = terms
    tier_idx = [TIERS.index(t) for t in candidate.tiers]
    total, upstream = 0.0, 0.0
    stages, hops, link_bytes = [], [], {}
    src_idx, src_name = DEVICE, CLIENT
    for i, stage in enumerate(problem.flow.stages):
        payload, nbytes = hops_ref[i]
        size = nbytes[at]
        call = float(hop_ms(problem.profile, tables, size)[src_idx, tier_idx[i]])
        work = float(stage_ms_on_tiers(tables, stage_ref[i][at])[tier_idx[i]])
        queue = work * float(tables.queueing[tier_idx[i]] / (1.0 + tables.queueing[tier_idx[i]]))
        total = total + (call + work)  # grouped as the solver's per-stage steps, so both agree bit for bit
        upstream = upstream + float(size) * float(src_idx == DEVICE and tier_idx[i] != DEVICE)
        src_tier, dst_tier = TIERS[src_idx], candidate.tiers[i]
        if src_tier != dst_tier:
            for leg in problem.cluster.link(src_tier, dst_tier).via:
                link_bytes[leg] = link_bytes.get(leg, 0.0) + float(size)
        hops.append(HopCost(src_name, stage.name, src_tier, dst_tier, payload, float(size), call))
        stages.append(StageCost(stage.name, stage.model, dst_tier, work, queue))
        src_idx, src_name = tier_idx[i], stage.name
    order = {t: i for i, t in enumerate(TIERS)}
    return Estimate(
        latency_ms=total,
        stages=tuple(stages),
        hops=tuple(hops),
        bytes_upstream=upstream,
        link_bytes=tuple((a, b, n) for (a, b), n in sorted(link_bytes.items(), key=lambda kv: (order[kv[0][0]], order[kv[0][1]]))),
        quality=problem.profile.quality_of(candidate.codec, candidate.split),
    )
