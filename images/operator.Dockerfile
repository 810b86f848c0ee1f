# syntax=docker/dockerfile:1
# The aiflow operator (and the link probe): the control plane only, without the data-plane extras.
# Build from the repository root:
#   docker build -f images/operator.Dockerfile -t ghcr.io/aiflow/operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# The operator checks flows against this CRD and these models (see aiflow/api/locations.py).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AIFLOW_CRD=/opt/aiflow/crds/aiflow.io_aiflows.yaml \
    AIFLOW_MODEL_REPO=/opt/aiflow/model_repo
COPY --from=build /wheels /wheels
# The base dependencies only: no torch, no Triton; the operator never imports the data plane.
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && groupadd --gid 10001 aiflow \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin aiflow
COPY crds/aiflow.io_aiflows.yaml /opt/aiflow/crds/aiflow.io_aiflows.yaml
COPY model_repo/ /opt/aiflow/model_repo/
USER 10001:10001
ENTRYPOINT ["aiflow"]
CMD ["operator", "--all-namespaces"]
