"""What can be checked of the images and the kind path without a container engine or a cluster:
paths the Dockerfiles copy, pins and users, image names agreeing across chart, CRD and script, and a
kind cluster whose nodes can run the examples (labels and taints against the real renderer)."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aiflow import TIER_LABEL, TIERS
from aiflow.api.cluster import cluster_from_nodes
from aiflow.api.spec import parse_flow
from aiflow.api.validate import validate_manifest
from aiflow.planner.placement import resolve_placement
from aiflow.render.manifests import TRITON_UID, render
from tests.chart.rendering import CHART_DIR, REPO, load_yaml

DOCKERFILES = sorted((REPO / "images").glob("*.Dockerfile"))
OPERATOR_DOCKERFILE = REPO / "images" / "operator.Dockerfile"
STAGE_DOCKERFILE = REPO / "images" / "triton-stage.Dockerfile"
STAGE_CPU_DOCKERFILE = REPO / "images" / "triton-stage-cpu.Dockerfile"
BUILD_SCRIPT = REPO / "images" / "build.sh"
KIND_CONFIG = REPO / "kind-config.yaml"
KIND_SCRIPT = REPO / "scripts" / "kind-demo.sh"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def build_args(dockerfile: Path) -> dict[str, str]:
    return dict(arg.split("=", 1) for op, arg in instructions(dockerfile) if op == "ARG" and "=" in arg)


def dockerignore_allows(path: str) -> bool:
    """Evaluate the repository's .dockerignore (last matching rule wins) for a context path."""
    allowed = True
    for rule in (REPO / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if pattern == "**" or fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/") \
                or (pattern.startswith("**/") and fnmatch.fnmatch(Path(path).name, pattern[3:])):
            allowed = negate
    return allowed


def crd_default_model_repository() -> str:
    crd = load_yaml(REPO / "crds" / "aiflow.io_aiflows.yaml")[0]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    repo = spec["properties"]["triton"]["properties"]["modelRepository"]["properties"]["path"]
    return repo["default"]


def script_default(name: str, script: Path = KIND_SCRIPT) -> str:
    match = re.search(rf'^{name}="\$\{{{name}:-([^}}]+)\}}"', script.read_text(), re.M) or \
        re.search(rf'^{name}="([^"$]+)"', script.read_text(), re.M)
    assert match, f"{name} has no default in {script.name}"
    return match.group(1)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_path_a_dockerfile_copies_exists_and_reaches_the_build_context(dockerfile):
    copies = [arg for op, arg in instructions(dockerfile) if op in ("COPY", "ADD")]
    assert copies
    for arg in copies:
        words = [w for w in shlex.split(arg) if not w.startswith("--")]
        if "--from=" in arg:
            continue
        for source in words[:-1]:
            assert (REPO / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
            assert dockerignore_allows(source.rstrip("/")), f".dockerignore drops {source}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_and_the_user_is_not_root(dockerfile):
    args = build_args(dockerfile)
    for op, arg in instructions(dockerfile):
        if op == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], arg.split()[0])
            if image in {a.split()[-1] for o, a in instructions(dockerfile) if o == "FROM" and " AS " in a.upper()}:
                continue  # a stage of this build
            assert ":" in image and not image.endswith((":latest", ":slim")), f"unpinned base {image}"
            assert re.search(r":\d", image), f"{image}: pin a version tag"
    users = [arg for op, arg in instructions(dockerfile) if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_operator_image_is_the_control_plane_only_and_runs_as_the_chart_user():
    text = OPERATOR_DOCKERFILE.read_text()
    assert "[flow]" not in text and "torch" not in re.sub(r"#.*", "", text)
    user = [arg for op, arg in instructions(OPERATOR_DOCKERFILE) if op == "USER"][-1]
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert user == f"{values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsGroup']}"
    env = " ".join(arg for op, arg in instructions(OPERATOR_DOCKERFILE) if op == "ENV")
    # The operator reads the CRD and the model configs from where the image puts them.
    for var, copied in (("AIFLOW_CRD", "/opt/aiflow/crds/aiflow.io_aiflows.yaml"),
                        ("AIFLOW_MODEL_REPO", "/opt/aiflow/model_repo")):
        assert f"{var}={copied}" in env
        assert any(arg.split()[-1].rstrip("/") == copied
                   for op, arg in instructions(OPERATOR_DOCKERFILE) if op == "COPY")


def test_stage_image_serves_the_crd_default_repository_as_the_renderer_uid():
    text = STAGE_DOCKERFILE.read_text()
    assert build_args(STAGE_DOCKERFILE)["TRITON_IMAGE"].startswith("nvcr.io/nvidia/tritonserver:")
    assert build_args(STAGE_DOCKERFILE)["TRITON_IMAGE"].endswith("-py3")
    assert '".[flow]"' in text and '"numpy<2"' in text
    repo = crd_default_model_repository()
    assert any(arg.split()[-1].rstrip("/") == repo
               for op, arg in instructions(STAGE_DOCKERFILE) if op == "COPY" and "model_repo" in arg)
    user = [arg for op, arg in instructions(STAGE_DOCKERFILE) if op == "USER"][-1]
    assert user == f"{TRITON_UID}:{TRITON_UID}"


def test_cpu_stage_image_runs_the_rendered_pod_unchanged():
    """The CPU image serves the CRD's default repository as the renderer's uid, with tritonserver on
    PATH and the Python backend where Triton looks by default (the rendered args name neither)."""
    text = STAGE_CPU_DOCKERFILE.read_text()
    assert '"/tmp/src[flow]"' in text and '"numpy<2"' in text and "libpython" in text
    repo = crd_default_model_repository()
    assert any(arg.split()[-1].rstrip("/") == repo
               for op, arg in instructions(STAGE_CPU_DOCKERFILE) if op == "COPY" and "model_repo" in arg)
    user = [arg for op, arg in instructions(STAGE_CPU_DOCKERFILE) if op == "USER"][-1]
    assert user == f"{TRITON_UID}:{TRITON_UID}"
    assert "/opt/tritonserver/backends/python" in text and "PATH=/opt/venv/bin:/opt/tritonserver/bin" in text


def test_image_names_agree_across_chart_api_scripts_and_dockerfiles():
    from aiflow.api.images import CPU_STAGE_IMAGE, DEFAULT_TIER_IMAGES, GPU_STAGE_IMAGE

    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    operator_image = f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"
    stage = {k: f"{v['repository']}:{v['tag'] or chart['appVersion']}" for k, v in values["stageImages"].items()
             if k in ("cpu", "gpu")}
    assert stage == {"cpu": CPU_STAGE_IMAGE, "gpu": GPU_STAGE_IMAGE}
    assert {t: stage[k] for t, k in values["stageImages"]["tiers"].items()} == DEFAULT_TIER_IMAGES
    assert script_default("OPERATOR_IMAGE") == operator_image
    assert script_default("DEFAULT_STAGE_CPU_IMAGE") == CPU_STAGE_IMAGE
    build = BUILD_SCRIPT.read_text()
    for name, image in (("OPERATOR_IMAGE", operator_image), ("STAGE_CPU_IMAGE", CPU_STAGE_IMAGE),
                        ("STAGE_IMAGE", GPU_STAGE_IMAGE)):
        assert script_default(name, BUILD_SCRIPT).replace("$VERSION", chart["appVersion"]) == image
    assert f"-t {operator_image}" in OPERATOR_DOCKERFILE.read_text()
    assert f"-t {GPU_STAGE_IMAGE}" in STAGE_DOCKERFILE.read_text()
    assert f"-t {CPU_STAGE_IMAGE}" in STAGE_CPU_DOCKERFILE.read_text()
    assert "images/build.sh" in KIND_SCRIPT.read_text() and "ENGINE=docker" in KIND_SCRIPT.read_text()
    assert 'version = "' + chart["appVersion"] + '"' in (REPO / "pyproject.toml").read_text() and build


def kind_nodes() -> list[dict]:
    """The kind cluster's workers as the Node objects the API server would show."""
    config = yaml.safe_load(KIND_CONFIG.read_text())
    nodes = []
    for i, node in enumerate(config["nodes"]):
        taints = []
        for patch in node.get("kubeadmConfigPatches", []):
            registration = yaml.safe_load(patch).get("nodeRegistration", {})
            taints += registration.get("taints", [])
        if node["role"] == "control-plane":
            taints.append({"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"})
        nodes.append({"metadata": {"name": f"aiflow-node-{i}", "labels": node.get("labels", {})},
                      "spec": {"taints": taints}})
    return nodes


def tolerates(tolerations: list[dict], taint: dict) -> bool:
    for t in tolerations:
        if t.get("effect") not in (None, "", taint["effect"]):
            continue
        if t.get("operator") == "Exists" and t.get("key") in (None, taint["key"]):
            return True
        if t.get("key") == taint["key"] and t.get("value") == taint.get("value"):
            return True
    return False


def schedulable(pod: dict, nodes: list[dict]) -> list[str]:
    """Nodes a pod fits by nodeSelector, required node affinity on label existence, and taints."""
    fits = []
    for node in nodes:
        labels = node["metadata"]["labels"]
        if any(labels.get(k) != v for k, v in (pod.get("nodeSelector") or {}).items()):
            continue
        if all(tolerates(pod.get("tolerations") or [], taint) for taint in node["spec"]["taints"]):
            fits.append(node["metadata"]["name"])
    return fits


def test_kind_cluster_has_a_worker_for_every_tier():
    tiers = [n["metadata"]["labels"].get(TIER_LABEL) for n in kind_nodes()]
    assert sorted(t for t in tiers if t) == sorted(TIERS)


# examples/ also holds cluster snapshots for `aiflow plan`; the flows are the files with an AIFlow.
EXAMPLE_FLOWS = sorted(p for p in (REPO / "examples").glob("*.yaml")
                       if any(d.get("kind") == "AIFlow" for d in load_yaml(p)))


def test_the_captioning_example_the_kind_demo_applies_exists():
    assert REPO / "examples" / "captioning.yaml" in EXAMPLE_FLOWS


@pytest.mark.parametrize("example", EXAMPLE_FLOWS, ids=lambda p: p.name)
def test_every_example_is_placed_and_schedulable_on_the_kind_cluster(example):
    nodes = kind_nodes()
    cluster = cluster_from_nodes(nodes)
    for doc in (d for d in load_yaml(example) if d.get("kind") == "AIFlow"):
        assert validate_manifest(doc, cluster=cluster) == []
        flow = parse_flow(doc, "default")
        for obj in render(flow, resolve_placement(flow, cluster)):
            if obj["kind"] == "Deployment":
                pod = obj["spec"]["template"]["spec"]
                assert schedulable(pod, nodes), f"{obj['metadata']['name']} fits no kind node"


def test_the_operator_and_link_probe_fit_the_kind_cluster(chart):
    from tests.chart.rendering import render as render_chart

    nodes = kind_nodes()
    rendered = render_chart(chart, {"linkProbe": {"enabled": True}})
    assert schedulable(rendered.one("Deployment")["spec"]["template"]["spec"], nodes)
    probe = rendered.one("DaemonSet", "link-probe")["spec"]["template"]["spec"]
    tier_nodes = [n for n in nodes if TIER_LABEL in n["metadata"]["labels"]]
    assert set(schedulable(probe, tier_nodes)) == {n["metadata"]["name"] for n in tier_nodes}


def test_make_targets_drive_the_kind_script():
    out = subprocess.run(["make", "-n", "kind-demo", "kind-down", "images"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "scripts/kind-demo.sh up" in out
    assert "scripts/kind-demo.sh down" in out
    assert "images/build.sh operator stage-cpu" in out


def test_kind_script_is_valid_bash_and_names_what_is_missing(tmp_path):
    subprocess.run(["bash", "-n", str(KIND_SCRIPT)], check=True)
    # On a PATH with only what the script itself needs to start, it stops at the first missing tool.
    for tool in ("bash", "dirname"):
        (tmp_path / tool).symlink_to(shutil.which(tool))
    result = subprocess.run([str(KIND_SCRIPT), "up"], capture_output=True, text=True,
                            env={"PATH": str(tmp_path)})
    assert result.returncode == 2
    assert "docker is not installed" in result.stderr and "docs/install.md" in result.stderr
    result = subprocess.run([str(KIND_SCRIPT), "sideways"], capture_output=True, text=True,
                            env={"PATH": str(tmp_path)})
    assert result.returncode == 2 and "use up, images or down" in result.stderr


def test_kind_script_forwards_the_stage_grpc_port():
    from aiflow.render.manifests import GRPC_PORT

    assert f'"$LOCAL_PORT:{GRPC_PORT}"' in KIND_SCRIPT.read_text()


def test_the_package_builds_from_the_image_build_context_without_the_data_plane(tmp_path):
    """The operator image's first step (`pip wheel --no-deps .` over what .dockerignore lets through)
    yields a wheel with the operator, the link probe and the bundled weights, whose base requirements
    hold no data-plane package: the operator image installs no torch, no Triton."""
    import email.parser
    import zipfile

    context = tmp_path / "context"

    def ignored(directory, names):
        return [n for n in names if not dockerignore_allows(str((Path(directory) / n).relative_to(REPO)))]

    for _, arg in [i for i in instructions(OPERATOR_DOCKERFILE) if i[0] == "COPY" and "--from=" not in i[1]]:
        for source in (s.rstrip("/") for s in shlex.split(arg)[:-1]):
            (context / source).parent.mkdir(parents=True, exist_ok=True)
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, context / source, ignore=ignored)
            else:
                shutil.copy(REPO / source, context / source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheels"), str(context)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheels").glob("aiflow-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = email.parser.Parser().parsestr(
            zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    for module in ("aiflow/cli/operator_cmds.py", "aiflow/controller/handlers.py", "aiflow/linkprobe.py",
                   "aiflow/model/weights/manifest.json"):
        assert module in names
    assert not any("__pycache__" in n for n in names)
    base = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert base and not any(r.split()[0].lower().startswith(("torch", "tritonclient", "nvidia-pytriton",
                                                              "transformers")) for r in base), base


def test_the_images_requirement_lists_are_the_package_requirements():
    """images/*-requirements.txt (installed before the project, for layer caching) say what
    pyproject.toml says: the base dependencies for the operator, plus the flow extra and the CPU torch
    pin for the stage image."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = project["dependencies"]
    flow = [r for r in project["optional-dependencies"]["flow"] if not r.startswith("torch")]

    def listed(name):
        return [line.strip() for line in (REPO / "images" / name).read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    assert listed("operator-requirements.txt") == base
    stage = listed("stage-requirements.txt")
    assert stage[0] == "torch==2.13.0" and set(stage[1:]) == set(base) | set(flow)
    assert 'TORCH_VERSION=2.13.0' in BUILD_SCRIPT.read_text()
    for name in ("operator-requirements.txt", "stage-requirements.txt"):
        assert dockerignore_allows(f"images/{name}")
