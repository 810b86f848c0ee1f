"""Triton Python backend of the `captioner` stage; what it runs follows from config.pbtxt (aiflow.flow.stages)."""

import triton_python_backend_utils as pb_utils

from aiflow.flow.stages import triton_model

TritonPythonModel = triton_model(pb_utils)
