"""Schemes: how the captioning work is spread over the tiers, as chains of Triton stages.

The client (a camera) sits on the device tier. A scheme names, per stage, the tier and the model of
model_repo/ it runs, with the knobs it needs; `wiring` turns it into what the local runtime loads
(each stage pointing at the next one through the emulated links). One tritonserver per tier serves
every scheme, so applying a scheme re-wires only the models whose settings differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

CLIENT_TIER = "device"
DEFAULT_SPLIT_LAYER = 4
# The learned codec (a trained bottleneck at layer 4, aiflow.model.bottleneck): ~178 B per image at the
# uncompressed model's caption quality, against ~1.9 KB for topk:16+int8 (bench/rate_quality.py).
DEFAULT_CODEC = "learned:16"
UPLOADS = ("png", "jpeg")
JPEG_QUALITY = 75


@dataclass(frozen=True)
class Placement:
    """One stage of a scheme: `model` on `tier`, with per-model knobs (AIFLOW_* parameters)."""

    tier: str
    model: str
    knobs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Scheme:
    name: str
    summary: str
    chain: tuple[Placement, ...]
    upload: str = "png"  # what the camera sends to the first stage: its PNG bytes, or a JPEG of them

    @property
    def entry(self) -> Placement:
        return self.chain[0]

    def describe(self) -> str:
        stages = " -> ".join(f"{p.tier}:{p.model}" for p in self.chain)
        knobs = "; ".join(f"{p.model} {_knob_text(p.knobs)}" for p in self.chain if p.knobs)
        return f"{self.name}: {stages}" + (f" ({knobs})" if knobs else "") + f"; upload {self.upload}"


def _knob_text(knobs: Mapping[str, str]) -> str:
    return " ".join(f"{k.removeprefix('AIFLOW_').lower()}={v}" for k, v in sorted(knobs.items()))


def _split_knobs(split_layer: int, codec: str) -> dict[str, str]:
    return {"AIFLOW_SPLIT_LAYER": str(split_layer), "AIFLOW_CODEC": codec}


def build_schemes(split_layer: int = DEFAULT_SPLIT_LAYER, codec: str = DEFAULT_CODEC) -> dict[str, Scheme]:
    """Every scheme, with the split schemes cut at `split_layer` and compressed with `codec`."""
    split = _split_knobs(split_layer, codec)
    return {
        s.name: s
        for s in (
            Scheme("device-only", "the whole captioner on the device", (Placement("device", "captioner"),)),
            Scheme("edge-only", "raw image uploaded to the edge captioner", (Placement("edge", "captioner"),)),
            Scheme(
                "cloud-only", "raw image uploaded over both links to the cloud captioner",
                (Placement("cloud", "captioner"),),
            ),
            Scheme(
                "split", f"device encoder layers [0,{split_layer}) + {codec} -> edge finishes and decodes",
                (Placement("device", "vision_head", split), Placement("edge", "caption_decoder")),
            ),
            Scheme(
                "split-spec",
                f"device encoder [0,{split_layer}) + {codec} -> edge small decoder drafts -> cloud large decoder verifies",
                (
                    Placement("device", "vision_head", split),
                    Placement("edge", "caption_drafter", {"AIFLOW_CODEC": "passthrough"}),
                    Placement("cloud", "caption_verifier"),
                ),
            ),
        )
    }


SCHEME_NAMES = tuple(build_schemes())


def get_scheme(
    name: str, split_layer: int | None = None, codec: str | None = None, upload: str = "png"
) -> Scheme:
    """A scheme by name, with optional split/codec overrides (split schemes only) and upload format."""
    from aiflow.contract import parse_codec

    schemes = build_schemes(
        DEFAULT_SPLIT_LAYER if split_layer is None else split_layer,
        DEFAULT_CODEC if codec is None else parse_codec(codec).spec,
    )
    if name not in schemes:
        raise ValueError(f"unknown scheme {name!r}; choose one of {', '.join(schemes)}")
    scheme = schemes[name]
    if (split_layer is not None or codec is not None) and scheme.entry.model != "vision_head":
        raise ValueError(f"--split-layer and --codec apply to the split schemes, not {name}")
    if upload not in UPLOADS:
        raise ValueError(f"unknown upload format {upload!r}; choose one of {', '.join(UPLOADS)}")
    return replace(scheme, upload=upload) if upload != scheme.upload else scheme


@dataclass(frozen=True)
class Wire:
    """What to load: `model` on `tier` with these parameters, forwarding to `next_stage` (tier, model)."""

    tier: str
    model: str
    parameters: Mapping[str, str]
    next_stage: tuple[str, str] | None


def wiring(scheme: Scheme) -> list[Wire]:
    """The load instructions of a scheme, last stage first (so each successor is up before its caller)."""
    wires = []
    for i, p in enumerate(scheme.chain):
        nxt = scheme.chain[i + 1] if i + 1 < len(scheme.chain) else None
        params = {"AIFLOW_STAGE": f"{scheme.name}/{p.model}", **p.knobs}
        wires.append(Wire(p.tier, p.model, params, (nxt.tier, nxt.model) if nxt else None))
    return wires[::-1]


def startup_wiring(schemes: Mapping[str, Scheme] | None = None) -> list[Wire]:
    """One load per (tier, model) covering every scheme; a model shared by two schemes gets the
    first scheme's wiring (applying the other scheme re-wires it)."""
    seen: dict[tuple[str, str], Wire] = {}
    for scheme in (schemes or build_schemes()).values():
        for w in wiring(scheme):
            seen.setdefault((w.tier, w.model), w)
    return list(seen.values())


