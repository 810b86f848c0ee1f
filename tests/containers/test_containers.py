"""The images the project builds, run as the rendered pods and the chart say.

`aiflow render -f examples/captioning.yaml` writes the Deployments and Services; every stage runs as
a podman container exactly as its pod spec says (tests/containers/podpods.py), the Service names
resolve on the containers' network, each pod must pass its own startup and readiness probes, and
held-out scenes captioned through the chain must read exactly as the local runtime's captions for
the same chain and knobs. Mutated pod specs show that the run fails where a real cluster would: a
model repository the pod's uid cannot read, a wrong probe path or port, a next-stage address that
does not resolve. The operator image runs `aiflow operator --help` and `aiflow validate` as the
chart's non-root user with a read-only root.

Needs root, podman and the images of `make images`; skips with the reason otherwise, unless
AIFLOW_REQUIRE_CONTAINERS=1 (CI), where a missing prerequisite fails.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess

import pytest

from tests.containers import podpods
from tests.containers.podpods import HarnessError, PodmanFlow

pytestmark = [pytest.mark.containers, pytest.mark.timeout(1200)]

EXAMPLE = podpods.REPO / "examples" / "captioning.yaml"
READY_TIMEOUT_S = 420  # 2 busy cores, three torch stages loading at once
BROKEN_TIMEOUT_S = 75  # a healthy head stage is ready in ~15-30 s here
SCENES = 4


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("AIFLOW_REQUIRE_CONTAINERS") == "1":
        pytest.fail(f"AIFLOW_REQUIRE_CONTAINERS=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def images():
    from aiflow.api.images import CPU_STAGE_IMAGE
    from tests.chart.rendering import CHART_DIR
    import yaml

    require(shutil.which("podman") is not None, "podman is not installed (images/build.sh deps)")
    require(os.geteuid() == 0, "the container test runs rootful podman: run as root")
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    app = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["appVersion"]
    operator = f"{values['image']['repository']}:{values['image']['tag'] or app}"
    for image in (CPU_STAGE_IMAGE, operator):
        found = podpods.podman("image", "exists", image, check=False).returncode == 0
        require(found, f"image {image} is not built: run `make images`")
    podpods.cleanup_leftovers()
    return {"stage": CPU_STAGE_IMAGE, "operator": operator}


@pytest.fixture(scope="module")
def rendered(images):
    # No GPU here: the cloud tier runs the CPU stage image too, as on a CPU-only cluster
    # (chart value stageImages.tiers.cloud=cpu). Device and edge get it by default.
    objects = podpods.render_flow(EXAMPLE, f"--stage-image=cloud={images['stage']}")
    assert {c["image"] for d in objects if d["kind"] == "Deployment"
            for c in d["spec"]["template"]["spec"]["containers"]} == {images["stage"]}
    return objects


@pytest.fixture(scope="module")
def scenes():
    return podpods.heldout_scenes(SCENES)


@pytest.fixture(scope="module")
def container_captions(rendered, scenes):
    """The captions of the rendered flow running in containers, and how long each pod took to be ready."""
    with PodmanFlow(rendered) as flow:
        ready = flow.wait_ready(READY_TIMEOUT_S)
        entry = flow.entry()
        scheme = podpods.chain_of(rendered)
        results = podpods.caption(f"127.0.0.1:{entry.host_port('grpc')}", scheme.entry.model, scenes)
        users = {p.name: podpods.podman("exec", p.name, "id", "-u").stdout.strip() for p in flow.pods}
        # The root filesystem really is read-only for the stage's uid.
        ro = podpods.podman("exec", flow.pods[0].name, "sh", "-c", "touch /opt/aiflow/x", check=False)
    return {"results": results, "ready": ready, "users": users, "ro": ro, "scheme": scheme}


def test_rendered_flow_in_containers_captions_exactly_like_the_local_runtime(container_captions, rendered, scenes, local_runtime):
    from aiflow.local.client import caption_images
    from aiflow.local.schemes import RunningFlow, wiring

    scheme = container_captions["scheme"]
    assert [p.model for p in scheme.chain] == ["vision_head", "caption_drafter", "caption_verifier"]
    flow = RunningFlow.of(local_runtime)
    flow.apply(wiring(scheme))
    local = [r.caption for r in caption_images(flow, scheme, scenes)]
    got = [text for text, _ in container_captions["results"]]
    assert got == local and all(got)
    # Every request went through the three containers, each on its tier, as the pods' env says.
    for _, hops in container_captions["results"]:
        assert [(h["tier"], h["model"]) for h in hops] == [(p.tier, p.model) for p in scheme.chain]


def test_stages_ran_as_the_pod_uid_with_a_read_only_root(container_captions, rendered):
    from aiflow.render.manifests import TRITON_UID

    assert set(container_captions["users"].values()) == {str(TRITON_UID)}
    assert container_captions["ro"].returncode != 0
    assert "Read-only file system" in container_captions["ro"].stderr
    assert len(container_captions["ready"]) == sum(1 for o in rendered if o["kind"] == "Deployment")


# ---- the same pods, broken the ways a cluster would break them -------------------------------------


def head_only(rendered: list[dict]) -> list[dict]:
    """The first stage's Deployment and Service, to break one thing at a time cheaply."""
    first = next(o for o in rendered if o["kind"] == "Deployment")
    services = [o for o in rendered if o["kind"] == "Service" and podpods.selects(o, first)]
    return copy.deepcopy([*services, first])


