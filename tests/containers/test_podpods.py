"""The pod-to-podman translation, field by field (no container engine needed)."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from aiflow.api.cluster import ClusterView
from aiflow.api.spec import parse_flow
from aiflow.planner.placement import resolve_placement
from aiflow.render.manifests import TRITON_UID, render
from tests.containers.podpods import REPO, HarnessError, named_port, pod_run_args, selects, service_names


@pytest.fixture(scope="module")
def objects():
    doc = yaml.safe_load((REPO / "examples" / "captioning.yaml").read_text())
    flow = parse_flow(doc)
    return render(flow, resolve_placement(flow, ClusterView.every_tier()))


def head(objects):
    return copy.deepcopy(next(o for o in objects if o["kind"] == "Deployment"))


def pairs(args):
    return list(zip(args, args[1:]))


def test_the_stage_pod_runs_as_written(objects):
    d = head(objects)
    c = d["spec"]["template"]["spec"]["containers"][0]
    args = pod_run_args(d, "p", "net", ["captioning-head"])
    assert ("--user", f"{TRITON_UID}:{TRITON_UID}") in pairs(args)
    assert ("--group-add", str(TRITON_UID)) in pairs(args)
    # Read-only root, and no writable tmpfs of podman's own: only the pod's emptyDirs.
    assert "--read-only" in args and "--read-only-tmpfs=false" in args
    mounts = [b for a, b in pairs(args) if a == "--mount"]
    assert mounts == ["type=tmpfs,destination=/tmp,tmpfs-mode=0777",
                      f"type=tmpfs,destination=/dev/shm,tmpfs-mode=0777,tmpfs-size={2**30}"]
    assert ("--cap-drop", "ALL") in pairs(args) and ("--security-opt", "no-new-privileges") in pairs(args)
    assert ("--memory", str(2 * 2**30)) in pairs(args)
    assert ("--entrypoint", json.dumps(c["command"])) in pairs(args)
    image_at = args.index(c["image"])
    assert args[image_at + 1:] == c["args"]
    envs = [b for a, b in pairs(args) if a == "--env"]
    assert envs == [f"{e['name']}={e['value']}" for e in c["env"]]
    assert [b for a, b in pairs(args) if a == "--publish"] == \
        [f"127.0.0.1::{p['containerPort']}/tcp" for p in c["ports"]]
    assert ("--network-alias", "captioning-head") in pairs(args)


def test_services_select_their_stage_and_carry_every_cluster_name(objects):
    services = [o for o in objects if o["kind"] == "Service"]
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    for s, d in zip(services, deployments):
        assert [x["metadata"]["name"] for x in deployments if selects(s, x)] == [d["metadata"]["name"]]
    assert service_names(services[1]) == ["captioning-drafter", "captioning-drafter.default",
                                          "captioning-drafter.default.svc",
                                          "captioning-drafter.default.svc.cluster.local"]


@pytest.mark.parametrize("mutate, says", [
    (lambda pod: pod["securityContext"].update(runAsUser=0), "runAsNonRoot"),
    (lambda pod: pod["volumes"].append({"name": "x", "persistentVolumeClaim": {"claimName": "c"}})
     or pod["containers"][0]["volumeMounts"].append({"name": "x", "mountPath": "/x"}), "not emulated"),
    (lambda pod: pod["containers"][0]["env"].append({"name": "S", "valueFrom": {}}), "valueFrom"),
    (lambda pod: pod["containers"].append(dict(pod["containers"][0])), "exactly one container"),
])
def test_what_cannot_be_emulated_is_an_error(objects, mutate, says):
    d = head(objects)
    mutate(d["spec"]["template"]["spec"])
    with pytest.raises(HarnessError, match=says):
        pod_run_args(d, "p", "net")


def test_named_ports_resolve_from_the_container_ports(objects):
    c = head(objects)["spec"]["template"]["spec"]["containers"][0]
    assert named_port(c, "http") == 8000 and named_port(c, 8009) == 8009
    with pytest.raises(HarnessError, match="no port named 'nope'"):
        named_port(c, "nope")
