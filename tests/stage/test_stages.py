"""Stage logic in process: knobs, partitions chained by direct calls, bad input, next stage down.

The same `Stage` objects run inside Triton (tests/local/test_chain.py covers that path).
"""

import io
import socket

import numpy as np
import pytest
from PIL import Image

from aiflow import contract
from aiflow.contract import ROLES, ROLES_BY_NAME, TENSORS
from aiflow.model import scenes
from aiflow.stage import wire
from aiflow.stage.config import StageError, stage_config
from aiflow.stage.logic import Stage, _torch, read_trace

ROLE_PARAMS = {role: {"aiflow.accepts": a, "aiflow.emits": e} for (a, e), role in ROLES.items()}


@pytest.fixture(scope="module")
def family():
    from aiflow.model.family import load_family

    return load_family()  # the bundled weights, as the Triton stages load them


@pytest.fixture(scope="module")
def images():
    batch, captions = scenes.make_batch(seed=3, start=0, count=2, split="heldout")
    return batch


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def image_tensor(batch) -> np.ndarray:
    return np.array([png(a) for a in batch], dtype=object)


def make(role, family, forward=None, env=None, **knobs):
    params = dict(ROLE_PARAMS[role], **{f"AIFLOW_{k.upper()}": str(v) for k, v in knobs.items()})
    return Stage(stage_config(role, params, env or {}), family, forward)


def chain(*stage_list):
    """Wire stages by direct calls (what gRPC does between Triton servers)."""
    for first, nxt in zip(stage_list, stage_list[1:]):
        first.forward = lambda name, data, nxt=nxt: nxt.run({name: data})
    return stage_list[0]


def captions(outputs):
    return [c.decode() for c in outputs["CAPTION"]]


# ---- knobs ------------------------------------------------------------------------------------------


def test_knob_precedence_parameter_then_env_then_config_default():
    params = dict(ROLE_PARAMS["vision_head"], split_layer="1", codec="fp16")
    assert stage_config("m", params, {}).split_layer == 1
    assert stage_config("m", params, {"AIFLOW_SPLIT_LAYER": "2"}).split_layer == 2
    params["AIFLOW_SPLIT_LAYER"] = "3"
    c = stage_config("m", params, {"AIFLOW_SPLIT_LAYER": "2", "AIFLOW_CODEC": "int8"})
    assert (c.split_layer, c.codec) == (3, "int8")


@pytest.mark.parametrize(
    "role, params, says",
    [
        ("vision_head", {"AIFLOW_SPLIT_LAYER": "two"}, "not a valid int"),
        ("vision_head", {"AIFLOW_CODEC": "bf16"}, "unknown step"),
        ("captioner", {"AIFLOW_DECODING": "beam"}, "greedy, speculative"),
        ("vision_head", {"AIFLOW_NEXT_URL": "127.0.0.1:1"}, "set both"),
        ("captioner", {"AIFLOW_NEXT_URL": "h:1", "AIFLOW_NEXT_MODEL": "x"}, "cannot have a next stage"),
        ("vision_head", {"AIFLOW_COMPUTE_FACTOR": "0.5"}, ">= 1"),
        ("vision_head", {"AIFLOW_CODEC": "passthrough"}, "only applies to a drafter"),
    ],
)
def test_bad_knobs_are_rejected_at_load(role, params, says):
    with pytest.raises(StageError, match=says):
        stage_config(role, dict(ROLE_PARAMS[role], **params), {})


def test_unknown_contract_is_rejected():
    with pytest.raises(StageError, match="not a stage"):
        stage_config("m", {"aiflow.accepts": "caption", "aiflow.emits": "image"}, {})


def test_split_layer_out_of_range_is_rejected(family):
    with pytest.raises(StageError, match="out of range"):
        make("vision_head", family, split_layer=family.num_layers + 1)


# ---- partitions -----------------------------------------------------------------------------------


def test_captioner_equals_in_process_model(family, images):
    out = make("captioner", family).run({"IMAGE": image_tensor(images)})
    assert captions(out) == family.caption(list(map(Image.fromarray, images)))
    assert all(captions(out)) and len(set(captions(out))) == 2  # real captions, not a degenerate model
    (hop,) = read_trace(out["TRACE"])
    assert hop["model"] == "captioner" and hop["batch"] == 2 and hop["bytes_in"] > 0


