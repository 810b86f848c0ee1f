"""Fixtures: an emulated Kubernetes API server, kubectl against it, and the real kopf operator on it.

Usage (the root conftest loads this module as a plugin, so the fixtures are just there)::

    def test_flow(apiserver, run_kopf_operator):
        apiserver.kubectl("apply", "-f", "crds/")          # the CRD, as a cluster gets it
        apiserver.seed_node("edge-1", "edge", allocatable={"cpu": "8", "memory": "16Gi"})
        run_kopf_operator("aiflow.controller.handlers")                     # real kopf, stopped at teardown
        apiserver.kubectl("apply", "-f", "examples/captioning.yaml")
        apiserver.start_deployment_controller()       # says so: Deployments become ready (no kubelet here)
        flow = apiserver.wait_for(lambda: ready(apiserver.get("aiflows", "captioning", "default")))
        assert apiserver.list("deployments", "default", label_selector="aiflow.io/flow=captioning")

Fixtures:
- `apiserver` (function scope): a fresh `EmulatedApiServer` on 127.0.0.1:<random port>, namespaces
  default/kube-system/kube-public/kube-node-lease. Attributes `url`, `kubeconfig` (path), `handler`
  (the kmock handler: `apiserver.handler['get /api/v1/nodes'] << 500` injects a fault). Methods:
  `get(resource, name, namespace=None)`, `list(resource, namespace=None, label_selector=None)`,
  `create(obj)`, `patch(resource, name, merge_patch, namespace=None, subresource=None)`,
  `delete(resource, name, namespace=None)`, `create_namespace(name)`,
  `seed_node(name, tier=None, labels=, allocatable=, ready=True, taints=)`, `set_node_ready(name, ready)`,
  `patch_node(name, patch)`, `remove_node(name)`, `serve_node_metrics()` (metrics.k8s.io NodeMetrics,
  as with metrics-server installed) and `set_node_metrics(name, cpu, memory="0")`, `kubectl(*args, input=None, check=True)`,
  `kubectl_env()`, `wait_for(predicate, timeout=30, message=...)`, `request_log` (list of
  `RequestRecord(method, path, verb, group, version, resource, namespace, name, subresource,
  user_agent, code, label_selector, also)`; `verbs` is the verb and the further verbs RBAC wanted,
  e.g. create for an apply that created), `clear_request_log()`,
  `authorize_token(token, tests.kube.rbac.User(...))` (requests with that bearer token are made as
  that user, under the RBAC objects stored in the server; returns a kubeconfig with the token), `warnings` (what it could not check, e.g. a CEL rule
  cel-python cannot run), and the controller stand-ins: `start_garbage_collector()`,
  `collect_garbage()`, `start_deployment_controller(selector=None, namespace=None)`,
  `mark_deployments_ready(namespace=None, names=None, label_selector=None, ready=True)`.
  `resource` is a plural, kind, short name or `plural.group` ("deployments", "Deployment", "af").
- `shared_apiserver` (session scope): the same, shared by the tests that opt in (clean up after you).
- `kubeconfig` (function scope): sets `KUBECONFIG` to the `apiserver`'s kubeconfig; returns its path.
- `run_kopf_operator(modules_or_paths, namespaces=("default",), clusterwide=False, apiserver=None,
  token="emulated", kubeconfig=None)`: starts the real kopf operator (in a thread, own event loop,
  standalone, logged in to `apiserver` with `token`, with `KUBECONFIG` pointing at it, or at
  `kubeconfig`) and stops it at teardown; returns a `KopfOperator`.
  Handlers that build their own API client must read the path then:
  `kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))` (the kubernetes
  package fixes its default path at import time).
- `garbage_collector`: the garbage-collector stand-in running for the test on `apiserver`.
- `derive_rbac_rules(records)` (tests.kube.apiserver): RBAC rules from a recorded `request_log`.

Outside pytest (e.g. bench/operator_bench.py)::

    from tests.kube.apiserver import EmulatedApiServer
    from tests.kube.kopf_runner import run_kopf_operator
    with EmulatedApiServer() as server, run_kopf_operator(server, "aiflow.controller.handlers"):
        ...

What is emulated and what is not: see tests/kube/apiserver.py and controllers.py docstrings.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from tests.kube.apiserver import EmulatedApiServer
from tests.kube.controllers import GarbageCollector
from tests.kube.kopf_runner import KopfOperator
from tests.kube.kopf_runner import run_kopf_operator as _run_kopf_operator


@pytest.fixture
def apiserver(tmp_path: Path) -> Iterator[EmulatedApiServer]:
    with EmulatedApiServer(workdir=tmp_path) as server:
        yield server


@pytest.fixture(scope="session")
def shared_apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedApiServer]:
    with EmulatedApiServer(workdir=tmp_path_factory.mktemp("shared-apiserver")) as server:
        yield server


@pytest.fixture
def kubeconfig(apiserver: EmulatedApiServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KUBECONFIG", str(apiserver.kubeconfig))
    monkeypatch.setenv("KUBECACHEDIR", str(apiserver.workdir / "cache"))
    return apiserver.kubeconfig


@pytest.fixture
def run_kopf_operator(apiserver: EmulatedApiServer) -> Iterator[Callable[..., KopfOperator]]:
    """Start the real kopf operator against an emulated API server; all are stopped at teardown."""
    default_server = apiserver
    with contextlib.ExitStack() as stack:
        def start(modules_or_paths: str | Path | Iterable[str | Path], *,
                  apiserver: EmulatedApiServer | None = None, namespaces: Iterable[str] = ("default",),
                  clusterwide: bool = False, **kwargs: object) -> KopfOperator:
            server = apiserver or default_server
            return stack.enter_context(_run_kopf_operator(server, modules_or_paths, namespaces=namespaces,
                                                          clusterwide=clusterwide, **kwargs))
        yield start


@pytest.fixture
def garbage_collector(apiserver: EmulatedApiServer) -> Iterator[GarbageCollector]:
    """Plays kube-controller-manager's garbage collector on `apiserver` for the test's duration."""
    with GarbageCollector(apiserver) as collector:
        yield collector  # type: ignore[misc]
