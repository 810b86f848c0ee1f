"""Stage logic: what each Triton model of model_repo/ runs, and how it hands over to the next stage.

A stage is defined by what it accepts and emits (`aiflow.accepts` / `aiflow.emits` in its
config.pbtxt); that pair decides what it computes:

    image -> caption      captioner         the whole model
    image -> features     vision_head       embed + encoder layers [0, split) + codec
    features -> features  vision_tail       encoder layers [layer, split) + codec
    features -> caption   caption_decoder   finish the encoder, large decoder (or local speculation)
    features -> drafts    caption_drafter   finish the encoder, small decoder drafts
    drafts -> caption     caption_verifier  finish the encoder, large decoder verifies the drafts

Its knobs are resolved in `aiflow.stage.config`. A stage with a successor forwards its output there over gRPC and returns the final caption plus a
trace with one entry per hop. Every failure becomes a StageError whose message says what to fix.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from aiflow.contract import MESSAGE, PASSTHROUGH, TENSORS, TRACE, parse_codec
from aiflow.stage import codecs, wire
from aiflow.stage.config import StageConfig, StageError
from aiflow.stage.forward import Forward, GrpcForward

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
                return wire.encode(msg.layer, msg.hidden, parse_codec(msg.codec), msg.positions, drafts, payload=msg.payload)
            return self._emit(hidden, fam.num_layers, msg.positions, hop, drafts)
        # caption_verifier
        if len(msg.drafts) != hop.batch:
            raise StageError(f"{c.name}: {len(msg.drafts)} drafts for a batch of {hop.batch}")
        ids, accepted = fam.verify(features, msg.drafts)
        hop.detail["draft_tokens"] = [len(d) for d in msg.drafts]
        hop.detail["accepted_tokens"] = [int(a) for a in accepted]
        return [fam.decode_text(i) for i in ids]

    def _emit(self, hidden, layer: int, positions, hop: Hop, drafts=None) -> bytes:
        codec = parse_codec(self.config.codec)
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


