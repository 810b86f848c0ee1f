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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from aiflow.contract import MESSAGE, PASSTHROUGH, TENSORS, TRACE, parse_codec
from aiflow.model.bottleneck import bottleneck_of
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


def decode_message(tensor: np.ndarray, config: StageConfig, tables: wire.Tables | None = None) -> wire.Message:
    """UINT8 tensor -> wire message of the kind this stage accepts (`tables`: the probability tables
    of the learned codec, see aiflow.stage.wire)."""
    name = TENSORS[config.accepts]
    if tensor is None:
        raise StageError(f"{config.name}: input {name} is missing")
    if tensor.dtype != np.uint8 or tensor.ndim != 1:
        raise StageError(
            f"{config.name}: {name} must be a 1-D UINT8 tensor holding one aiflow message, "
            f"got {tensor.dtype} of shape {list(tensor.shape)}"
        )
    try:
        msg = wire.decode(tensor, expect=config.accepts, tables=tables)
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
    received_s: float = 0.0  # wall clock (epoch seconds) when this stage took the request
    replied_s: float = 0.0  # ... and when it replied; several requests in flight overlap here
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
        if family is not None and config.emits in ("features", "drafts") and config.codec != PASSTHROUGH:
            codec = parse_codec(config.codec)
            if codec.learned:
                try:
                    bottleneck_of(family, codec.channels, self._emit_layer())
                except ValueError as exc:
                    raise StageError(f"model {config.model}: {exc}") from None
        if forward is None and config.next_url:
            forward = GrpcForward(config.next_url, config.next_model, config.timeout_s)
        self.forward = forward

    def _emit_layer(self) -> int:
        """The encoder layer this stage's messages carry (a tail stops at its split layer at the latest)."""
        c, layers = self.config, self.family.num_layers
        return layers if c.split_layer is None or c.role == "caption_drafter" else c.split_layer

    def _tables(self, codec, layer: int) -> np.ndarray:
        """The learned codec's probability tables, from this stage's own weights."""
        return bottleneck_of(self.family, codec.channels, layer).coding_tables()

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Serve one request: inputs by tensor name -> outputs by tensor name (CAPTION or the emitted
        message, and TRACE). Synchronous: waits for the next stage when there is one."""
        pending = self.receive(inputs)
        self.compute([pending])
        if pending.error is not None:
            raise pending.error
        return self.run_forward(pending) if pending.forwards(self) else self.reply(pending)

    def run_forward(self, pending: Pending) -> dict[str, np.ndarray]:
        """Send a computed request on to the next stage, wait for its answer and reply with it."""
        t1 = time.perf_counter()
        reply = self.forward(TENSORS[self.config.emits], pending.message())
        return self.reply(pending, reply, 1000 * (time.perf_counter() - t1))

    def receive(self, inputs: Mapping[str, np.ndarray]) -> Pending:
        """Check and decode one request's input; StageError says what is wrong with it."""
        c = self.config
        start = time.perf_counter()
        tensor = inputs.get(TENSORS[c.accepts])
        hop = Hop(stage=c.name, tier=c.tier, model=c.model, batch=0, bytes_in=0, compute_factor=c.compute_factor,
                  received_s=time.time())
        if c.accepts == "image":
            received = decode_images(tensor, c)
            hop.bytes_in = sum(len(b) for b in tensor)
            hop.batch = len(received)
        else:
            received = decode_message(tensor, c, self._tables if self.family is not None else None)
            hop.bytes_in = int(tensor.size)
            hop.batch = int(received.hidden.shape[0])
        return Pending(hop=hop, received=received, start=start)

    def compute(self, pendings: Sequence[Pending]) -> None:
        """Compute several requests in as few batched passes as their inputs allow (features at the
        same layer and shape share a pass); each gets its result or its StageError. The emulated
        slowdown sleeps once per pass, in proportion to the pass."""
        import torch

        for group in _compatible_groups(pendings):
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    self._compute(group)
            except StageError as exc:
                for p in group:
                    p.error = exc
            except ValueError as exc:  # the model's own checks: shapes, token ids, image size and mode
                for p in group:
                    p.error = StageError(f"{self.config.name}: {exc}")
            compute_ms = 1000 * (time.perf_counter() - t0)
            emulated_ms = (self.config.compute_factor - 1) * compute_ms if self.config.compute_factor > 1 else 0.0
            if emulated_ms:
                time.sleep(emulated_ms / 1000)
            for p in group:
                p.hop.compute_ms, p.hop.emulated_ms = compute_ms, emulated_ms
                p.hop.detail["batched_requests"] = len(group)
                p.hop.detail["batched_samples"] = sum(q.hop.batch for q in group)

    def reply(self, pending: Pending, downstream: Mapping[str, np.ndarray] | None = None, wait_ms: float = 0.0) -> dict[str, np.ndarray]:
        """The outputs of a computed request: its captions or emitted message, or the next stage's
        reply (`downstream`, after `wait_ms`), plus the trace with this hop first."""
        c, hop = self.config, pending.hop
        hops: list[dict] = []
        if c.emits == "caption":
            outputs = {TENSORS["caption"]: caption_tensor(pending.result)}
        elif downstream is None:
            hop.bytes_to_next = len(pending.result)
            outputs = {MESSAGE: pending.message()}
        else:
            hop.bytes_to_next = len(pending.result)
            hop.next = f"{c.next_model}@{c.next_url}" if c.next_url else c.next_model
            hop.wait_next_ms = wait_ms
            captions = downstream.get(TENSORS["caption"])
            if captions is None:
                raise StageError(f"{c.name}: next stage {hop.next} returned no caption (is it the end of the chain?)")
            outputs = {TENSORS["caption"]: captions}
            hops = read_trace(downstream.get(TRACE))
        hop.total_ms = 1000 * (time.perf_counter() - pending.start)
        hop.replied_s = time.time()
        outputs[TRACE] = trace_tensor([asdict(hop), *hops])
        return outputs

    # What each role computes, for a group of requests whose inputs share one pass; sets each
    # request's result: its captions (emits caption) or its message bytes.
    def _compute(self, group: Sequence[Pending]) -> None:
        c, fam = self.config, self.family
        role = c.role
        counts = [p.hop.batch for p in group]
        if role in ("captioner", "vision_head"):
            pixels = fam.preprocess([img for p in group for img in p.received])
            hidden = fam.embed(pixels)
            if role == "captioner":
                captions = self._captions(fam.finish(fam.encode_layers(hidden, 0, fam.num_layers)), group)
                _deal(group, captions)
                return
            split = fam.num_layers if c.split_layer is None else c.split_layer
            hidden = fam.encode_layers(hidden, 0, split)
            for p, part in zip(group, _split(hidden, counts)):
                p.result = self._emit(part, split, None, p.hop)
            return
        msgs: list[wire.Message] = [p.received for p in group]
        layer = msgs[0].layer
        for p, msg in zip(group, msgs):
            p.hop.detail["codec_in"] = msg.codec
            p.hop.detail["layer_in"] = msg.layer
        if layer > fam.num_layers:
            raise StageError(f"{c.name}: features at layer {layer}, but the encoder has {fam.num_layers} layers")
        hidden = _torch(np.concatenate([m.hidden for m in msgs]) if len(msgs) > 1 else msgs[0].hidden)
        positions = [m.positions for m in msgs]
        codec_in = parse_codec(msgs[0].codec)
        if codec_in.learned:  # symbols -> hidden states at the layer, by the bottleneck's synthesis
            hidden = bottleneck_of(fam, codec_in.channels, layer).synthesise(hidden)
        if role == "vision_tail":
            stop = max(layer, fam.num_layers if c.split_layer is None else c.split_layer)
            hidden = fam.encode_layers(hidden, layer, stop)
            for p, part, pos in zip(group, _split(hidden, counts), positions):
                p.result = self._emit(part, stop, pos, p.hop)
            return
        hidden = fam.encode_layers(hidden, layer, fam.num_layers)
        features = fam.finish(hidden)
        if role == "caption_decoder":
            _deal(group, self._captions(features, group))
            return
        if role == "caption_drafter":
            drafts = fam.draft(features)
            for p, part, msg, own in zip(group, _split(hidden, counts), msgs, _split(drafts, counts)):
                p.hop.detail["draft_tokens"] = [len(d) for d in own]
                if c.codec == PASSTHROUGH:
                    p.result = wire.encode(msg.layer, msg.hidden, parse_codec(msg.codec), msg.positions, own, payload=msg.payload)
                else:
                    p.result = self._emit(part, fam.num_layers, msg.positions, p.hop, own)
            return
        # caption_verifier: the drafts of every request in the group verified in one pass
        for p, msg in zip(group, msgs):
            if len(msg.drafts) != p.hop.batch:
                raise StageError(f"{c.name}: {len(msg.drafts)} drafts for a batch of {p.hop.batch}")
        drafts = [d for m in msgs for d in m.drafts]
        ids, accepted = fam.verify(features, drafts)
        for p, own, acc in zip(group, _split(drafts, counts), _split(list(accepted), counts)):
            p.hop.detail["draft_tokens"] = [len(d) for d in own]
            p.hop.detail["accepted_tokens"] = [int(a) for a in acc]
        _deal(group, [fam.decode_text(i) for i in ids])

    def _emit(self, hidden, layer: int, positions, hop: Hop, drafts=None) -> bytes:
        codec = parse_codec(self.config.codec)
        hop.detail["codec_out"] = codec.spec
        hop.detail["layer_out"] = layer
        if codec.learned:
            bn = bottleneck_of(self.family, codec.channels, layer)
            symbols = bn.symbols(hidden).astype(np.float32)
            hop.detail["tokens_out"] = int(symbols.shape[1])
            return wire.encode(layer, symbols, codec, None, drafts, tables=bn.coding_tables())
        x = hidden.detach().float().numpy()
        importance = None
        if codec.reduce == "topk" and x.shape[1] > codec.keep + 1:
            importance = self.family.token_importance(hidden).detach().float().numpy()
        x, positions = codecs.reduce_tokens(codec, x, importance, positions)
        hop.detail["tokens_out"] = int(x.shape[1])
        return wire.encode(layer, x, codec, positions, drafts)

    def _captions(self, features, group: Sequence[Pending]) -> list[str]:
        fam = self.family
        if self.config.decoding == "speculative":
            drafts = fam.draft(features)
            ids, accepted = fam.verify(features, drafts)
            for p, own, acc in zip(group, _split(drafts, [p.hop.batch for p in group]), _split(list(accepted), [p.hop.batch for p in group])):
                p.hop.detail["draft_tokens"] = [len(d) for d in own]
                p.hop.detail["accepted_tokens"] = [int(a) for a in acc]
        else:
            ids = fam.generate(features, decoder="large")
        return [fam.decode_text(i) for i in ids]

    def close(self) -> None:
        close = getattr(self.forward, "close", None)
        if close:
            close()


