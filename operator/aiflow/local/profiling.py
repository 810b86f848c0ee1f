"""`aiflow profile`: measure the planner's profile (kind PlannerProfile, docs/planner.md) on real Triton.

One tritonserver serves the stage models of model_repo/ (direct loopback calls, no emulated link, compute
factor 1), so every compute figure is "this machine" = the reference a tier's computeFactor scales.
Stage times are the stages' own times from their TRACE (receipt to reply, minus the wait for a next
stage), medians of single-image requests after warm-up:

- `encoder.embedMs`: vision_head at split 0 (image decode, preprocess, patch embedding, fp32 message);
- `encoder.layerMs[s]`: vision_tail (run up to layer L) fed features taken at layer s, minus fed at s+1;
- decoder: caption_decoder, caption_drafter and caption_verifier fed the finished encoder's features;
  per-token figures divide by the request's caption length (large decoder), so tokens x step is the
  measured stage time; `verifyMs` is the verifier's time minus its greedy steps after the first rejection;
- `rpc`: client latency minus the stage's own time, fitted over payload sizes (straight line);
- bytes, tokens, acceptance and quality: held-out scenes through vision_head on Triton, re-encoded per
  (split, codec) by the stage code in this process, captioned on Triton by caption_decoder (large) and
  caption_drafter (small drafts), drafts verified by caption_verifier;
- `features.codecMs`: the stage code's encode/decode timed in this process (sub-millisecond: the noise of a
  Triton call would hide them);
- `memoryMiB`: resident memory of a tritonserver with no model plus the model's Python stub.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aiflow import contract
from aiflow.contract import MESSAGE, PASSTHROUGH, ROLES_BY_NAME, TENSORS, TRACE
from aiflow.stage import wire
from aiflow.stage.config import MAX_BATCH, stage_config
from aiflow.stage.forward import describe_call_error
from aiflow.stage.logic import Stage, read_trace

HELDOUT_SEED = 4004  # scenes the demo (2026) and the weights manifest do not use
LOSSLESS = "fp32"
CALL_TIMEOUT_S = 120.0


class ProfilingError(RuntimeError):
    """The measurement could not be made; the message says what failed and what to check."""


@dataclass(frozen=True)
class Settings:
    """How much to measure. `quick` keeps `aiflow profile --quick` (tests) to the minimum."""

    images: int = 32  # held-out scenes for bytes, tokens, acceptance and quality
    timing_images: int = 4  # scenes the timed single-image requests cycle through
    warmup: int = 2  # unmeasured requests per model
    repeats: int = 5  # timed requests per scene and configuration
    seed: int = HELDOUT_SEED
    codecs: tuple[str, ...] | None = None  # None: those of the shipped default profile

    def check(self) -> None:
        if not 1 <= self.images <= MAX_BATCH:
            raise ValueError(f"images {self.images}: choose 1..{MAX_BATCH} held-out scenes")
        if not 1 <= self.timing_images <= self.images:
            raise ValueError(f"timing images {self.timing_images}: choose 1..{self.images}")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError("warmup must be >= 0 and repeats >= 1")


QUICK = Settings(images=4, timing_images=1, warmup=1, repeats=2)


@dataclass
class Measurements:
    """Raw figures from one run; `profile_document` turns them into a profile. Times in ms."""

    layers: int
    tokens: int
    dims: int
    codecs: tuple[str, ...]
    head_ms: list[float] = field(default_factory=list)  # vision_head at split 0
    tail_ms: dict[int, list[float]] = field(default_factory=dict)  # vision_tail fed features at layer s
    large: list[tuple[float, int]] = field(default_factory=list)  # caption_decoder (ms, caption tokens)
    small: list[tuple[float, int]] = field(default_factory=list)  # caption_drafter (ms, caption tokens)
    verify: list[tuple[float, int, int]] = field(default_factory=list)  # verifier (ms, tokens, accepted)
    captioner_ms: list[float] = field(default_factory=list)  # the whole model, a consistency check
    rpc: list[tuple[float, float]] = field(default_factory=list)  # (request bytes, latency - stage time)
    caption_tokens: list[int] = field(default_factory=list)  # large-decoder ids per held-out scene
    accepted: list[int] = field(default_factory=list)  # draft tokens the verifier accepted, per scene
    png_bytes: list[int] = field(default_factory=list)
    jpeg_bytes: list[int] = field(default_factory=list)
    feature_bytes: dict[str, list[float]] = field(default_factory=dict)  # codec -> mean per layer 0..L
    zstd_ratio: dict[str, float] = field(default_factory=dict)
    codec_ms: dict[str, tuple[float, float]] = field(default_factory=dict)
    quality: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # decoder -> codec -> per layer
    quality_metric: str = "exact_match"
    memory_mib: dict[str, float] = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    settings: Settings = field(default_factory=Settings)


# ---- the pure part: raw figures -> profile document -----------------------------------------------


def median(values: Sequence[float], what: str) -> float:
    if not values:
        raise ProfilingError(f"no measurement of {what}")
    return float(statistics.median(values))


def layer_costs(tail_ms: Mapping[int, Sequence[float]], layers: int) -> list[float]:
    """Per-layer ms from vision_tail's time fed at each layer s (it runs [s, L)): differences of
    medians, negatives (noise) set to 0 and the rest rescaled so they still add up to the measured
    time of the whole encoder."""
    cum = [median(tail_ms.get(s, ()), f"vision_tail fed layer {s}") for s in range(layers + 1)]
    total = max(cum[0] - cum[layers], 0.0)
    steps = [max(cum[s] - cum[s + 1], 0.0) for s in range(layers)]
    scale = total / sum(steps) if sum(steps) > 0 else 0.0
    return [s * scale for s in steps] if scale else [total / layers] * layers


def fit_rpc(samples: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(overhead ms, ms per MB) of a Triton call: least squares over (bytes, ms), both kept >= 0."""
    if not samples:
        raise ProfilingError("no measurement of the Triton call overhead")
    x = np.array([s[0] for s in samples], dtype=float) / 1e6
    y = np.array([s[1] for s in samples], dtype=float)
    if np.ptp(x) == 0:
        return max(float(np.median(y)), 0.0), 0.0
    slope, _ = np.polyfit(x, y, 1)
    slope = max(float(slope), 0.0)
    return max(float(np.median(y - slope * x)), 0.0), slope  # median: robust to a slow outlier


