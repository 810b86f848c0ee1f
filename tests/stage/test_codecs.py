"""Feature codecs: spec parsing, round trips, byte counts, error bounds, token reduction."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiflow import contract
from aiflow.contract import CodecError, parse_codec
from aiflow.stage import codecs


def features(b=2, t=17, d=24, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, t, d)) * rng.uniform(0.1, 5, size=(1, 1, d))).astype(np.float32)


@pytest.mark.parametrize(
    "spec, canonical",
    [
        ("fp32", "fp32"),
        ("FP16", "fp16"),
        ("int8", "int8"),
        ("topk:16+int8+zstd", "topk:16+int8+zstd"),
        ("merge:8+fp16+zstd:3", "merge:8+fp16+zstd:3"),
        ("zstd", "fp32+zstd"),
        ("topk:4", "topk:4+fp32"),
    ],
)
def test_spec_parses_to_canonical_form(spec, canonical):
    assert parse_codec(spec).spec == canonical
    assert parse_codec(canonical) == parse_codec(spec)


@pytest.mark.parametrize(
    "spec, says",
    [
        ("", "empty"),
        ("bf16", "unknown step"),
        ("int8+topk:4", "must come first"),
        ("topk", "positive integer"),
        ("topk:0", "positive integer"),
        ("merge:x", "positive integer"),
        ("fp16+int8", "single quantiser"),
        ("zstd+fp16", "single quantiser"),
        ("zstd:99", "1..22"),
    ],
)
def test_bad_spec_is_rejected_with_a_reason(spec, says):
    with pytest.raises(CodecError, match=says):
        parse_codec(spec)


def test_lossless_path_is_identity_bit_for_bit():
    x = features()
    for spec in ("fp32", "fp32+zstd"):
        c = parse_codec(spec)
        assert c.lossless
        assert np.array_equal(codecs.unpack(c, codecs.pack(c, x), x.shape), x)


@pytest.mark.parametrize("spec, nbytes", [("fp32", 4 * 2 * 17 * 24), ("fp16", 2 * 2 * 17 * 24), ("int8", 2 * 17 * 24 + 2 * 2 * 24)])
def test_byte_counts_without_entropy_coding(spec, nbytes):
    x = features()
    assert len(codecs.pack(parse_codec(spec), x)) == nbytes == contract.payload_size(spec, x.shape)


def test_zstd_shrinks_compressible_payload_and_round_trips():
    x = np.repeat(features(t=1), 64, axis=1)
    c = parse_codec("int8+zstd")
    payload = codecs.pack(c, x)
    assert len(payload) < contract.payload_size("int8", x.shape) / 10
    assert np.allclose(codecs.unpack(c, payload, x.shape), x, atol=np.abs(x).max() / 127)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3))
def test_int8_error_within_half_a_step_per_channel(seed, scale):
    x = features(seed=seed) * np.float32(scale)
    c = parse_codec("int8")
    y = codecs.unpack(c, codecs.pack(c, x), x.shape)
    step = codecs.int8_scales(x).astype(np.float32)[:, None, :]
    assert np.all(np.abs(y - x) <= step / 2 * (1 + 1e-6))


def test_fp16_relative_error_bound():
    x = features()
    c = parse_codec("fp16")
    y = codecs.unpack(c, codecs.pack(c, x), x.shape)
    assert np.all(np.abs(y - x) <= np.abs(x) * 2**-11 + 1e-7)


def test_int8_zero_channel_survives():
    x = features()
    x[:, :, 3] = 0
    c = parse_codec("int8")
    assert np.all(codecs.unpack(c, codecs.pack(c, x), x.shape)[:, :, 3] == 0)


def test_prune_keeps_cls_and_most_important_in_order():
    x = features(b=1, t=9)
    importance = np.array([[100, 1, 9, 2, 8, 3, 7, 4, 6]], dtype=np.float32)
    y, pos = codecs.reduce_tokens(parse_codec("topk:3"), x, importance)
    assert pos.tolist() == [[0, 2, 4, 6]]
    assert np.array_equal(y, x[:, [0, 2, 4, 6]])


def test_prune_composes_positions_and_is_idempotent():
    x = features(b=2, t=9)
    imp = np.tile(np.arange(9, dtype=np.float32), (2, 1))
    c = parse_codec("topk:4")
    y, pos = codecs.reduce_tokens(c, x, imp)
    assert pos.tolist() == [[0, 5, 6, 7, 8]] * 2
    again, pos2 = codecs.reduce_tokens(c, y, imp[:, :5], pos)
    assert again is y and pos2 is pos
    z, pos3 = codecs.reduce_tokens(parse_codec("topk:2"), y, np.tile(np.arange(5.0), (2, 1)), pos)
    assert pos3.tolist() == [[0, 7, 8]] * 2


def test_prune_without_importance_is_a_clear_error():
    with pytest.raises(CodecError, match="importance"):
        codecs.reduce_tokens(parse_codec("topk:2"), features(), None)


def test_merge_reaches_k_plus_cls_and_preserves_size_weighted_mean():
    x = features(b=2, t=33, d=8)
    y, pos = codecs.reduce_tokens(parse_codec("merge:5"), x, None)
    assert y.shape == (2, 6, 8) and pos is None
    assert np.array_equal(y[:, 0], x[:, 0])  # CLS never merges


def test_merge_keeps_the_total_mass_of_tokens():
    # Size-weighted means: the sum over tokens weighted by how many originals each holds is conserved.
    x = features(b=1, t=12, d=4)
    x1, s1 = codecs._merge_round(x[0].astype(np.float64), np.ones(12), 3)
    assert len(x1) == 9 and s1.sum() == 12
    assert np.allclose((x1 * s1[:, None]).sum(0), x[0].sum(0), atol=1e-5)


def test_merge_joins_identical_tokens_first():
    x = np.zeros((1, 5, 2), dtype=np.float32)
    x[0, :, :] = [[9, 9], [1, 0], [1, 0.01], [0, 1], [-1, 0]]
    y = codecs.merge_tokens(x, 3)
    assert y.shape == (1, 4, 2)
    assert any(np.allclose(row, [1, 0.005]) for row in y[0])


@pytest.mark.parametrize("payload", [b"", b"garbage bytes that are not zstd", b"\x28\xb5\x2f\xfd" + b"\x00" * 20])
def test_garbage_payload_is_a_clear_error(payload):
    with pytest.raises(CodecError, match="zstd|needs"):
        codecs.unpack(parse_codec("int8+zstd"), payload, (1, 4, 4))


def test_wrong_payload_length_is_a_clear_error():
    with pytest.raises(CodecError, match="needs 64"):
        codecs.unpack(parse_codec("fp32"), b"\x00" * 60, (1, 4, 4))


def test_non_finite_features_are_rejected():
    x = features()
    x[0, 0, 0] = np.nan
    with pytest.raises(CodecError, match="NaN"):
        codecs.pack(parse_codec("fp16"), x)
