"""The Triton side of a stage: the `TritonPythonModel` that model_repo/*/1/model.py exposes."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiflow.contract import TENSORS
from aiflow.stage.config import StageError, stage_config
from aiflow.stage.logic import Stage


def model_parameters(model_config: Mapping) -> dict[str, str]:
    """config.pbtxt `parameters` (as Triton passes them to `initialize`) -> {key: string value}."""
    return {k: str(v.get("string_value", "")) for k, v in (model_config.get("parameters") or {}).items()}


def load_stage(args: Mapping[str, str], env: Mapping[str, str]) -> Stage:
    """Build the Stage for a Triton model instance from its `initialize` args; loads the model once."""
    import torch

    from aiflow.model.family import load_family

    torch.set_num_threads(1)  # one instance, one core: instances and tiers share 2 cores
    model_config = json.loads(args["model_config"])
    config = stage_config(args.get("model_name") or model_config.get("name", "?"), model_parameters(model_config), env)
    stage = Stage(config, load_family(config.model_path or None))
    print(config.describe(), flush=True)
    return stage


def triton_model(pb_utils) -> type:
    """The `TritonPythonModel` class of a model_repo/ stage (pb_utils exists only inside the stub)."""
    import os

    class TritonPythonModel:
        def initialize(self, args):
            self.stage = load_stage(args, os.environ)

        def execute(self, requests):
            return serve(self.stage, requests, pb_utils)

        def finalize(self):
            self.stage.close()

    return TritonPythonModel


def serve(stage: Stage, requests, pb_utils) -> list:
    """Triton `execute`: one response per request; errors become TritonErrors, the server keeps serving."""
    responses = []
    for request in requests:
        try:
            inputs = {}
            for name in (TENSORS[stage.config.accepts],):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                inputs[name] = tensor.as_numpy() if tensor is not None else None
            outputs = stage.run(inputs)
            tensors = [pb_utils.Tensor(name, value) for name, value in outputs.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        except StageError as exc:
            responses.append(pb_utils.InferenceResponse(error=_triton_error(pb_utils, str(exc), exc.code)))
        except Exception as exc:  # a bug must not take the server down; say where it happened
            message = f"{stage.config.name}: internal error {type(exc).__name__}: {exc}"
            responses.append(pb_utils.InferenceResponse(error=_triton_error(pb_utils, message, "INTERNAL")))
    return responses


def _triton_error(pb_utils, message: str, code: str):
    code_value = getattr(pb_utils.TritonError, code, None)  # error codes exist in recent backends only
    return pb_utils.TritonError(message, code_value) if code_value is not None else pb_utils.TritonError(message)
