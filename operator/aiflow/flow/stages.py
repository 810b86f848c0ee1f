"""Stage logic: what each Triton model of model_repo/ runs, and how it hands over to the next stage.

A stage is defined by what it accepts and emits (`aiflow.accepts` / `aiflow.emits` in its
config.pbtxt); that pair decides what it computes:

    image -> caption      captioner         the whole model
    image -> features     vision_head       embed + encoder layers [0, split) + codec
    features -> features  vision_tail       encoder layers [layer, split) + codec
    features -> caption   caption_decoder   finish the encoder, large decoder (or local speculation)
    features -> drafts    caption_drafter   finish the encoder, small decoder drafts
    drafts -> caption     caption_verifier  finish the encoder, large decoder verifies the drafts

Knobs are looked up per model parameter `AIFLOW_X` (the local runtime's load-time override), then
the process environment `AIFLOW_X` (the operator's wiring), then the config.pbtxt default `x`.
A stage with a successor forwards its output there over gRPC and returns the final caption plus a
trace with one entry per hop. Every failure becomes a StageError whose message says what to fix.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from aiflow.flow import codecs, wire

ROLES = {
    ("image", "caption"): "captioner",
    ("image", "features"): "vision_head",
    ("features", "features"): "vision_tail",
    ("features", "caption"): "caption_decoder",
    ("features", "drafts"): "caption_drafter",
    ("drafts", "caption"): "caption_verifier",
}
ROLES_BY_NAME = {role: pair for pair, role in ROLES.items()}
TENSORS = {"image": "IMAGE", "features": "FEATURES", "drafts": "DRAFTS", "caption": "CAPTION"}
TRACE = "TRACE"
MESSAGE = "MESSAGE"  # the emitted message, returned when a features/drafts stage is the last one wired
DECODINGS = ("greedy", "speculative")
PASSTHROUGH = "passthrough"  # drafter: forward the features as received, plus the drafts

DEFAULT_CODEC = "fp32"
DEFAULT_TIMEOUT_S = 60.0
MAX_IMAGE_BYTES = 2 * 1024 * 1024
MAX_IMAGE_SIDE = 2048
MAX_BATCH = 64

# knob -> (kind, default); looked up as parameter AIFLOW_<KNOB>, env AIFLOW_<KNOB>, parameter <knob>.
KNOBS: dict[str, tuple[type, object]] = {
    "split_layer": (int, None),
    "codec": (str, DEFAULT_CODEC),
    "decoding": (str, "greedy"),
    "next_url": (str, ""),
    "next_model": (str, ""),
    "tier": (str, ""),
    "flow": (str, ""),
    "stage": (str, ""),
    "compute_factor": (float, 1.0),
    "timeout_s": (float, DEFAULT_TIMEOUT_S),
    "max_image_bytes": (int, MAX_IMAGE_BYTES),
    "max_image_side": (int, MAX_IMAGE_SIDE),
    "max_batch": (int, MAX_BATCH),
    "model_path": (str, ""),  # a checkpoint directory; empty = the bundled trained weights
}


class StageError(Exception):
    """A request or configuration this stage cannot serve; the message goes back to the caller.

    `code` names the Triton error code: INVALID_ARG (the request), UNAVAILABLE (the next stage).
    """

    def __init__(self, message: str, code: str = "INVALID_ARG"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class StageConfig:
    model: str
    accepts: str
    emits: str
    split_layer: int | None = None
    codec: str = DEFAULT_CODEC
    decoding: str = "greedy"
    next_url: str = ""
    next_model: str = ""
    tier: str = ""
    flow: str = ""
    stage: str = ""
    compute_factor: float = 1.0
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_side: int = MAX_IMAGE_SIDE
    max_batch: int = MAX_BATCH
    model_path: str = ""

    @property
    def role(self) -> str:
        return ROLES[(self.accepts, self.emits)]

    @property
    def name(self) -> str:
        return self.stage or self.model

    def describe(self) -> str:
        """One line for the server log: what runs here, where it goes, how slow it is made."""
        knobs = [f"codec={self.codec}"] if self.emits in ("features", "drafts") else []
        if self.split_layer is not None and self.accepts != "drafts":
            knobs.append(f"split_layer={self.split_layer}")
        if self.emits == "caption":
            knobs.append(f"decoding={self.decoding}")
        nxt = f"-> {self.next_model} at {self.next_url}" if self.next_url else "(last stage)"
        return (
            f"aiflow stage {self.name} [{self.role}] tier={self.tier or '?'} {' '.join(knobs)} {nxt}; "
            f"compute factor {self.compute_factor:g} (emulated: sleeps {self.compute_factor - 1:g}x compute)"
        )


def stage_config(model: str, parameters: Mapping[str, str], env: Mapping[str, str]) -> StageConfig:
    """Resolve a stage's configuration from its config parameters and environment; StageError if bad."""
    accepts, emits = parameters.get("aiflow.accepts", ""), parameters.get("aiflow.emits", "")
    if (accepts, emits) not in ROLES:
        known = ", ".join(f"{a}->{e}" for a, e in ROLES)
        raise StageError(f"model {model}: aiflow.accepts/emits {accepts!r}->{emits!r} is not a stage ({known})")
    values: dict[str, object] = {}
    for knob, (kind, default) in KNOBS.items():
        key = f"AIFLOW_{knob.upper()}"
        raw = parameters.get(key) or env.get(key) or parameters.get(knob) or parameters.get(f"aiflow.{knob}")
        if raw in (None, ""):
            values[knob] = default
            continue
        try:
            values[knob] = kind(str(raw).strip())
        except ValueError:
            raise StageError(f"model {model}: {key}={raw!r} is not a valid {kind.__name__}") from None
    config = StageConfig(model=model, accepts=accepts, emits=emits, **values)
    _check_config(config)
    return config


