"""The learned codec (`learned:C`): grammar, lossless range coding of its symbols, deterministic round
trips through the stages with the shipped bottleneck, honest byte accounting, refused bad messages."""

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiflow import contract
from aiflow.contract import CodecError, parse_codec
from aiflow.model import scenes
from aiflow.model.bottleneck import ALPHABET, PMF_PRECISION, bottleneck_of, quantized_pmf, trained
from aiflow.stage import codecs, wire
from aiflow.stage.config import StageError, stage_config
from aiflow.stage.logic import Stage, read_trace
from aiflow.contract import ROLES_BY_NAME

from tests.stage.test_stages import image_tensor


@pytest.fixture(scope="module")
def family():
    from aiflow.model.family import load_family

    return load_family()


@pytest.fixture(scope="module")
def shipped(family):
    """(codec spec, split layer) of the first shipped bottleneck."""
    assert trained(family), "the bundled weights ship no learned-codec bottleneck"
    channels, layer = sorted(trained(family))[0]
    return f"learned:{channels}", layer


@pytest.fixture(scope="module")
def images():
    batch, _ = scenes.make_batch(seed=31, start=0, count=3, split="heldout")
    return batch


def make(role, family, **knobs):
    accepts, emits = ROLES_BY_NAME[role]
    params = {"aiflow.accepts": accepts, "aiflow.emits": emits, **{f"AIFLOW_{k.upper()}": str(v) for k, v in knobs.items()}}
    return Stage(stage_config(role, params, {}), family)


# ---- the grammar ---------------------------------------------------------------------------------


def test_learned_spec_parses_alone():
    c = parse_codec("LEARNED:16")
    assert c.learned and c.channels == 16 and c.spec == "learned:16" and not c.lossless
    assert parse_codec(c.spec) == c


@pytest.mark.parametrize("spec, says", [
    ("learned", "positive integer"),
    ("learned:0", "positive integer"),
    ("learned:8+zstd", "whole codec"),
    ("topk:16+learned:8", "whole codec"),
    ("learned:9999", "at most"),
])
def test_bad_learned_specs_are_rejected(spec, says):
    with pytest.raises(CodecError, match=says):
        parse_codec(spec)


# ---- range coding --------------------------------------------------------------------------------


def random_tables(channels, seed):
    rng = np.random.default_rng(seed)
    return quantized_pmf(rng.dirichlet(np.full(2 * ALPHABET + 1, 0.3), size=channels))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 16), st.integers(0, 2**31))
def test_range_coding_is_lossless_on_any_symbols(b, t, c, seed):
    rng = np.random.default_rng(seed)
    tables = random_tables(c, seed)
    symbols = rng.integers(-ALPHABET, ALPHABET + 1, size=(b, t, c)).astype(np.int32)
    payload = codecs.range_encode(symbols, tables)
    assert np.array_equal(codecs.range_decode(payload, tables, symbols.shape), symbols)
    assert payload == codecs.range_encode(symbols, tables)  # deterministic
    assert len(payload) <= contract.payload_size(contract.LEARNED, symbols.shape)


def test_quantized_tables_sum_exactly_and_never_zero():
    tables = random_tables(5, 0)
    assert (tables.sum(axis=1) == 1 << PMF_PRECISION).all() and tables.min() >= 1


def test_pack_refuses_what_is_not_bottleneck_symbols():
    c = parse_codec("learned:4")
    tables = random_tables(4, 1)
    with pytest.raises(CodecError, match="integer symbols"):
        codecs.pack(c, np.full((1, 3, 4), 0.5, dtype=np.float32), tables)
    with pytest.raises(CodecError, match="4 channels"):
        codecs.pack(c, np.zeros((1, 3, 5), dtype=np.float32), tables)
    with pytest.raises(CodecError, match="probability tables"):
        codecs.pack(c, np.zeros((1, 3, 4), dtype=np.float32))


# ---- through the stages, with the shipped bottleneck ------------------------------------------------


def test_round_trip_is_deterministic_and_the_receiver_sees_the_very_symbols(family, shipped, images):
    spec, layer = shipped
    head = make("vision_head", family, split_layer=layer, codec=spec)
    first = head.run({"IMAGE": image_tensor(images)})["MESSAGE"]
    again = head.run({"IMAGE": image_tensor(images)})["MESSAGE"]
    assert np.array_equal(first, again)
    bn = bottleneck_of(family, parse_codec(spec).channels, layer)
    msg = wire.decode(first, expect="features", tables=lambda codec, at: bottleneck_of(family, codec.channels, at).coding_tables())
    pixels = family.preprocess(images)
    expected = bn.symbols(family.encode_layers(family.embed(pixels), 0, layer))
    assert (msg.layer, msg.codec) == (layer, spec)
    assert np.array_equal(msg.hidden, expected.astype(np.float32))


