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
GRACE_S = 30  # a broken pod must still not be ready this long after a healthy one started with it was
SCENES = 4


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("AIFLOW_REQUIRE_CONTAINERS") == "1":
        pytest.fail(f"AIFLOW_REQUIRE_CONTAINERS=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def images():
    import yaml

    from aiflow.api.images import CPU_STAGE_IMAGE
    from tests.chart.rendering import CHART_DIR

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
        resolved = next_stage_addresses(flow)
    return {"results": results, "ready": ready, "users": users, "ro": ro, "scheme": scheme, "resolved": resolved}


def next_stage_addresses(flow: PodmanFlow) -> list[tuple[str, str, str]]:
    """(AIFLOW_NEXT_URL host, its address seen from the stage's container, the next pod's address)."""
    by_deployment = {p.deployment["metadata"]["name"]: p for p in flow.pods}
    out = []
    for pod in flow.pods:
        env = {e["name"]: e["value"] for e in pod.container["env"]}
        if "AIFLOW_NEXT_URL" in env:
            host = env["AIFLOW_NEXT_URL"].rsplit(":", 1)[0]
            seen = podpods.podman("exec", pod.name, "python3", "-c",
                                  f"import socket; print(socket.gethostbyname({host!r}))").stdout.strip()
            out.append((host, seen, by_deployment[host.split(".")[0]].address))
    return out


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


PROBE_CASES = {"probe-path": ("path", "/v2/health/nowhere"), "probe-port": ("port", 8009),
               "probe-port-name": ("port", "nope")}


@pytest.fixture(scope="module")
def broken(rendered, unreadable_repo, scenes):
    """The first stage, broken one way per pod, all started at once beside a control whose only change
    is a next-stage address that does not exist (it must get ready: the others had as long, and
    GRACE_S more). Returns what each run raised (None: nothing)."""
    from aiflow.local.client import CaptionError

    cases = {}
    for name, (key, value) in PROBE_CASES.items():
        objects = head_only(rendered)
        container(objects)["readinessProbe"]["httpGet"][key] = value
        cases[name] = (objects, ())
    objects = head_only(rendered)
    repo = next(a.split("=", 1)[1] for a in container(objects)["args"] if a.startswith("--model-repository="))
    cases["unreadable-repo"] = (objects, ("--mount", f"type=bind,source={unreadable_repo},destination={repo},ro=true"))
    objects = head_only(rendered)
    (var,) = [e for e in container(objects)["env"] if e["name"] == "AIFLOW_NEXT_URL"]
    var["value"] = var["value"].replace("captioning-drafter", "captioning-nowhere")
    cases["next-unresolved"] = (objects, ())

    flows: dict[str, PodmanFlow] = {}
    outcome: dict[str, BaseException | None] = {}
    try:
        for name, (objects, extra) in cases.items():
            flows[name] = PodmanFlow(objects, extra_args=extra).__enter__()
        control = flows["next-unresolved"]
        control.wait_ready(READY_TIMEOUT_S)
        try:
            podpods.caption(f"127.0.0.1:{control.entry().host_port('grpc')}", "vision_head", scenes[:1], timeout_s=60)
            outcome["next-unresolved"] = None
        except CaptionError as exc:
            outcome["next-unresolved"] = exc
        for name, flow in flows.items():
            if flow is not control:
                try:
                    flow.wait_ready(GRACE_S)
                    outcome[name] = None
                except HarnessError as exc:
                    outcome[name] = exc
    finally:
        for flow in flows.values():
            flow.stop()
    return outcome


def test_a_model_repository_the_pod_uid_cannot_read_fails(broken):
    error = broken["unreadable-repo"]
    assert isinstance(error, HarnessError), "the pod got ready"
    assert "exited before it was ready" in str(error) or "not ready" in str(error)


@pytest.mark.parametrize("case", PROBE_CASES)
def test_a_wrong_probe_path_or_port_never_gets_ready(broken, case):
    error = broken[case]
    assert isinstance(error, HarnessError), f"{case}: the pod got ready"
    assert "readinessProbe" in str(error) or "no port named" in str(error)


def test_a_next_stage_address_that_does_not_resolve_fails_the_request(broken):
    error = broken["next-unresolved"]
    assert error is not None and "captioning-nowhere" in str(error)


def test_every_next_stage_address_resolves_to_the_next_stage_pod(container_captions):
    """What the chain relies on, shown directly: each AIFLOW_NEXT_URL host (`<svc>.<ns>.svc`)
    resolves, from inside the stage's container, to the pod its Service selects."""
    resolved = container_captions["resolved"]
    assert len(resolved) == 2
    for host, seen, expected in resolved:
        assert host.endswith(".default.svc") and seen == expected, (host, seen, expected)


# ---- the operator image -----------------------------------------------------------------------------


def operator_run(images, *args: str) -> subprocess.CompletedProcess:
    """The operator container as the chart's Deployment runs it, with other arguments."""
    import helm_python

    from tests.chart.rendering import CHART_DIR, render

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
