"""Wire messages: self-describing, versioned, and loud about bytes they cannot read."""

import struct
import zlib

import numpy as np
import pytest

from aiflow import contract
from aiflow.stage import codecs, wire
from aiflow.stage.wire import WireError


def hidden(b=2, t=5, d=8):
    return np.random.default_rng(1).standard_normal((b, t, d)).astype(np.float32)


def test_features_round_trip_carries_layer_codec_shape_positions():
    x = hidden()
    pos = np.array([[0, 3, 4, 9, 11], [0, 1, 2, 7, 8]])
    data = wire.encode(3, x, contract.parse_codec("topk:4+fp32+zstd"), positions=pos)
    msg = wire.decode(data, expect="features")
    assert (msg.layer, msg.codec, msg.kind) == (3, "topk:4+fp32+zstd", "features")
    assert np.array_equal(msg.hidden, x)
    assert msg.positions.tolist() == pos.tolist()
    assert msg.drafts is None


def test_drafts_round_trip_with_small_and_large_ids():
    x = hidden()
    for drafts in ([[1, 2, 3], []], [[70000, 5], [1]]):
        msg = wire.decode(wire.encode(6, x, contract.parse_codec("fp16"), drafts=drafts), expect="drafts")
        assert msg.drafts == drafts and msg.kind == "drafts"
        assert np.allclose(msg.hidden, x, rtol=1e-3)


def test_message_overhead_is_small():
    x = hidden(1, 17, 64)
    c = contract.parse_codec("int8")
    overhead = len(wire.encode(12, x, c)) - len(codecs.pack(c, x))
    assert overhead == wire._HEAD.size + len("int8") + 4 + 4


def test_accepts_a_numpy_uint8_tensor():
    data = wire.encode(0, hidden(), contract.parse_codec("fp32"))
    assert wire.decode(np.frombuffer(data, dtype=np.uint8)).layer == 0


@pytest.mark.parametrize(
    "data, says",
    [
        (b"", "not an aiflow"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an aiflow"),
        (b"AIFW" + b"\x07" * 40, "version 7"),
    ],
)
def test_foreign_bytes_are_rejected(data, says):
    with pytest.raises(WireError, match=says):
        wire.decode(data)


def test_flipped_byte_is_detected():
    data = bytearray(wire.encode(2, hidden(), contract.parse_codec("int8+zstd")))
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(WireError, match="corrupt"):
        wire.decode(bytes(data))


def test_truncated_message_is_rejected():
    data = wire.encode(2, hidden(), contract.parse_codec("fp16"))
    with pytest.raises(WireError):
        wire.decode(data[:-10])


def test_wrong_kind_is_rejected():
    data = wire.encode(2, hidden(), contract.parse_codec("fp16"))
    with pytest.raises(WireError, match="expected a drafts message, got features"):
        wire.decode(data, expect="drafts")


def test_well_checksummed_but_inconsistent_message_is_rejected():
    # A message whose header lies about the shape, with a valid checksum: caught by the codec.
    body = bytearray(wire.encode(2, hidden(), contract.parse_codec("fp32"))[:-4])
    struct.pack_into("<H", body, 10, 9)  # tokens 5 -> 9
    data = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    with pytest.raises(WireError, match="needs"):
        wire.decode(data)


def test_payload_passes_through_untouched_with_drafts_added():
    x = hidden()
    c = contract.parse_codec("int8+zstd")
    msg = wire.decode(wire.encode(4, x, c))
    again = wire.encode(msg.layer, msg.hidden, c, msg.positions, [[5, 6]] * 2, payload=msg.payload)
    out = wire.decode(again, expect="drafts")
    assert out.payload == msg.payload and np.array_equal(out.hidden, msg.hidden)