def test_byte_accounting_is_the_message_the_link_carries(family, shipped, images):
    spec, layer = shipped
    head = make("vision_head", family, split_layer=layer, codec=spec)
    out = head.run({"IMAGE": image_tensor(images[:1])})
    message = out["MESSAGE"]
    hop = read_trace(out["TRACE"])[0]
    assert hop["bytes_to_next"] == message.size
    (payload_len,) = struct.unpack_from("<I", message.tobytes(), wire._HEAD.size + len(spec))
    assert message.size == contract.WIRE_HEADER_BYTES + len(spec) + payload_len
    assert payload_len % 4 == 0 and payload_len < 200  # a few 32-bit words, not kilobytes


def test_split_with_learned_codec_captions_through_decoder_and_speculation(family, shipped, images):
    spec, layer = shipped
    head = make("vision_head", family, split_layer=layer, codec=spec)
    message = head.run({"IMAGE": image_tensor(images)})["MESSAGE"]
    greedy = make("caption_decoder", family).run({"FEATURES": message})["CAPTION"]
    spec_out = make("caption_decoder", family, decoding="speculative").run({"FEATURES": message})["CAPTION"]
    drafts = make("caption_drafter", family, codec="passthrough").run({"FEATURES": message})["MESSAGE"]
    verified = make("caption_verifier", family).run({"DRAFTS": drafts})["CAPTION"]
    assert list(greedy) == list(spec_out) == list(verified)
    assert all(c for c in greedy)


def test_corrupt_or_truncated_learned_messages_are_refused(family, shipped, images):
    spec, layer = shipped
    head = make("vision_head", family, split_layer=layer, codec=spec)
    message = head.run({"IMAGE": image_tensor(images[:1])})["MESSAGE"].tobytes()
    decoder = make("caption_decoder", family)
    flipped = bytearray(message)
    flipped[len(flipped) - 8] ^= 0x40  # inside the range-coded payload
    cases = {
        "corrupt": bytes(flipped),
        "not an aiflow": message[:10],
        "corrupt (checksum": message[:-5] + message[-4:],
    }
    for says, data in cases.items():
        with pytest.raises(StageError, match=says.split(" (")[0]):
            decoder.run({"FEATURES": np.frombuffer(data, dtype=np.uint8)})


def test_valid_crc_over_a_foreign_payload_is_still_refused(family, shipped, images):
    spec, layer = shipped
    head = make("vision_head", family, split_layer=layer, codec=spec)
    message = head.run({"IMAGE": image_tensor(images[:1])})["MESSAGE"].tobytes()
    body = message[:-4]
    start = wire._HEAD.size + len(spec)
    (size,) = struct.unpack_from("<I", body, start)
    padded = body[:start] + struct.pack("<I", size + 8) + body[start + 4 :] + b"\x01" * 8  # two extra words
    forged = padded + struct.pack("<I", zlib.crc32(padded))
    with pytest.raises(StageError, match="more than a range-coded stream"):
        make("caption_decoder", family).run({"FEATURES": np.frombuffer(forged, dtype=np.uint8)})


def test_oversized_claims_are_refused_before_decoding(family, shipped):
    spec, _ = shipped
    c = parse_codec(spec)
    with pytest.raises(CodecError, match="exceed the bounds"):
        codecs.unpack(c, b"\x00" * 8, (1, 60000, c.channels), random_tables(c.channels, 0))


def test_learned_codec_without_a_bottleneck_is_a_clear_error(family, shipped, images):
    spec, layer = shipped
    other = next(l for l in range(family.num_layers + 1) if (parse_codec(spec).channels, l) not in trained(family))
    with pytest.raises(StageError, match="no trained bottleneck"):
        make("vision_head", family, split_layer=other, codec=spec)
    message = make("vision_head", family, split_layer=layer, codec=spec).run({"IMAGE": image_tensor(images[:1])})["MESSAGE"]
    with pytest.raises(WireErrorOrStage, match="no trained bottleneck"):
        wire.decode(message, expect="features")


WireErrorOrStage = (wire.WireError, StageError)


def test_learned_messages_batched_in_one_pass_caption_as_one_by_one(family, shipped, images):
    spec, layer = shipped
    head = make("vision_head", family, split_layer=layer, codec=spec)
    messages = [head.run({"IMAGE": image_tensor(images[i : i + 1])})["MESSAGE"] for i in range(len(images))]
    lossless = make("vision_head", family, split_layer=layer, codec="fp32").run({"IMAGE": image_tensor(images[:1])})["MESSAGE"]
    decoder = make("caption_decoder", family)
    alone = [decoder.run({"FEATURES": m})["CAPTION"][0].decode() for m in messages]
    pendings = [decoder.receive({"FEATURES": m}) for m in [*messages, lossless]]
    decoder.compute(pendings)
    together = [decoder.reply(p)["CAPTION"][0].decode() for p in pendings]
    assert together[:-1] == alone
    assert [p.hop.detail["batched_requests"] for p in pendings] == [len(messages)] * len(messages) + [1]
