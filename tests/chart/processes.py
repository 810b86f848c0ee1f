"""The operator container of the rendered chart, run as a local process against an emulated API server,
and what the tests read back: a flow's Ready condition, the operator's own requests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.chart.rendering import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextlib.contextmanager
def container_process(container: dict, kubeconfig: Path, log_path: Path,
                      field_refs: Mapping[str, str] = {}) -> Iterator[subprocess.Popen]:
    """Run `container`'s command, args and env as a process logged in through `kubeconfig` (in a pod
    it would use the ServiceAccount's in-cluster credentials); `field_refs` gives the values of env
    vars the kubelet would fill from the pod (valueFrom.fieldRef). Stopped with SIGTERM on exit."""
    executable = Path(sys.executable).parent / container["command"][0]
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    for var in container.get("env", []):
        env[var["name"]] = var["value"] if "value" in var else field_refs[var["name"]]
    with log_path.open("w") as log:
        process = subprocess.Popen([str(executable), *container["command"][1:], *container["args"]],
                                   cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# User agents of the operator's two API clients: kopf's own and the operator's (controller/kube.py).
OPERATOR_AGENTS = ("kopf/", "aiflow-operator/")


def ready_condition(flow: dict | None) -> dict:
    conditions = ((flow or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Ready"), {})


def ready(flow: dict | None) -> bool:
    return ready_condition(flow).get("status") == "True"


def reason(flow: dict | None) -> str | None:
    return ready_condition(flow).get("reason")
