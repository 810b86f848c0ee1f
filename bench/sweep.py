"""The measured case study: every scheme, and the adaptive plan, across network and device conditions.

    python -m bench.sweep [--quick] [--out docs/results] [--measure-profile | --profile FILE|default] [--requests N]
    python -m bench.sweep --report-only [--out docs/results]     # tables and plots again from sweep.json

One local runtime (a real tritonserver per tier, emulated links) serves the whole grid: device->edge
bandwidth x edge->cloud RTT x device compute factor. Links change live between grid points
(`Link.set`); the device's compute factor is a load-time parameter of the device stages
(`AIFLOW_COMPUTE_FACTOR`): each factor gets its own set of stage copies, loaded side by side, and the
schemes take turns request by request. At every grid point each scheme runs the same held-out
scenes, one request each after a warm-up request: device-only,
edge-only, cloud-only (raw PNG upload), split with each codec, split + speculative decoding, and the
adaptive plan -- the planner's fastest runnable plan over the captioning flows for that grid point's
conditions (measured profile when given, else the shipped default), run as a chain of stages.

Writes into --out: sweep.csv (one row per grid point and scheme), sweep.json (rows, headline,
targets, machine, settings), sweep.md (the tables), sweep_latency.png, sweep_quality.png,
sweep_headline.png. Speed targets are checked and reported, never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/sweep.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiflow.local.schemes import DEFAULT_CODEC, DEFAULT_SPLIT_LAYER, Conditions, Scheme, get_scheme
from bench.report import write_csv

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "results"
DEFAULT_PROFILE = DEFAULT_OUT / "planner_profile.yaml"
HELDOUT_SEED = 6006  # scenes of their own: the demo, the profile and the weights manifest use other seeds
ADAPTIVE = "adaptive"
FRESH_WARMUP = 2  # extra unmeasured requests per chain right after its stages load
# Targets of the case study (issue 6).
WITHIN_BEST = 1.05  # adaptive <= 5% slower than the best static scheme at every grid point
SPEEDUP_OVER_CLOUD = 3.0  # best cooperative scheme vs cloud-only at the lowest bandwidth
QUALITY_POINTS = 1.0  # ... with quality within 1 point (0-100 metrics)
QUALITY_TARGET_METRICS = ("bleu4", "exact_match")  # the 0-100 metrics; CIDEr (0-1000) is reported


@dataclass(frozen=True)
class Settings:
    """The grid and how much to measure at each point."""

    bandwidths: tuple[float, ...] = (0.25, 1.0, 5.0, 25.0, 100.0)  # device->edge uplink, Mbit/s
    rtts: tuple[float, ...] = (5.0, 40.0)  # edge->cloud round trip, ms
    device_factors: tuple[float, ...] = (1.0, 4.0)  # x slower than this machine
    # lossless-ish, quantised, token pruning (the default), token merging
    codecs: tuple[str, ...] = tuple(dict.fromkeys(("fp16", "int8", DEFAULT_CODEC, "merge:16+int8")))
    split_layer: int = DEFAULT_SPLIT_LAYER
    spec_codec: str = DEFAULT_CODEC
    requests: int = 10  # measured requests per scheme and grid point
    warmup: int = 1  # unmeasured requests after every link or wiring change
    seed: int = HELDOUT_SEED
    # Fixed conditions: the edge box and the backbone.
    edge_factor: float = Conditions.edge_factor
    cloud_factor: float = Conditions.cloud_factor
    device_rtt_ms: float = Conditions.rtt_ms
    downlink_floor_mbps: float = Conditions.downlink_mbps  # device<-edge: max(uplink, this)
    edge_uplink_mbps: float = Conditions.edge_uplink_mbps
    edge_downlink_mbps: float = Conditions.edge_downlink_mbps

    def check(self) -> None:
        if not (self.bandwidths and self.rtts and self.device_factors):
            raise ValueError("the grid needs at least one bandwidth, one RTT and one device compute factor")
        if min(self.bandwidths) <= 0 or min(self.rtts) < 0 or min(self.device_factors) < 1:
            raise ValueError("bandwidths must be > 0 Mbit/s, RTTs >= 0 ms, compute factors >= 1")
        if self.requests < 1 or self.warmup < 0:
            raise ValueError("requests must be >= 1 and warmup >= 0")

    @property
    def scenes_per_factor(self) -> int:
        """Held-out scenes: each (bandwidth, RTT) point gets its own `requests` of them; every scheme
        at a point sees the same ones, and the second compute factor repeats the first's."""
        return len(self.bandwidths) * len(self.rtts) * self.requests


QUICK = Settings(bandwidths=(0.5, 25.0), rtts=(40.0,), device_factors=(4.0,), codecs=(DEFAULT_CODEC,), requests=2)


@dataclass(frozen=True)
class GridPoint:
    bandwidth_mbps: float
    rtt_ms: float  # edge->cloud
    device_factor: float

    @property
    def label(self) -> str:
        return f"{self.bandwidth_mbps:g} Mbit/s, {self.rtt_ms:g} ms, x{self.device_factor:g}"

    @property
    def key(self) -> tuple[float, float, float]:
        return (self.bandwidth_mbps, self.rtt_ms, self.device_factor)


def grid(settings: Settings) -> list[GridPoint]:
    """Compute factor outermost (a new factor reloads the device models), then RTT, then bandwidth."""
    return [GridPoint(b, r, f) for f in settings.device_factors for r in settings.rtts for b in settings.bandwidths]


