#!/usr/bin/env bash
# The operator image has no torch: install the package without the `flow` extra into a venv of its
# own, as images/operator.Dockerfile does, and run the operator's offline commands on the examples.
# Fails if any of them needs the data plane (torch, transformers, Triton's client).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${CONTROL_PLANE_VENV:-.venv-control-plane}
[ -x "$VENV/bin/aiflow" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --no-cache-dir .
export AIFLOW_CRD="$PWD/crds/aiflow.io_aiflows.yaml" AIFLOW_MODEL_REPO="$PWD/model_repo"
cd "$VENV"  # away from the checkout: the installed package, not the source tree, is what runs
for lib in torch transformers tritonclient; do
  if bin/python -c "import $lib" 2>/dev/null; then
    echo "check-control-plane: $lib is installed without the flow extra" >&2; exit 1
  fi
done
ex="$OLDPWD/examples"
bin/aiflow validate -f "$ex/captioning.yaml" -f "$ex/two-tier.yaml" -f "$ex/auto-placement.yaml"
bin/aiflow render -f "$ex/captioning.yaml" > /dev/null
bin/aiflow plan -f "$ex/auto-placement.yaml" --cluster "$ex/cluster-thin-uplink.yaml" > /dev/null
bin/aiflow operator --help > /dev/null
echo "check-control-plane: validate, render, plan and operator --help run without the data plane"
