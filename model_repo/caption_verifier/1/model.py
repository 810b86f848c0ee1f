"""Triton Python backend of the `caption_verifier` stage; what it runs follows from config.pbtxt (aiflow.stage)."""

import triton_python_backend_utils as pb_utils

from aiflow.stage.triton import triton_model

TritonPythonModel = triton_model(pb_utils)
