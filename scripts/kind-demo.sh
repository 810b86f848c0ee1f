#!/usr/bin/env bash
# The kind path in one command: a local cluster with device/edge/cloud workers, the aiflow images,
# the chart, the captioning example, and one caption served through it.
#
#   scripts/kind-demo.sh [up]   create/reuse the cluster, build+load images, install, apply, caption
#   scripts/kind-demo.sh images build the operator and CPU stage images only (images/build.sh)
#   scripts/kind-demo.sh down   delete the cluster
#
# Needs docker, kind, kubectl, helm, and the project venv (make setup) for the caption request.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CLUSTER="${KIND_CLUSTER:-aiflow}"
# The chart's default operator image (values.yaml + appVersion) and its CPU stage image
# (stageImages.cpu); tests/chart/test_static.py keeps these in step. kind nodes have no GPU: every
# tier runs the CPU stage image, built here from images/triton-stage-cpu.Dockerfile.
OPERATOR_IMAGE="${OPERATOR_IMAGE:-ghcr.io/aiflow/operator:0.1.0}"
DEFAULT_STAGE_CPU_IMAGE="ghcr.io/aiflow/triton-stage-cpu:0.1.0"
STAGE_CPU_IMAGE="${STAGE_CPU_IMAGE:-$DEFAULT_STAGE_CPU_IMAGE}"
RELEASE="${RELEASE:-aiflow-operator}"
OPERATOR_NAMESPACE="${OPERATOR_NAMESPACE:-aiflow-system}"
FLOW_FILE="${FLOW_FILE:-examples/captioning.yaml}"
FLOW_NAMESPACE="${FLOW_NAMESPACE:-default}"
LOCAL_PORT="${LOCAL_PORT:-18001}"
READY_TIMEOUT="${READY_TIMEOUT:-20m}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'kind-demo: error: %s\n' "$*" >&2; exit 2; }

need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (needed: $*); see docs/install.md"
  done
}

build_images() {
  need docker
  docker info >/dev/null 2>&1 || die "the docker daemon is not reachable (is it running?)"
  # The same script and Dockerfiles as CI, with docker and a python:3.11 base from the registry.
  say "Building $OPERATOR_IMAGE and $STAGE_CPU_IMAGE (images/build.sh)"
  ENGINE=docker OPERATOR_IMAGE="$OPERATOR_IMAGE" STAGE_CPU_IMAGE="$STAGE_CPU_IMAGE" \
    images/build.sh operator stage-cpu
}

create_cluster() {
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    say "Reusing kind cluster $CLUSTER"
  else
    say "Creating kind cluster $CLUSTER from kind-config.yaml"
    kind create cluster --name "$CLUSTER" --config kind-config.yaml --wait 120s
  fi
  kubectl config use-context "kind-$CLUSTER" >/dev/null
}

up() {
  need docker kind kubectl helm
  [ -x "$PYTHON" ] || die "$PYTHON not found: run 'make setup' first (the caption request uses the project client)"
  [ -f "$FLOW_FILE" ] || die "$FLOW_FILE not found"
  create_cluster
  build_images
  say "Loading images into the cluster nodes"
  kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$STAGE_CPU_IMAGE"

  say "Installing the chart (release $RELEASE in $OPERATOR_NAMESPACE)"
  helm upgrade --install "$RELEASE" charts/aiflow-operator \
    --namespace "$OPERATOR_NAMESPACE" --create-namespace \
    --set image.repository="${OPERATOR_IMAGE%:*}" --set image.tag="${OPERATOR_IMAGE##*:}" \
    --set stageImages.cpu.repository="${STAGE_CPU_IMAGE%:*}" --set stageImages.cpu.tag="${STAGE_CPU_IMAGE##*:}" \
    --set stageImages.tiers.cloud=cpu \
    --wait --timeout 5m

  say "Applying $FLOW_FILE"
  flow_ref="$(kubectl -n "$FLOW_NAMESPACE" apply -f "$FLOW_FILE" -o name | grep -i '^aiflow' | head -n1)"
  [ -n "$flow_ref" ] || die "$FLOW_FILE holds no AIFlow"

  say "Waiting for $flow_ref to be Ready (first start loads the models; up to $READY_TIMEOUT)"
  if ! kubectl -n "$FLOW_NAMESPACE" wait "$flow_ref" --for=condition=Ready --timeout="$READY_TIMEOUT"; then
    kubectl -n "$FLOW_NAMESPACE" describe "$flow_ref" || true
    kubectl -n "$FLOW_NAMESPACE" get pods -o wide || true
    die "$flow_ref did not become Ready; see docs/operating.md#troubleshooting"
  fi
  kubectl -n "$FLOW_NAMESPACE" get "$flow_ref" -o wide

  flow="${flow_ref#*/}"
  stage="$(kubectl -n "$FLOW_NAMESPACE" get "$flow_ref" -o jsonpath='{.spec.stages[0].name}')"
  model="$(kubectl -n "$FLOW_NAMESPACE" get "$flow_ref" -o jsonpath='{.spec.stages[0].model}')"
  service="$(kubectl -n "$FLOW_NAMESPACE" get service -l "aiflow.io/flow=$flow,aiflow.io/stage=$stage" -o name | head -n1)"
  [ -n "$service" ] || die "no Service for the first stage $stage of $flow"

  say "Port-forwarding $service (gRPC 8001) to 127.0.0.1:$LOCAL_PORT"
  kubectl -n "$FLOW_NAMESPACE" port-forward "$service" "$LOCAL_PORT:8001" >/dev/null &
  forward=$!
  trap 'kill "$forward" 2>/dev/null || true' EXIT

  say "Captioning a fresh scene through $model at the first stage"
  "$PYTHON" scripts/caption_request.py --url "127.0.0.1:$LOCAL_PORT" --model "$model"
}

case "${1:-up}" in
  up) up ;;
  images) build_images ;;
  down) need kind; kind delete cluster --name "$CLUSTER" ;;
  *) die "unknown command ${1}; use up, images or down" ;;
esac