@dataclass
class Pending:
    """One request on its way through a stage: received, then computed (`result` or `error`)."""

    hop: Hop
    received: object  # the decoded input: images, or a wire.Message
    start: float
    result: object = None  # captions (list of str) or the emitted message bytes
    error: StageError | None = None

    def forwards(self, stage: Stage) -> bool:
        """Whether the result goes on to a next stage (rather than back to the caller)."""
        return stage.config.emits != "caption" and stage.forward is not None

    def message(self) -> np.ndarray:
        return np.frombuffer(self.result, dtype=np.uint8)


def _compatible_groups(pendings: Sequence[Pending]) -> list[list[Pending]]:
    """Requests that can share one batched pass: all images, or messages with the same layer,
    token and channel counts, the same kind of positions and, for a learned codec, the same codec
    (in arrival order)."""
    groups: dict[tuple, list[Pending]] = {}
    for p in pendings:
        msg = p.received
        # a learned codec's symbols go through its own synthesis: they batch only with the same codec
        key = () if isinstance(msg, list) else (msg.layer, msg.hidden.shape[1:], msg.positions is None,
                                                 msg.codec if parse_codec(msg.codec).learned else "")
        groups.setdefault(key, []).append(p)
    return list(groups.values())


def _split(items, counts: Sequence[int]) -> list:
    """Cut a batch (tensor or list) back into the requests' parts, `counts` samples each."""
    parts, at = [], 0
    for n in counts:
        parts.append(items[at : at + n])
        at += n
    return parts


def _deal(group: Sequence[Pending], captions: list[str]) -> None:
    for p, own in zip(group, _split(captions, [p.hop.batch for p in group])):
        p.result = own


def _torch(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