def decoder_figures(m: Measurements) -> dict:
    """decoder section: per-token steps, verify pass, tokens per caption, acceptance."""
    tokens = float(np.mean(m.caption_tokens)) if m.caption_tokens else 0.0
    if tokens <= 0:
        raise ProfilingError("no caption tokens measured (did the decoder return captions?)")
    acceptance = min(1.0, float(np.sum(m.accepted)) / float(np.sum(m.caption_tokens))) if m.accepted else 0.0
    large = median([ms / max(t, 1) for ms, t in m.large], "caption_decoder")
    small = median([ms / max(t, 1) for ms, t in m.small], "caption_drafter")
    # The cost model charges (1 - acceptance) x tokens large steps after the verify pass.
    verify = median([ms - max(t - a, 0) * large for ms, t, a in m.verify], "caption_verifier")
    return {
        "smallTokenMs": _round(small),
        "largeTokenMs": _round(large),
        "verifyMs": _round(max(verify, 0.0)),
        "tokensPerCaption": _round(tokens),
        "acceptance": _round(acceptance, 4),
    }


def profile_document(m: Measurements) -> dict:
    """The PlannerProfile document (docs/planner.md) of one run's measurements."""
    overhead, per_mb = fit_rpc(m.rpc)
    codecs = list(m.codecs)
    s = m.settings
    doc_embed = median(m.head_ms, "vision_head at split 0")
    layer_ms = layer_costs(m.tail_ms, m.layers)
    decoder = decoder_figures(m)
    doc = {
        "apiVersion": "aiflow.io/v1alpha1",
        "kind": "PlannerProfile",
        "source": "measured",
        "note": (
            "measured by `aiflow profile` on real Triton servers of this machine (compute factor 1, direct "
            "calls): medians of single-image requests after warm-up; see `measurement` for how each figure was taken"
        ),
        "machine": m.machine,
        "measurement": {
            "statistic": "median",
            "heldoutImages": s.images,
            "heldoutSeed": s.seed,
            "timingImages": s.timing_images,
            "warmup": s.warmup,
            "repeats": s.repeats,
            "encoder": "stage time from TRACE: vision_head at split 0 (embed); vision_tail fed each layer (layers)",
            "decoder": "caption_decoder / caption_drafter / caption_verifier on finished features, per caption token",
            "rpc": "client latency minus the stage's own time, straight-line fit over request bytes",
            "features": "wire bytes of held-out scenes per split and codec (aiflow.stage.wire); codecMs timed in-process",
            "quality": f"{m.quality_metric} of held-out scenes captioned on Triton per split and codec",
            "memoryMiB": "RSS of a tritonserver without models plus the model's Python backend stub",
            # The whole model measured as one stage, against what the figures above add up to for it.
            "checkCaptionerMs": _round(median(m.captioner_ms, "captioner")) if m.captioner_ms else None,
            "checkCaptionerFromPartsMs": _round(
                doc_embed + sum(layer_ms) + decoder["tokensPerCaption"] * decoder["largeTokenMs"]),
        },
        "encoder": {
            "embedMs": _round(doc_embed),
            "layerMs": [_round(x) for x in layer_ms],
            "tokens": m.tokens,
            "dims": m.dims,
        },
        "decoder": decoder,
        "image": {"pngBytes": _round(float(np.mean(m.png_bytes)), 1), "jpegBytes": _round(float(np.mean(m.jpeg_bytes)), 1)},
        "features": {
            "codecs": codecs,
            "zstdRatio": {q: _round(r, 4) for q, r in m.zstd_ratio.items()},
            "bytes": {c: [_round(b, 1) for b in m.feature_bytes[c]] for c in codecs},
            "codecMs": {c: {"encode": _round(m.codec_ms[c][0]), "decode": _round(m.codec_ms[c][1])} for c in codecs},
        },
        "quality": {
            "metric": m.quality_metric,
            "source": f"measured: {s.images} held-out scenes (seed {s.seed}) captioned on Triton",
            **{d: {c: [_round(v, 2) for v in per_layer] for c, per_layer in table.items()} for d, table in m.quality.items()},
        },
        "memoryMiB": {k: _round(v, 1) for k, v in m.memory_mib.items()},
        "rpc": {"overheadMs": _round(overhead), "msPerMB": _round(per_mb)},
    }
    return doc


