"""render(flow, placement): the Services and Deployments of a flow."""

import dataclasses

import kubernetes_validate
import pytest

from aiflow.api.cluster import ClusterView
from aiflow.api.spec import parse_flow
from aiflow.planner.placement import resolve_placement
from aiflow.render.manifests import CONFIG_HASH_ANNOTATION, render
from aiflow.render.names import bounded, object_name


def manifest(**spec):
    base = {
        "stages": [
            {"name": "head", "model": "vision_head", "tier": "device", "parameters": {"splitLayer": 4, "codec": "int8+zstd"}},
            {"name": "drafter", "model": "caption_drafter", "tier": "edge", "env": [{"name": "LOG", "value": "1"}]},
            {"name": "verifier", "model": "caption_verifier", "tier": "cloud", "replicas": 2,
             "parameters": {"decoding": "speculative"}},
        ],
    }
    base.update(spec)
    return {"apiVersion": "aiflow.io/v1alpha1", "kind": "AIFlow",
            "metadata": {"name": "captioning", "namespace": "team", "uid": "uid-1", "generation": 1}, "spec": base}


def rendered(doc=None):
    flow = parse_flow(doc or manifest())
    return render(flow, resolve_placement(flow, ClusterView.every_tier()))


def by_kind(objects, kind):
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(deployment):
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env(deployment):
    return {e["name"]: e["value"] for e in container(deployment)["env"]}


def test_one_service_and_one_deployment_per_stage_in_flow_order():
    objects = rendered()
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("Service", "captioning-head"), ("Deployment", "captioning-head"),
        ("Service", "captioning-drafter"), ("Deployment", "captioning-drafter"),
        ("Service", "captioning-verifier"), ("Deployment", "captioning-verifier"),
        ("PodDisruptionBudget", "captioning-verifier"),  # the only stage of more than one replica
    ]
    assert all(o["metadata"]["namespace"] == "team" for o in objects)


def test_rendering_is_deterministic():
    assert rendered() == rendered()


@pytest.mark.parametrize("index", range(7))
def test_every_object_is_a_valid_kubernetes_object(index):
    kubernetes_validate.validate(rendered()[index], "1.32", strict=True)


