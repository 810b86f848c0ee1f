"""A flow and its placement -> the Kubernetes objects that run it: per stage a Service and a
Deployment of Triton Inference Server, wired to the next stage through environment variables.

Pure and deterministic: the operator applies exactly what `aiflow render` prints.
"""

from __future__ import annotations

import hashlib
import json

from aiflow import GROUP, KIND, TIER_LABEL, VERSION
from aiflow.api.cluster import ClusterView
from aiflow.api.placement import Placement, StagePlacement
from aiflow.api.spec import Flow, Stage, ValueFrom
from aiflow.render.names import object_name, stage_labels, stage_selector
from aiflow.render.rollout import SURGE, rolling_update
from aiflow.serving import Serving, from_spec

HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
CONFIG_HASH_ANNOTATION = "aiflow.io/config-hash"
MODEL_ANNOTATION = "aiflow.io/model"
TIER_ANNOTATION = "aiflow.io/tier"
TRITON_UID = 1000  # the `triton-server` user of the NVIDIA Triton images and of the CPU stage image
CONTAINER = "triton"
MODEL_VOLUME = "model-repository"
# Triton waits this long for in-flight requests when told to stop; the kubelet's SIGKILL must come
# later, or draining races the kill.
EXIT_TIMEOUT_SECONDS = 30
TERMINATION_GRACE_SECONDS = EXIT_TIMEOUT_SECONDS + 15
# On a pod without a GPU: no GPU metrics (NVML/DCGM) and no pinned-memory pool (CUDA), whose
# failed probing Triton otherwise logs as errors at every start.
CPU_ONLY_ARGS = ("--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0")
STAGE_REPOSITORY = "/tmp/model_repo"  # the stage's own copy when its serving settings differ from the image's
QUEUE_METRIC = "aiflow_triton_queue_ms"  # mean queue time per request, served by prometheus-adapter
DEFAULT_TARGET_QUEUE_MS = 50.0


def render(flow: Flow, placement: Placement, cluster: ClusterView | None = None) -> list[dict]:
    """Every object the flow owns, in apply order: per stage its Service, its Deployment and, for a
    stage of more than one replica, its PodDisruptionBudget; then a HorizontalPodAutoscaler per
    stage with `autoscaling`. `cluster` (the tiers' nodes) decides each Deployment's rollout
    strategy (`rollout`); without it, make-before-break."""
    objects = []
    for i, stage in enumerate(flow.stages):
        successor = flow.stages[i + 1] if i + 1 < len(flow.stages) else None
        objects.append(render_service(flow, stage))
        deployment = render_deployment(flow, stage, placement.of(stage.name), successor,
                                       rolling_update(flow, placement, cluster, stage))
        objects.append(deployment)
        if (budget := disruption_budget(deployment)) is not None:
            objects.append(budget)
    return objects + [render_autoscaler(flow, s, object_name(flow.name, s.name)) for s in flow.stages if s.autoscaling]


def stage_serving(stage: Stage) -> Serving:
    """The stage's serving settings: its `serving` fields over the defaults of its CPU request."""
    return from_spec(stage.serving, (stage.resources.get("requests") or {}).get("cpu"))


def own_repository(stage: Stage) -> bool:
    """Whether the stage serves its own copy of its model, its serving settings in the config
    (Triton reads instances and batching from there; the image's repository is read-only)."""
    return stage_serving(stage) != Serving()


def render_autoscaler(flow: Flow, stage: Stage, deployment: str) -> dict:
    """A HorizontalPodAutoscaler (autoscaling/v2) on the stage's mean Triton queue time per request,
    a Pods metric of the custom metrics API (prometheus-adapter: docs/operating.md)."""
    a = stage.autoscaling or {}
    target = float(a.get("targetQueueMilliseconds", DEFAULT_TARGET_QUEUE_MS))
    meta = _metadata(flow, stage)
    meta["name"] = deployment
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment},
            "minReplicas": int(a.get("minReplicas", stage.replicas)),
            "maxReplicas": int(a["maxReplicas"]),
            "metrics": [{
                "type": "Pods",
                "pods": {
                    "metric": {"name": QUEUE_METRIC},
                    "target": {"type": "AverageValue", "averageValue": f"{round(target * 1000)}m"},
                },
            }],
        },
    }