@pytest.mark.parametrize("split", range(5))
def test_split_at_every_layer_with_lossless_codec_equals_monolithic(family, images, split):
    head = make("vision_head", family, split_layer=split, codec="fp32")
    out = chain(head, make("caption_decoder", family)).run({"IMAGE": image_tensor(images)})
    assert captions(out) == family.caption(list(images))
    first, last = read_trace(out["TRACE"])
    assert first["detail"]["layer_out"] == split and last["detail"]["layer_in"] == split
    assert first["bytes_to_next"] > 4 * family.config.num_tokens * family.config.hidden_size * 2


def test_head_tail_decoder_three_stages(family, images):
    head = make("vision_head", family, split_layer=1, codec="fp32")
    tail = make("vision_tail", family, split_layer=3, codec="fp32")
    out = chain(head, tail, make("caption_decoder", family)).run({"IMAGE": image_tensor(images)})
    assert captions(out) == family.caption(list(images))
    assert [h["model"] for h in read_trace(out["TRACE"])] == ["vision_head", "vision_tail", "caption_decoder"]


@pytest.mark.parametrize("codec", ["passthrough", "fp32", "int8+zstd"])
def test_drafter_verifier_equals_large_decoder_on_the_verifiers_features(family, images, codec):
    head = make("vision_head", family, split_layer=2, codec="fp32")
    out = chain(head, make("caption_drafter", family, codec=codec), make("caption_verifier", family)).run(
        {"IMAGE": image_tensor(images)}
    )
    if codec == "int8+zstd":  # the verifier sees quantised features: compare with the large decoder on those
        feats = family.encode(family.preprocess(list(images)))
        msg = wire.decode(wire.encode(4, feats.numpy(), contract.parse_codec(codec)))
        expected = [family.decode_text(i) for i in family.generate(_torch(msg.hidden), "large")]
    else:
        expected = family.caption(list(images))
    assert captions(out) == expected
    hops = read_trace(out["TRACE"])
    assert hops[1]["detail"]["draft_tokens"] == hops[2]["detail"]["draft_tokens"]
    assert len(hops[2]["detail"]["accepted_tokens"]) == 2


def test_local_speculative_decoding_equals_greedy(family, images):
    greedy = make("captioner", family).run({"IMAGE": image_tensor(images)})
    spec = make("captioner", family, decoding="speculative").run({"IMAGE": image_tensor(images)})
    assert captions(spec) == captions(greedy)


def test_topk_codec_prunes_tokens_and_records_positions(family, images):
    head = make("vision_head", family, split_layer=2, codec="topk:8+int8+zstd")
    out = head.run({"IMAGE": image_tensor(images)})
    msg = wire.decode(out["MESSAGE"], expect="features")
    assert msg.hidden.shape == (2, 9, family.config.hidden_size)
    assert msg.positions[:, 0].tolist() == [0, 0] and (np.diff(msg.positions, axis=1) > 0).all()
    # The same tokens the model's own selection (used in training) keeps.
    hidden = family.encode_layers(family.embed(family.preprocess(list(images))), 0, 2)
    assert msg.positions.tolist() == family.select_tokens(hidden, 8)[1].tolist()
    # The decoder finishes the shortened encoder from layer 2 on the 9 tokens.
    assert len(captions(make("caption_decoder", family).run({"FEATURES": out["MESSAGE"]}))) == 2


def test_merge_codec_compresses_and_decodes(family, images):
    head = make("vision_head", family, split_layer=4, codec="merge:8+fp16+zstd")
    out = chain(head, make("caption_decoder", family)).run({"IMAGE": image_tensor(images)})
    hop = read_trace(out["TRACE"])[0]
    assert hop["detail"]["tokens_out"] == 9 and hop["bytes_to_next"] < 9 * family.config.hidden_size * 2 * 2 + 100


def test_compute_factor_is_declared_and_applied(family, images):
    head = make("captioner", family, compute_factor=3)
    assert "compute factor 3" in head.config.describe()
    hop = read_trace(head.run({"IMAGE": image_tensor(images[:1])})["TRACE"])[0]
    assert hop["compute_factor"] == 3 and hop["emulated_ms"] == pytest.approx(2 * hop["compute_ms"])
    assert hop["total_ms"] >= hop["compute_ms"] + hop["emulated_ms"]


# ---- bad input ------------------------------------------------------------------------------------


