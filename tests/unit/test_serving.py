"""Serving settings: validation, what they do to a Triton model config, the overloaded error and
the caption client's retry on another replica."""

import json

import pytest
from tritonclient.utils import InferenceServerException

from aiflow.local.client import CaptionError, infer_any
from aiflow.local.tritonserver import model_config_json
from aiflow.serving import SERIAL, Serving, ServingError, apply_parameters, for_cpu, from_spec
from aiflow.stage.config import StageError, stage_config
from aiflow.stage.forward import describe_call_error, is_overloaded

QUEUE_FULL = InferenceServerException("[request id: <id_unknown>] Exceeds maximum queue size", "StatusCode.UNAVAILABLE")


def test_every_model_of_the_repo_batches_with_a_bounded_queue(model_repo_path):
    for model in ("captioner", "vision_head", "vision_tail", "caption_decoder", "caption_drafter", "caption_verifier"):
        config = json.loads(model_config_json(model_repo_path / model))
        assert config["max_batch_size"] == 8
        assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 64
        assert all(i.get("allow_ragged_batch") for i in config["input"])


def test_serving_parameters_set_instances_batching_and_the_queue(model_repo_path):
    config = json.loads(model_config_json(model_repo_path / "caption_verifier", Serving(instances=3, max_batch_size=4, max_queue_delay_us=500, max_queue_size=7).knobs()))
    assert config["instance_group"] == [{"kind": "KIND_CPU", "count": 3}]
    assert config["max_batch_size"] == 4
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": "500", "default_queue_policy": {"max_queue_size": 7}}
    assert config["parameters"]["AIFLOW_FORWARD"]["string_value"] == "async"
    serial = json.loads(model_config_json(model_repo_path / "caption_verifier", SERIAL.knobs()))
    assert serial["max_batch_size"] == 1 and "dynamic_batching" not in serial
    assert serial["parameters"]["AIFLOW_FORWARD"]["string_value"] == "sync"
    # Only the settings given change; the rest of the config stays.
    only = apply_parameters({"max_batch_size": 8, "instance_group": [{"count": 2}], "name": "m"}, {"AIFLOW_MAX_QUEUE_SIZE": "5"})
    assert only["instance_group"][0]["count"] == 2 and only["max_batch_size"] == 8 and only["name"] == "m"
    assert only["dynamic_batching"]["default_queue_policy"] == {"max_queue_size": 5}


@pytest.mark.parametrize("fields, says", [
    ({"instances": 0}, "serving.instances must be an integer >= 1"),
    ({"max_batch_size": 0}, "serving.max_batch_size must be an integer >= 1"),
    ({"max_queue_size": -1}, "serving.max_queue_size must be an integer >= 0"),
    ({"forward": "later"}, "serving.forward must be one of async, sync"),
])
def test_bad_serving_settings_say_which_field(fields, says):
    with pytest.raises(ServingError, match=says):
        Serving(**fields)


def test_spec_fields_and_cpu_derived_defaults():
    assert for_cpu("500m").instances == 1
    assert for_cpu("2").instances == 2 and for_cpu(2.5).instances == 2
    assert for_cpu(None) == Serving()
    s = from_spec({"maxBatchSize": 16, "maxQueueSize": 100, "threads": 2}, cpu="3")
    assert (s.instances, s.threads, s.max_batch_size, s.max_queue_size) == (3, 2, 16, 100)
    with pytest.raises(ServingError, match="unknown field"):
        from_spec({"batch": 4})
    with pytest.raises(ServingError, match="not a Kubernetes quantity"):
        for_cpu("lots")
    with pytest.raises(ServingError, match="AIFLOW_INSTANCES='two' is not an integer"):
        apply_parameters({}, {"AIFLOW_INSTANCES": "two"})


def test_stage_knobs_for_serving_are_checked():
    params = {"aiflow.accepts": "image", "aiflow.emits": "caption"}
    with pytest.raises(StageError, match="forward 'later' must be one of async, sync"):
        stage_config("captioner", {**params, "AIFLOW_FORWARD": "later"}, {})
    with pytest.raises(StageError, match="threads 0 must be >= 1"):
        stage_config("captioner", {**params, "AIFLOW_THREADS": "0"}, {})
    assert stage_config("captioner", {**params, "AIFLOW_THREADS": "2"}, {}).threads == 2


def test_a_full_queue_is_named_overloaded_and_stays_named_through_the_chain():
    own = describe_call_error(QUEUE_FULL, "caption_verifier", "127.0.0.1:9", 60)
    assert own.startswith("next stage caption_verifier at 127.0.0.1:9 is overloaded: its queue is full")
    nested = describe_call_error(InferenceServerException(own, "StatusCode.UNAVAILABLE"), "caption_drafter", "127.0.0.1:8", 60, what="stage")
    assert nested.startswith("stage caption_drafter at 127.0.0.1:8 failed: next stage caption_verifier")
    assert is_overloaded(own) and is_overloaded(nested)
    down = InferenceServerException("failed to connect", "StatusCode.UNAVAILABLE")
    assert not is_overloaded(describe_call_error(down, "m", "u", 60))


