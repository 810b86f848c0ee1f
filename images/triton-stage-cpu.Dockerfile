# syntax=docker/dockerfile:1
# A CPU stage server for tiers without an NVIDIA GPU (devices, most edge nodes): the Triton Inference
# Server that the nvidia-pytriton wheel bundles (2.51, the release the tests run), its Python backend,
# the CPU build of torch, the aiflow data plane and model_repo/ baked in at /opt/aiflow/model_repo.
# It runs the pod that `aiflow render` writes unchanged: `tritonserver` on PATH, the backend in
# Triton's default /opt/tritonserver/backends, uid/gid 1000, nothing written outside /tmp and /dev/shm.
#
# Build from the repository root with images/build.sh (it puts the torch wheel into images/wheels/):
#   images/build.sh stage-cpu
# or by hand:
#   pip download torch==2.13.0 --no-deps --only-binary=:all: --python-version 3.11 \
#       --platform manylinux_2_28_x86_64 --index-url https://download.pytorch.org/whl/cpu -d images/wheels
#   docker build -f images/triton-stage-cpu.Dockerfile -t ghcr.io/aiflow/triton-stage-cpu:0.1.0 .
# BASE_IMAGE: any Debian bookworm with Python 3.11 and venv (python:3.11-slim-bookworm, or the local
# debootstrap base that images/build.sh makes where no registry is reachable).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    AIFLOW_MODEL_REPO=/opt/aiflow/model_repo

# The Python backend stub links libpython3.X.so.1.0: python:*-slim has it in /usr/local/lib, a minbase
# Debian needs the libpython3.X package. Debian's pip is externally managed: everything goes in a venv.
RUN set -eu; \
    py="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"; \
    if ! ldconfig -p | grep -q "libpython${py}.so.1.0"; then \
      apt-get update && apt-get install -y --no-install-recommends "libpython${py}" \
      && rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/venv

# torch from the wheel in images/wheels/ (a plain `pip install torch` resolves the multi-GB CUDA
# build), then the rest of images/stage-requirements.txt (numpy<2: the stub returns empty outputs with
# numpy 2), then the project alone: a code change rebuilds only that layer and the ones after it.
# images/build.sh fills images/wheels/ with every wheel and passes PIP_ARGS=--no-index, so its builds
# read no index; with the default empty PIP_ARGS pip fetches what images/wheels/ lacks.
ARG PIP_ARGS=
COPY images/stage-requirements.txt /tmp/requirements.txt
RUN --mount=type=bind,source=images/wheels,target=/tmp/wheels \
    set -eu; \
    ls /tmp/wheels/torch-"${TORCH_VERSION}"*.whl >/dev/null 2>&1 \
      || { echo "images/wheels/ holds no torch ${TORCH_VERSION} wheel: run images/build.sh wheels" >&2; exit 1; }; \
    pip="/opt/venv/bin/pip install ${PIP_ARGS} --find-links /tmp/wheels"; \
    $pip /tmp/wheels/torch-"${TORCH_VERSION}"*.whl; \
    $pip -r /tmp/requirements.txt; \
    rm -rf /tmp/requirements.txt /root/.cache
COPY pyproject.toml README.md /tmp/src/
COPY operator/ /tmp/src/operator/
RUN --mount=type=bind,source=images/wheels,target=/tmp/wheels \
    set -eu; \
    /opt/venv/bin/pip install ${PIP_ARGS} --find-links /tmp/wheels "/tmp/src[flow]" "numpy<2" "torch==${TORCH_VERSION}"; \
    rm -rf /tmp/src /root/.cache

# Lay out the bundled server as the NVIDIA image does, at build time, so a read-only root works:
# the binary on PATH, the Python backend and this Python's stub in Triton's default backend folder.
RUN set -eu; \
    py="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"; \
    site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
    bundle="$site/pytriton/tritonserver"; \
    test -x "$bundle/python_backend_stubs/$py/triton_python_backend_stub" \
      || { echo "nvidia-pytriton has no Python backend stub for Python $py" >&2; exit 1; }; \
    mkdir -p /opt/tritonserver/bin /opt/tritonserver/backends/python; \
    ln -s "$bundle/bin/tritonserver" /opt/tritonserver/bin/tritonserver; \
    cp "$bundle/backends/python/libtriton_python.so" "$bundle/backends/python/triton_python_backend_utils.py" \
       "$bundle/python_backend_stubs/$py/triton_python_backend_stub" /opt/tritonserver/backends/python/; \
    ln -s "$site/nvidia_pytriton.libs" /opt/tritonserver/lib; \
    groupadd --gid 1000 triton-server; \
    useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin triton-server

# The stub runs the first python3 on PATH: the venv's, which has torch and aiflow.
ENV PATH=/opt/venv/bin:/opt/tritonserver/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LD_LIBRARY_PATH=/opt/tritonserver/lib \
    HOME=/tmp

COPY model_repo/ /opt/aiflow/model_repo/
WORKDIR /opt/aiflow
# The uid/gid that stage pods run as (render/manifests.py TRITON_UID), as in NVIDIA's Triton images.
USER 1000:1000
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/opt/aiflow/model_repo", "--model-control-mode=explicit"]

# Last, so that a new revision only relabels the image and rebuilds no layer.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/aiflow-project/aiflow
LABEL org.opencontainers.image.title="aiflow triton-stage-cpu" \
      org.opencontainers.image.description="aiflow stage server: Triton Inference Server (CPU) with the aiflow data plane and model repository" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
