"""Feature codecs: what turns encoder hidden states into the few bytes that cross a link.

A codec is a spec string of steps joined by `+` (the grammar and its byte accounting are in
`aiflow.contract`, which the planner shares), applied in this order:

- token reduction (optional, at most one): `topk:K` keeps the CLS token plus the K most important
  tokens (importance from the model); `merge:K` merges tokens ToMe-style (bipartite soft matching,
  size-weighted) down to CLS plus K. Reducing before the last encoder layers also shortens them.
- quantisation (exactly one, default `fp32`): `fp32` (lossless), `fp16`, `int8` (symmetric, one scale
  per sample and channel).
- entropy coding (optional): `zstd` or `zstd:LEVEL`.

Examples: `fp32`, `fp16`, `int8`, `topk:16+int8+zstd`, `merge:16+fp16+zstd`.
Tensors here are numpy float32 arrays `[B, T, D]`, token 0 being CLS.

`learned:C` is a codec of its own: the trained bottleneck (aiflow.model.bottleneck) turns hidden
states into integer symbols `[B, T, C]`, which are range-coded here (constriction) with the
bottleneck's learned per-channel probability tables; both ends of a link hold the same tables (the
same weights), so decoding gives the very symbols back.
"""

from __future__ import annotations

import numpy as np

from aiflow.contract import Codec, CodecError, payload_size
from aiflow.model.bottleneck import ALPHABET

# Bounds on what a learned-codec message may claim, so a small message cannot make a stage allocate
# or decode without end (a ViT of 37 tokens x 8 channels is 296 symbols per image).
MAX_LEARNED_SYMBOLS_PER_SAMPLE = 1 << 16
MAX_LEARNED_SYMBOLS = 1 << 22

# ---- token reduction ------------------------------------------------------------------------------