class FakeClient:
    def __init__(self, error=None):
        self.error, self.calls = error, 0

    def infer(self, *args, **kwargs):
        self.calls += 1
        if self.error:
            raise self.error
        return FakeResult()


class FakeResult:
    def as_numpy(self, name):
        import numpy as np

        return np.array([[b"a red circle"]], dtype=object) if name == "CAPTION" else np.array([[b"[]"]], dtype=object)


def test_the_caption_client_retries_an_overloaded_replica_on_the_next():
    busy, free = FakeClient(QUEUE_FULL), FakeClient()
    captions, hops, _ = infer_any([(busy, "a:1"), (free, "b:1")], "vision_head", [b"png"])
    assert captions == ["a red circle"] and (busy.calls, free.calls) == (1, 1)
    with pytest.raises(CaptionError, match="every replica of vision_head is overloaded \\(2 tried\\)") as info:
        infer_any([(busy, "a:1"), (FakeClient(QUEUE_FULL), "b:1")], "vision_head", [b"png"])
    assert info.value.overloaded
    broken = FakeClient(InferenceServerException("vision_head: image 0 is empty", "StatusCode.INVALID_ARGUMENT"))
    with pytest.raises(CaptionError, match="image 0 is empty"):
        infer_any([(broken, "a:1"), (free, "b:1")], "vision_head", [b"png"])
    assert free.calls == 1  # a bad request is not retried elsewhere


def test_the_crd_checks_serving_and_autoscaling_fields():
    from aiflow.api.validate import validate_manifest
    from tests.unit.test_render import serving_manifest

    doc = serving_manifest()
    assert validate_manifest(doc) == []
    doc["spec"]["stages"][1]["serving"].update(batch=3, maxBatchSize=0)
    doc["spec"]["stages"][1]["autoscaling"] = {"minReplicas": 2}
    found = " ".join(str(p) for p in validate_manifest(doc))
    assert 'unknown field "spec.stages[1].serving.batch"' in found
    assert "serving.maxBatchSize: 0 is too small" in found
    assert "maxReplicas" in found


def test_measured_stage_load_makes_the_tier_busy_for_the_planner():
    from aiflow.api.spec import parse_flow
    from aiflow.controller.reconcile import with_stage_load
    from aiflow.controller.stage_metrics import StageSample, stage_times
    from aiflow.planner.cluster import TierState, cluster_state
    from tests.unit.test_render import serving_manifest

    before = StageSample(success=10, executions=5, compute_us=1e6, at=100.0)
    after = StageSample(success=30, executions=10, compute_us=4e6, at=102.0)
    times = stage_times(before, after)
    # 3 s charged to 20 requests in 5 executions (batches of 4): 0.75 s busy in 2 s
    assert times.busy == pytest.approx(0.375)
    assert times.to_status("drafter")["busy"] == 0.375
    assert stage_times(None, after).busy is None  # no interval to divide by
    flow = parse_flow(serving_manifest())  # the drafter runs 2 instances on the edge
    state = cluster_state([TierState(t, 1, 1) for t in ("device", "edge", "cloud")])
    loaded = with_stage_load(state, flow, (("head", "device"), ("drafter", "edge"), ("verifier", "cloud")), (("drafter", times),))
    assert loaded.tier("edge").busy == pytest.approx(0.1875)
    assert loaded.tier("cloud").busy == 0 and loaded.tier("device").busy == 0


def test_the_stages_own_request_time_is_preferred_to_tritons():
    """With the forward async, Triton's request duration ends when execute returns; the stage's own
    counters say when it really answered."""
    from aiflow.controller.stage_metrics import parse_triton_metrics, stage_times

    triton = (
        'nv_inference_request_success{model="vision_head",version="1"} 4\n'
        'nv_inference_exec_count{model="vision_head",version="1"} 4\n'
        'nv_inference_request_duration_us{model="vision_head",version="1"} 32000\n'
        'nv_inference_queue_duration_us{model="vision_head",version="1"} 400\n'
        'nv_inference_compute_infer_duration_us{model="vision_head",version="1"} 30000\n'
    )
    own = ('aiflow_request_duration_us{model="vision_head"} 580000\n'
           'aiflow_request_success{model="vision_head"} 4\n'
           'aiflow_request_duration_us{model="other"} 1\n')
    assert stage_times(None, parse_triton_metrics(triton, "vision_head")).request_ms == pytest.approx(8.0)
    assert stage_times(None, parse_triton_metrics(triton + own, "vision_head")).request_ms == pytest.approx(145.0)