def _round(x: float, digits: int = 3) -> float:
    return float(round(float(x), digits))


# ---- machine facts --------------------------------------------------------------------------------


def machine_info(triton_version: str = "") -> dict:
    """What the numbers were measured on: they hold for this machine only."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else -1.0
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadAverage": round(load, 2),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchThreads": 1,
        "tritonserver": triton_version,
        "measuredAt": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        **weights_identity(),
    }


def weights_identity() -> dict:
    """Which weights were profiled: quality, caption length and acceptance belong to them."""
    import json

    from aiflow.planner.profile import WEIGHTS_MANIFEST_PATH

    try:
        manifest = json.loads(WEIGHTS_MANIFEST_PATH.read_text())
    except (OSError, ValueError):
        return {"weights": "unknown (no readable weights manifest)"}
    sha = (manifest.get("sha256") or {}).get("model.safetensors", "")
    return {"weightsTrained": bool(manifest.get("trained")), "weightsSha256": sha[:16]}


# ---- talking to Triton ----------------------------------------------------------------------------


@dataclass
class Call:
    outputs: dict[str, np.ndarray]
    hops: list[dict]
    latency_ms: float
    request_bytes: int

    @property
    def stage_ms(self) -> float:
        """The first stage's own time (it has no next stage here)."""
        hop = self.hops[0]
        return float(hop["total_ms"] - hop["wait_next_ms"])


