"""The real kopf operator of aiflow against the emulated Kubernetes API server (tests/kube).

No kubelet or Deployment controller runs there: tests that need ready stages say so and start the
Deployment controller stand-in; tests that need cascading deletion start the garbage collector.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from aiflow.controller.kube import USER_AGENT

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "aiflow.io_aiflows.yaml"
NS = "default"
WRITES = {"create", "update", "patch", "delete", "deletecollection"}
WAIT_SECONDS = 60  # a bound on waits for the operator, never a timing assertion


@dataclass
class Cluster:
    """An emulated API server with the AIFlow CRD and tier nodes, and the operator running on it."""

    api: object  # tests.kube.apiserver.EmulatedApiServer

    def apply(self, *files: str | Path) -> str:
        args = ["apply", "--validate=false"]
        for f in files:
            args += ["-f", str(f)]
        return self.api.kubectl(*args).stdout

    def flow(self, name: str) -> dict | None:
        return self.api.get("aiflows", name, NS)

    def condition(self, name: str, kind: str) -> dict:
        flow = self.flow(name) or {}
        return next((c for c in (flow.get("status") or {}).get("conditions") or () if c["type"] == kind), {})

    def wait(self, predicate, message: str = "condition", timeout: float = WAIT_SECONDS):
        """Poll until `predicate()` is truthy (and return it); bounded, generous for a loaded machine."""
        return self.api.wait_for(predicate, timeout=timeout, message=message)

    def wait_condition(self, name: str, kind: str, status: str, reason: str | None = None,
                       timeout: float = WAIT_SECONDS) -> dict:
        def met():
            c = self.condition(name, kind)
            return c if c.get("status") == status and (reason is None or c.get("reason") == reason) else None
        return self.api.wait_for(met, timeout=timeout, message=f"{name}: {kind}={status} {reason or ''}")

    def children(self, flow: str, kind: str = "deployments") -> dict[str, dict]:
        objs = self.api.list(kind, NS, label_selector=f"aiflow.io/flow={flow}")
        return {o["metadata"]["name"]: o for o in objs}

    def events(self, reason: str | None = None) -> list[dict]:
        return [e for e in self.api.list("events", NS) if reason is None or e.get("reason") == reason]

    def operator_writes(self, since: int = 0) -> list:
        """Writes the operator's reconcile made (its own API client), after request `since`."""
        return [r for r in self.api.request_log[since:]
                if r.user_agent.startswith(USER_AGENT) and r.verb in WRITES]

    def writes_of_a_full_reconcile(self, name: str, touch: str = "1") -> list:
        """Touch the flow's metadata (kopf then runs the update handler: a full reconcile), wait for
        that reconcile and for kopf to finish, and return the writes the operator made meanwhile."""
        mark = len(self.api.request_log)
        self.api.patch("aiflows", name, {"metadata": {"annotations": {"example.com/touch": touch}}}, NS)
        self.wait(lambda: self.operator_reads("deployments", mark), message="a reconcile after the touch")
        self.wait(lambda: any(r.resource == "aiflows" and r.verb == "patch" and r.subresource is None and r.name == name
                              for r in self.api.request_log[mark:] if r.user_agent.startswith("kopf")),
                  message="kopf to finish the update handler")
        return self.operator_writes(mark)

    def operator_reads(self, resource: str, since: int = 0) -> list:
        return [r for r in self.api.request_log[since:]
                if r.user_agent.startswith(USER_AGENT) and r.verb in ("get", "list") and r.resource == resource]


@pytest.fixture
def cluster(apiserver, run_kopf_operator) -> Cluster:
    """The CRD applied with kubectl, one node per tier, the operator running in `default`."""
    apiserver.kubectl("apply", "--validate=false", "-f", str(CRD))
    for tier in ("device", "edge", "cloud"):
        apiserver.seed_node(f"{tier}-1", tier)
    run_kopf_operator("aiflow.controller.handlers")
    return Cluster(apiserver)


@pytest.fixture
def bare_cluster(apiserver, run_kopf_operator) -> Cluster:
    """The CRD and the operator, no tier nodes yet."""
    apiserver.kubectl("apply", "--validate=false", "-f", str(CRD))
    apiserver.seed_node("control-plane")
    run_kopf_operator("aiflow.controller.handlers")
    return Cluster(apiserver)


def aiflow(name: str, *stages: dict, **spec) -> dict:
    return {"apiVersion": "aiflow.io/v1alpha1", "kind": "AIFlow", "metadata": {"name": name, "namespace": NS},
            "spec": {"stages": list(stages), **spec}}