def service_endpoint(flow: Flow, stage: Stage) -> str:
    """The gRPC address of a stage inside the cluster: `<service>.<namespace>.svc:8001`."""
    return f"{object_name(flow.name, stage.name)}.{flow.namespace}.svc:{GRPC_PORT}"


def owner_references(flow: Flow) -> list[dict]:
    """The flow as controller owner, so that deleting it deletes its objects (garbage collection).
    Empty when the flow has no uid yet (offline rendering of a manifest never applied)."""
    if not flow.uid:
        return []
    return [{
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": flow.name,
        "uid": flow.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }]


def _metadata(flow: Flow, stage: Stage, annotations: dict | None = None) -> dict:
    meta = {
        "name": object_name(flow.name, stage.name),
        "namespace": flow.namespace,
        "labels": stage_labels(flow.name, stage.name),
    }
    if annotations:
        meta["annotations"] = annotations
    refs = owner_references(flow)
    if refs:
        meta["ownerReferences"] = refs
    return meta


def render_service(flow: Flow, stage: Stage) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(flow, stage),
        "spec": {
            "type": "ClusterIP",
            "selector": stage_selector(flow.name, stage.name),
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def stage_env(flow: Flow, stage: Stage, placed: StagePlacement, successor: Stage | None) -> list[dict]:
    """The stage's environment: identity, the next stage's address, partition knobs, user env."""
    env = {
        "AIFLOW_FLOW": flow.name,
        "AIFLOW_STAGE": stage.name,
        "AIFLOW_TIER": placed.tier,
    }
    if successor is not None:
        env["AIFLOW_NEXT_URL"] = service_endpoint(flow, successor)
        env["AIFLOW_NEXT_MODEL"] = successor.model
    env.update(placed.parameters.as_env())
    if own_repository(stage):
        env.update(stage_serving(stage).knobs())
    # The root filesystem is read-only: caches of Python libraries go to the writable /tmp.
    env["HOME"] = "/tmp"
    env.update(dict(stage.env))
    return [{"name": k, "valueFrom": v.as_dict()} if isinstance(v, ValueFrom) else {"name": k, "value": v}
            for k, v in env.items()]


def _probe(path: str, period: int, failures: int) -> dict:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _volumes(flow: Flow) -> tuple[list[dict], list[dict]]:
    """The pod's volumes and the container's mounts of them: writable scratch for Triton and the
    Python backend (the root filesystem is read-only), and the model repository when it is a claim."""
    repo = flow.triton.model_repository
    mounts = [
        {"name": "tmp", "mountPath": "/tmp"},  # Triton and the Python backend write here
        {"name": "shm", "mountPath": "/dev/shm"},  # Python backend tensors travel via shared memory
    ]
    volumes = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
    ]
    if repo.claim_name:
        mount = {"name": MODEL_VOLUME, "mountPath": repo.path, "readOnly": True}
        if repo.sub_path:
            mount["subPath"] = repo.sub_path
        mounts.append(mount)
        volumes.append({"name": MODEL_VOLUME, "persistentVolumeClaim": {"claimName": repo.claim_name, "readOnly": True}})
    return mounts, volumes


def triton_args(flow: Flow, stage: Stage) -> list[str]:
    """The tritonserver command line: the one model of the stage, explicit ports, ready only when it loaded."""
    return [
        f"--model-repository={STAGE_REPOSITORY if own_repository(stage) else flow.triton.model_repository.path}",
        "--model-control-mode=explicit",
        f"--load-model={stage.model}",
        f"--http-port={HTTP_PORT}",
        f"--grpc-port={GRPC_PORT}",
        f"--metrics-port={METRICS_PORT}",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--exit-timeout-secs={EXIT_TIMEOUT_SECONDS}",
        *(() if uses_gpu(stage) else CPU_ONLY_ARGS),
    ]


def uses_gpu(stage: Stage) -> bool:
    """Whether the stage's pod asks for a GPU (an extended resource such as nvidia.com/gpu)."""
    return any("gpu" in name for part in ("limits", "requests") for name in stage.resources.get(part) or {})


def _probes() -> dict:
    # Loading a model (Python backend, torch) can take minutes: the startup probe holds the
    # liveness probe off until Triton is live.
    return {
        "startupProbe": _probe("/v2/health/live", 5, 120),
        "livenessProbe": _probe("/v2/health/live", 10, 3),
        "readinessProbe": _probe("/v2/health/ready", 5, 3),
    }