def bad_image_cases(images):
    big = np.zeros((2100, 10, 3), dtype=np.uint8)
    return {
        "not an image": (np.array([b"hello, not a png"], dtype=object), "not a readable image"),
        "truncated png": (np.array([png(images[0])[:200]], dtype=object), "not a readable image"),
        "oversized bytes": (np.array([b"\x89PNG" + b"\x00" * (2 * 1024 * 1024)], dtype=object), "over the limit"),
        "oversized pixels": (np.array([png(big)], dtype=object), "2100 pixels|10x2100"),
        "wrong size": (np.array([png(images[0][:64, :64])], dtype=object), "96x96"),
        "empty batch": (np.array([], dtype=object), "empty batch"),
        "empty element": (np.array([b""], dtype=object), "is empty"),
        "wrong dtype": (np.zeros((96, 96, 3), dtype=np.uint8), "1-D BYTES"),
        "wrong shape": (np.array([[b"a", b"b"]], dtype=object), "1-D BYTES"),
        "missing": (None, "missing"),
    }


@pytest.mark.parametrize(
    "case",
    ["not an image", "truncated png", "oversized bytes", "oversized pixels", "wrong size", "empty batch",
     "empty element", "wrong dtype", "wrong shape", "missing"],
)
def test_bad_image_input_is_a_clear_error(family, images, case):
    tensor, says = bad_image_cases(images)[case]
    with pytest.raises(StageError, match=says):
        make("vision_head", family).run({"IMAGE": tensor})


@pytest.mark.parametrize(
    "role, tensor, says",
    [
        ("caption_decoder", np.frombuffer(b"garbage bytes here, not a message", np.uint8), "not an aiflow"),
        ("caption_decoder", np.zeros((2, 3), np.uint8), "1-D UINT8"),
        ("caption_decoder", np.zeros(4, np.float32), "1-D UINT8"),
        ("caption_verifier", None, "expected a drafts message"),
    ],
)
def test_bad_message_input_is_a_clear_error(family, images, role, tensor, says):
    if tensor is None:  # a features message sent to the verifier
        head = make("vision_head", family, codec="fp16")
        tensor = head.run({"IMAGE": image_tensor(images[:1])})["MESSAGE"]
    with pytest.raises(StageError, match=says):
        make(role, family).run({TENSORS[ROLES_BY_NAME[role][0]]: tensor})


# ---- next stage down ------------------------------------------------------------------------------


def test_next_stage_unreachable_names_its_address(family, images):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = make("vision_head", family, next_url=f"127.0.0.1:{port}", next_model="caption_decoder", timeout_s=5)
    with pytest.raises(StageError, match=f"caption_decoder at 127.0.0.1:{port} is unreachable"):
        head.run({"IMAGE": image_tensor(images[:1])})
    head.close()


def test_next_stage_that_never_answers_times_out(family, images):
    with socket.socket() as listener:  # accepts connections, never speaks gRPC
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        head = make("vision_head", family, next_url=f"127.0.0.1:{port}", next_model="caption_decoder", timeout_s=1)
        with pytest.raises(StageError, match=f"127.0.0.1:{port} did not answer within 1s"):
            head.run({"IMAGE": image_tensor(images[:1])})
        head.close()


# ---- the caption command without a running flow ------------------------------------------------------


def test_caption_command_without_a_running_flow_says_how_to_start_one(tmp_path, images, capsys):
    from aiflow.cli import main

    path = tmp_path / "a.png"
    path.write_bytes(png(images[0]))
    assert main(["caption", str(path), "--state-dir", str(tmp_path / "none")]) == 2
    assert "aiflow up" in capsys.readouterr().err


def test_caption_command_rejects_a_missing_file_and_bad_options(tmp_path, capsys):
    from aiflow.cli import main

    assert main(["caption", str(tmp_path / "missing.png")]) == 2
    assert "no such image file" in capsys.readouterr().err
    path = tmp_path / "a.png"
    path.write_bytes(b"x")
    assert main(["caption", str(path), "--scheme", "edge-only", "--codec", "int8", "--state-dir", str(tmp_path)]) == 2
    assert "apply to the split schemes" in capsys.readouterr().err
    assert main(["caption", str(path), "--codec", "int9", "--state-dir", str(tmp_path)]) == 2
    assert "unknown step" in capsys.readouterr().err


def test_features_of_another_model_width_are_a_clear_error(family):
    message = wire.encode(1, np.zeros((1, 5, 7), np.float32), contract.parse_codec("fp16"))
    with pytest.raises(StageError, match=r"caption_decoder: hidden states must have shape \[B,T,96\]"):
        make("caption_decoder", family).run({"FEATURES": np.frombuffer(message, np.uint8)})


def test_drafts_outside_the_vocabulary_are_a_clear_error(family):
    message = wire.encode(4, np.zeros((1, 5, 96), np.float32), contract.parse_codec("fp16"), drafts=[[9999]])
    with pytest.raises(StageError, match="outside the vocabulary"):
        make("caption_verifier", family).run({"DRAFTS": np.frombuffer(message, np.uint8)})