def conditions(point: GridPoint, settings: Settings) -> Conditions:
    """The emulated tiers and links at a grid point (what the planner is told, too)."""
    return Conditions(
        device_factor=point.device_factor,
        edge_factor=settings.edge_factor,
        cloud_factor=settings.cloud_factor,
        uplink_mbps=point.bandwidth_mbps,
        downlink_mbps=max(point.bandwidth_mbps, settings.downlink_floor_mbps),
        rtt_ms=settings.device_rtt_ms,
        edge_uplink_mbps=settings.edge_uplink_mbps,
        edge_downlink_mbps=settings.edge_downlink_mbps,
        edge_rtt_ms=point.rtt_ms,
    )


# ---- schemes as chains ------------------------------------------------------------------------------


def static_schemes(settings: Settings) -> dict[str, Scheme]:
    """The fixed schemes by label: the three single-tier ones, split with each codec, split + speculation."""
    schemes = {n: get_scheme(n) for n in ("device-only", "edge-only", "cloud-only")}
    for codec in settings.codecs:
        s = get_scheme("split", split_layer=settings.split_layer, codec=codec)
        schemes[f"split {s.entry.knobs['AIFLOW_CODEC']}"] = s
    s = get_scheme("split-spec", split_layer=settings.split_layer, codec=settings.spec_codec)
    schemes[f"split-spec {s.entry.knobs['AIFLOW_CODEC']}"] = s
    return {label: dataclasses.replace(s, name=label) for label, s in schemes.items()}


def cooperative(scheme: Scheme) -> bool:
    """A scheme that spreads the model over more than one tier."""
    return len({p.tier for p in scheme.chain}) > 1


def normalised(scheme: Scheme) -> Scheme:
    """Drop knobs that only restate a stage's default (greedy decoding), so equal chains compare equal."""
    chain = tuple(
        dataclasses.replace(p, knobs={k: v for k, v in p.knobs.items() if (k, v) != ("AIFLOW_DECODING", "greedy")})
        for p in scheme.chain
    )
    return dataclasses.replace(scheme, chain=chain)


def chain_key(scheme: Scheme) -> tuple:
    """What a scheme runs: upload format and every stage's tier, model and knobs (not its name)."""
    return (scheme.upload, tuple((p.tier, p.model, tuple(sorted(p.knobs.items()))) for p in scheme.chain))


def with_device_factor(scheme: Scheme, factor: float) -> Scheme:
    """The scheme with its device stages loaded at compute factor `factor` (a load-time parameter)."""
    chain = tuple(
        dataclasses.replace(p, knobs={**p.knobs, "AIFLOW_COMPUTE_FACTOR": f"{factor:g}"}) if p.tier == "device" else p
        for p in scheme.chain
    )
    return dataclasses.replace(scheme, chain=chain)


# ---- the adaptive plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The planner's plan for one grid point, as a runnable chain."""

    scheme: Scheme
    plan: str  # the option as the planner describes it
    flow: str
    predicted_ms: float
    predicted_bytes_up: float
    same_as: str  # label of the static scheme running the very same chain, or ""
    note: str  # why this option (first choice, or why the first could not run here)


def adaptive_choice(point: GridPoint, settings: Settings, profile, statics: Mapping[str, Scheme]) -> Choice:
    """Plan every captioning flow for the point's conditions; take the fastest predicted option the
    local runtime can run (its links carry calls up the tiers only)."""
    from aiflow.local.planning import FLOWS, conditions_cluster, describe_option, flow_of, option_scheme, runnable
    from aiflow.planner.problem import PlanError, Problem
    from aiflow.planner.solver import plan

    cluster = conditions_cluster(conditions(point, settings))
    options, refused = [], []
    for fname, models in FLOWS.items():
        try:
            result = plan(Problem(flow_of(fname, models), cluster, profile))
        except PlanError as exc:
            refused.append(f"{fname}: {exc}")
            continue
        for rank, option in enumerate((result.chosen, *result.alternatives)):
            est = option.estimate
            options.append(((est.latency_ms, est.bytes_upstream, -est.quality), fname, rank, result, option))
    if not options:
        raise RuntimeError(f"the planner found no plan at {point.label}: {'; '.join(refused)}")
    options.sort(key=lambda o: o[0])  # stable: ties keep the flow order
    runnable_options = [o for o in options if runnable(o[4].candidate.tiers)]
    if not runnable_options:
        raise RuntimeError(f"no planned option at {point.label} can run on the local runtime (all call down the tiers)")
    _, fname, rank, result, option = runnable_options[0]
    first = options[0]
    note = "planner's first choice" if first is runnable_options[0] else (
        f"the first choice ({describe_option(first[3], first[4])}) calls down the tiers, which the local links do not carry")
    scheme = normalised(option_scheme(result, option))
    key = chain_key(scheme)
    same_as = next((label for label, s in statics.items() if chain_key(s) == key), "")
    text = describe_option(result, option)
    scheme = statics[same_as] if same_as else dataclasses.replace(scheme, name=f"{ADAPTIVE}: {text}", summary=text)
    return Choice(scheme, text, fname, option.estimate.latency_ms, option.estimate.bytes_upstream, same_as, note)


def load_planner_profile(path: str | os.PathLike | None):
    """The measured profile at `path` when it exists; else the shipped default. Returns (profile, where)."""
    from aiflow.planner.profile import load_profile

    if path and str(path) != "default" and Path(path).is_file():
        return load_profile(path), str(path)
    return load_profile(None), "shipped default (operator/aiflow/planner/default_profile.yaml)"