def _container_security() -> dict:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": TRITON_UID,
        "runAsGroup": TRITON_UID,
        "fsGroup": TRITON_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container(flow: Flow, stage: Stage, placed: StagePlacement, successor: Stage | None, mounts: list[dict]) -> dict:
    return {
        "name": CONTAINER,
        "image": flow.triton.image_for(stage, placed.tier),
        "imagePullPolicy": flow.triton.image_pull_policy,
        "command": ["tritonserver"],
        "args": triton_args(flow, stage),
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "env": stage_env(flow, stage, placed, successor),
        "resources": stage.resources,
        # When Triton exits (a model that fails to load), the tail of its log becomes the container's
        # termination message, which the operator reports in the flow's status.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        **_probes(),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }


def _scheduling(placed: StagePlacement) -> dict:
    """Onto the tier's nodes, tolerating the tier's taint."""
    return {
        "nodeSelector": {TIER_LABEL: placed.tier},
        "tolerations": [{"key": TIER_LABEL, "operator": "Equal", "value": placed.tier, "effect": "NoSchedule"}],
    }


def render_pod_spec(flow: Flow, stage: Stage, placed: StagePlacement, successor: Stage | None) -> dict:
    mounts, volumes = _volumes(flow)
    container = _container(flow, stage, placed, successor, mounts)
    pod = {
        **_scheduling(placed),
        "securityContext": _pod_security(),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "containers": [container],
        "volumes": volumes,
    }
    if own_repository(stage):
        pod["initContainers"] = [serving_config_container(flow, stage, container, mounts)]
    return pod


def serving_config_container(flow: Flow, stage: Stage, container: dict, mounts: list[dict]) -> dict:
    """The init container that writes the stage's model, with its serving settings in its
    config.pbtxt, to the pod's /tmp (`aiflow.local.repository`): Triton then serves that copy."""
    return {
        "name": "serving-config",
        "image": container["image"],
        "imagePullPolicy": container["imagePullPolicy"],
        "command": ["python3", "-m", "aiflow.local.repository", f"--source={flow.triton.model_repository.path}",
                    f"--model={stage.model}", f"--dest={STAGE_REPOSITORY}"],
        "env": [e for e in container["env"] if e["name"].startswith("AIFLOW_") or e["name"] == "HOME"],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": container["securityContext"],
        "volumeMounts": [m for m in mounts if m["name"] in ("tmp", MODEL_VOLUME)],
    }


def config_hash(pod_spec: dict) -> str:
    return hashlib.sha256(json.dumps(pod_spec, sort_keys=True).encode()).hexdigest()[:16]


def render_deployment(flow: Flow, stage: Stage, placed: StagePlacement, successor: Stage | None,
                      strategy: dict | None = None) -> dict:
    """The stage's Deployment; `strategy` defaults to make-before-break (a new pod is ready before
    an old one goes), which needs room for one more pod on the tier (see `rollout`)."""
    pod_spec = render_pod_spec(flow, stage, placed, successor)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(flow, stage, {MODEL_ANNOTATION: stage.model, TIER_ANNOTATION: placed.tier}),
        "spec": {
            **({} if stage.autoscaling else {"replicas": stage.replicas}),  # with autoscaling, the HPA sets them
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": stage_selector(flow.name, stage.name)},
            "strategy": strategy or {"type": "RollingUpdate", "rollingUpdate": dict(SURGE)},
            "template": {
                "metadata": {
                    "labels": stage_labels(flow.name, stage.name),
                    "annotations": {CONFIG_HASH_ANNOTATION: config_hash(pod_spec)},
                },
                "spec": pod_spec,
            },
        },
    }


def disruption_budget(deployment: dict) -> dict | None:
    """A PodDisruptionBudget that lets a drain or an eviction take at most one of the Deployment's
    pods at a time; None for a single replica (a budget would block every drain of its node)."""
    if int(deployment["spec"].get("replicas", 1)) <= 1:
        return None
    meta = deployment["metadata"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {k: meta[k] for k in ("name", "namespace", "labels", "ownerReferences") if k in meta},
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": dict(deployment["spec"]["selector"]["matchLabels"])},
        },
    }
