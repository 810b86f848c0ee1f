"""Bring-your-own models through the real kopf operator on the emulated API server: a flow whose model
repository the operator cannot read is deployed as it is, a model that fails to load is reported in
status with Triton's own message, and credentials reach the stages from Secrets.

What the message is: a real tritonserver (the nvidia-pytriton wheel's) is started on a repository whose
model fails to load; the tail of its log, cut as the kubelet cuts it for `terminationMessagePolicy:
FallbackToLogsOnError` (80 lines, 2048 bytes), is written as the stage pod's termination message.
No kubelet runs here: the test writes that Pod status, and says so.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.kube.apiserver import now_rfc3339
from tests.operator.conftest import NS, aiflow

MODEL = "my_captioner"
FAILURE = "weights not found at s3://team-models/my_captioner"
PVC_REPO = {"path": "/models", "persistentVolumeClaim": {"claimName": "team-models"}}


def triton_log_of_a_failing_model(tmp_path) -> str:
    """Run the real tritonserver on a repository whose one model raises at load; its log."""
    try:
        from aiflow.local.tritonserver import backend_directory, find_triton, free_ports, server_env
        install = find_triton()
    except Exception as exc:  # noqa: BLE001  (no bundled Triton here: say so)
        pytest.skip(f"needs the bundled tritonserver (nvidia-pytriton): {exc}")
    model = tmp_path / "repo" / MODEL
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        f'name: "{MODEL}"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "IMAGE" data_type: TYPE_STRING dims: [ -1 ] } ]\n'
        'output [ { name: "CAPTION" data_type: TYPE_STRING dims: [ -1 ] } ]\n')
    (model / "1" / "model.py").write_text(f"raise RuntimeError({FAILURE!r})\n")
    http, grpc, metrics = free_ports(3)
    # The rendered stage's own arguments, on loopback ports.
    from aiflow.render.manifests import CPU_ONLY_ARGS, EXIT_TIMEOUT_SECONDS

    cmd = [str(install.binary), f"--model-repository={model.parent}", "--model-control-mode=explicit",
           f"--load-model={MODEL}", f"--backend-directory={backend_directory(install)}",
           f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}",
           "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
           "--strict-readiness=true", "--exit-on-error=true", f"--exit-timeout-secs={EXIT_TIMEOUT_SECONDS}",
           *CPU_ONLY_ARGS]
    done = subprocess.run(cmd, env=server_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode != 0, "tritonserver should exit when its model fails to load"
    return done.stdout + done.stderr


def kubelet_termination_message(log: str) -> str:
    """FallbackToLogsOnError: the last 80 lines of the log, at most 2048 bytes."""
    return "\n".join(log.splitlines()[-80:])[-2048:]


def crashed_pod(cluster, deployment: str, message: str, name: str) -> None:
    """The stage's pod after Triton exited, as the kubelet reports it (written by the test)."""
    template = cluster.api.get("deployments", deployment, NS)["spec"]["template"]
    cluster.api.create({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": name, "namespace": NS, "labels": template["metadata"]["labels"]},
                        "spec": template["spec"]})
    stamp = now_rfc3339()
    cluster.api.patch("pods", name, {"status": {"phase": "Running", "containerStatuses": [{
        "name": "triton", "ready": False, "restartCount": 3, "image": template["spec"]["containers"][0]["image"],
        "imageID": "", "started": False,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": message,
                                     "startedAt": stamp, "finishedAt": stamp}}}]}}, NS, subresource="status")


def test_a_model_of_its_own_repository_that_fails_to_load_is_reported_with_tritons_message(cluster, tmp_path):
    message = kubelet_termination_message(triton_log_of_a_failing_model(tmp_path))
    assert FAILURE in message  # what the kubelet keeps does carry Triton's reason
    # A model the bundled repository does not have, from a volume the operator cannot read.
    cluster.api.create(aiflow("byo", {"name": "only", "model": MODEL, "tier": "cloud", "env": [
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "team-models", "key": "secret"}}}]},
        triton={"modelRepository": PVC_REPO}))
    cluster.wait(lambda: cluster.children("byo"), message="the stage deployed, not refused")
    cluster.wait_condition("byo", "SpecValid", "True")  # written after the objects, in the same reconcile
    (deployment,) = cluster.children("byo").values()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": "team-models", "key": "secret"}}} in container["env"]
    crashed_pod(cluster, deployment["metadata"]["name"], message, "byo-only-5c7d-abcde")
    # The operator hears of it at its next reconcile (the resync, or here a touch of the flow).
    cluster.api.patch("aiflows", "byo", {"metadata": {"annotations": {"example.com/touch": "1"}}}, NS)
    failed = cluster.wait_condition("byo", "ModelsLoaded", "False", "ModelLoadFailed")
    assert failed["message"].startswith(f"stage only: model {MODEL} did not load (pod byo-only-5c7d-abcde): ")
    assert FAILURE in failed["message"] and "At:" not in failed["message"]  # the reason, not the traceback
    (event,) = cluster.wait(lambda: cluster.events("ModelLoadFailed"), message="a Warning Event")
    assert event["type"] == "Warning" and FAILURE in event["message"]
    assert cluster.condition("byo", "Ready")["status"] == "False"


def test_a_flow_on_the_bundled_repository_is_still_checked_against_its_models(cluster):
    cluster.api.create(aiflow("bundled", {"name": "only", "model": MODEL, "tier": "cloud"}))
    invalid = cluster.wait_condition("bundled", "SpecValid", "False", "InvalidSpec")
    assert f"unknown model {MODEL!r}" in invalid["message"]
    assert cluster.children("bundled") == {}
