# syntax=docker/dockerfile:1
# A stage server: NVIDIA Triton Inference Server with the aiflow data plane and model_repo/ baked in at
# /opt/aiflow/model_repo (the AIFlow CRD's default spec.triton.image and modelRepository.path).
# Build from the repository root:
#   docker build -f images/triton-stage.Dockerfile -t ghcr.io/aiflow/triton-stage:0.1.0 .
# 24.10 ships Triton 2.51, the release the tests run (nvidia-pytriton's bundled server), on Python 3.10.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}

# The CPU build of torch: the captioning family is small, and the CUDA build adds gigabytes. Point
# TORCH_INDEX at https://download.pytorch.org/whl/cu124 for GPU stages.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AIFLOW_MODEL_REPO=/opt/aiflow/model_repo

WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
# torch first from its own index, so the flow extras resolve to it instead of the CUDA build;
# numpy<2 because the Python backend stub returns empty outputs with numpy 2.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && pip install --no-cache-dir ".[flow]" "numpy<2" \
    && rm -rf /src
COPY model_repo/ /opt/aiflow/model_repo/
WORKDIR /opt/aiflow
# The image's unprivileged triton-server user; stage pods run as this uid (render/manifests.py).
USER 1000:1000
CMD ["tritonserver", "--model-repository=/opt/aiflow/model_repo", "--model-control-mode=explicit"]