# ---- measuring --------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One scheme at one grid point: every request measured on the Triton servers."""

    point: GridPoint
    label: str
    kind: str  # "static" or ADAPTIVE
    chain: str
    latencies_ms: list[float]
    bytes_up: float  # payload bytes leaving the device per request (upload or features)
    wire_up: dict[str, float]  # bytes per request on each link upstream, as the link proxies counted
    captions: dict[str, str]  # scene -> caption
    cooperative: bool
    same_as: str = ""
    predicted_ms: float | None = None
    plan: str = ""
    note: str = ""


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default)."""
    import numpy as np

    return float(np.percentile(list(values), q))


def set_links(runtime, point: GridPoint, settings: Settings) -> None:
    """Change the running links to the point's conditions (live: no server restarts)."""
    links = conditions(point, settings).links()
    for name, cfg in links.items():
        runtime.link(name).set(**dataclasses.asdict(cfg))


# Every chain of one compute factor is loaded side by side, each distinct stage as a copy of its
# model_repo/ model under a name of its own (aiflow.local.adaptive's model copies: same config, same
# code), so at every grid point the schemes take turns request by request and share whatever load the
# machine has at that moment.


@dataclass(frozen=True)
class Deployment:
    wires: tuple  # aiflow.local.schemes.Wire, one per distinct stage, each a model copy
    chains: Mapping[str, Scheme]  # label -> the chain as loaded (copy names)


def deployment(schemes: Sequence[Scheme], first: int) -> Deployment:
    """Name a model copy for every distinct stage (tier, model, knobs and the stages after it) of
    `schemes`, numbered from `first`."""
    from aiflow.local.planning import copy_name
    from aiflow.local.schemes import Wire

    names: dict[tuple, str] = {}
    wires, chains = [], {}
    for scheme in schemes:
        after, placed = None, []
        for p in reversed(scheme.chain):
            key = (p.tier, p.model, tuple(sorted(p.knobs.items())), after)
            if key not in names:
                names[key] = copy = copy_name(p.model, first + len(names))
                wires.append(Wire(p.tier, copy, {"AIFLOW_STAGE": copy, **p.knobs}, after))
            after = (p.tier, names[key])
            placed.append(dataclasses.replace(p, model=names[key]))
        chains[scheme.name] = dataclasses.replace(scheme, chain=tuple(reversed(placed)))
    return Deployment(tuple(wires), chains)


def load(flow, dep: Deployment) -> None:
    """Load every stage copy of `dep` side by side (each load starts a Python stub that imports torch)."""
    from concurrent.futures import ThreadPoolExecutor

    from aiflow.local.adaptive import load_copy

    with ThreadPoolExecutor(max_workers=len(dep.wires)) as pool:
        list(pool.map(lambda w: load_copy(flow, w), dep.wires))


class Camera:
    """The device-side client of one chain: one open gRPC channel into its first stage, as a camera
    keeps it (a channel per request would add connection set-up over the emulated link)."""

    def __init__(self, flow, runtime, scheme: Scheme):
        import tritonclient.grpc as grpcclient

        self.flow, self.runtime, self.scheme = flow, runtime, scheme
        self.url = flow.entry_address(scheme)
        self.client = grpcclient.InferenceServerClient(self.url)

    def _counters(self) -> dict[str, int]:
        return {link.name: link.stats().bytes_up for link in self.runtime.links.values()}

    def caption(self, name: str, image: bytes):
        """One request: (Captioned, bytes each link carried upstream for it as the link proxies counted)."""
        from aiflow.local.client import Captioned, add_link_times, encode_upload, infer, link_bytes

        upload = encode_upload(image, self.scheme.upload)
        before = self._counters()
        (caption,), hops, latency = infer(self.client, self.url, self.scheme.entry.model, [upload])
        after = self._counters()
        add_link_times(hops, latency)
        result = Captioned(name, caption, self.scheme.name, latency, len(upload),
                           link_bytes(self.flow.tiers, len(upload), hops), hops)
        return result, {k: after[k] - before[k] for k in after}

    def close(self) -> None:
        self.client.close()


def measure_point(cameras: Mapping[str, Camera], scenes: Sequence[tuple[str, bytes]], warmup: int) -> dict[str, list]:
    """Warm every chain up, then send each scene through every chain in turn (the first to go rotates);
    label -> [(Captioned, wire bytes)] in scene order."""
    labels = list(cameras)
    for w in range(warmup):
        for label in labels:
            cameras[label].caption(*scenes[w % len(scenes)])
    out: dict[str, list] = {label: [] for label in labels}
    for r, scene in enumerate(scenes):
        k = r % len(labels)
        for label in labels[k:] + labels[:k]:
            out[label].append(cameras[label].caption(*scene))
    return out


