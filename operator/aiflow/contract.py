"""The data plane's contract: what the planner, the renderer, the operator and the stages agree on.

Torch-free and numpy-free on purpose: the operator image imports this, never the data plane.

- Stage roles: a Triton model of model_repo/ declares what it accepts and emits (the config.pbtxt
  parameters `aiflow.accepts` / `aiflow.emits`); the pair names its role.
- Tensor names on the wire between stages.
- The codec grammar (a spec string like `topk:16+int8+zstd`, or `learned:8` for the trained
  task-oriented bottleneck) and its byte accounting, so the planner can price a codec without
  running it, and the wire framing each message adds.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- stage roles and tensors ----------------------------------------------------------------------

ACCEPTS = "aiflow.accepts"  # config.pbtxt parameter keys
EMITS = "aiflow.emits"

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

# ---- the codec grammar ----------------------------------------------------------------------------

QUANTISERS = ("fp32", "fp16", "int8")
REDUCERS = ("topk", "merge")
# The learned bottleneck (aiflow.model.bottleneck): projection to C channels, quantisation and
# entropy coding with a learned prior, trained with the family; a whole codec on its own.
LEARNED = "learned"
MAX_LEARNED_CHANNELS = 256
DEFAULT_ZSTD_LEVEL = 19
SPEC_HELP = (
    "steps joined by '+': [topk:K|merge:K] + fp32|fp16|int8 + [zstd[:LEVEL]], e.g. topk:16+int8+zstd; "
    "or learned:C alone (the trained bottleneck with C channels), e.g. learned:8"
)


class CodecError(ValueError):
    """A codec spec or an encoded payload that cannot be used."""


@dataclass(frozen=True)
class Codec:
    """A parsed codec spec."""

    quant: str = "fp32"
    reduce: str | None = None
    keep: int | None = None
    zstd_level: int | None = None
    channels: int | None = None  # learned:C: latent channels of the trained bottleneck

    @property
    def learned(self) -> bool:
        return self.quant == LEARNED

    @property
    def spec(self) -> str:
        """The canonical spec string (what `parse_codec` reads back to the same codec)."""
        if self.learned:
            return f"{LEARNED}:{self.channels}"
        steps = [f"{self.reduce}:{self.keep}"] if self.reduce else []
        steps.append(self.quant)
        if self.zstd_level is not None:
            steps.append("zstd" if self.zstd_level == DEFAULT_ZSTD_LEVEL else f"zstd:{self.zstd_level}")
        return "+".join(steps)

    @property
    def lossless(self) -> bool:
        return self.reduce is None and self.quant == "fp32"


def parse_codec(spec: str) -> Codec:
    """Parse a codec spec like `topk:16+int8+zstd`; raise CodecError saying what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise CodecError(f"empty codec spec; expected {SPEC_HELP}")
    quant = reduce = keep = zstd_level = None
    order = 0  # reducers, then the quantiser, then zstd
    steps = spec.strip().lower().split("+")
    for raw in steps:
        name, _, arg = raw.strip().partition(":")
        if name == LEARNED:
            if len(steps) > 1:
                raise CodecError(f"codec {spec!r}: {LEARNED}:C is a whole codec (it quantises and entropy-codes); use it alone")
            channels = _positive_int(spec, raw, arg)
            if channels > MAX_LEARNED_CHANNELS:
                raise CodecError(f"codec {spec!r}: at most {MAX_LEARNED_CHANNELS} channels")
            return Codec(quant=LEARNED, channels=channels)
        if name in REDUCERS:
            if order > 0:
                raise CodecError(f"codec {spec!r}: token reduction {raw!r} must come first, once")
            reduce, keep, order = name, _positive_int(spec, raw, arg), 1
        elif name in QUANTISERS:
            if order > 1 or arg:
                raise CodecError(f"codec {spec!r}: {raw!r} must be a single quantiser before zstd")
            quant, order = name, 2
        elif name == "zstd":
            if order > 2:
                raise CodecError(f"codec {spec!r}: zstd given twice")
            zstd_level = _positive_int(spec, raw, arg) if arg else DEFAULT_ZSTD_LEVEL
            if zstd_level > 22:
                raise CodecError(f"codec {spec!r}: zstd level must be 1..22")
            order = 3
        else:
            raise CodecError(f"codec {spec!r}: unknown step {raw!r}; expected {SPEC_HELP}")
    return Codec(quant=quant or "fp32", reduce=reduce, keep=keep, zstd_level=zstd_level)


def _positive_int(spec: str, raw: str, arg: str) -> int:
    try:
        value = int(arg)
    except ValueError:
        value = 0
    if value < 1:
        raise CodecError(f"codec {spec!r}: {raw!r} needs a positive integer, e.g. {raw.split(':')[0]}:16")
    return value


# ---- byte accounting ------------------------------------------------------------------------------

# Wire message framing (aiflow.stage.wire): fixed header + payload length + crc32; the codec spec
# string and the optional token positions / draft ids come on top.
WIRE_HEADER_BYTES = 16 + 4 + 4


def payload_size(quant: str, shape: tuple[int, int, int]) -> int:
    """Bytes of the quantised payload before entropy coding; for the learned codec, whose size
    depends on the content, the most its range-coded symbols can take (what a receiver accepts)."""
    b, t, d = shape
    if quant == LEARNED:
        return learned_payload_bound(shape)
    return {"fp32": 4 * b * t * d, "fp16": 2 * b * t * d, "int8": b * t * d + 2 * b * d}[quant]


# The range coder's probabilities have 24 bits of precision, so one symbol costs at most 24 bits;
# the coder emits 32-bit words and may add one word per sample when it flushes.
LEARNED_BITS_PER_SYMBOL = 24


def learned_payload_bound(shape: tuple[int, int, int]) -> int:
    """Largest payload of `learned:C` for latents of shape [B, T, C]."""
    b, t, c = shape
    return 4 * (-(-b * t * c * LEARNED_BITS_PER_SYMBOL // 32) + 2 * b)