def _check_config(c: StageConfig) -> None:
    where = f"model {c.model}"
    if c.decoding not in DECODINGS:
        raise StageError(f"{where}: decoding {c.decoding!r} must be one of {', '.join(DECODINGS)}")
    if c.emits in ("features", "drafts") and c.codec != PASSTHROUGH:
        try:
            codecs.parse_codec(c.codec)
        except codecs.CodecError as exc:
            raise StageError(f"{where}: {exc}") from None
    if c.codec == PASSTHROUGH and c.role != "caption_drafter":
        raise StageError(f"{where}: codec {PASSTHROUGH!r} only applies to a drafter")
    if bool(c.next_url) != bool(c.next_model):
        raise StageError(f"{where}: set both next_url and next_model (AIFLOW_NEXT_URL, AIFLOW_NEXT_MODEL) or neither")
    if c.next_url and c.emits == "caption":
        raise StageError(f"{where}: emits the caption, so it cannot have a next stage ({c.next_model} at {c.next_url})")
    if c.compute_factor < 1:
        raise StageError(f"{where}: compute factor {c.compute_factor} must be >= 1 (1 = real speed)")
    if c.timeout_s <= 0:
        raise StageError(f"{where}: timeout_s must be positive")


# ---- inputs ---------------------------------------------------------------------------------------


def decode_images(tensor: np.ndarray, config: StageConfig) -> list:
    """BYTES tensor of encoded images -> RGB PIL images, each checked against the stage's limits."""
    from PIL import Image, UnidentifiedImageError

    if tensor is None:
        raise StageError(f"{config.name}: input IMAGE is missing")
    if tensor.dtype != object or tensor.ndim != 1:
        raise StageError(
            f"{config.name}: IMAGE must be a 1-D BYTES tensor of encoded images (PNG/JPEG), "
            f"got {tensor.dtype} of shape {list(tensor.shape)}"
        )
    check_batch(len(tensor), config)
    images = []
    for i, blob in enumerate(tensor):
        if not isinstance(blob, (bytes, bytearray)) or not blob:
            raise StageError(f"{config.name}: image {i} is empty")
        if len(blob) > config.max_image_bytes:
            raise StageError(
                f"{config.name}: image {i} is {len(blob)} bytes, over the limit of {config.max_image_bytes}; "
                "send a smaller image"
            )
        try:
            img = Image.open(io.BytesIO(blob))
            w, h = img.size
            if max(w, h) > config.max_image_side:
                raise StageError(
                    f"{config.name}: image {i} is {w}x{h} pixels, over the limit of "
                    f"{config.max_image_side} per side; resize it"
                )
            img.load()
        except UnidentifiedImageError:
            raise StageError(f"{config.name}: image {i} is not a readable image: unknown format (send PNG or JPEG bytes)") from None
        except (OSError, Image.DecompressionBombError, ValueError) as exc:
            raise StageError(f"{config.name}: image {i} is not a readable image (send PNG or JPEG bytes): {exc}") from None
        images.append(img.convert("RGB"))
    return images