class StageClient:
    """Single calls to the stage models of one tritonserver, over one gRPC channel."""

    def __init__(self, url: str):
        import tritonclient.grpc as grpcclient

        self.url = url
        self.client = grpcclient.InferenceServerClient(url)

    def call(self, model: str, data) -> Call:
        """Send images (list of encoded bytes) or one wire message (bytes) to `model`."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        accepts, emits = ROLES_BY_NAME[model]
        if accepts == "image":
            tensor, dtype, size = np.array(list(data), dtype=object), "BYTES", sum(len(b) for b in data)
        else:
            tensor, dtype, size = np.frombuffer(bytes(data), dtype=np.uint8), "UINT8", len(data)
        inp = grpcclient.InferInput(TENSORS[accepts], [1, tensor.size], dtype)  # one request: batch dimension 1
        inp.set_data_from_numpy(tensor.reshape(1, -1))
        names = [TENSORS["caption"] if emits == "caption" else MESSAGE, TRACE]
        start = time.perf_counter()
        try:
            result = self.client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput(n) for n in names], client_timeout=CALL_TIMEOUT_S)
        except InferenceServerException as exc:
            raise ProfilingError(describe_call_error(exc, model, self.url, CALL_TIMEOUT_S, what="stage")) from None
        latency = 1000 * (time.perf_counter() - start)
        outputs = {n: result.as_numpy(n).reshape(-1) for n in names}
        return Call(outputs, read_trace(outputs[TRACE]), latency, size)

    def close(self) -> None:
        self.client.close()


# ---- the measurement ------------------------------------------------------------------------------

MODELS = ("vision_head", "vision_tail", "caption_decoder", "caption_drafter", "caption_verifier", "captioner")


def stage_parameters(layers: int) -> dict[str, dict[str, str]]:
    """Load-time parameters of each measured model: no successor, lossless features."""
    return {
        "vision_head": {"AIFLOW_SPLIT_LAYER": "0", "AIFLOW_CODEC": LOSSLESS},
        "vision_tail": {"AIFLOW_SPLIT_LAYER": str(layers), "AIFLOW_CODEC": LOSSLESS},
        "caption_decoder": {"AIFLOW_DECODING": "greedy"},
        "caption_drafter": {"AIFLOW_CODEC": PASSTHROUGH},
        "caption_verifier": {},
        "captioner": {"AIFLOW_DECODING": "greedy"},
    }


class LocalStages:
    """The stage code of aiflow.stage in this process, to re-encode features exactly as a
    vision_tail stage would (for bytes, quality inputs and codec timings)."""

    def __init__(self, family):
        self.family = family
        self._stages: dict[tuple[int, str], Stage] = {}

    def reencode(self, message: bytes, layer: int, codec: str) -> bytes:
        """Features message -> the same features advanced to `layer` and encoded with `codec`."""
        key = (layer, codec)
        if key not in self._stages:
            params = {"aiflow.accepts": "features", "aiflow.emits": "features", "AIFLOW_SPLIT_LAYER": str(layer), "AIFLOW_CODEC": codec}
            self._stages[key] = Stage(stage_config("vision_tail", params, {}), self.family)
        out = self._stages[key].run({TENSORS["features"]: np.frombuffer(message, dtype=np.uint8)})
        return out[MESSAGE].tobytes()

    def available(self, layer: int, codec: str) -> bool:
        """Whether `codec` can encode features at `layer` (a learned codec only where it was trained)."""
        c = contract.parse_codec(codec)
        return not c.learned or (c.channels, layer) in self.family.bottlenecks

    def tables(self, codec: contract.Codec, layer: int) -> np.ndarray:
        """A learned codec's probability tables, for reading its messages (aiflow.stage.wire)."""
        from aiflow.model.bottleneck import bottleneck_of

        return bottleneck_of(self.family, codec.channels, layer).coding_tables()