def reduce_tokens(
    codec: Codec,
    hidden: np.ndarray,
    importance: np.ndarray | None = None,
    positions: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply the codec's token reduction; return (hidden, positions of kept tokens or None).

    `positions[b, t]` is the original token index of token t (pruning keeps it; merging drops it,
    since a merged token has no single position). A tensor already at K+1 tokens or fewer is
    returned unchanged, so re-encoding reduced features is a no-op.
    """
    _check_hidden(hidden)
    if codec.reduce is None or hidden.shape[1] <= codec.keep + 1:
        return hidden, positions
    if codec.reduce == "topk":
        if importance is None or importance.shape != hidden.shape[:2]:
            raise CodecError(f"topk needs token importance of shape {hidden.shape[:2]}")
        return prune_tokens(hidden, importance, codec.keep, positions)
    return merge_tokens(hidden, codec.keep), None


def prune_tokens(
    hidden: np.ndarray, importance: np.ndarray, keep: int, positions: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Keep CLS plus the `keep` most important other tokens, in their original order."""
    top = np.argsort(-importance[:, 1:], axis=1, kind="stable")[:, :keep] + 1
    idx = np.concatenate([np.zeros((hidden.shape[0], 1), dtype=np.int64), np.sort(top, axis=1)], axis=1)
    kept = np.take_along_axis(hidden, idx[:, :, None], axis=1)
    base = positions if positions is not None else np.broadcast_to(np.arange(hidden.shape[1]), idx.shape[:1] + hidden.shape[1:2])
    return kept, np.take_along_axis(np.asarray(base), idx, axis=1).astype(np.int32)


def merge_tokens(hidden: np.ndarray, keep: int) -> np.ndarray:
    """ToMe bipartite soft matching down to CLS + `keep` tokens; merged tokens are size-weighted means."""
    out = []
    for x in hidden:
        size = np.ones(len(x), dtype=np.float64)
        x = x.astype(np.float64)
        while len(x) > keep + 1:
            x, size = _merge_round(x, size, len(x) - keep - 1)
        out.append(x.astype(np.float32))
    return np.stack(out)


def _merge_round(x: np.ndarray, size: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
    """One round of bipartite matching: alternate tokens into A (incl. CLS) and B, merge the r most
    similar A tokens into their best B match. CLS never merges."""
    a_idx, b_idx = np.arange(0, len(x), 2), np.arange(1, len(x), 2)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    scores = unit[a_idx] @ unit[b_idx].T
    scores[0, :] = -np.inf  # CLS is a[0]
    best, match = scores.max(axis=1), scores.argmax(axis=1)
    r = min(want, len(a_idx) - 1)
    order = np.argsort(-best, kind="stable")
    src, kept = order[:r], np.sort(order[r:])
    dst_sum = x[b_idx] * size[b_idx, None]
    dst_size = size[b_idx].copy()
    np.add.at(dst_sum, match[src], x[a_idx[src]] * size[a_idx[src], None])
    np.add.at(dst_size, match[src], size[a_idx[src]])
    merged = np.concatenate([x[a_idx[kept]], dst_sum / dst_size[:, None]])
    return merged, np.concatenate([size[a_idx[kept]], dst_size])


# ---- quantisation and entropy coding --------------------------------------------------------------


def pack(codec: Codec, hidden: np.ndarray, tables: np.ndarray | None = None) -> bytes:
    """Quantise and entropy-code `hidden` (already reduced) into payload bytes. For `learned:C`,
    `hidden` holds the bottleneck's integer symbols and `tables` its probability tables."""
    _check_hidden(hidden)
    if codec.learned:
        return range_encode(_symbols(codec, hidden), _tables(codec, tables))
    if codec.quant == "fp32":
        raw = np.ascontiguousarray(hidden, dtype="<f4").tobytes()
    elif codec.quant == "fp16":
        raw = np.ascontiguousarray(hidden, dtype="<f2").tobytes()
    else:
        scale = int8_scales(hidden)
        q = np.clip(np.rint(hidden / scale[:, None, :].astype(np.float32)), -127, 127).astype(np.int8)
        raw = scale.astype("<f2").tobytes() + q.tobytes()
    if codec.zstd_level is not None:
        import zstandard

        raw = zstandard.ZstdCompressor(level=codec.zstd_level).compress(raw)
    return raw


def unpack(codec: Codec, payload: bytes, shape: tuple[int, int, int], tables: np.ndarray | None = None) -> np.ndarray:
    """Inverse of `pack`: payload bytes back to float32 `[B, T, D]`; CodecError if they do not fit."""
    b, t, d = shape
    expected = payload_size(codec.quant, shape)
    raw = bytes(payload)
    if codec.learned:
        if t * d > MAX_LEARNED_SYMBOLS_PER_SAMPLE or b * t * d > MAX_LEARNED_SYMBOLS:
            raise CodecError(f"{codec.spec!r} symbols of shape {list(shape)} exceed the bounds ({MAX_LEARNED_SYMBOLS_PER_SAMPLE} per sample, {MAX_LEARNED_SYMBOLS} per message)")
        if d != codec.channels:
            raise CodecError(f"codec {codec.spec!r} carries {codec.channels} channels, the message says {d}")
        if not 0 < len(raw) <= expected or len(raw) % 4:
            raise CodecError(f"payload of {len(raw)} bytes cannot be {codec.spec!r} symbols of shape {list(shape)} (32-bit words, at most {expected} bytes)")
        return range_decode(raw, _tables(codec, tables), shape).astype(np.float32)
    if codec.zstd_level is not None:
        import zstandard

        try:
            raw = zstandard.ZstdDecompressor().decompress(raw, max_output_size=expected)
        except zstandard.ZstdError as exc:
            raise CodecError(f"payload is not valid zstd data for codec {codec.spec!r}: {exc}") from exc
    if len(raw) != expected:
        raise CodecError(
            f"payload holds {len(raw)} bytes but codec {codec.spec!r} with shape {list(shape)} needs {expected}"
        )
    if codec.quant == "fp32":
        return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
    if codec.quant == "fp16":
        return np.frombuffer(raw, dtype="<f2").reshape(shape).astype(np.float32)
    scale = np.frombuffer(raw[: 2 * b * d], dtype="<f2").reshape(b, 1, d).astype(np.float32)
    q = np.frombuffer(raw[2 * b * d :], dtype=np.int8).reshape(shape)
    return q.astype(np.float32) * scale


def int8_scales(hidden: np.ndarray) -> np.ndarray:
    """One scale per sample and channel, `[B, D]`, exactly representable in fp16 and never too small
    (so values never clip and the error stays within scale/2)."""
    peak = np.abs(hidden).max(axis=1) / 127.0
    peak = np.where(peak > 0, peak, 1.0)
    scale = peak.astype(np.float16)
    too_small = scale.astype(np.float32) < peak
    scale[too_small] = np.nextafter(scale[too_small], np.float16(np.inf))
    return scale


# ---- range coding of the learned bottleneck's symbols -----------------------------------------------


def range_encode(symbols: np.ndarray, tables: np.ndarray) -> bytes:
    """Integer symbols [B, T, C] in [-A, A] -> range-coded bytes, every symbol of channel c coded with
    the probabilities `tables[c]` (integer counts over the 2A+1 symbols)."""
    import constriction

    b, t, c = symbols.shape
    model = constriction.stream.model.Categorical(perfect=False)
    probabilities = np.tile(tables.astype(np.float64), (t, 1))  # one row per symbol of a sample
    encoder = constriction.stream.queue.RangeEncoder()
    for sample in symbols:
        encoder.encode((sample.reshape(-1) + ALPHABET).astype(np.int32), model, probabilities)
    return encoder.get_compressed().astype("<u4").tobytes()


def range_decode(payload: bytes, tables: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Inverse of `range_encode`: int32 symbols [B, T, C]; CodecError on bytes that are not such a stream."""
    import constriction

    b, t, c = shape
    model = constriction.stream.model.Categorical(perfect=False)
    probabilities = np.tile(tables.astype(np.float64), (t, 1))
    try:
        decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
        out = np.stack([decoder.decode(model, probabilities).reshape(t, c) for _ in range(b)])
        exhausted = decoder.maybe_exhausted()
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise CodecError(f"payload is not a valid range-coded stream of shape {list(shape)}: {exc}") from exc
    if not exhausted:
        raise CodecError(f"payload holds more than a range-coded stream of shape {list(shape)}")
    return out.astype(np.int32) - ALPHABET


def _symbols(codec: Codec, hidden: np.ndarray) -> np.ndarray:
    if hidden.shape[2] != codec.channels:
        raise CodecError(f"codec {codec.spec!r} codes {codec.channels} channels of bottleneck symbols, got {hidden.shape[2]}")
    symbols = np.rint(hidden)
    if not np.array_equal(symbols, hidden) or np.abs(symbols).max() > ALPHABET:
        raise CodecError(f"codec {codec.spec!r} codes the bottleneck's integer symbols in [-{ALPHABET}, {ALPHABET}]; run the bottleneck first")
    return symbols.astype(np.int32)


def _tables(codec: Codec, tables: np.ndarray | None) -> np.ndarray:
    if tables is None:
        raise CodecError(f"codec {codec.spec!r} needs the trained bottleneck's probability tables")
    if tables.shape != (codec.channels, 2 * ALPHABET + 1):
        raise CodecError(f"probability tables of shape {list(tables.shape)} do not fit codec {codec.spec!r}")
    return tables


def _check_hidden(hidden: np.ndarray) -> None:
    if not isinstance(hidden, np.ndarray) or hidden.ndim != 3 or 0 in hidden.shape:
        shape = getattr(hidden, "shape", None)
        raise CodecError(f"features must be a non-empty [batch, tokens, channels] array, got shape {shape}")
    if not np.isfinite(hidden).all():
        raise CodecError("features contain NaN or infinite values")