def check_batch(n: int, config: StageConfig) -> None:
    if n == 0:
        raise StageError(f"{config.name}: empty batch; send at least one image")
    if n > config.max_batch:
        raise StageError(f"{config.name}: batch of {n} is over the limit of {config.max_batch}; split it")


def decode_message(tensor: np.ndarray, config: StageConfig) -> wire.Message:
    """UINT8 tensor -> wire message of the kind this stage accepts."""
    name = TENSORS[config.accepts]
    if tensor is None:
        raise StageError(f"{config.name}: input {name} is missing")
    if tensor.dtype != np.uint8 or tensor.ndim != 1:
        raise StageError(
            f"{config.name}: {name} must be a 1-D UINT8 tensor holding one aiflow message, "
            f"got {tensor.dtype} of shape {list(tensor.shape)}"
        )
    try:
        msg = wire.decode(tensor, expect=config.accepts)
    except wire.WireError as exc:
        raise StageError(f"{config.name}: {exc}") from None
    check_batch(msg.hidden.shape[0], config)
    return msg


# ---- the trace ------------------------------------------------------------------------------------


@dataclass
class Hop:
    """What one stage did for one request."""

    stage: str
    tier: str
    model: str
    batch: int
    bytes_in: int
    compute_ms: float = 0.0
    emulated_ms: float = 0.0  # extra sleep for the compute factor
    compute_factor: float = 1.0
    total_ms: float = 0.0  # receipt to reply, including the wait for the next stage
    bytes_to_next: int = 0
    next: str = ""
    wait_next_ms: float = 0.0
    detail: dict = field(default_factory=dict)


def trace_tensor(hops: list[dict]) -> np.ndarray:
    return np.array([json.dumps(hops).encode()], dtype=object)


def read_trace(tensor: np.ndarray | None) -> list[dict]:
    if tensor is None or len(tensor) == 0:
        return []
    return json.loads(bytes(tensor.reshape(-1)[0]).decode())


def caption_tensor(captions: list[str]) -> np.ndarray:
    return np.array([c.encode() for c in captions], dtype=object)


# ---- forwarding -----------------------------------------------------------------------------------

Forward = Callable[[str, np.ndarray], dict[str, np.ndarray]]