def measure(
    model_repo: str | Path | None = None,
    settings: Settings = Settings(),
    log: Callable[[str], None] = lambda line: None,
    log_dir: str | Path | None = None,
) -> Measurements:
    """Start one tritonserver on `model_repo`, measure, stop it. ProfilingError says what failed."""
    from aiflow.local.compare import heldout_images
    from aiflow.local.schemes import default_model_repo
    from aiflow.local.tritonserver import TritonError, TritonServer
    from aiflow.model.checkpoint import CheckpointError
    from aiflow.model.family import load_family
    from aiflow.planner.profile import DEFAULT_PROFILE_PATH, load_profile

    settings.check()
    codecs = tuple(settings.codecs or load_profile(DEFAULT_PROFILE_PATH, manifest=None).codecs)
    repo = Path(model_repo) if model_repo else default_model_repo()
    try:
        family = load_family()  # the stages' model (their model_path is the bundled weights)
    except CheckpointError as exc:
        raise ProfilingError(f"cannot load the model the stages serve: {exc}") from exc
    cfg = family.config
    m = Measurements(layers=family.num_layers, tokens=cfg.num_tokens, dims=cfg.hidden_size, codecs=codecs, settings=settings)
    with tempfile.TemporaryDirectory(prefix="aiflow-profile-") as tmp:
        images, references = heldout_images(settings.seed, settings.images, Path(tmp) / "images")
        blobs = [b for _, b in images]
        log(f"profiling on {len(blobs)} held-out scenes (seed {settings.seed}); starting tritonserver ...")
        server = TritonServer(repo, name="tritonserver-profile", log_dir=log_dir, env={"AIFLOW_TIER": "profile", "AIFLOW_COMPUTE_FACTOR": "1"})
        try:
            server.start()
            base_rss = _rss_mib([server.pid])
            params = stage_parameters(m.layers)
            log(f"loading {', '.join(MODELS)} ...")
            with ThreadPoolExecutor(max_workers=len(MODELS)) as pool:  # each load imports torch in a fresh stub
                list(pool.map(lambda model: server.load_model(model, parameters=params[model]), MODELS))
            client = StageClient(server.grpc_url)
            try:
                version = client.client.get_server_metadata().version
                _measure_with(client, LocalStages(family), family, m, blobs, references, log)
            finally:
                client.close()
            m.memory_mib = {model: base_rss + rss for model, rss in _stub_rss_mib(server.pid, MODELS).items()}
            m.machine = machine_info(version)
        except TritonError as exc:
            raise ProfilingError(f"tritonserver failed: {exc}") from exc
        finally:
            server.stop()
    return m


def _measure_with(client: StageClient, local: LocalStages, family, m: Measurements, blobs, references, log) -> None:
    from aiflow.local.client import encode_upload

    m.png_bytes = [len(b) for b in blobs]
    m.jpeg_bytes = [len(encode_upload(b, "jpeg")) for b in blobs]
    layer0 = _time_stages(client, local, family, m, blobs[: m.settings.timing_images], log)
    _measure_quality(client, local, family, m, blobs, references, layer0, log)


