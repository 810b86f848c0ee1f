"""Fixtures: real tritonserver processes (and the local runtime) that leave no process behind.

- `triton_factory(repo, models=[...], env={...})` -> a started TritonServer on free ports (session).
- `local_runtime` -> a LocalRuntime over `model_repo/` on free ports, no models loaded; tests call
  `local_runtime.load(tier, model, next_stage=(tier, model))` for what they need (session).
- `tiny_model_repo` -> a throwaway repo: `relay` (A+B, forwards to AIFLOW_NEXT_URL if set, reports
  env and parameters as JSON in INFO) and `broken` (fails to load).
"""

from __future__ import annotations

import contextlib
import textwrap
from pathlib import Path

import pytest

from aiflow.local.runtime import LocalRuntime
from aiflow.local.tritonserver import TritonServer, process_group_members

REPO_ROOT = Path(__file__).resolve().parents[2]

RELAY_CONFIG = """
backend: "python"
max_batch_size: 0
input [
  { name: "A" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "B" data_type: TYPE_FP32 dims: [ -1 ] }
]
output [
  { name: "SUM" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "INFO" data_type: TYPE_STRING dims: [ 1 ] }
]
parameters { key: "greeting" value: { string_value: "hello" } }
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

RELAY_MODEL = '''
import json, os
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.params = {k: v["string_value"] for k, v in params.items()}
        self.next_url = self.params.get("AIFLOW_NEXT_URL") or os.environ.get("AIFLOW_NEXT_URL")
        self.next_model = self.params.get("AIFLOW_NEXT_MODEL") or os.environ.get("AIFLOW_NEXT_MODEL")

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        a = pb_utils.get_input_tensor_by_name(request, "A").as_numpy()
        b = pb_utils.get_input_tensor_by_name(request, "B").as_numpy()
        total = (a + b).astype(np.float32)
        hop = {"env_tier": os.environ.get("AIFLOW_TIER"),
               "compute_factor": os.environ.get("AIFLOW_COMPUTE_FACTOR"),
               "params": self.params}
        hops = [hop]
        if self.next_url:
            import tritonclient.grpc as grpcclient
            client = grpcclient.InferenceServerClient(self.next_url)
            inputs = [grpcclient.InferInput("A", list(a.shape), "FP32"),
                      grpcclient.InferInput("B", list(b.shape), "FP32")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            result = client.infer(self.next_model, inputs, client_timeout=60)
            total = total + result.as_numpy("SUM")
            hops += json.loads(result.as_numpy("INFO")[0])
            client.close()
        info = np.array([json.dumps(hops).encode()], dtype=np.object_)
        return pb_utils.InferenceResponse([pb_utils.Tensor("SUM", total),
                                           pb_utils.Tensor("INFO", info)])
'''

BROKEN_MODEL = '''
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("broken on purpose: weights file missing")

    def execute(self, requests):
        return []
'''


def write_model(repo: Path, name: str, config: str, code: str) -> Path:
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(textwrap.dedent(config))
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(code))
    return repo / name


def assert_group_gone(pgid: int) -> None:
    left = process_group_members(pgid)
    assert not left, f"processes left behind by tritonserver group {pgid}: {left}"


@contextlib.contextmanager
def running(runtime: LocalRuntime):
    """Start `runtime`, yield it, stop it, and fail if any of its processes or its state file stay."""
    with runtime:
        groups = [s.pid for s in runtime.servers.values()]
        yield runtime
    for pgid in groups:
        assert_group_gone(pgid)
    assert not (runtime.state_dir / "state.json").exists(), "state file left behind"


@pytest.fixture(scope="session")
def tiny_model_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("tiny_model_repo")
    write_model(repo, "relay", RELAY_CONFIG, RELAY_MODEL)
    write_model(repo, "broken", RELAY_CONFIG, BROKEN_MODEL)
    return repo


@pytest.fixture(scope="session")
def triton_factory(tmp_path_factory):
    """Start real tritonservers on free ports; all stopped (and checked gone) at session end."""
    started: list[TritonServer] = []

    def start(model_repository, models=(), env=None, **kwargs) -> TritonServer:
        kwargs.setdefault("log_dir", tmp_path_factory.mktemp("triton-logs"))
        server = TritonServer(model_repository, models=models, env=env, **kwargs)
        started.append(server)
        return server.start()

    yield start
    groups = [s.pid for s in started if s.pid]
    for server in started:
        server.terminate()
    for server in started:
        server.stop()
    for pgid in groups:
        assert_group_gone(pgid)


@pytest.fixture(scope="session")
def model_repo_path() -> Path:
    return REPO_ROOT / "model_repo"


@pytest.fixture(scope="session")
def local_runtime(model_repo_path, tmp_path_factory):
    """The three tiers over `model_repo/`, unshaped links, free ports, a private state dir."""
    runtime = LocalRuntime(
        model_repo_path,
        state_path=tmp_path_factory.mktemp("aiflow-state"),
        log_dir=tmp_path_factory.mktemp("aiflow-logs"),
    )
    with running(runtime):
        yield runtime