# ---- applying a scheme to a running flow -----------------------------------------------------------


class RunningFlow:
    """The tier servers of a local flow, from a LocalRuntime or from the state file of `aiflow up`."""

    def __init__(self, state: Mapping, runtime=None):
        self.state = state
        self.runtime = runtime

    @classmethod
    def of(cls, runtime) -> RunningFlow:
        return cls(runtime.state(), runtime)

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(self.state["tiers"])

    def address_via(self, src: str, dst: str) -> str:
        from aiflow.local.runtime import address_via_state

        return address_via_state(self.state, src, dst)

    def wanted_parameters(self, w: Wire) -> dict[str, str]:
        params = {"AIFLOW_TIER": w.tier, **w.parameters}
        if w.next_stage:
            params["AIFLOW_NEXT_URL"] = self.address_via(w.tier, w.next_stage[0])
            params["AIFLOW_NEXT_MODEL"] = w.next_stage[1]
        return params

    def loaded_parameters(self, tier: str, model: str) -> dict[str, str] | None:
        """The AIFLOW_* parameters a loaded model runs with; None if it is not loaded."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.state["tiers"][tier]["grpc"])
        try:
            if not client.is_model_ready(model):
                return None
            config = client.get_model_config(model, as_json=True)["config"]
        except InferenceServerException:
            return None
        finally:
            client.close()
        params = config.get("parameters", {})
        return {k: v.get("string_value", "") for k, v in params.items() if k.startswith("AIFLOW_")}

    def load(self, w: Wire, timeout_s: float = 300.0) -> bool:
        """Load `w` unless it already runs with exactly these parameters; True if it (re)loaded."""
        params = self.wanted_parameters(w)
        if self.loaded_parameters(w.tier, w.model) == params:
            return False
        if self.runtime is not None:
            self.runtime.server(w.tier).load_model(w.model, parameters=params)
            return True
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        from aiflow.local.tritonserver import ModelLoadError, model_config_json

        model_dir = Path(self.state["model_repo"]) / w.model
        client = grpcclient.InferenceServerClient(self.state["tiers"][w.tier]["grpc"])
        try:
            client.load_model(w.model, config=model_config_json(model_dir, params, name=w.model), client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise ModelLoadError(f"{w.tier}: model {w.model!r} failed to load: {exc.message()}") from exc
        finally:
            client.close()
        return True

    def apply(self, wires: list[Wire], parallel: bool = True) -> list[Wire]:
        """Load what `wires` need (in parallel: each load imports torch in a fresh stub); return the
        wires that were (re)loaded."""
        from concurrent.futures import ThreadPoolExecutor

        if not parallel:
            return [w for w in wires if self.load(w)]
        with ThreadPoolExecutor(max_workers=len(wires) or 1) as pool:
            done = list(pool.map(self.load, wires))
        return [w for w, changed in zip(wires, done) if changed]

    def entry_address(self, scheme: Scheme) -> str:
        """Where the client on the device sends its request: through the links to the first stage."""
        return self.address_via(CLIENT_TIER, scheme.entry.tier)

    def link_counters(self) -> dict[str, dict]:
        """Bytes each emulated link has carried so far, as the link proxies count them (TCP payload)."""
        from aiflow.local.links import remote_links

        return remote_links(self.state["control_url"])


# ---- the local runtime under given conditions -------------------------------------------------------


@dataclass(frozen=True)
class Conditions:
    """Emulated tiers and links: compute factors (x slower than this machine), link rates and RTTs."""

    device_factor: float = 8.0  # a low-end device: too slow to run the whole model quickly
    edge_factor: float = 2.0  # an edge box: slower than the cloud, faster than the device
    cloud_factor: float = 1.0
    uplink_mbps: float | None = 2.0  # device -> edge; None = unshaped
    downlink_mbps: float | None = 20.0
    rtt_ms: float = 20.0
    edge_uplink_mbps: float | None = 50.0  # edge -> cloud
    edge_downlink_mbps: float | None = 200.0
    edge_rtt_ms: float = 40.0

    def links(self) -> dict[str, object]:
        from aiflow.local.links import LinkConfig

        def mbit(v):
            return None if v is None else v * 1e6

        return {
            "device->edge": LinkConfig(mbit(self.uplink_mbps), mbit(self.downlink_mbps), self.rtt_ms / 2e3, self.rtt_ms / 2e3),
            "edge->cloud": LinkConfig(
                mbit(self.edge_uplink_mbps), mbit(self.edge_downlink_mbps), self.edge_rtt_ms / 2e3, self.edge_rtt_ms / 2e3
            ),
        }

    def compute_factors(self) -> dict[str, float]:
        return {"device": self.device_factor, "edge": self.edge_factor, "cloud": self.cloud_factor}


def default_model_repo() -> Path:
    """model_repo/ of this checkout (or $AIFLOW_MODEL_REPO)."""
    import os

    path = Path(os.environ.get("AIFLOW_MODEL_REPO") or Path(__file__).resolve().parents[3] / "model_repo")
    if not (path / "captioner" / "config.pbtxt").is_file():
        raise FileNotFoundError(f"no model repository at {path}; set AIFLOW_MODEL_REPO to the repo's model_repo/")
    return path


def start_runtime(
    conditions: Conditions,
    wires: list[Wire] | None = None,
    base_port: int | None = None,
    state_path: str | Path | None = None,
    model_repo: str | Path | None = None,
):
    """Start one tritonserver per tier under `conditions` and load `wires` (default: every scheme).

    Returns (runtime, flow); the caller stops the runtime (it is a context manager).
    """
    from aiflow.local.runtime import LocalRuntime

    runtime = LocalRuntime(
        model_repo or default_model_repo(),
        base_port=base_port,
        links=conditions.links(),
        compute_factors=conditions.compute_factors(),
        state_path=state_path,
    )
    runtime.start()
    try:
        flow = RunningFlow.of(runtime)
        flow.apply(startup_wiring() if wires is None else wires)
    except BaseException:
        runtime.stop()
        raise
    return runtime, flow
