"""Run rendered Kubernetes pods as podman containers, as a kubelet and cluster DNS would.

`pod_run_args` turns a Deployment's pod template into `podman run` arguments, field by field:
image, command, args, env, workingDir, runAsUser/runAsGroup/fsGroup, runAsNonRoot, a read-only
root filesystem, capabilities, privilege escalation, emptyDir volumes (as tmpfs, with their size
limits), memory/CPU limits and the declared ports (published on 127.0.0.1). A field it cannot
emulate is an error, never ignored. `PodmanFlow` runs every Deployment of a rendered flow on one
podman network where each Service's names (`<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc`,
`<svc>.<ns>.svc.cluster.local`) resolve to the pods it selects (aardvark-dns aliases; static
addresses and `--add-host` where the network has no DNS), then waits on each pod's own startup and
readiness probes, sent to the container's address on its network as the kubelet sends them to the
pod IP.

Run by hand (needs root, podman and the images of `make images`):
    .venv/bin/python -m tests.containers.podpods [-f examples/captioning.yaml] [--scenes 3]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LABEL = "io.aiflow.container-test"
# podman's default rlimits are refused on these machines (ENVIRONMENT.md): a host limit, not the pod's.
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
PODMAN_TIMEOUT_S = 120


class HarnessError(RuntimeError):
    """The pod spec cannot run as written (or the harness cannot emulate a field of it)."""


def podman_base() -> list[str]:
    """podman, with runc where installed: crun refuses hosts with hybrid cgroups."""
    runtime = os.environ.get("OCI_RUNTIME") or ("runc" if shutil.which("runc") else None)
    return ["podman"] + (["--runtime", runtime] if runtime else [])


def podman(*args: str, check: bool = True, timeout: float = PODMAN_TIMEOUT_S) -> subprocess.CompletedProcess:
    result = subprocess.run([*podman_base(), *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise HarnessError(f"podman {' '.join(args[:3])} ... failed: {result.stderr.strip()[-2000:]}")
    return result


# ---- quantities ------------------------------------------------------------------------------------

_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def memory_bytes(quantity: str | int) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?|k)?", str(quantity))
    if not m:
        raise HarnessError(f"memory quantity {quantity!r} not understood")
    return int(float(m.group(1)) * _SUFFIX.get(m.group(2) or "", 1))


def cpus(quantity: str | int | float) -> str:
    text = str(quantity)
    return str(int(text[:-1]) / 1000) if text.endswith("m") else text


# ---- pod template -> podman run --------------------------------------------------------------------


def _security(pod: Mapping, container: Mapping) -> dict:
    """The container's effective security context: pod-level fields, container-level over them."""
    merged = {k: v for k, v in (pod.get("securityContext") or {}).items()
              if k in ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile")}
    merged.update(container.get("securityContext") or {})
    return merged


def named_port(container: Mapping, port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    for p in container.get("ports") or ():
        if p.get("name") == port:
            return int(p["containerPort"])
    raise HarnessError(f"container {container.get('name')} has no port named {port!r}")


def pod_run_args(deployment: Mapping, name: str, network: str, aliases: Sequence[str] = (),
                 add_hosts: Mapping[str, str] | None = None, ip: str | None = None,
                 image_user: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """`podman run` arguments (after `run`) for one pod of `deployment`, named `name`; `extra` goes
    before the image (tests use it to break a pod on purpose)."""
    pod = deployment["spec"]["template"]["spec"]
    containers = pod.get("containers") or []
    if len(containers) != 1 or pod.get("initContainers"):
        raise HarnessError(f"{deployment['metadata']['name']}: the harness runs pods of exactly one container")
    (c,) = containers
    args = ["-d", "--name", name, "--label", f"{LABEL}={network}", "--pull", "never",
            "--network", network, *ULIMITS]
    for alias in aliases:
        args += ["--network-alias", alias]
    if ip:
        args += ["--ip", ip]
    for host, address in (add_hosts or {}).items():
        args += ["--add-host", f"{host}:{address}"]
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        raise HarnessError("host namespaces are not emulated")

    sec = _security(pod, c)
    uid, gid = sec.get("runAsUser"), sec.get("runAsGroup")
    if sec.get("runAsNonRoot"):
        effective = uid if uid is not None else (image_user or "").split(":")[0]
        if str(effective) in ("", "0", "root"):
            raise HarnessError(f"runAsNonRoot, but the container would run as {effective or 'the image default (root)'}")
    if uid is not None:
        args += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
    elif gid is not None:
        raise HarnessError("runAsGroup without runAsUser is not emulated")
    fs_group = (pod.get("securityContext") or {}).get("fsGroup")
    if fs_group is not None:
        args += ["--group-add", str(fs_group)]  # the kubelet adds fsGroup as a supplemental group
    if sec.get("readOnlyRootFilesystem"):
        # No tmpfs of podman's own on /tmp, /run, /var/tmp: only the pod's emptyDirs are writable.
        args += ["--read-only", "--read-only-tmpfs=false"]
    if sec.get("privileged"):
        raise HarnessError("privileged containers are not emulated")
    if sec.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    caps = sec.get("capabilities") or {}
    for cap in caps.get("drop") or ():
        args += ["--cap-drop", cap]
    for cap in caps.get("add") or ():
        args += ["--cap-add", cap]
    seccomp = (sec.get("seccompProfile") or {}).get("type", "RuntimeDefault")
    if seccomp == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    elif seccomp != "RuntimeDefault":
        raise HarnessError(f"seccompProfile {seccomp} is not emulated")

    volumes = {v["name"]: v for v in pod.get("volumes") or ()}
    for mount in c.get("volumeMounts") or ():
        volume = volumes.get(mount["name"])
        if volume is None:
            raise HarnessError(f"volumeMount {mount['name']} names no volume of the pod")
        if "emptyDir" not in volume or mount.get("subPath"):
            kind = next((k for k in volume if k != "name"), "?")
            raise HarnessError(f"volume {mount['name']} ({kind}) is not emulated: only emptyDir is")
        spec = volume["emptyDir"] or {}
        # An emptyDir is a fresh world-writable directory (0777), in memory or on the node's disk.
        opts = [f"type=tmpfs,destination={mount['mountPath']}", "tmpfs-mode=0777"]
        if spec.get("sizeLimit"):
            opts.append(f"tmpfs-size={memory_bytes(spec['sizeLimit'])}")
        if mount.get("readOnly"):
            opts.append("ro=true")
        args += ["--mount", ",".join(opts)]

    limits = (c.get("resources") or {}).get("limits") or {}
    if "memory" in limits:
        args += ["--memory", str(memory_bytes(limits["memory"]))]
    if "cpu" in limits:
        args += ["--cpus", cpus(limits["cpu"])]
    for var in c.get("env") or ():
        if "valueFrom" in var:
            raise HarnessError(f"env {var['name']}: valueFrom is not emulated")
        args += ["--env", f"{var['name']}={var.get('value', '')}"]
    for p in c.get("ports") or ():
        if p.get("hostPort"):
            raise HarnessError("hostPort is not emulated")
        args += ["--publish", f"127.0.0.1::{p['containerPort']}/{p.get('protocol', 'TCP').lower()}"]
    if c.get("workingDir"):
        args += ["--workdir", c["workingDir"]]
    if c.get("command"):
        args += ["--entrypoint", json.dumps(c["command"])]
    args += list(extra)
    args.append(c["image"])
    args += list(c.get("args") or ())
    return args


# ---- a rendered flow -------------------------------------------------------------------------------


def render_flow(flow_file: Path | str, *extra: str) -> list[dict]:
    """What `aiflow render -f FLOW` prints, parsed."""
    import yaml

    cli = Path(sys.executable).with_name("aiflow")
    out = subprocess.run([str(cli), "render", "-f", str(flow_file), *extra], capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0:
        raise HarnessError(f"aiflow render failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def selects(service: Mapping, deployment: Mapping) -> bool:
    selector = service["spec"].get("selector") or {}
    labels = deployment["spec"]["template"]["metadata"].get("labels") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def service_names(service: Mapping) -> list[str]:
    name, ns = service["metadata"]["name"], service["metadata"].get("namespace", "default")
    return [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]


def check_service_ports(service: Mapping, deployment: Mapping) -> None:
    """A DNS alias carries no port mapping: a Service port must be its target container port."""
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    for p in service["spec"].get("ports") or ():
        target = named_port(c, p.get("targetPort", p["port"]))
        if target != p["port"]:
            raise HarnessError(f"Service {service['metadata']['name']} maps port {p['port']} to {target}: not emulated")


@dataclass
class Pod:
    name: str  # the container's name
    deployment: dict
    address: str = ""  # on the flow's network (the pod IP)
    host_ports: dict[int, int] = field(default_factory=dict)  # containerPort -> 127.0.0.1 port

    @property
    def container(self) -> dict:
        return self.deployment["spec"]["template"]["spec"]["containers"][0]

    def host_port(self, port: int | str) -> int:
        return self.host_ports[named_port(self.container, port)]


@dataclass
class PodmanFlow:
    """Every Deployment of `objects` as podman containers on one network (a context manager)."""

    objects: list[dict]
    replicas: int | None = 1  # pods per Deployment; None: each Deployment's spec.replicas
    dns: bool = True  # False: static addresses and --add-host for every Service name
    extra_args: tuple[str, ...] = ()  # more `podman run` arguments for every pod
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    pods: list[Pod] = field(default_factory=list)

    @property
    def network(self) -> str:
        return f"aiflow-ct-{self.tag}"

    def deployments(self) -> list[dict]:
        return [o for o in self.objects if o["kind"] == "Deployment"]

    def services(self) -> list[dict]:
        return [o for o in self.objects if o["kind"] == "Service"]

    def __enter__(self) -> PodmanFlow:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        podman("network", "create", *([] if self.dns else ["--disable-dns"]), self.network)
        plan = []
        for d in self.deployments():
            aliases = []
            for s in self.services():
                if selects(s, d):
                    check_service_ports(s, d)
                    aliases += service_names(s)
            count = d["spec"].get("replicas", 1) if self.replicas is None else self.replicas
            for i in range(count):
                plan.append((f"{self.network}-{d['metadata']['name']}-{i}", d, aliases))
        ips, hosts = {}, {}
        if not self.dns:
            subnet = json.loads(podman("network", "inspect", self.network).stdout)[0]["subnets"][0]["subnet"]
            prefix = subnet.rsplit(".", 1)[0]
            for n, (name, _, aliases) in enumerate(plan):
                ips[name] = f"{prefix}.{10 + n}"
                for alias in aliases:
                    hosts.setdefault(alias, ips[name])  # one address per name: the first replica
        for name, d, aliases in plan:
            image = d["spec"]["template"]["spec"]["containers"][0]["image"]
            user = podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
            args = pod_run_args(d, name, self.network, aliases if self.dns else (), hosts or None,
                                ips.get(name), image_user=user, extra=self.extra_args)
            podman("run", *args)
            self.pods.append(Pod(name, d))
        for pod in self.pods:
            self._inspect(pod)

    def _inspect(self, pod: Pod) -> None:
        info = json.loads(podman("container", "inspect", pod.name).stdout)[0]
        pod.address = info["NetworkSettings"]["Networks"][self.network]["IPAddress"]
        for key, bindings in (info["NetworkSettings"].get("Ports") or {}).items():
            if bindings:
                pod.host_ports[int(key.split("/")[0])] = int(bindings[0]["HostPort"])

    def logs(self, pod: Pod, lines: int = 40) -> str:
        r = podman("logs", "--tail", str(lines), pod.name, check=False)
        return (r.stdout + r.stderr).strip()

    def running(self, pod: Pod) -> bool:
        r = podman("container", "inspect", "--format", "{{.State.Running}}", pod.name, check=False)
        return r.stdout.strip() == "true"

    def probe_once(self, pod: Pod, probe: Mapping) -> str | None:
        """None when the probe succeeds, else why it failed."""
        get = probe.get("httpGet")
        if not get:
            raise HarnessError(f"{pod.name}: only httpGet probes are emulated")
        if get.get("scheme", "HTTP") != "HTTP":
            raise HarnessError(f"{pod.name}: probe scheme {get['scheme']} is not emulated")
        port = named_port(pod.container, get["port"])
        url = f"http://{pod.address}:{port}{get.get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=probe.get("timeoutSeconds", 1)) as r:
                return None if 200 <= r.status < 400 else f"{url} answered {r.status}"
        except urllib.error.HTTPError as exc:
            return f"{url} answered {exc.code}"
        except OSError as exc:
            return f"{url}: {exc}"

    def wait_ready(self, timeout_s: float) -> dict[str, float]:
        """Wait until every pod passes its startupProbe, then its readinessProbe; seconds each took.
        Raises HarnessError when a container exits or a probe has not passed within `timeout_s`."""
        start = time.monotonic()
        deadline = start + timeout_s
        waiting = {p.name: p for p in self.pods}
        passed: dict[str, set] = {p.name: set() for p in self.pods}
        ready_after: dict[str, float] = {}
        last: dict[str, str] = {}
        while waiting:
            for name, pod in list(waiting.items()):
                if not self.running(pod):
                    raise HarnessError(f"{name} exited before it was ready:\n{self.logs(pod)}")
                for kind in ("startupProbe", "readinessProbe"):
                    probe = pod.container.get(kind)
                    if probe is None or kind in passed[name]:
                        continue
                    why = self.probe_once(pod, probe)
                    if why is not None:
                        last[name] = f"{kind}: {why}"
                        break
                    passed[name].add(kind)
                else:
                    ready_after[name] = time.monotonic() - start
                    del waiting[name]
            if not waiting:
                break
            if time.monotonic() > deadline:
                name, pod = next(iter(waiting.items()))
                raise HarnessError(f"{name} not ready after {timeout_s:.0f} s ({last.get(name)}):\n{self.logs(pod)}")
            time.sleep(1.0)
        return ready_after

    def entry(self) -> Pod:
        """A pod of the first Deployment (the one the flow's entry Service selects)."""
        return next(p for p in self.pods if p.deployment is self.deployments()[0])

    def stop(self) -> None:
        for pod in self.pods:
            podman("rm", "-f", "-t", "5", pod.name, check=False)
        podman("network", "rm", "-f", self.network, check=False)


def cleanup_leftovers() -> None:
    """Containers and networks a crashed earlier run of this harness left (by its label and prefix)."""
    r = podman("ps", "-a", "--filter", f"label={LABEL}", "--format", "{{.Names}}", check=False)
    for name in r.stdout.split():
        podman("rm", "-f", "-t", "2", name, check=False)
    r = podman("network", "ls", "--format", "{{.Name}}", check=False)
    for name in r.stdout.split():
        if name.startswith("aiflow-ct-"):
            podman("network", "rm", "-f", name, check=False)


# ---- what a request through the flow sees ----------------------------------------------------------


def chain_of(objects: Sequence[Mapping]):
    """The rendered flow as a local-runtime scheme: each stage's tier, model and partition knobs."""
    from aiflow.local.schemes import Placement, Scheme

    chain = []
    for d in (o for o in objects if o["kind"] == "Deployment"):
        env = {e["name"]: e.get("value", "") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
        knobs = {k: env[k] for k in ("AIFLOW_SPLIT_LAYER", "AIFLOW_CODEC", "AIFLOW_DECODING") if k in env}
        chain.append(Placement(env["AIFLOW_TIER"], d["metadata"]["annotations"]["aiflow.io/model"], knobs))
    return Scheme("rendered", "the stages as aiflow render wrote them", tuple(chain))


def heldout_scenes(count: int, seed: int = 23) -> list[tuple[str, bytes]]:
    import io

    from PIL import Image

    from aiflow.model import scenes

    arrays, _ = scenes.make_batch(seed=seed, start=0, count=count, split="heldout")
    out = []
    for i, a in enumerate(arrays):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append((f"heldout-{seed}-{i}.png", buf.getvalue()))
    return out


def caption(url: str, model: str, images: Sequence[tuple[str, bytes]], timeout_s: float = 120) -> list[tuple[str, list[dict]]]:
    """(caption, trace hops) per image, one request each, as the local runtime's client sends them."""
    import tritonclient.grpc as grpcclient

    from aiflow.local.client import infer

    client = grpcclient.InferenceServerClient(url)
    try:
        out = []
        for _, blob in images:
            (text,), hops, _ = infer(client, url, model, [blob], timeout_s)
            out.append((text, hops))
        return out
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from aiflow.api.images import CPU_STAGE_IMAGE

    p = argparse.ArgumentParser(description="Run the pods `aiflow render` writes as podman containers and caption through them.")
    p.add_argument("-f", "--filename", default=str(REPO / "examples" / "captioning.yaml"))
    p.add_argument("--stage-image", action="append", default=None, metavar="TIER=IMAGE",
                   help=f"passed to aiflow render (default: cloud={CPU_STAGE_IMAGE}: no GPU here)")
    p.add_argument("--scenes", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300)
    a = p.parse_args(argv)
    extra = [f"--stage-image={i}" for i in (a.stage_image or [f"cloud={CPU_STAGE_IMAGE}"])]
    objects = render_flow(a.filename, *extra)
    scheme = chain_of(objects)
    with PodmanFlow(objects) as flow:
        ready = flow.wait_ready(a.timeout)
        for name, s in ready.items():
            print(f"ready: {name} after {s:.1f} s")
        entry = flow.entry()
        url = f"127.0.0.1:{entry.host_port('grpc')}"
        images = heldout_scenes(a.scenes)
        for (name, _), (text, hops) in zip(images, caption(url, scheme.entry.model, images)):
            print(f"{name}: {text}   [{' -> '.join(h['tier'] + ':' + h['model'] for h in hops)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