def scenes_for(point_index: int, settings: Settings, pool: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The point's own slice of the held-out pool (the same for every scheme at that point)."""
    start = (point_index * settings.requests) % len(pool)
    return [pool[(start + i) % len(pool)] for i in range(settings.requests)]


def blocks(settings: Settings, statics: Mapping[str, Scheme], choices: Mapping) -> list[tuple[float, list, Deployment]]:
    """Per device compute factor: its grid points (index, point) and the deployment of every chain they run."""
    out, first = [], 1
    points = grid(settings)
    for factor in settings.device_factors:
        here = [(i, p) for i, p in enumerate(points) if p.device_factor == factor]
        schemes = {**statics, **{c.scheme.name: c.scheme for c in (choices[p.key] for _, p in here) if not c.same_as}}
        dep = deployment([with_device_factor(s, factor) for s in schemes.values()], first)
        out.append((factor, here, dep))
        first += len(dep.wires)
    return out


def run(settings: Settings, profile, profile_source: str, command: str = "python -m bench.sweep",
        log: Callable[[str], None] = print) -> dict:
    """Measure the whole grid on one local runtime; return the results document (rows, quality, meta)."""
    from aiflow.local.compare import heldout_images
    from aiflow.local.schemes import start_runtime

    settings.check()
    statics = static_schemes(settings)
    points = grid(settings)
    per_factor = len(settings.bandwidths) * len(settings.rtts)
    choices = {p.key: adaptive_choice(p, settings, profile, statics) for p in points}
    plan = blocks(settings, statics, choices)
    fastest = GridPoint(max(settings.bandwidths), min(settings.rtts), settings.device_factors[0])
    started, load_start = time.time(), os.getloadavg()[0]
    cells: list[Cell] = []
    extra: dict[str, dict[str, str]] = {}  # chain -> scene -> caption, captioned only for quality
    with tempfile.TemporaryDirectory(prefix="aiflow-sweep-") as tmp:
        pool, refs = heldout_images(settings.seed, settings.scenes_per_factor, Path(tmp) / "scenes")
        references = {name: ref for (name, _), ref in zip(pool, refs)}
        log(f"{len(points)} grid points x {len(statics) + 1} schemes, {settings.requests} requests each after "
            f"{settings.warmup} warm-up; {len(pool)} held-out scenes (seed {settings.seed}); profile: {profile_source}")
        runtime, flow = start_runtime(conditions(points[0], settings), wires=[], state_path=Path(tmp) / "state",
                                      model_repo=os.environ.get("AIFLOW_MODEL_REPO"))
        try:
            triton_version = _triton_version(runtime)
            for factor, here, dep in plan:
                t0 = time.time()
                load(flow, dep)
                log(f"device x{factor:g}: {len(dep.chains)} chains, {len(dep.wires)} stages loaded in {time.time() - t0:.0f} s")
                cameras = {label: Camera(flow, runtime, chain) for label, chain in dep.chains.items()}
                try:
                    for n, (i, p) in enumerate(here):
                        choice = choices[p.key]
                        labels = list(statics) + ([] if choice.same_as else [choice.scheme.name])
                        set_links(runtime, p, settings)
                        warmup = settings.warmup + (FRESH_WARMUP if n == 0 else 0)  # every stub's first calls
                        measured = measure_point({k: cameras[k] for k in labels}, scenes_for(i % per_factor, settings, pool), warmup)
                        for label, done in measured.items():
                            base = statics.get(label) or choice.scheme
                            cells += _cells(p, label, base, statics, choice, done)
                        adaptive = choice.same_as or choice.scheme.name
                        log(f"  {p.label}: " + ", ".join(f"{k} {statistics.median(r.latency_ms for r, _ in v):.0f}" for k, v in measured.items())
                            + f" ms; adaptive = {adaptive}, predicted {choice.predicted_ms:.0f} ms")
                    set_links(runtime, fastest, settings)
                    for label, camera in cameras.items():  # quality over the whole pool: caption the rest, untimed
                        chain = (statics.get(label) or next(c.scheme for c in choices.values() if c.scheme.name == label)).describe()
                        seen = {s for c in cells if c.chain == chain for s in c.captions} | set(extra.get(chain, {}))
                        for name, image in (s for s in pool if s[0] not in seen):
                            extra.setdefault(chain, {})[name] = camera.caption(name, image)[0].caption
                finally:
                    for camera in cameras.values():
                        camera.close()
                for w in dep.wires:  # free the memory before the next factor's stages load
                    runtime.unload(w.tier, w.model)
        finally:
            runtime.stop()
    meta = {
        "command": command,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "duration_s": round(time.time() - started),
        "machine": _machine(triton_version, load_start),
        "settings": {**dataclasses.asdict(settings), "scenes": settings.scenes_per_factor},
        "profile": profile_source,
        "weights": _weights(),
        "git": _git(),
    }
    return document(cells, references, statics, meta, extra)


def _cells(point, label, base: Scheme, statics, choice, done) -> list[Cell]:
    """The cell(s) one chain's measurement fills: the static scheme's, and the adaptive one when the
    plan runs that very chain (the adaptive scheme *is* that chain there: one measurement, two rows)."""
    results = [r for r, _ in done]
    wire = {k: statistics.mean(w[k] for _, w in done) for k in done[0][1]}
    common = dict(
        point=point,
        chain=base.describe(),
        latencies_ms=[r.latency_ms for r in results],
        bytes_up=statistics.mean(r.bytes_from_device for r in results),
        wire_up=wire,
        captions={r.image: r.caption for r in results},
        cooperative=cooperative(base),
    )
    out = []
    if label in statics:
        out.append(Cell(label=label, kind="static", **common))
    if label == (choice.same_as or choice.scheme.name):
        out.append(Cell(label=ADAPTIVE, kind=ADAPTIVE, same_as=choice.same_as, predicted_ms=choice.predicted_ms,
                        plan=choice.plan, note=choice.note, **common))
    return out


def _triton_version(runtime) -> str:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(runtime.address("cloud"))
    try:
        return client.get_server_metadata().version
    finally:
        client.close()


def _machine(triton_version: str, load_start: float) -> dict:
    from aiflow.local.profiling import machine_info

    info = machine_info(triton_version)
    info.pop("measuredAt", None)
    info["loadAverageAtStart"] = round(load_start, 2)
    info["loadAverageAtEnd"] = info.pop("loadAverage")
    return info


def _weights() -> dict:
    from aiflow.planner.profile import WEIGHTS_MANIFEST_PATH

    try:
        manifest = json.loads(Path(WEIGHTS_MANIFEST_PATH).read_text())
    except (OSError, ValueError):
        return {"manifest": "unreadable"}
    return {"trained": manifest.get("trained"), "model.safetensors": (manifest.get("sha256") or {}).get("model.safetensors", "")}


def _git() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


# ---- from cells to the results document (pure) -----------------------------------------------------

COLUMNS = (
    "bandwidth_mbps", "rtt_ms", "device_factor", "scheme", "kind", "cooperative", "requests",
    "median_ms", "p95_ms", "mean_ms", "min_ms", "max_ms",
    "bytes_up", "wire_bytes_up", "wire_bytes_edge_cloud",
    "bleu4", "cider", "exact_match", "quality_scenes",
    "predicted_ms", "same_as", "chain", "plan", "note",
)


def document(cells: Sequence[Cell], references: Mapping[str, str], statics: Mapping[str, Scheme], meta: dict,
             extra: Mapping[str, Mapping[str, str]] | None = None) -> dict:
    """Rows (one per grid point and scheme), quality per chain, the headline and the targets."""
    quality = chain_quality(cells, references, extra)
    rows = [row(c, quality) for c in cells]
    rows.sort(key=lambda r: (r["device_factor"], r["rtt_ms"], r["bandwidth_mbps"], _order(r["scheme"], statics)))
    heads = headline(rows)
    return {"meta": meta, "rows": rows, "quality": quality, "headline": heads, "targets": targets(rows, heads)}


def _order(label: str, statics: Mapping[str, Scheme]) -> int:
    labels = list(statics) + [ADAPTIVE]
    return labels.index(label) if label in labels else len(labels)


def chain_quality(cells: Sequence[Cell], references: Mapping[str, str],
                  extra: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, dict]:
    """Caption quality per chain over every distinct scene it captioned anywhere in the grid, plus
    `extra` captions taken for quality only (captions do not depend on links or compute factors; a
    chain that captioned a scene two ways is counted as inconsistent). Keyed by chain description."""
    from aiflow.model.quality import score

    seen: dict[str, dict[str, set[str]]] = {}
    captioned = [(c.chain, c.captions) for c in cells] + list((extra or {}).items())
    for chain, captions in captioned:
        for scene, caption in captions.items():
            seen.setdefault(chain, {}).setdefault(scene, set()).add(caption)
    out = {}
    for chain, scenes in seen.items():
        names = sorted(scenes)
        preds = [sorted(scenes[n])[0] for n in names]
        q = score(preds, [references[n] for n in names])
        out[chain] = {"bleu4": q.bleu4, "cider": q.cider, "rouge_l": q.rouge_l, "exact_match": q.exact_match,
                      "scenes": q.count, "inconsistent_scenes": sum(len(v) > 1 for v in scenes.values())}
    return out


def row(c: Cell, quality: Mapping[str, dict]) -> dict:
    q = quality[c.chain]
    lat = c.latencies_ms
    return {
        "bandwidth_mbps": c.point.bandwidth_mbps,
        "rtt_ms": c.point.rtt_ms,
        "device_factor": c.point.device_factor,
        "scheme": c.label,
        "kind": c.kind,
        "cooperative": c.cooperative,
        "requests": len(lat),
        "median_ms": statistics.median(lat),
        "p95_ms": percentile(lat, 95),
        "mean_ms": statistics.mean(lat),
        "min_ms": min(lat),
        "max_ms": max(lat),
        "bytes_up": c.bytes_up,
        "wire_bytes_up": c.wire_up.get("device->edge", 0.0),
        "wire_bytes_edge_cloud": c.wire_up.get("edge->cloud", 0.0),
        "bleu4": q["bleu4"],
        "cider": q["cider"],
        "exact_match": q["exact_match"],
        "quality_scenes": q["scenes"],
        "predicted_ms": c.predicted_ms,
        "same_as": c.same_as,
        "chain": c.chain,
        "plan": c.plan,
        "note": c.note,
    }


def _points(rows: Sequence[dict]) -> list[tuple[float, float, float]]:
    return list(dict.fromkeys((r["bandwidth_mbps"], r["rtt_ms"], r["device_factor"]) for r in rows))


def _at(rows: Sequence[dict], point) -> list[dict]:
    return [r for r in rows if (r["bandwidth_mbps"], r["rtt_ms"], r["device_factor"]) == tuple(point)]


def headline(rows: Sequence[dict]) -> list[dict]:
    """Per grid point: adaptive latency over the best static scheme's and over each static scheme's;
    the planner's prediction against the measured median."""
    out = []
    for point in _points(rows):
        here = _at(rows, point)
        adaptive = next((r for r in here if r["scheme"] == ADAPTIVE), None)
        statics = [r for r in here if r["kind"] == "static"]
        if adaptive is None or not statics:
            continue
        best = min(statics, key=lambda r: r["median_ms"])
        a = adaptive["median_ms"]
        pred = adaptive["predicted_ms"]
        out.append({
            "bandwidth_mbps": point[0], "rtt_ms": point[1], "device_factor": point[2],
            "adaptive_ms": a, "adaptive_plan": adaptive["plan"], "adaptive_same_as": adaptive["same_as"],
            "best_static": best["scheme"], "best_static_ms": best["median_ms"], "vs_best": a / best["median_ms"],
            "vs": {r["scheme"]: a / r["median_ms"] for r in statics},
            "predicted_ms": pred, "prediction_error": None if pred is None else (pred - a) / a,
        })
    return out


def targets(rows: Sequence[dict], heads: Sequence[dict]) -> list[dict]:
    """The case study's targets, each met or missed with the numbers that decide it."""
    out = []
    if not heads:
        return [{"target": "adaptive measured", "met": False, "detail": "no grid point has both adaptive and static rows"}]
    worst = max(heads, key=lambda h: h["vs_best"])
    misses = [h for h in heads if h["vs_best"] > WITHIN_BEST]
    out.append({
        "target": f"adaptive within {100 * (WITHIN_BEST - 1):.0f}% of the best static scheme at every grid point",
        "met": not misses,
        "detail": (f"{len(heads) - len(misses)}/{len(heads)} grid points; worst {worst['vs_best']:.3f}x the best static "
                   f"({worst['best_static']}) at {_point_text(worst)}")
        + ("" if not misses else "; missed at " + ", ".join(f"{_point_text(h)} ({h['vs_best']:.2f}x {h['best_static']})" for h in misses)),
    })
    statics = list(dict.fromkeys(s for h in heads for s in h["vs"]))
    beaten = {s: min(h["vs"][s] for h in heads if s in h["vs"]) for s in statics}
    never = [s for s, v in beaten.items() if not v < 1.0]
    out.append({
        "target": "adaptive strictly faster than each single static scheme at some grid point",
        "met": not never,
        "detail": "; ".join(f"{s}: best {v:.2f}x" for s, v in beaten.items())
        + ("" if not never else f"; never faster than {', '.join(never)}"),
    })
    out.append(_low_bandwidth_target(rows))
    return out


def _point_text(h: Mapping) -> str:
    return f"{h['bandwidth_mbps']:g} Mbit/s, {h['rtt_ms']:g} ms, x{h['device_factor']:g}"


def _low_bandwidth_target(rows: Sequence[dict]) -> dict:
    """At the lowest bandwidth: the fastest cooperative scheme whose quality is within QUALITY_POINTS
    of cloud-only must be SPEEDUP_OVER_CLOUD times faster than cloud-only, at every such grid point."""
    name = (f"lowest bandwidth: best cooperative scheme >= {SPEEDUP_OVER_CLOUD:g}x faster than cloud-only, "
            f"quality ({', '.join(QUALITY_TARGET_METRICS)}) within {QUALITY_POINTS:g} point of cloud-only")
    low = min(r["bandwidth_mbps"] for r in rows)
    details, met = [], True
    for point in _points([r for r in rows if r["bandwidth_mbps"] == low]):
        here = _at(rows, point)
        cloud = next((r for r in here if r["scheme"] == "cloud-only"), None)
        coop = sorted((r for r in here if r["cooperative"]), key=lambda r: r["median_ms"])
        if cloud is None or not coop:
            details.append(f"{point}: cloud-only or cooperative rows missing")
            met = False
            continue
        good = [r for r in coop if all(r[m] >= cloud[m] - QUALITY_POINTS for m in QUALITY_TARGET_METRICS)]
        fastest = coop[0]
        text = f"{low:g} Mbit/s, {point[1]:g} ms, x{point[2]:g}: "
        if good:
            best = good[0]
            speedup = cloud["median_ms"] / best["median_ms"]
            met &= speedup >= SPEEDUP_OVER_CLOUD
            text += (f"{best['scheme']} {speedup:.2f}x faster ({best['median_ms']:.0f} vs {cloud['median_ms']:.0f} ms), "
                     + ", ".join(f"{m} {best[m]:.1f} vs {cloud[m]:.1f}" for m in (*QUALITY_TARGET_METRICS, "cider")))
        else:
            met = False
            text += "no cooperative scheme keeps quality within the margin"
        if fastest is not (good[0] if good else None):
            text += (f" (fastest cooperative: {fastest['scheme']} {cloud['median_ms'] / fastest['median_ms']:.2f}x, "
                     + ", ".join(f"{m} {fastest[m]:.1f}" for m in QUALITY_TARGET_METRICS) + ")")
        details.append(text)
    return {"target": name, "met": met, "detail": "; ".join(details)}


# ---- writing ----------------------------------------------------------------------------------------


def write(doc: dict, out: Path) -> list[Path]:
    """sweep.json, sweep.csv, sweep.md and the plots; returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
    write_csv(out / "sweep.csv", ({k: _csv(r[k]) for k in COLUMNS} for r in doc["rows"]), COLUMNS)
    (out / "sweep.md").write_text(markdown(doc))
    return [out / n for n in ("sweep.json", "sweep.csv", "sweep.md")] + plots(doc, out)


def _csv(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def markdown(doc: dict) -> str:
    meta, rows, heads = doc["meta"], doc["rows"], doc["headline"]
    m, s = meta["machine"], meta["settings"]
    statics = list(dict.fromkeys(r["scheme"] for r in rows if r["kind"] == "static"))
    lines = [
        "# Case study: every scheme across network and device conditions, measured",
        "",
        f"Command: `{meta['command']}` (finished {meta['finished_at']}, {meta['duration_s'] / 60:.1f} min; git {meta['git']}).",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('os')}, Python {m.get('python')}, torch {m.get('torch')}, "
        f"tritonserver {m.get('tritonserver')}; load average {m.get('loadAverageAtStart')} at start, "
        f"{m.get('loadAverageAtEnd')} at the end (the machine is shared: absolute numbers carry that noise).",
        "",
        f"Settings: device->edge uplink {', '.join(f'{b:g}' for b in s['bandwidths'])} Mbit/s "
        f"(RTT {s['device_rtt_ms']:g} ms, downlink max(uplink, {s['downlink_floor_mbps']:g} Mbit/s)); "
        f"edge->cloud RTT {', '.join(f'{r:g}' for r in s['rtts'])} ms ({s['edge_uplink_mbps']:g} Mbit/s up); "
        f"device compute factor {', '.join(f'x{f:g}' for f in s['device_factors'])}, edge x{s['edge_factor']:g}, "
        f"cloud x{s['cloud_factor']:g}. Split at encoder layer {s['split_layer']}; split-spec codec {s['spec_codec']}. "
        f"{s['requests']} measured requests per scheme and grid point after {s['warmup']} warm-up "
        f"({s['warmup'] + FRESH_WARMUP} at the first point after loading), the schemes taking turns request by request; "
        f"{s['scenes']} held-out scenes (seed {s['seed']}). Weights: trained={meta['weights'].get('trained')}. "
        f"Planner profile: {meta['profile']}.",
        "",
        "## Targets",
        "",
    ]
    lines += [f"- **{'met' if t['met'] else 'MISSED'}** — {t['target']}: {t['detail']}" for t in doc["targets"]]
    lines += ["", "## Headline: adaptive against the static schemes", "",
              "Median end-to-end latency; `adaptive / best` is the adaptive plan's median over the fastest static "
              "scheme's at that grid point; `predicted` is the planner's prediction for the plan it chose.", ""]
    lines += _md_table(
        ("uplink Mbit/s", "edge-cloud RTT ms", "device", "adaptive plan", "adaptive ms", "best static", "best ms",
         "adaptive / best", "predicted ms", "error"), "rrrlrlrrrr",
        ([f"{h['bandwidth_mbps']:g}", f"{h['rtt_ms']:g}", f"x{h['device_factor']:g}",
          h["adaptive_plan"] + (f" (= {h['adaptive_same_as']})" if h["adaptive_same_as"] else ""),
          f"{h['adaptive_ms']:.0f}", h["best_static"], f"{h['best_static_ms']:.0f}", f"{h['vs_best']:.2f}",
          "" if h["predicted_ms"] is None else f"{h['predicted_ms']:.0f}",
          "" if h["prediction_error"] is None else f"{100 * h['prediction_error']:+.0f}%"] for h in heads))
    lines += ["", "Adaptive median / each static scheme's median (below 1: adaptive is faster):", ""]
    lines += _md_table(("uplink", "RTT", "device", *statics), "r" * (3 + len(statics)),
                       ([f"{h['bandwidth_mbps']:g}", f"{h['rtt_ms']:g}", f"x{h['device_factor']:g}",
                         *(f"{h['vs'][st]:.2f}" if st in h["vs"] else "" for st in statics)] for h in heads))
    lines += ["", "## Caption quality per chain", "",
              "Every distinct held-out scene a chain captioned anywhere in the grid (captions do not depend on the links "
              "or compute factors). BLEU-4, ROUGE-L and exact match on 0-100, CIDEr x100.", ""]
    lines += _md_table(("chain", "scenes", "BLEU-4", "CIDEr", "ROUGE-L", "exact match", "inconsistent"), "lrrrrrr",
                       ([chain, str(q["scenes"]), *(f"{q[m]:.1f}" for m in ("bleu4", "cider", "rouge_l", "exact_match")),
                         str(q["inconsistent_scenes"])] for chain, q in doc["quality"].items()))
    lines += ["", "## Every grid point and scheme", "",
              "Bytes up: payload leaving the device per request (the PNG, or the feature message); on the wire: what "
              "the device->edge link carried per request (gRPC and HTTP/2 framing included).", ""]
    lines += _md_table(("uplink", "RTT", "device", "scheme", "median ms", "p95 ms", "bytes up", "on the wire", "BLEU-4",
                        "CIDEr", "exact"), "rrrlrrrrrrr",
                       ([f"{r['bandwidth_mbps']:g}", f"{r['rtt_ms']:g}", f"x{r['device_factor']:g}", r["scheme"],
                         f"{r['median_ms']:.0f}", f"{r['p95_ms']:.0f}", f"{r['bytes_up']:,.0f}", f"{r['wire_bytes_up']:,.0f}",
                         f"{r['bleu4']:.1f}", f"{r['cider']:.1f}", f"{r['exact_match']:.1f}"] for r in rows))
    lines += ["", "Plots: [latency vs bandwidth](sweep_latency.png), [quality vs bytes](sweep_quality.png), "
              "[headline](sweep_headline.png). Data: [sweep.csv](sweep.csv), [sweep.json](sweep.json).", ""]
    return "\n".join(lines)


def _md_table(header: Sequence[str], align: str, body) -> list[str]:
    """A markdown table; `align` has one letter per column: l(eft) or r(ight)."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(cells) + " |" for cells in body)]


def plots(doc: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, heads = doc["rows"], doc["headline"]
    rtts = sorted({r["rtt_ms"] for r in rows})
    factors = sorted({r["device_factor"] for r in rows})
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    written = []

    fig, axes = plt.subplots(len(factors), len(rtts), figsize=(6 * len(rtts), 4.5 * len(factors)), squeeze=False, sharey=True)
    for (fi, f), (ri, rtt) in ((a, b) for a in enumerate(factors) for b in enumerate(rtts)):
        ax = axes[fi][ri]
        for scheme in schemes:
            mine = sorted((r for r in rows if r["scheme"] == scheme and r["rtt_ms"] == rtt and r["device_factor"] == f),
                          key=lambda r: r["bandwidth_mbps"])
            style = dict(color="black", lw=2.5, marker="*", ms=9, zorder=5) if scheme == ADAPTIVE else dict(marker="o", ms=4, alpha=0.8)
            ax.plot([r["bandwidth_mbps"] for r in mine], [r["median_ms"] for r in mine], label=scheme, **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"edge->cloud RTT {rtt:g} ms, device x{f:g}")
        ax.set_xlabel("device->edge uplink (Mbit/s)")
        ax.set_ylabel("median end-to-end latency (ms)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "sweep_latency.png", dpi=110)
    plt.close(fig)
    written.append(out / "sweep_latency.png")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    by_scheme = {}
    for r in rows:
        if r["kind"] == "static" or not r["same_as"]:
            by_scheme.setdefault(r["scheme"] if r["kind"] == "static" else f"adaptive: {r['plan']}", []).append(r)
    for ax, metric, name in zip(axes, ("exact_match", "bleu4"), ("exact match", "BLEU-4")):
        for n, (scheme, mine) in enumerate(by_scheme.items()):
            nbytes = max(statistics.mean(x["bytes_up"] for x in mine), 1.0)
            marker = "s" if not mine[0]["cooperative"] else ("*" if scheme.startswith(ADAPTIVE) else "^" if "spec" in scheme else "o")
            ax.scatter([nbytes], [mine[0][metric]], marker=marker, s=60, color=plt.cm.tab20(n % 20), label=scheme)
        ax.set_xscale("log")
        ax.set_xlabel("bytes up from the device per request (none: drawn at 1)")
        ax.set_ylabel(f"{name} (0-100)")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("caption quality vs bytes upstream, per codec and scheme")
    fig.tight_layout()
    fig.savefig(out / "sweep_quality.png", dpi=110)
    plt.close(fig)
    written.append(out / "sweep_quality.png")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [f"{h['bandwidth_mbps']:g}/{h['rtt_ms']:g}/x{h['device_factor']:g}" for h in heads]
    ax1.bar(range(len(heads)), [h["vs_best"] for h in heads], color=["tab:green" if h["vs_best"] <= WITHIN_BEST else "tab:red" for h in heads])
    ax1.axhline(1.0, color="black", lw=1)
    ax1.axhline(WITHIN_BEST, color="tab:red", lw=1, ls="--", label=f"target {WITHIN_BEST:g}")
    ax1.set_ylim(0, 1.1 * max([WITHIN_BEST] + [h["vs_best"] for h in heads]))
    ax1.set_xticks(range(len(heads)), labels, rotation=60, fontsize=7)
    ax1.set_xlabel("uplink Mbit/s / edge-cloud RTT ms / device factor")
    ax1.set_ylabel("adaptive / best static (median latency)")
    ax1.legend(fontsize=8)
    pred = [h for h in heads if h["predicted_ms"] is not None]
    if pred:
        top = max(max(h["predicted_ms"], h["adaptive_ms"]) for h in pred) * 1.25
        low = min(min(h["predicted_ms"], h["adaptive_ms"]) for h in pred) * 0.8
        ax2.plot([low, top], [low, top], color="black", lw=1, label="predicted = measured")
        ax2.fill_between([low, top], [0.85 * low, 0.85 * top], [1.15 * low, 1.15 * top], color="green", alpha=0.12, label="within 15%")
        ax2.legend(fontsize=8)
        ax2.scatter([h["adaptive_ms"] for h in pred], [h["predicted_ms"] for h in pred], c="tab:blue")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
    ax2.set_xlabel("measured median (ms)")
    ax2.set_ylabel("planner's prediction (ms)")
    ax2.set_title("adaptive plan: predicted vs measured")
    fig.tight_layout()
    fig.savefig(out / "sweep_headline.png", dpi=110)
    plt.close(fig)
    written.append(out / "sweep_headline.png")
    return written


def print_summary(doc: dict) -> None:
    for h in doc["headline"]:
        err = "" if h["prediction_error"] is None else f", predicted {h['predicted_ms']:.0f} ms ({100 * h['prediction_error']:+.0f}%)"
        print(f"{_point_text(h):<28} adaptive {h['adaptive_ms']:7.0f} ms  best static {h['best_static']:<24} "
              f"{h['best_static_ms']:7.0f} ms  ratio {h['vs_best']:.2f}{err}")
    for t in doc["targets"]:
        print(f"[{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['detail']}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 grid points, one codec, 2 requests per scheme")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default docs/results)")
    ap.add_argument("--profile", default=str(DEFAULT_PROFILE),
                    help="planner profile for the adaptive plan (default docs/results/planner_profile.yaml, written by "
                         "`aiflow profile`; `default` or a missing file: the shipped default profile)")
    ap.add_argument("--measure-profile", action="store_true",
                    help="first measure the planner's profile on this machine (`aiflow profile`) into OUT/planner_profile.yaml "
                         "and plan with it")
    ap.add_argument("--requests", type=int, default=None, help="measured requests per scheme and grid point")
    ap.add_argument("--report-only", action="store_true", help="rewrite tables and plots from OUT/sweep.json, measure nothing")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        try:
            doc = json.loads((out / "sweep.json").read_text())
        except (OSError, ValueError) as exc:
            print(f"sweep: cannot read {out / 'sweep.json'} ({exc}); run the sweep first", file=sys.stderr)
            return 2
        doc["targets"] = targets(doc["rows"], doc["headline"])
    else:
        settings = QUICK if args.quick else Settings()
        if args.requests is not None:
            settings = dataclasses.replace(settings, requests=args.requests)
        profile_path = out / "planner_profile.yaml" if args.measure_profile else args.profile
        try:
            settings.check()
            if args.measure_profile:
                from aiflow.cli import main as aiflow

                out.mkdir(parents=True, exist_ok=True)
                print(f"measuring the planner's profile into {profile_path} (aiflow profile) ...", flush=True)
                if aiflow(["profile", "--out", str(profile_path)] + (["--quick"] if args.quick else [])) != 0:
                    return 1
            profile, source = load_planner_profile(profile_path)
        except ValueError as exc:
            print(f"sweep: {exc}", file=sys.stderr)
            return 2
        command = "python -m bench.sweep " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        doc = run(settings, profile, source, command.strip(), log=lambda line: print(line, flush=True))
    written = write(doc, out)
    print_summary(doc)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
