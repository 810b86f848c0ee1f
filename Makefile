# The two commands of the README, and the kind path.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch must be installed before anything that depends on torch,
# or pip resolves the multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test check-control-plane bench clean

$(BIN)/aiflow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

setup: $(BIN)/aiflow

demo: setup
	$(BIN)/aiflow demo

test: setup check-control-plane
	$(BIN)/python -m pytest -q

# The operator image has no torch: install without the flow extra and run validate/render/plan.
check-control-plane:
	PYTHON=$(PYTHON) scripts/check-control-plane.sh

clean:
	rm -rf $(VENV) .venv-control-plane .pytest_cache

# The kind path (docs/install.md): a local cluster with one worker per tier, the images, the chart,
# the captioning example, and a caption through it. Needs docker, kind, kubectl and helm.
KIND_CLUSTER ?= aiflow
.PHONY: kind-demo kind-down images

kind-demo: setup
	KIND_CLUSTER=$(KIND_CLUSTER) scripts/kind-demo.sh up

kind-down:
	KIND_CLUSTER=$(KIND_CLUSTER) scripts/kind-demo.sh down

# The operator and CPU stage images from images/*.Dockerfile (buildah/podman, else docker; a debootstrap
# base where no registry is reachable). `images/build.sh stage-gpu` builds the NVIDIA Triton stage image.
images:
	images/build.sh operator stage-cpu
