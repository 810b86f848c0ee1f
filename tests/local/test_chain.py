"""The stages on real Triton servers, one per tier, wired through the local runtime's links.

Checks that every scheme captions exactly like the same stage logic run in process, that the
three-tier speculative chain equals the large decoder, that bad input gets a clear error from the
stage that received it while the servers keep serving, and that a missing next stage is named.
"""

import io
import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from aiflow.local.client import caption_images
from aiflow.local.schemes import DEFAULT_CODEC, SCHEME_NAMES, RunningFlow, get_scheme, startup_wiring, wiring
from aiflow.local.tritonserver import free_ports, model_config_json
from aiflow.model import scenes
from aiflow.stage.config import stage_config
from aiflow.stage.logic import Stage
from aiflow.stage.triton import model_parameters

pytestmark = [pytest.mark.triton, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def flow(local_runtime):
    flow = RunningFlow.of(local_runtime)
    flow.apply(startup_wiring())
    return flow


@pytest.fixture(scope="module")
def family():
    from aiflow.model.family import load_family

    return load_family()  # the weights the Triton stages load


@pytest.fixture(scope="module")
def sample():
    arrays, refs = scenes.make_batch(seed=11, start=0, count=3, split="heldout")
    return [(f"scene{i}.png", png(a)) for i, a in enumerate(arrays)], arrays


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def in_process(scheme, family, model_repo):
    """The scheme's chain as Stage objects called directly, configured from the same config.pbtxt."""
    chain = []
    for p in scheme.chain:
        config = json.loads(model_config_json(model_repo / p.model, p.knobs))
        chain.append(Stage(stage_config(p.model, model_parameters(config), {}), family))
    for first, nxt in zip(chain, chain[1:]):
        first.forward = lambda name, data, nxt=nxt: nxt.run({name: data})
    return chain[0]


def infer(url, model, name, array, datatype):
    client = grpcclient.InferenceServerClient(url)
    try:
        inp = grpcclient.InferInput(name, [1, *array.shape], datatype)  # one request: batch dimension 1
        inp.set_data_from_numpy(array[None])
        result = client.infer(model, [inp], client_timeout=120)
        return [c.decode() for c in result.as_numpy("CAPTION").reshape(-1)]
    finally:
        client.close()


@pytest.mark.parametrize("name", SCHEME_NAMES)
def test_every_scheme_captions_like_the_in_process_stages(flow, family, sample, model_repo_path, name):
    images, arrays = sample
    scheme = get_scheme(name)
    flow.apply(wiring(scheme))
    results = caption_images(flow, scheme, images)
    expected = in_process(scheme, family, model_repo_path).run({"IMAGE": np.array([b for _, b in images], dtype=object)})
    assert [r.caption for r in results] == [c.decode() for c in expected["CAPTION"]]
    assert all(r.caption for r in results)
    assert [h["tier"] for h in results[0].hops] == [p.tier for p in scheme.chain]
    assert [h["model"] for h in results[0].hops] == [p.model for p in scheme.chain]


def test_speculation_across_tiers_equals_the_large_decoders_own_caption(flow, sample):
    images, _ = sample
    split, spec = get_scheme("split"), get_scheme("split-spec")  # same split layer and codec
    flow.apply(wiring(spec))
    speculative = caption_images(flow, spec, images)
    flow.apply(wiring(split))
    large = [r.caption for r in caption_images(flow, split, images)]
    assert [r.caption for r in speculative] == large
    verifier = speculative[0].hops[-1]["detail"]
    assert verifier["draft_tokens"] and len(verifier["accepted_tokens"]) == 1


# ---- bad input: the stage that received it answers, the server keeps serving -------------------------


BIG = np.zeros((2100, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "case, array, datatype, says",
    [
        ("not an image", np.array([b"this is not a png"], dtype=object), "BYTES", "vision_head: image 0 is not a readable image"),
        ("oversized bytes", np.array([b"\x89PNG" + b"\0" * (2 * 1024 * 1024)], dtype=object), "BYTES", "over the limit of 2097152"),
        ("oversized pixels", np.array([png(BIG)], dtype=object), "BYTES", "8x2100 pixels"),
        ("wrong image size", np.array([png(np.zeros((64, 64, 3), np.uint8))], dtype=object), "BYTES", "96x96"),
        ("empty batch", np.array([], dtype=object), "BYTES", "empty batch"),
        ("wrong dtype", np.zeros(4, dtype=np.int32), "INT32", "expects 'BYTES'"),
        ("wrong shape", np.array([[b"a"]], dtype=object), "BYTES", "shape"),
    ],
)
def test_bad_image_input_gets_a_clear_error_and_the_server_keeps_serving(flow, sample, case, array, datatype, says):
    scheme = get_scheme("split")
    flow.apply(wiring(scheme))
    url = flow.entry_address(scheme)
    with pytest.raises(InferenceServerException, match=says):
        infer(url, "vision_head", "IMAGE", array, datatype)
    images, _ = sample
    assert infer(url, "vision_head", "IMAGE", np.array([images[0][1]], dtype=object), "BYTES")


def test_bad_messages_get_a_clear_error_from_the_receiving_stage(flow, sample, family, model_repo_path):
    edge, cloud = flow.state["tiers"]["edge"]["grpc"], flow.state["tiers"]["cloud"]["grpc"]
    with pytest.raises(InferenceServerException, match="caption_decoder: not an aiflow features message"):
        infer(edge, "caption_decoder", "FEATURES", np.frombuffer(b"\x89PNG garbage", np.uint8), "UINT8")
    head = in_process(get_scheme("split"), family, model_repo_path)
    head.forward = None
    images, _ = sample
    message = head.run({"IMAGE": np.array([images[0][1]], dtype=object)})["MESSAGE"]
    with pytest.raises(InferenceServerException, match="caption_verifier: expected a drafts message, got features"):
        infer(cloud, "caption_verifier", "DRAFTS", message, "UINT8")
    assert infer(edge, "caption_decoder", "FEATURES", message, "UINT8")


# ---- next stage down --------------------------------------------------------------------------------


def test_next_stage_down_is_named_with_its_address(flow, local_runtime, sample, family, model_repo_path):
    head = in_process(get_scheme("split"), family, model_repo_path)
    head.forward = None
    images, _ = sample
    message = head.run({"IMAGE": np.array([images[0][1]], dtype=object)})["MESSAGE"]
    device = local_runtime.server("device")
    (dead,) = free_ports(1)
    cloud = flow.address_via("device", "cloud")
    for next_url, next_model, says in [
        (f"127.0.0.1:{dead}", "caption_decoder", f"next stage caption_decoder at 127.0.0.1:{dead} is unreachable"),
        (cloud, "no_such_model", f"next stage no_such_model at {cloud} failed"),
    ]:
        device.load_model("vision_tail", parameters={"AIFLOW_NEXT_URL": next_url, "AIFLOW_NEXT_MODEL": next_model, "AIFLOW_TIMEOUT_S": "10"})
        with pytest.raises(InferenceServerException, match=says):
            infer(device.grpc_url, "vision_tail", "FEATURES", message, "UINT8")
    device.unload_model("vision_tail")
    assert infer(device.grpc_url, "captioner", "IMAGE", np.array([images[0][1]], dtype=object), "BYTES") is not None


def test_three_tier_lossless_chain_equals_the_in_process_model(flow, family, sample):
    images, arrays = sample
    scheme = get_scheme("split-spec", split_layer=1, codec="fp32")
    flow.apply(wiring(scheme))
    results = caption_images(flow, scheme, images)
    assert [r.caption for r in results] == family.caption(list(arrays))
    r = results[0]
    assert [h["tier"] for h in r.hops] == ["device", "edge", "cloud"]
    message = r.hops[0]["bytes_to_next"]
    assert r.link_bytes == {"device->edge": message, "edge->cloud": r.hops[1]["bytes_to_next"]}
    assert r.hops[1]["bytes_to_next"] > message  # passthrough features + the draft ids


def test_caption_command_uses_the_running_flow(flow, local_runtime, sample, tmp_path, capsys):
    from aiflow.cli import main

    images, _ = sample
    path = tmp_path / images[0][0]
    path.write_bytes(images[0][1])
    state = str(local_runtime.state_dir)
    assert main(["caption", str(path), "--scheme", "split", "-o", "json", "--state-dir", state]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["scheme"] == "split" and result["image"] == str(path)
    assert result["bytes_from_device"] == result["link_bytes"]["device->edge"] == result["hops"][0]["bytes_to_next"]
    # The default split codec is the learned one: a couple of hundred bytes, counted as the link carried them.
    assert result["hops"][0]["detail"]["codec_out"] == DEFAULT_CODEC == "learned:16"
    assert result["bytes_from_device"] < 400
    assert main(["caption", str(path), "--scheme", "edge-only", "--state-dir", state]) == 0
    text = capsys.readouterr().out
    assert f"device->edge {len(images[0][1]):,} B" in text and "edge   captioner" in text


def test_the_device_uplink_carries_the_learned_codecs_message_and_little_more(flow, sample):
    """What the link proxy counted on device->edge for one split request: the wire message the trace
    reports, plus gRPC's framing of one call (the same few hundred bytes whatever the codec)."""
    images, _ = sample
    carried = {}
    for codec in ("learned:16", "int8"):
        scheme = get_scheme("split", codec=codec)
        flow.apply(wiring(scheme))
        caption_images(flow, scheme, images[:1])  # warm: the channel is set up before counting
        before = flow.link_counters()["device->edge"]["bytes_up"]
        (result,) = caption_images(flow, scheme, images[:1])
        carried[codec] = (flow.link_counters()["device->edge"]["bytes_up"] - before, result.hops[0]["bytes_to_next"])
    (learned_wire, learned_msg), (int8_wire, int8_msg) = carried["learned:16"], carried["int8"]
    assert learned_msg < 400 < 3000 < int8_msg
    assert learned_wire >= learned_msg and int8_wire >= int8_msg
    assert abs((learned_wire - learned_msg) - (int8_wire - int8_msg)) < 100  # the same call overhead
