"""Random planning instances for property-based tests: profiles, clusters and flows that the parsers accept."""

from __future__ import annotations

from hypothesis import strategies as st

from aiflow import TIERS
from aiflow.api.spec import parse_flow
from aiflow.planner.cluster import LinkState, TierState, cluster_state
from aiflow.planner.problem import Problem
from aiflow.planner.profile import profile_from_dict

CHAINS = (
    ("captioner",),
    ("vision_head", "caption_decoder"),
    ("vision_head", "vision_tail", "caption_decoder"),
    ("vision_head", "caption_drafter", "caption_verifier"),
    ("vision_head", "vision_tail", "caption_drafter", "caption_verifier"),
)
CODEC_POOL = ("fp32", "fp16", "int8", "int8+zstd", "topk:4+int8+zstd", "merge:4+fp16+zstd")
MODELS = ("captioner", "vision_head", "vision_tail", "caption_decoder", "caption_drafter", "caption_verifier")

ms = st.floats(0.0, 50.0, allow_nan=False)
score = st.floats(90.0, 100.0, allow_nan=False)


def manifest(name: str, stages: list[dict]) -> dict:
    return {"apiVersion": "aiflow.io/v1alpha1", "kind": "AIFlow", "metadata": {"name": name}, "spec": {"stages": stages}}


@st.composite
def profile_docs(draw) -> dict:
    layers = draw(st.integers(1, 4))
    codecs = draw(st.lists(st.sampled_from(CODEC_POOL), min_size=1, max_size=3, unique=True))
    per_codec = lambda: st.one_of(score, st.lists(score, min_size=layers + 1, max_size=layers + 1))
    quality = {c: draw(per_codec()) for c in codecs}
    quality.setdefault("fp32", draw(st.floats(96.0, 100.0)))
    return {
        "kind": "PlannerProfile",
        "encoder": {"embedMs": draw(ms), "layerMs": draw(st.lists(ms, min_size=layers, max_size=layers)),
                    "tokens": draw(st.integers(2, 200)), "dims": draw(st.integers(1, 64))},
        "decoder": {"smallTokenMs": draw(ms), "largeTokenMs": draw(ms), "verifyMs": draw(ms),
                    "tokensPerCaption": draw(st.floats(1, 30)), "acceptance": draw(st.floats(0, 1))},
        "image": {"pngBytes": draw(st.floats(100, 200_000))},
        "features": {"codecs": codecs,
                     "codecMs": {c: {"encode": draw(ms), "decode": draw(ms)} for c in codecs if draw(st.booleans())}},
        "quality": {"large": quality},
        "memoryMiB": {m: draw(st.floats(50, 3000)) for m in MODELS},
        "rpc": {"overheadMs": draw(st.floats(0, 2)), "msPerMB": draw(st.floats(0, 10))},
    }


@st.composite
def tier_states(draw) -> list[TierState]:
    out = []
    for tier in TIERS:
        nodes = draw(st.sampled_from([0, 1, 1, 2, 2, 3]))
        ready = nodes if draw(st.integers(0, 5)) else draw(st.integers(0, nodes))
        out.append(TierState(
            tier, nodes=nodes, ready_nodes=ready,
            compute_factor=draw(st.floats(0.2, 5)), utilisation=draw(st.floats(0, 1)),
            memory_mib=draw(st.sampled_from([0.0, 512.0, 2048.0, 2048.0, 8192.0, 8192.0])),
        ))
    return out


bandwidth = st.floats(0.1, 1000)
rtt = st.floats(0, 100)


@st.composite
def link_lists(draw) -> list[LinkState]:
    links = [LinkState("device", "edge", draw(bandwidth), draw(rtt)), LinkState("edge", "cloud", draw(bandwidth), draw(rtt))]
    if draw(st.booleans()):
        links.append(LinkState("device", "cloud", draw(bandwidth), draw(rtt)))
    return links


@st.composite
def flow_manifests(draw, profile: dict) -> dict:
    chain = draw(st.sampled_from(CHAINS))
    stages = []
    for i, model in enumerate(chain):
        stage = {"name": f"s{i}", "model": model, "tier": draw(st.sampled_from(("auto",) * 6 + TIERS))}
        if model == "vision_head" and draw(st.integers(0, 5)) == 0:
            stage["parameters"] = {"splitLayer": draw(st.integers(0, len(profile["encoder"]["layerMs"])))}
        stages.append(stage)
    return manifest("random", stages)


def source_links(cluster) -> list[LinkState]:
    """The links a cluster was built from (forward directions, not composed), to rebuild it changed."""
    return [l for (s, d), l in cluster.links.items() if TIERS.index(s) < TIERS.index(d) and len(l.via) == 1]


@st.composite
def problems(draw, min_quality=st.one_of(st.none(), st.none(), st.floats(80, 97))) -> Problem:
    """A random Problem; `.links` of its cluster came from `link_lists`."""
    doc = draw(profile_docs())
    flow = parse_flow(draw(flow_manifests(doc)))
    cluster = cluster_state(draw(tier_states()), observed_links=draw(link_lists()))
    return Problem(flow, cluster, profile_from_dict(doc), draw(min_quality))