def _time_stages(client: StageClient, local: LocalStages, family, m: Measurements, timed, log) -> list[bytes]:
    """Stage times of every model on the timed scenes; returns their layer-0 features messages."""
    s, L = m.settings, m.layers
    log("inputs: held-out scenes through vision_head, features at every layer, drafts ...")
    layer0 = [client.call("vision_head", [b]).outputs[MESSAGE].tobytes() for b in timed]
    at_layer = {layer: [local.reencode(msg, layer, LOSSLESS) for msg in layer0] for layer in range(L + 1)}
    finished = at_layer[L]
    lengths = _large_lengths(family, finished)
    drafted = [client.call("caption_drafter", msg).outputs[MESSAGE].tobytes() for msg in finished]

    # Every timed request, tagged; the rounds interleave them so a burst of load elsewhere on the
    # machine spreads over all figures instead of skewing one of them.
    probes = [(("head", i), "vision_head", [b]) for i, b in enumerate(timed)]
    probes += [(("tail", layer, i), "vision_tail", msg) for layer in range(L + 1) for i, msg in enumerate(at_layer[layer])]
    probes += [(("large", i), "caption_decoder", msg) for i, msg in enumerate(finished)]
    probes += [(("small", i), "caption_drafter", msg) for i, msg in enumerate(finished)]
    probes += [(("verify", i), "caption_verifier", msg) for i, msg in enumerate(drafted)]
    probes += [(("captioner", i), "captioner", [b]) for i, b in enumerate(timed)]
    log(f"timing: {len(probes)} configurations x {s.repeats} rounds after {s.warmup} warm-up ...")
    for _ in range(s.warmup):
        for _, model, data in probes:
            client.call(model, data)
    for _ in range(s.repeats):
        for tag, model, data in probes:
            c = client.call(model, data)
            kind, i = tag[0], tag[-1]
            if kind == "head":
                m.head_ms.append(c.stage_ms)
            elif kind == "tail":
                m.tail_ms.setdefault(tag[1], []).append(c.stage_ms)
            elif kind == "large":
                m.large.append((c.stage_ms, lengths[i]))
            elif kind == "small":
                m.small.append((c.stage_ms, lengths[i]))
            elif kind == "verify":
                m.verify.append((c.stage_ms, lengths[i], sum(c.hops[0]["detail"].get("accepted_tokens", [0]))))
            else:
                m.captioner_ms.append(c.stage_ms)
            if ROLES_BY_NAME[model][1] == "caption":  # small replies: the call costs its request
                m.rpc.append((c.request_bytes, c.latency_ms - c.hops[0]["total_ms"]))
    m.zstd_ratio = _zstd_ratios(finished)
    m.codec_ms = _codec_ms(local, finished, m.codecs, L, s.repeats)
    return layer0


def _measure_quality(client: StageClient, local: LocalStages, family, m: Measurements, blobs, references, layer0, log) -> None:
    """Feature bytes and caption quality of every codec at every split, on all scenes."""
    from aiflow.model import quality

    L = m.layers
    log(f"features and quality: {len(blobs)} scenes x {L + 1} splits x {len(m.codecs) + 1} codecs ...")
    batch0 = client.call("vision_head", blobs).outputs[MESSAGE].tobytes()
    singles0 = layer0 + [client.call("vision_head", [b]).outputs[MESSAGE].tobytes() for b in blobs[len(layer0):]]
    all_codecs = (LOSSLESS, *m.codecs)
    m.quality = {"large": {}, "small": {}}
    for codec in all_codecs:
        sizes, large_q, small_q = [], [], []
        for layer in range(L + 1):
            if not local.available(layer, codec):  # no bottleneck there: the planner must never pick it
                sizes.append(None)
                large_q.append(0.0)
                small_q.append(0.0)
                continue
            sizes.append(float(np.mean([len(local.reencode(msg, layer, codec)) for msg in singles0])))
            batch = local.reencode(batch0, layer, codec)
            large = client.call("caption_decoder", batch)
            m.rpc.append((large.request_bytes, large.latency_ms - large.hops[0]["total_ms"]))
            captions = [c.decode() for c in large.outputs[TENSORS["caption"]]]
            large_q.append(getattr(quality.score(captions, references), m.quality_metric))
            drafts = client.call("caption_drafter", batch).outputs[MESSAGE].tobytes()
            small = [family.decode_text(d) for d in wire.decode(drafts, tables=local.tables).drafts]
            small_q.append(getattr(quality.score(small, references), m.quality_metric))
            if codec == LOSSLESS and layer == L:  # speculative decoding on lossless features
                verified = client.call("caption_verifier", drafts)
                m.accepted = list(verified.hops[0]["detail"].get("accepted_tokens", []))
                m.caption_tokens = _large_lengths(family, [batch])
        known = [b for b in sizes if b is not None]
        if not known:
            raise ProfilingError(f"codec {codec}: the served weights have no trained bottleneck for it at any split layer; train one (`aiflow train --bottleneck-only`) or drop it from the profile's features.codecs")
        m.feature_bytes[codec] = [known[0] if b is None else b for b in sizes]  # a size where it cannot run is never used
        m.quality["large"][codec], m.quality["small"][codec] = large_q, small_q
    m.feature_bytes.pop(LOSSLESS)


