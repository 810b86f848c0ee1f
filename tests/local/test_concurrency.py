"""Concurrent requests on real Triton servers: stages free while the next tier works, batched passes
that caption exactly like one request at a time, and a full queue that answers "overloaded" at once.

Overlap is read from the stages' own trace timestamps (`received_s`, `replied_s`), never inferred
from sleeps; the slow downstream stage is made slow with its emulated compute factor.
"""

import threading
import time

import numpy as np
import pytest

from aiflow.local.client import CaptionError, infer
from aiflow.local.schemes import get_scheme, wiring
from aiflow.serving import SERIAL, Serving
from tests.local.test_chain import in_process, png

pytestmark = [pytest.mark.triton, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def family():
    from aiflow.model.family import load_family

    return load_family()


@pytest.fixture(scope="module")
def blobs():
    from aiflow.model import scenes

    arrays, _ = scenes.make_batch(seed=23, start=0, count=8, split="heldout")
    return [png(a) for a in arrays]


def concurrently(url, model, blobs, start_gap_s=0.0):
    """Send one image per request, each on its own channel, all at once (or `start_gap_s` apart);
    return (captions, trace) or the CaptionError per request, in order."""
    import tritonclient.grpc as grpcclient

    out = [None] * len(blobs)

    def one(i):
        client = grpcclient.InferenceServerClient(url)
        try:
            captions, hops, _ = infer(client, url, model, [blobs[i]], timeout_s=120)
            out[i] = (captions[0], hops)
        except CaptionError as exc:
            out[i] = exc
        finally:
            client.close()

    threads = []
    for i in range(len(blobs)):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
        if start_gap_s:
            time.sleep(start_gap_s)  # only orders the arrivals; the overlap is read from the traces
    for t in threads:
        t.join(timeout=300)
    return out


def load_split(runtime, head: Serving, decoder: Serving, decoder_factor: float):
    runtime.load("edge", "caption_decoder", parameters={**decoder.knobs(), "AIFLOW_COMPUTE_FACTOR": f"{decoder_factor:g}"})
    runtime.load("device", "vision_head", next_stage=("edge", "caption_decoder"),
                 parameters={**head.knobs(), "AIFLOW_COMPUTE_FACTOR": "1"})


def test_a_stage_takes_the_next_request_while_the_next_tier_works(local_runtime, blobs):
    url = local_runtime.address("device")
    spans = {}
    for name, head in (("concurrent", Serving(max_batch_size=1)), ("serial", SERIAL)):
        load_split(local_runtime, head, Serving(max_batch_size=1), decoder_factor=30)
        first, second = concurrently(url, "vision_head", blobs[:2], start_gap_s=0.3)
        assert not isinstance(first, Exception) and not isinstance(second, Exception), (first, second)
        spans[name] = [hops[0] for _, hops in (first, second)]
    a, b = spans["concurrent"]
    # The head finished computing the first request, then took the second while the first was
    # still at the decoder: one instance, two requests in flight.
    assert a["received_s"] + (a["compute_ms"] + a["emulated_ms"]) / 1e3 <= b["received_s"] < a["replied_s"]
    assert a["wait_next_ms"] > 0 and b["wait_next_ms"] > 0
    # The serial configuration holds its only instance until the next stage answers.
    a, b = spans["serial"]
    assert b["received_s"] >= a["replied_s"]


@pytest.mark.parametrize("scheme_name", ["split", "split-spec"])
def test_batched_passes_caption_exactly_like_one_request_at_a_time(local_runtime, family, blobs, model_repo_path, scheme_name):
    """Many cameras at once: the edge and cloud stages batch them (the verifier checks the drafts of
    several requests in one pass), and every caption equals the stage logic run on that image alone."""
    from aiflow.local.schemes import RunningFlow

    scheme = get_scheme(scheme_name)
    flow = RunningFlow.of(local_runtime)
    slow = {"AIFLOW_COMPUTE_FACTOR": "3"}  # so that requests queue behind each other and batch
    flow.apply([w if w.tier == "device" else type(w)(w.tier, w.model, {**w.parameters, **slow}, w.next_stage)
                for w in wiring(scheme)])
    results = concurrently(flow.entry_address(scheme), scheme.entry.model, blobs)
    assert all(not isinstance(r, Exception) for r in results), results
    alone = in_process(scheme, family, model_repo_path)
    expected = [alone.run({"IMAGE": np.array([b], dtype=object)})["CAPTION"][0].decode() for b in blobs]
    assert [caption for caption, _ in results] == expected
    last = [hops[-1] for _, hops in results]
    assert max(h["detail"]["batched_requests"] for h in last) > 1, "no request was batched: the test saw no batching"
    if scheme_name == "split-spec":
        assert last[0]["model"] == "caption_verifier"
        assert all(h["detail"]["accepted_tokens"] for h in last)


def test_a_full_queue_answers_overloaded_at_once_naming_the_stage(local_runtime, blobs):
    url = local_runtime.address("device")
    load_split(local_runtime, Serving(max_batch_size=1), Serving(max_batch_size=1, max_queue_size=1), decoder_factor=30)
    finished = {}
    import tritonclient.grpc as grpcclient

    def one(i):
        client = grpcclient.InferenceServerClient(url)
        try:
            infer(client, url, "vision_head", [blobs[i]], timeout_s=120)
            finished[i] = (time.monotonic(), None)
        except CaptionError as exc:
            finished[i] = (time.monotonic(), exc)
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    errors = [(t, e) for t, e in finished.values() if e is not None]
    served = [t for t, e in finished.values() if e is None]
    assert errors and served, finished
    for _, exc in errors:
        assert exc.overloaded
        assert "next stage caption_decoder at" in str(exc) and "is overloaded: its queue is full" in str(exc)
    # Rejected requests come back before the queued ones are served, not after a timeout.
    assert max(t for t, _ in errors) < max(served)