def container(objects: list[dict]) -> dict:
    return next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module")
def unreadable_repo(tmp_path_factory):
    """A copy of model_repo/ only root can read, standing in for an image whose repository the pod's
    uid cannot read."""
    path = tmp_path_factory.mktemp("unreadable") / "model_repo"
    shutil.copytree(podpods.REPO / "model_repo", path)
    os.chown(path, 0, 0)
    os.chmod(path, 0o700)
    return path


def run_broken(objects: list[dict], extra_mount: str | None = None) -> None:
    """Start `objects` and wait for readiness (HarnessError when the pod never gets ready)."""
    with PodmanFlow(objects, extra_args=("--mount", extra_mount) if extra_mount else ()) as flow:
        flow.wait_ready(BROKEN_TIMEOUT_S)


def test_a_model_repository_the_pod_uid_cannot_read_fails(rendered, unreadable_repo):
    objects = head_only(rendered)
    repo = next(a.split("=", 1)[1] for a in container(objects)["args"] if a.startswith("--model-repository="))
    with pytest.raises(HarnessError, match="exited before it was ready|not ready"):
        run_broken(objects, extra_mount=f"type=bind,source={unreadable_repo},destination={repo},ro=true")


@pytest.mark.parametrize("field, value", [("path", "/v2/health/nowhere"), ("port", 8009), ("port", "nope")])
def test_a_wrong_probe_path_or_port_never_gets_ready(rendered, field, value):
    objects = head_only(rendered)
    container(objects)["readinessProbe"]["httpGet"][field] = value
    with pytest.raises(HarnessError, match="readinessProbe|no port named"):
        run_broken(objects)


def test_a_next_stage_address_that_does_not_resolve_fails_the_request(rendered, scenes):
    from aiflow.local.client import CaptionError

    objects = head_only(rendered)
    env = container(objects)["env"]
    (var,) = [e for e in env if e["name"] == "AIFLOW_NEXT_URL"]
    var["value"] = var["value"].replace("captioning-drafter", "captioning-nowhere")
    with PodmanFlow(objects) as flow:
        flow.wait_ready(READY_TIMEOUT_S)
        url = f"127.0.0.1:{flow.entry().host_port('grpc')}"
        with pytest.raises(CaptionError, match="captioning-nowhere"):
            podpods.caption(url, "vision_head", scenes[:1], timeout_s=60)


def test_the_real_next_stage_name_resolves_on_the_network(rendered):
    """What the chain test relies on, shown directly: every AIFLOW_NEXT_URL host resolves from the
    previous stage's container to the next stage's address."""
    with PodmanFlow(rendered) as flow:
        by_deployment = {p.deployment["metadata"]["name"]: p for p in flow.pods}
        for pod in flow.pods:
            env = {e["name"]: e["value"] for e in pod.container["env"]}
            if "AIFLOW_NEXT_URL" not in env:
                continue
            host = env["AIFLOW_NEXT_URL"].rsplit(":", 1)[0]
            out = podpods.podman("exec", pod.name, "python3", "-c",
                                 f"import socket; print(socket.gethostbyname({host!r}))").stdout.strip()
            target = by_deployment[host.split(".")[0]]
            assert out == target.address


# ---- the operator image -----------------------------------------------------------------------------


def operator_run(images, *args: str) -> subprocess.CompletedProcess:
    """The operator container as the chart's Deployment runs it, with other arguments."""
    from tests.chart.rendering import CHART_DIR, render
    import helm_python

    chart = helm_python.Chart.load(str(CHART_DIR))
    deployment = copy.deepcopy(render(chart, {}).one("Deployment"))
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == images["operator"]
    c["args"] = list(args)
    name = f"aiflow-ct-operator-{os.getpid()}"
    c["ports"] = []  # nothing to publish: the container only prints
    run = podpods.pod_run_args(deployment, name, "none", extra=(
        "--rm", "--mount", f"type=bind,source={EXAMPLE},destination=/flows/captioning.yaml,ro=true"))
    return podpods.podman("run", *[a for a in run if a != "-d"], check=False, timeout=180)


def test_operator_image_runs_the_cli_as_the_chart_user_with_a_read_only_root(images):
    out = operator_run(images, "operator", "--help")
    assert out.returncode == 0, out.stderr
    assert "--stage-image" in out.stdout and "--all-namespaces" in out.stdout
    out = operator_run(images, "validate", "-f", "/flows/captioning.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "AIFlow captioning: OK" in out.stdout