def test_labels_owner_and_selectors():
    for obj in rendered():
        meta = obj["metadata"]
        stage = meta["name"].removeprefix("captioning-")
        assert meta["labels"] == {
            "app.kubernetes.io/name": "aiflow-stage", "app.kubernetes.io/instance": "captioning",
            "app.kubernetes.io/component": stage, "app.kubernetes.io/part-of": "aiflow",
            "app.kubernetes.io/managed-by": "aiflow-operator", "aiflow.io/flow": "captioning", "aiflow.io/stage": stage,
        }
        assert meta["ownerReferences"] == [{"apiVersion": "aiflow.io/v1alpha1", "kind": "AIFlow", "name": "captioning",
                                            "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}]
    for name, dep in by_kind(rendered(), "Deployment").items():
        selector = dep["spec"]["selector"]["matchLabels"]
        assert selector == {"aiflow.io/flow": "captioning", "aiflow.io/stage": name.removeprefix("captioning-")}
        assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        assert by_kind(rendered(), "Service")[name]["spec"]["selector"] == selector


def test_no_owner_reference_without_a_uid():
    doc = manifest()
    del doc["metadata"]["uid"]
    assert all("ownerReferences" not in o["metadata"] for o in rendered(doc))


def test_triton_container_serves_the_stage_model_with_probes_and_ports():
    dep = by_kind(rendered(), "Deployment")["captioning-drafter"]
    c = container(dep)
    assert c["command"] == ["tritonserver"]
    assert "--model-control-mode=explicit" in c["args"] and "--load-model=caption_drafter" in c["args"]
    assert "--model-repository=/opt/aiflow/model_repo" in c["args"]
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("http", 8000), ("grpc", 8001), ("metrics", 8002)]
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    svc = by_kind(rendered(), "Service")["captioning-drafter"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
        ("http", 8000, "http"), ("grpc", 8001, "grpc"), ("metrics", 8002, "metrics")]


def test_pods_land_on_their_tier_and_run_locked_down():
    for name, dep in by_kind(rendered(), "Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        tier = {"captioning-head": "device", "captioning-drafter": "edge", "captioning-verifier": "cloud"}[name]
        assert pod["nodeSelector"] == {"aiflow.io/tier": tier}
        assert pod["tolerations"] == [{"key": "aiflow.io/tier", "operator": "Equal", "value": tier, "effect": "NoSchedule"}]
        assert pod["securityContext"]["runAsNonRoot"] is True
        sc = container(dep)["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"]: m["name"] for m in container(dep)["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]


def test_stages_are_wired_to_their_successor():
    deps = by_kind(rendered(), "Deployment")
    head, drafter, verifier = (env(deps[f"captioning-{s}"]) for s in ("head", "drafter", "verifier"))
    assert head["AIFLOW_NEXT_URL"] == "captioning-drafter.team.svc:8001"
    assert head["AIFLOW_NEXT_MODEL"] == "caption_drafter"
    assert drafter["AIFLOW_NEXT_URL"] == "captioning-verifier.team.svc:8001"
    assert drafter["AIFLOW_NEXT_MODEL"] == "caption_verifier"
    assert "AIFLOW_NEXT_URL" not in verifier and "AIFLOW_NEXT_MODEL" not in verifier
    assert (head["AIFLOW_FLOW"], head["AIFLOW_STAGE"], head["AIFLOW_TIER"]) == ("captioning", "head", "device")


def test_stage_knobs_and_user_env_reach_the_container():
    deps = by_kind(rendered(), "Deployment")
    head, drafter, verifier = (env(deps[f"captioning-{s}"]) for s in ("head", "drafter", "verifier"))
    assert (head["AIFLOW_SPLIT_LAYER"], head["AIFLOW_CODEC"]) == ("4", "int8+zstd")
    assert "AIFLOW_DECODING" not in head and "AIFLOW_SPLIT_LAYER" not in drafter
    assert verifier["AIFLOW_DECODING"] == "speculative"
    assert drafter["LOG"] == "1"
    assert deps["captioning-verifier"]["spec"]["replicas"] == 2


def test_model_repository_from_a_volume_claim_is_mounted_read_only():
    doc = manifest(triton={"image": "img:2", "modelRepository": {
        "path": "/models", "persistentVolumeClaim": {"claimName": "repo", "subPath": "v1"}}})
    dep = by_kind(rendered(doc), "Deployment")["captioning-head"]
    c = container(dep)
    assert c["image"] == "img:2" and "--model-repository=/models" in c["args"]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/models"]
    assert mount["readOnly"] is True and mount["subPath"] == "v1"
    (volume,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"] == {"claimName": "repo", "readOnly": True}


def test_config_hash_changes_with_the_stage_config_only():
    base = by_kind(rendered(), "Deployment")
    doc = manifest()
    doc["spec"]["stages"][1]["env"][0]["value"] = "2"
    changed = by_kind(rendered(doc), "Deployment")
    h = lambda d: d["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    assert h(changed["captioning-drafter"]) != h(base["captioning-drafter"])
    assert h(changed["captioning-head"]) == h(base["captioning-head"])


def test_auto_stages_render_on_their_resolved_tier():
    doc = manifest()
    for stage in doc["spec"]["stages"]:
        stage["tier"] = "auto"
    flow = parse_flow(doc)
    cluster = ClusterView.every_tier()
    cluster = dataclasses.replace(cluster, nodes=tuple(n for n in cluster.nodes if n.tier != "device"))
    deps = by_kind(render(flow, resolve_placement(flow, cluster)), "Deployment")
    assert deps["captioning-head"]["spec"]["template"]["spec"]["nodeSelector"] == {"aiflow.io/tier": "edge"}
    assert env(deps["captioning-head"])["AIFLOW_TIER"] == "edge"


def test_names_are_bounded_unique_and_valid():
    long_flow, long_stage = "f" * 63, "s" * 40
    name = object_name(long_flow, long_stage)
    assert len(name) <= 63 and name[0].isalpha()
    assert object_name(long_flow, long_stage + "x") != name
    assert object_name("9flow.v2", "a") == "af-9flow-v2-a"
    assert bounded("short") == "short"


def test_a_stage_of_several_replicas_gets_a_disruption_budget_owned_and_labelled_like_its_deployment():
    objects = rendered()
    (budget,) = by_kind(objects, "PodDisruptionBudget").values()
    dep = by_kind(objects, "Deployment")["captioning-verifier"]
    assert budget["spec"] == {"maxUnavailable": 1, "selector": dep["spec"]["selector"]}
    assert budget["metadata"]["labels"] == dep["metadata"]["labels"]
    assert budget["metadata"]["ownerReferences"] == dep["metadata"]["ownerReferences"]
    single = manifest()
    single["spec"]["stages"][2]["replicas"] = 1
    assert by_kind(rendered(single), "PodDisruptionBudget") == {}


def test_the_kubelet_waits_longer_than_triton_drains_and_cpu_pods_skip_gpu_probing():
    for dep in by_kind(rendered(), "Deployment").values():
        args = container(dep)["args"]
        (exit_timeout,) = [int(a.split("=")[1]) for a in args if a.startswith("--exit-timeout-secs=")]
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > exit_timeout
        assert "--allow-gpu-metrics=false" in args and "--pinned-memory-pool-byte-size=0" in args
    doc = manifest()
    doc["spec"]["stages"][2]["resources"] = {"limits": {"nvidia.com/gpu": 1}}
    args = container(by_kind(rendered(doc), "Deployment")["captioning-verifier"])["args"]
    assert "--allow-gpu-metrics=false" not in args and "--pinned-memory-pool-byte-size=0" not in args


def cluster_of(cloud_cpu: str, cloud_nodes: int = 1):
    from aiflow.api.cluster import NodeInfo

    nodes = [NodeInfo(f"{t}-1", t, allocatable={"cpu": "8", "memory": "32Gi"}) for t in ("device", "edge")]
    nodes += [NodeInfo(f"cloud-{i}", "cloud", allocatable={"cpu": cloud_cpu, "memory": "32Gi"})
              for i in range(cloud_nodes)]
    return ClusterView(tuple(nodes))


def strategy(cloud_cpu: str, cloud_nodes: int = 1, stage: str = "captioning-verifier"):
    doc = manifest()
    doc["spec"]["stages"][2]["resources"] = {"requests": {"cpu": "1", "memory": "1Gi"}}
    flow = parse_flow(doc)
    cluster = cluster_of(cloud_cpu, cloud_nodes)
    dep = by_kind(render(flow, resolve_placement(flow, cluster), cluster), "Deployment")[stage]
    return dep["spec"]["strategy"]["rollingUpdate"]


def test_the_rollout_surges_only_when_the_tier_has_room_for_one_more_pod():
    # Two replicas of cpu 1 fill a 2-CPU cloud node: a surge pod would stay Pending forever.
    assert strategy("2") == {"maxSurge": 0, "maxUnavailable": 1}
    assert strategy("3") == {"maxSurge": 1, "maxUnavailable": 0}
    assert strategy("1", cloud_nodes=3) == {"maxSurge": 1, "maxUnavailable": 0}  # one per node, a third node free
    assert strategy("1", cloud_nodes=2) == {"maxSurge": 0, "maxUnavailable": 1}
    assert strategy("2", stage="captioning-head") == {"maxSurge": 1, "maxUnavailable": 0}  # the device has room
    # Offline (no allocatable known): make-before-break, as before.
    assert by_kind(rendered(), "Deployment")["captioning-verifier"]["spec"]["strategy"]["rollingUpdate"] == {
        "maxSurge": 1, "maxUnavailable": 0}


def test_env_from_a_secret_or_configmap_key_reaches_the_container_as_a_reference():
    doc = manifest()
    doc["spec"]["stages"][2]["env"] = [
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "model-store", "key": "secret"}}},
        {"name": "AWS_REGION", "valueFrom": {"configMapKeyRef": {"name": "store", "key": "region", "optional": True}}},
        {"name": "EMPTY"},
    ]
    from aiflow.api.validate import validate_manifest

    assert validate_manifest(doc) == []
    dep = by_kind(rendered(doc), "Deployment")["captioning-verifier"]
    entries = {e["name"]: e for e in container(dep)["env"]}
    assert entries["AWS_SECRET_ACCESS_KEY"] == {"name": "AWS_SECRET_ACCESS_KEY",
                                                "valueFrom": {"secretKeyRef": {"name": "model-store", "key": "secret"}}}
    assert entries["AWS_REGION"]["valueFrom"] == {"configMapKeyRef": {"name": "store", "key": "region", "optional": True}}
    assert entries["EMPTY"] == {"name": "EMPTY", "value": ""}
    assert container(dep)["terminationMessagePolicy"] == "FallbackToLogsOnError"
    kubernetes_validate.validate(dep, "1.32", strict=True)


# ---- serving settings and autoscaling -----------------------------------------------------------------


def serving_manifest():
    doc = manifest()
    drafter = doc["spec"]["stages"][1]
    drafter["serving"] = {"instances": 2, "maxBatchSize": 16, "maxQueueSize": 10, "threads": 2}
    drafter["autoscaling"] = {"maxReplicas": 5, "targetQueueMilliseconds": 25}
    return doc


def test_serving_settings_reach_the_stage_and_its_triton_config():
    deployments = by_kind(rendered(serving_manifest()), "Deployment")
    drafter = deployments["captioning-drafter"]
    pod = drafter["spec"]["template"]["spec"]
    e = env(drafter)
    assert (e["AIFLOW_INSTANCES"], e["AIFLOW_MAX_BATCH_SIZE"], e["AIFLOW_MAX_QUEUE_SIZE"], e["AIFLOW_THREADS"]) == ("2", "16", "10", "2")
    assert e["AIFLOW_FORWARD"] == "async"
    # Triton reads instances and batching from the config: an init container writes the stage's own copy.
    (init,) = pod["initContainers"]
    assert init["command"][:3] == ["python3", "-m", "aiflow.local.repository"]
    assert "--model=caption_drafter" in init["command"] and "--dest=/tmp/model_repo" in init["command"]
    assert {v["name"]: v["value"] for v in init["env"]}["AIFLOW_INSTANCES"] == "2"
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    assert "--model-repository=/tmp/model_repo" in container(drafter)["args"]
    # A stage on the defaults keeps the image's repository and no init container.
    head = deployments["captioning-head"]
    assert "initContainers" not in head["spec"]["template"]["spec"]
    assert "AIFLOW_INSTANCES" not in env(head)


def test_cpu_request_sets_the_default_instance_count():
    doc = manifest()
    doc["spec"]["stages"][2]["resources"] = {"requests": {"cpu": "2", "memory": "2Gi"}}
    verifier = by_kind(rendered(doc), "Deployment")["captioning-verifier"]
    assert env(verifier)["AIFLOW_INSTANCES"] == "2"


def test_autoscaling_renders_a_valid_hpa_on_queue_time_and_leaves_replicas_to_it():
    objects = rendered(serving_manifest())
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler").values()
    kubernetes_validate.validate(hpa, "1.32", strict=True)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "captioning-drafter"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 5)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "aiflow_triton_queue_ms"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "25000m"}
    deployments = by_kind(objects, "Deployment")
    assert "replicas" not in deployments["captioning-drafter"]["spec"]
    assert deployments["captioning-verifier"]["spec"]["replicas"] == 2
    for obj in objects:
        kubernetes_validate.validate(obj, "1.32", strict=True)