class GrpcForward:
    """Calls the next stage's Triton over gRPC; every failure names the next stage and its address."""

    def __init__(self, url: str, model: str, timeout_s: float):
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self._client = None

    def __call__(self, input_name: str, data: np.ndarray) -> dict[str, np.ndarray]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.url)
        inp = grpcclient.InferInput(input_name, list(data.shape), "UINT8")
        inp.set_data_from_numpy(data)
        outputs = [grpcclient.InferRequestedOutput(n) for n in (TENSORS["caption"], TRACE)]
        try:
            result = self._client.infer(self.model, [inp], outputs=outputs, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            down = any(s in str(exc.status()) for s in ("UNAVAILABLE", "DEADLINE_EXCEEDED"))
            message = describe_call_error(exc, self.model, self.url, self.timeout_s)
            raise StageError(message, "UNAVAILABLE" if down else "INTERNAL") from None
        return {name: result.as_numpy(name) for name in (TENSORS["caption"], TRACE)}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def describe_call_error(exc, model: str, url: str, timeout_s: float, what: str = "next stage") -> str:
    """A tritonclient error as a sentence naming the stage called and its address."""
    status, message = str(exc.status() or ""), exc.message() or str(exc)
    if "UNAVAILABLE" in status:
        return f"{what} {model} at {url} is unreachable (is its Triton server running?): {message}"
    if "DEADLINE_EXCEEDED" in status:
        return f"{what} {model} at {url} did not answer within {timeout_s:g}s"
    return f"{what} {model} at {url} failed: {message}"


# ---- the stage ------------------------------------------------------------------------------------


class Stage:
    """One partition of the captioning model, as served by one Triton model instance."""

    def __init__(self, config: StageConfig, family, forward: Forward | None = None):
        self.config = config
        self.family = family
        if family is not None and config.split_layer is not None and not 0 <= config.split_layer <= family.num_layers:
            raise StageError(
                f"model {config.model}: split_layer {config.split_layer} is out of range 0..{family.num_layers}"
            )
        if forward is None and config.next_url:
            forward = GrpcForward(config.next_url, config.next_model, config.timeout_s)
        self.forward = forward

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Serve one request: inputs by tensor name -> outputs by tensor name (CAPTION or the emitted
        message, and TRACE)."""
        import torch

        c = self.config
        start = time.perf_counter()
        tensor = inputs.get(TENSORS[c.accepts])
        hop = Hop(stage=c.name, tier=c.tier, model=c.model, batch=0, bytes_in=0, compute_factor=c.compute_factor)
        if c.accepts == "image":
            images = decode_images(tensor, c)
            hop.bytes_in = sum(len(b) for b in tensor)
            received = images
        else:
            received = decode_message(tensor, c)
            hop.bytes_in = int(tensor.size)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                result = self._compute(received, hop)
        except ValueError as exc:  # the model's own checks: shapes, token ids, image size and mode
            raise StageError(f"{c.name}: {exc}") from None
        hop.compute_ms = 1000 * (time.perf_counter() - t0)
        if c.compute_factor > 1:
            hop.emulated_ms = (c.compute_factor - 1) * hop.compute_ms
            time.sleep(hop.emulated_ms / 1000)
        outputs: dict[str, np.ndarray]
        downstream: list[dict] = []
        if c.emits == "caption":
            outputs = {TENSORS["caption"]: caption_tensor(result)}
        else:
            data = np.frombuffer(result, dtype=np.uint8)
            hop.bytes_to_next = len(result)
            if self.forward is None:
                outputs = {MESSAGE: data}
            else:
                hop.next = f"{c.next_model}@{c.next_url}" if c.next_url else c.next_model
                t1 = time.perf_counter()
                reply = self.forward(TENSORS[c.emits], data)
                hop.wait_next_ms = 1000 * (time.perf_counter() - t1)
                captions = reply.get(TENSORS["caption"])
                if captions is None:
                    raise StageError(f"{c.name}: next stage {hop.next} returned no caption (is it the end of the chain?)")
                outputs = {TENSORS["caption"]: captions}
                downstream = read_trace(reply.get(TRACE))
        hop.total_ms = 1000 * (time.perf_counter() - start)
        outputs[TRACE] = trace_tensor([asdict(hop), *downstream])
        return outputs

    # What each role computes; returns captions (emits caption) or message bytes.
    def _compute(self, received, hop: Hop):
        c, fam = self.config, self.family
        role = c.role
        if role in ("captioner", "vision_head"):
            pixels = fam.preprocess(received)
            hop.batch = int(pixels.shape[0])
            hidden = fam.embed(pixels)
            if role == "captioner":
                return self._captions(fam.finish(fam.encode_layers(hidden, 0, fam.num_layers)), hop)
            split = fam.num_layers if c.split_layer is None else c.split_layer
            return self._emit(fam.encode_layers(hidden, 0, split), split, None, hop)
        msg: wire.Message = received
        hop.batch = int(msg.hidden.shape[0])
        hop.detail["codec_in"] = msg.codec
        hop.detail["layer_in"] = msg.layer
        if msg.layer > fam.num_layers:
            raise StageError(f"{c.name}: features at layer {msg.layer}, but the encoder has {fam.num_layers} layers")
        hidden = _torch(msg.hidden)
        if role == "vision_tail":
            stop = max(msg.layer, fam.num_layers if c.split_layer is None else c.split_layer)
            return self._emit(fam.encode_layers(hidden, msg.layer, stop), stop, msg.positions, hop)
        hidden = fam.encode_layers(hidden, msg.layer, fam.num_layers)
        features = fam.finish(hidden)
        if role == "caption_decoder":
            return self._captions(features, hop)
        if role == "caption_drafter":
            drafts = fam.draft(features)
            hop.detail["draft_tokens"] = [len(d) for d in drafts]
            if c.codec == PASSTHROUGH:
                return wire.encode(msg.layer, msg.hidden, codecs.parse_codec(msg.codec), msg.positions, drafts, payload=msg.payload)
            return self._emit(hidden, fam.num_layers, msg.positions, hop, drafts)
        # caption_verifier
        if len(msg.drafts) != hop.batch:
            raise StageError(f"{c.name}: {len(msg.drafts)} drafts for a batch of {hop.batch}")
        ids, accepted = fam.verify(features, msg.drafts)
        hop.detail["draft_tokens"] = [len(d) for d in msg.drafts]
        hop.detail["accepted_tokens"] = [int(a) for a in accepted]
        return [fam.decode_text(i) for i in ids]

    def _emit(self, hidden, layer: int, positions, hop: Hop, drafts=None) -> bytes:
        codec = codecs.parse_codec(self.config.codec)
        x = hidden.detach().float().numpy()
        importance = None
        if codec.reduce == "topk" and x.shape[1] > codec.keep + 1:
            importance = self.family.token_importance(hidden).detach().float().numpy()
        x, positions = codecs.reduce_tokens(codec, x, importance, positions)
        hop.detail["codec_out"] = codec.spec
        hop.detail["tokens_out"] = int(x.shape[1])
        hop.detail["layer_out"] = layer
        return wire.encode(layer, x, codec, positions, drafts)

    def _captions(self, features, hop: Hop) -> list[str]:
        fam = self.family
        if self.config.decoding == "speculative":
            drafts = fam.draft(features)
            ids, accepted = fam.verify(features, drafts)
            hop.detail["accepted_tokens"] = [int(a) for a in accepted]
        else:
            ids = fam.generate(features, decoder="large")
        return [fam.decode_text(i) for i in ids]

    def close(self) -> None:
        close = getattr(self.forward, "close", None)
        if close:
            close()


def _torch(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


# ---- the Triton side (used by model_repo/*/1/model.py) --------------------------------------------


def model_parameters(model_config: Mapping) -> dict[str, str]:
    """config.pbtxt `parameters` (as Triton passes them to `initialize`) -> {key: string value}."""
    return {k: str(v.get("string_value", "")) for k, v in (model_config.get("parameters") or {}).items()}


def load_stage(args: Mapping[str, str], env: Mapping[str, str]) -> Stage:
    """Build the Stage for a Triton model instance from its `initialize` args; loads the model once."""
    import torch

    from aiflow.flow.model import load_family

    torch.set_num_threads(1)  # one instance, one core: instances and tiers share 2 cores
    model_config = json.loads(args["model_config"])
    config = stage_config(args.get("model_name") or model_config.get("name", "?"), model_parameters(model_config), env)
    stage = Stage(config, load_family(config.model_path or None))
    print(config.describe(), flush=True)
    return stage


def triton_model(pb_utils) -> type:
    """The `TritonPythonModel` class of a model_repo/ stage (pb_utils exists only inside the stub)."""
    import os

    class TritonPythonModel:
        def initialize(self, args):
            self.stage = load_stage(args, os.environ)

        def execute(self, requests):
            return serve(self.stage, requests, pb_utils)

        def finalize(self):
            self.stage.close()

    return TritonPythonModel


def serve(stage: Stage, requests, pb_utils) -> list:
    """Triton `execute`: one response per request; errors become TritonErrors, the server keeps serving."""
    responses = []
    for request in requests:
        try:
            inputs = {}
            for name in (TENSORS[stage.config.accepts],):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                inputs[name] = tensor.as_numpy() if tensor is not None else None
            outputs = stage.run(inputs)
            tensors = [pb_utils.Tensor(name, value) for name, value in outputs.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        except StageError as exc:
            responses.append(pb_utils.InferenceResponse(error=_triton_error(pb_utils, str(exc), exc.code)))
        except Exception as exc:  # a bug must not take the server down; say where it happened
            message = f"{stage.config.name}: internal error {type(exc).__name__}: {exc}"
            responses.append(pb_utils.InferenceResponse(error=_triton_error(pb_utils, message, "INTERNAL")))
    return responses


def _triton_error(pb_utils, message: str, code: str):
    code_value = getattr(pb_utils.TritonError, code, None)  # error codes exist in recent backends only
    return pb_utils.TritonError(message, code_value) if code_value is not None else pb_utils.TritonError(message)
