"""The Triton side of a stage: the `TritonPythonModel` that model_repo/*/1/model.py exposes.

`execute` receives the requests Triton's dynamic batcher gathered (up to the config's
`max_batch_size`, each with a batch dimension of 1) and computes them in one batched pass. A
stage with a next stage then hands every request to the forward's event loop and returns None:
the instance is free for the next batch while the tiers after it work, and each request's
response goes back through its response sender when the next stage answers (a non-decoupled
model may answer this way, once per request). With `forward: sync` (the serial configuration)
`execute` waits for the next stage and returns the responses itself.

Triton's own request duration then ends when `execute` returns, before the next stage answered:
the stage counts receipt-to-reply itself, in the counters `aiflow_request_duration_us` and
`aiflow_request_success` (Python backend custom metrics, on the same /metrics port), which
`aiflow.controller.stage_metrics` prefers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

import numpy as np

from aiflow.contract import TENSORS
from aiflow.stage.config import StageError, stage_config
from aiflow.stage.forward import AsyncGrpcForward
from aiflow.stage.logic import Pending, Stage



def model_parameters(model_config: Mapping) -> dict[str, str]:
    """config.pbtxt `parameters` (as Triton passes them to `initialize`) -> {key: string value}."""
    return {k: str(v.get("string_value", "")) for k, v in (model_config.get("parameters") or {}).items()}


def load_stage(args: Mapping[str, str], env: Mapping[str, str]) -> Stage:
    """Build the Stage for a Triton model instance from its `initialize` args; loads the model once."""
    import torch

    from aiflow.model.family import load_family

    model_config = json.loads(args["model_config"])
    config = stage_config(args.get("model_name") or model_config.get("name", "?"), model_parameters(model_config), env)
    torch.set_num_threads(config.threads)  # instances and tiers share the node's cores
    forward = None
    if config.next_url and config.forward == "async":
        forward = AsyncGrpcForward(config.next_url, config.next_model, config.timeout_s)
    stage = Stage(config, load_family(config.model_path or None), forward)
    print(f"{config.describe()}; forward {config.forward}, {config.threads} thread(s)", flush=True)
    return stage


def triton_model(pb_utils) -> type:
    """The `TritonPythonModel` class of a model_repo/ stage (pb_utils exists only inside the stub)."""
    import os

    class TritonPythonModel:
        def initialize(self, args):
            self.stage = load_stage(args, os.environ)
            self.batched = int(json.loads(args["model_config"]).get("max_batch_size") or 0) > 0
            self.stage.replied = request_counters(pb_utils, args.get("model_name") or self.stage.config.model)

        def execute(self, requests):
            return serve(self.stage, requests, pb_utils, self.batched)

        def finalize(self):
            self.stage.close()

    return TritonPythonModel


def request_counters(pb_utils, model: str):
    """A callback counting one answered request and its receipt-to-reply microseconds in Triton's
    metrics (labelled with the model, like Triton's own); a no-op where custom metrics are missing."""
    family = getattr(pb_utils, "MetricFamily", None)
    if family is None:
        return lambda us: None
    # A family must outlive its metrics: the callback holds both.
    families = (family(name="aiflow_request_duration_us", description="receipt to reply, next stages included", kind=family.COUNTER),
                family(name="aiflow_request_success", description="requests answered", kind=family.COUNTER))
    duration, success = (f.Metric(labels={"model": model}) for f in families)

    def count(us: float, _families=families) -> None:
        duration.increment(us)
        success.increment(1)

    return count


def _replied(stage: Stage, pending: Pending | None) -> None:
    count = getattr(stage, "replied", None)
    if count is not None and pending is not None:
        count(1e6 * (time.perf_counter() - pending.start))


def serve(stage: Stage, requests, pb_utils, batched: bool = False) -> list | None:
    """Triton `execute`: one response per request; errors become TritonErrors, the server keeps
    serving. Returns None when the responses go through the requests' response senders."""
    name = TENSORS[stage.config.accepts]
    pendings: list[Pending | None] = []
    responses: list = []
    for request in requests:
        try:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            value = tensor.as_numpy() if tensor is not None else None
            if batched and value is not None:
                value = _unbatch(value, name, stage.config.name)
            pendings.append(stage.receive({name: value}))
            responses.append(None)
        except Exception as exc:
            pendings.append(None)
            responses.append(_error_response(pb_utils, stage, exc))
    computed = [p for p in pendings if p is not None]
    try:
        stage.compute(computed)
    except Exception as exc:  # a bug must not take the server down
        for p in computed:
            p.error = StageError(f"{stage.config.name}: internal error {type(exc).__name__}: {exc}", "INTERNAL")
    asynchronous = isinstance(stage.forward, AsyncGrpcForward)
    for i, (request, p) in enumerate(zip(requests, pendings)):
        if p is None:
            continue
        if p.error is not None:
            responses[i] = _error_response(pb_utils, stage, p.error)
        elif not p.forwards(stage):
            responses[i] = _respond(pb_utils, stage, lambda p=p: stage.reply(p), batched)
        elif not asynchronous:
            responses[i] = _respond(pb_utils, stage, lambda p=p: stage.run_forward(p), batched)
        else:
            responses[i] = request.get_response_sender()
            stage.forward.submit(_forward_and_send(stage, p, responses[i], pb_utils, batched))
    answered = [(r, p) for r, p in zip(responses, pendings) if isinstance(r, pb_utils.InferenceResponse)]
    if not asynchronous:
        for _, p in answered:
            _replied(stage, p)
        return responses
    # Every request answers through its sender: those already answered (errors, last stage) now.
    for request, response, p in zip(requests, responses, pendings):
        if isinstance(response, pb_utils.InferenceResponse):
            request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            _replied(stage, p)
    return None


async def _forward_and_send(stage: Stage, pending: Pending, sender, pb_utils, batched: bool) -> None:
    """On the forward's loop: call the next stage, then answer the request through its sender."""
    t1 = time.perf_counter()
    try:
        reply = await stage.forward.call(TENSORS[stage.config.emits], pending.message())
        wait_ms = 1000 * (time.perf_counter() - t1)
        response = _respond(pb_utils, stage, lambda: stage.reply(pending, reply, wait_ms), batched)
    except Exception as exc:
        response = _error_response(pb_utils, stage, exc)
    sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    _replied(stage, pending)


def _unbatch(value: np.ndarray, name: str, stage: str) -> np.ndarray:
    """A request's input without Triton's batch dimension: [1, n] -> [n]."""
    if value.ndim != 2 or value.shape[0] != 1:
        raise StageError(f"{stage}: {name} must have shape [1, n] (one message or one list of images per request), got {list(value.shape)}")
    return value[0]


def _respond(pb_utils, stage: Stage, outputs, batched: bool):
    try:
        values = outputs()
    except Exception as exc:
        return _error_response(pb_utils, stage, exc)
    tensors = [pb_utils.Tensor(n, v.reshape(1, -1) if batched else v) for n, v in values.items()]
    return pb_utils.InferenceResponse(output_tensors=tensors)


def _error_response(pb_utils, stage: Stage, exc: Exception):
    if isinstance(exc, StageError):
        message, code = str(exc), exc.code
    else:  # a bug must not take the server down; say where it happened
        message, code = f"{stage.config.name}: internal error {type(exc).__name__}: {exc}", "INTERNAL"
    code_value = getattr(pb_utils.TritonError, code, None)  # error codes exist in recent backends only
    error = pb_utils.TritonError(message, code_value) if code_value is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=error)
