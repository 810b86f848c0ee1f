# syntax=docker/dockerfile:1
# The aiflow operator (and the link probe): the control plane only, without the data-plane extras.
# Build from the repository root with images/build.sh, or by hand:
#   docker build -f images/operator.Dockerfile -t ghcr.io/aiflow/operator:0.1.0 .
# BASE_IMAGE: any Debian bookworm with Python 3.11 and venv (python:3.11-slim-bookworm, or the local
# debootstrap base that images/build.sh makes where no registry is reachable).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}


# The operator checks flows against this CRD and these models (see aiflow/api/locations.py).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    AIFLOW_CRD=/opt/aiflow/crds/aiflow.io_aiflows.yaml \
    AIFLOW_MODEL_REPO=/opt/aiflow/model_repo \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# The base dependencies only (images/operator-requirements.txt): no torch, no Triton; the operator
# never imports the data plane. They install before the project, so a code change rebuilds only the
# project's layer. Wheels in images/wheels/ (images/build.sh fills it) come first; PIP_ARGS=--no-index
# makes the build read no index at all, the default empty PIP_ARGS lets pip fetch what is missing.
ARG PIP_ARGS=
COPY images/operator-requirements.txt /tmp/requirements.txt
RUN --mount=type=bind,source=images/wheels,target=/tmp/wheels \
    set -eu; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/pip install ${PIP_ARGS} --find-links /tmp/wheels -r /tmp/requirements.txt; \
    rm -rf /tmp/requirements.txt /root/.cache; \
    groupadd --gid 10001 aiflow; \
    useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin aiflow
COPY pyproject.toml README.md /tmp/src/
COPY operator/ /tmp/src/operator/
RUN --mount=type=bind,source=images/wheels,target=/tmp/wheels \
    /opt/venv/bin/pip install ${PIP_ARGS} --find-links /tmp/wheels /tmp/src && rm -rf /tmp/src /root/.cache
COPY crds/aiflow.io_aiflows.yaml /opt/aiflow/crds/aiflow.io_aiflows.yaml
COPY model_repo/ /opt/aiflow/model_repo/
# The uid/gid of the chart's podSecurityContext.
USER 10001:10001
ENTRYPOINT ["aiflow"]
CMD ["operator", "--all-namespaces"]

# Last, so that a new revision only relabels the image and rebuilds no layer.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/aiflow-project/aiflow
LABEL org.opencontainers.image.title="aiflow operator" \
      org.opencontainers.image.description="aiflow operator: AIFlow custom resources as chains of Triton stage servers, and the link probe" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