def _large_lengths(family, messages: Sequence[bytes]) -> list[int]:
    """Ids the large decoder generates (EOS included) for features messages at the last layer."""
    import torch

    lengths = []
    for msg in messages:
        hidden = torch.from_numpy(wire.decode(msg).hidden)
        lengths += [len(ids) for ids in family.generate(family.finish(hidden), "large")]
    return lengths


def _zstd_ratios(messages: Sequence[bytes]) -> dict[str, float]:
    """Compressed / raw payload per quantiser, on finished features."""
    from aiflow.stage import codecs

    ratios = {}
    for quant in contract.QUANTISERS:
        raw = plain = 0
        for msg in messages:
            hidden = wire.decode(msg).hidden
            plain += len(codecs.pack(contract.parse_codec(quant), hidden))
            raw += len(codecs.pack(contract.parse_codec(f"{quant}+zstd"), hidden))
        ratios[quant] = min(raw / plain, 1.0)
    return ratios


def _codec_ms(local: LocalStages, messages: Sequence[bytes], codecs: Sequence[str], layer: int, repeats: int) -> dict[str, tuple[float, float]]:
    """(encode, decode) ms of each codec beyond the lossless message, at the last layer, in-process."""

    def timed(fn) -> float:
        times = []
        for _ in range(max(repeats, 3)):
            for msg in messages:
                t = time.perf_counter()
                fn(msg)
                times.append(1000 * (time.perf_counter() - t))
        return statistics.median(times)

    base_enc = timed(lambda msg: local.reencode(msg, layer, LOSSLESS))
    base_dec = timed(wire.decode)
    out = {}
    for codec in codecs:
        if not local.available(layer, codec):
            out[codec] = (0.0, 0.0)
            continue
        encoded = {msg: local.reencode(msg, layer, codec) for msg in messages}
        enc = timed(lambda msg: local.reencode(msg, layer, codec)) - base_enc
        dec = timed(lambda msg: wire.decode(encoded[msg], tables=local.tables)) - base_dec
        out[codec] = (max(enc, 0.0), max(dec, 0.0))
    return out


def _rss_mib(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def _stub_rss_mib(server_pid: int | None, models: Sequence[str]) -> dict[str, float]:
    """RSS of each model's Python backend stub (its command line names the model's directory)."""
    from aiflow.local.tritonserver import process_group_members

    found: dict[str, float] = {}
    for pid in process_group_members(server_pid) if server_pid else []:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for model in models:
            if f"/{model}/" in cmdline and "stub" in cmdline:
                found[model] = found.get(model, 0.0) + _rss_mib([pid])
    return found


# ---- writing --------------------------------------------------------------------------------------


def profile_yaml(doc: Mapping) -> str:
    import yaml

    header = "# The planner's profile, measured by `aiflow profile` (format: docs/planner.md).\n"
    return header + yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=None, width=120)


FORMATS = ("yaml", "json", "configmap")
DEFAULT_CONFIGMAP = "aiflow-profile"


def render(doc: Mapping, fmt: str = "yaml", name: str = DEFAULT_CONFIGMAP, namespace: str | None = None) -> str:
    """The profile as text: YAML, JSON, or a ConfigMap manifest (YAML) holding it."""
    import json

    import yaml

    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    if fmt == "configmap":
        return yaml.safe_dump(configmap_manifest(doc, name, namespace), sort_keys=False)
    if fmt == "yaml":
        return profile_yaml(doc)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def configmap_manifest(doc: Mapping, name: str, namespace: str | None = None) -> dict:
    """A ConfigMap holding the profile as `profile.yaml`, labelled for the operator to find."""
    from aiflow import GROUP

    metadata = {"name": name, "labels": {"app.kubernetes.io/part-of": "aiflow", f"{GROUP}/profile": "true"}}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {"profile.yaml": profile_yaml(doc)}}


__all__ = [
    "FORMATS", "HELDOUT_SEED", "QUICK", "Measurements", "ProfilingError", "Settings", "configmap_manifest", "fit_rpc",
    "layer_costs", "machine_info", "measure", "profile_document", "profile_yaml", "render",
]
