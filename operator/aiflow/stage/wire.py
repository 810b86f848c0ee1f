"""Self-describing messages between stages: encoder features, optionally with draft tokens.

A message travels as one UINT8 tensor. Layout (little-endian):

    magic "AIFW" | version u8 | kind u8 (1 features, 2 drafts) | layer u16 | batch, tokens, channels u16
    | flags u8 (1: token positions, 2: 32-bit draft ids) | codec spec (u8 length + ascii)
    | [positions u16 x batch x tokens] | [drafts: per sample u16 count + ids] | payload (u32 length + bytes)
    | crc32 of everything before

`layer` is the number of encoder layers already applied, so any consumer finishes the encoder from
there. The header is a few dozen bytes: on a thin uplink it counts.

With the learned codec (`learned:C`) `channels` is C and the payload holds the bottleneck's
range-coded symbols; reading them needs the bottleneck's probability tables, which the receiving
stage passes as `tables(codec, layer)` (from its own copy of the weights).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from aiflow import contract
from aiflow.stage import codecs

MAGIC = b"AIFW"
VERSION = 1
FEATURES, DRAFTS = 1, 2
KIND_NAMES = {FEATURES: "features", DRAFTS: "drafts"}
_HEAD = struct.Struct("<4sBBHHHHBB")
_FLAG_POSITIONS, _FLAG_WIDE_IDS = 1, 2


class WireError(ValueError):
    """Bytes that are not a message this version can read."""


Tables = Callable[[contract.Codec, int], np.ndarray]  # (learned codec, layer) -> probability tables


@dataclass(frozen=True)
class Message:
    """A decoded message: features at encoder layer `layer`, plus draft token ids for `drafts`."""

    layer: int
    codec: str
    hidden: np.ndarray  # float32 [B, T, D]
    positions: np.ndarray | None = None  # int [B, T]: original token index of each kept token
    drafts: list[list[int]] | None = None
    payload: bytes = b""  # the codec payload as received, so a stage can pass it on untouched

    @property
    def kind(self) -> str:
        return "drafts" if self.drafts is not None else "features"


def encode(
    layer: int,
    hidden: np.ndarray,
    codec: contract.Codec,
    positions: np.ndarray | None = None,
    drafts: list[list[int]] | None = None,
    payload: bytes | None = None,
    tables: np.ndarray | None = None,
) -> bytes:
    """Pack already-reduced features (and drafts) into one message; quantisation per `codec`, unless
    `payload` (the packed form of `hidden`, e.g. as received) is given. For `learned:C`, `hidden`
    holds the bottleneck's symbols and `tables` its probability tables."""
    b, t, d = hidden.shape
    if max(b, t, d, layer) > 0xFFFF:
        raise WireError(f"features of shape {list(hidden.shape)} at layer {layer} exceed the u16 header fields")
    spec = codec.spec.encode("ascii")
    flags = 0
    parts = []
    if positions is not None:
        flags |= _FLAG_POSITIONS
        parts.append(np.asarray(positions, dtype="<u2").reshape(b, t).tobytes())
    if drafts is not None:
        if len(drafts) != b:
            raise WireError(f"{len(drafts)} draft sequences for a batch of {b}")
        wide = any(i > 0xFFFF for seq in drafts for i in seq)
        flags |= _FLAG_WIDE_IDS if wide else 0
        for seq in drafts:
            parts.append(struct.pack("<H", len(seq)) + np.asarray(seq, dtype="<u4" if wide else "<u2").tobytes())
    if payload is None:
        payload = codecs.pack(codec, hidden, tables)
    kind = DRAFTS if drafts is not None else FEATURES
    body = b"".join(
        [_HEAD.pack(MAGIC, VERSION, kind, layer, b, t, d, flags, len(spec)), spec, *parts]
        + [struct.pack("<I", len(payload)), payload]
    )
    return body + struct.pack("<I", zlib.crc32(body))


def decode(data: bytes | np.ndarray, expect: str | None = None, tables: Tables | None = None) -> Message:
    """Read a message; WireError with what is wrong for foreign, corrupt or mismatched bytes.
    `tables(codec, layer)` gives the probability tables of a learned codec (or raises ValueError
    saying why there are none)."""
    buf = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    if len(buf) < _HEAD.size + 4 or buf[:4] != MAGIC:
        raise WireError(f"not an aiflow features message ({len(buf)} bytes, magic {buf[:4]!r}, expected {MAGIC!r})")
    body, (crc,) = buf[:-4], struct.unpack("<I", buf[-4:])
    magic, version, kind, layer, b, t, d, flags, spec_len = _HEAD.unpack_from(buf)
    if version != VERSION:
        raise WireError(f"message version {version} is not supported (this stage reads version {VERSION})")
    if zlib.crc32(body) != crc:
        raise WireError("message is corrupt (checksum mismatch)")
    if kind not in KIND_NAMES:
        raise WireError(f"unknown message kind {kind}")
    if expect is not None and KIND_NAMES[kind] != expect:
        raise WireError(f"expected a {expect} message, got {KIND_NAMES[kind]}")
    try:
        pos = _HEAD.size
        spec = body[pos : pos + spec_len].decode("ascii")
        pos += spec_len
        codec = contract.parse_codec(spec)
        positions = None
        if flags & _FLAG_POSITIONS:
            positions = np.frombuffer(body[pos : pos + 2 * b * t], dtype="<u2").reshape(b, t).astype(np.int32)
            pos += 2 * b * t
        drafts = None
        if kind == DRAFTS:
            width = 4 if flags & _FLAG_WIDE_IDS else 2
            drafts = []
            for _ in range(b):
                (n,) = struct.unpack_from("<H", body, pos)
                ids = np.frombuffer(body[pos + 2 : pos + 2 + width * n], dtype=f"<u{width}")
                drafts.append([int(i) for i in ids])
                pos += 2 + width * n
        (size,) = struct.unpack_from("<I", body, pos)
        payload = body[pos + 4 : pos + 4 + size]
        if pos + 4 + size != len(body):
            raise WireError(f"message length mismatch: payload says {size} bytes, {len(body) - pos - 4} present")
        table = None
        if codec.learned:
            if tables is None:
                raise WireError(f"message uses the learned codec {codec.spec}, and this reader has no trained bottleneck")
            table = tables(codec, layer)
        hidden = codecs.unpack(codec, payload, (b, t, d), table)
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, WireError):
            raise
        raise WireError(f"malformed {KIND_NAMES[kind]} message: {exc}") from exc
    return Message(layer=layer, codec=codec.spec, hidden=hidden, positions=positions, drafts=drafts, payload=payload)
