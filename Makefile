# The two commands of the README, and the kind path.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch must be installed before anything that depends on torch,
# or pip resolves the multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(BIN)/aiflow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

setup: $(BIN)/aiflow

demo: setup
	$(BIN)/aiflow demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache

# The kind path (docs/install.md): a local cluster with one worker per tier, the images, the chart,
# the captioning example, and a caption through it. Needs docker, kind, kubectl and helm.
KIND_CLUSTER ?= aiflow
.PHONY: kind-demo kind-down images

kind-demo: setup
	KIND_CLUSTER=$(KIND_CLUSTER) scripts/kind-demo.sh up

kind-down:
	KIND_CLUSTER=$(KIND_CLUSTER) scripts/kind-demo.sh down

images:
	scripts/kind-demo.sh images
