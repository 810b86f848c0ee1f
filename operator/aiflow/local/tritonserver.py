"""Real `tritonserver` processes: the CPU build bundled in nvidia-pytriton, started, probed and stopped.

The recipe (see ENVIRONMENT.md): a backend folder holding the Python backend and the stub for the
running Python; `LD_LIBRARY_PATH` with the wheel's libraries and the interpreter's LIBDIR (the stub
links the system libpython); the venv's `bin` first on `PATH` (the stub runs the first `python3`);
a working directory without a `triton/` folder (it would shadow the package torch imports).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
DEFAULT_STARTUP_TIMEOUT = 180.0  # the Python stub imports torch per model: slow on 2 busy cores
STOP_GRACE = 15.0


class TritonError(RuntimeError):
    """A tritonserver could not be found, started, or asked to do something."""


class PortInUseError(TritonError):
    """A port the server needs is already taken by another process."""


class ModelLoadError(TritonError):
    """A model failed to load; the message carries the server's reason."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the bundled tritonserver live."""

    binary: Path
    libs: Path
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stubs: Path  # <python version>/triton_python_backend_stub


@dataclass(frozen=True)
class TritonPorts:
    """The three endpoints of one server, all on `host`."""

    http: int
    grpc: int
    metrics: int
    host: str = LOOPBACK

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics}/metrics"

    def as_list(self) -> list[int]:
        return [self.http, self.grpc, self.metrics]


def find_triton() -> TritonInstall:
    """Locate the tritonserver bundled in the nvidia-pytriton wheel of this interpreter."""
    try:
        import pytriton
    except ImportError as exc:
        raise TritonError(
            "tritonserver not found: install the data-plane extras (`pip install -e .[flow]`, "
            "which brings nvidia-pytriton)"
        ) from exc
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        libs=root.parent.parent / "nvidia_pytriton.libs",
        python_backend=root / "backends" / "python",
        stubs=root / "python_backend_stubs",
    )
    for path in (install.binary, install.libs, install.python_backend / "libtriton_python.so"):
        if not path.exists():
            raise TritonError(f"nvidia-pytriton is incomplete: {path} is missing; reinstall it")
    return install


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aiflow"


def backend_directory(install: TritonInstall | None = None, cache: Path | None = None) -> Path:
    """A `--backend-directory` whose `python/` holds the backend and the stub for this Python.

    Built once per interpreter version in the cache (atomically, so concurrent callers are safe).
    """
    install = install or find_triton()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = install.stubs / version / "triton_python_backend_stub"
    if not stub.exists():
        have = sorted(p.name for p in install.stubs.iterdir()) if install.stubs.exists() else []
        raise TritonError(f"no Triton Python backend stub for Python {version} (the wheel has {have})")
    stamp = f"{install.binary.stat().st_mtime_ns}-{stub.stat().st_size}"
    target = (cache or _cache_dir()) / "triton-backends" / f"py{version}-{stamp}"
    if (target / "python" / "triton_python_backend_stub").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        (staging / "python").mkdir()
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(install.python_backend / name, staging / "python" / name)
        shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")
        try:
            staging.rename(target)
        except OSError as exc:  # another process won the race
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def server_env(
    overrides: Mapping[str, str] | None = None,
    install: TritonInstall | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment a tritonserver (and its Python stubs) needs, plus per-process overrides."""
    install = install or find_triton()
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    lib_paths = [str(install.libs), libdir, env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in lib_paths if p)
    # The stub runs the first `python3` on PATH: make it this interpreter's environment.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in (bin_dir, env.get("PATH", "")) if p)
    env.pop("PYTHONHOME", None)
    for key, value in (overrides or {}).items():
        env[str(key)] = str(value)
    return env


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """True when something listens on host:port (a TIME_WAIT leftover does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct ports that were free a moment ago (the kernel picks them)."""
    socks, ports = [], []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            socks.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in socks:
            sock.close()
    return ports


def check_ports_free(ports: Iterable[int], host: str = LOOPBACK, what: str = "tritonserver") -> None:
    """Raise PortInUseError naming every taken port."""
    taken = [p for p in ports if port_in_use(p, host)]
    if taken:
        listed = ", ".join(f"{host}:{p}" for p in taken)
        raise PortInUseError(
            f"{what} cannot start: port(s) {listed} already in use; stop whatever listens there "
            "or choose other ports (e.g. another --base-port)"
        )


def model_config_json(
    model_dir: Path, parameters: Mapping[str, str] | None = None, name: str | None = None
) -> str:
    """The model's config.pbtxt as the JSON that Triton's load API takes, with `parameters` set.

    Triton replaces the whole config with a load-time override, so the override starts from the file.
    The serving parameters (AIFLOW_INSTANCES, AIFLOW_MAX_BATCH_SIZE, ...) also set the instances,
    batching and queue bound they name (`aiflow.serving.apply_parameters`).
    """
    from aiflow.serving import apply_parameters

    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(model_dir) / "config.pbtxt"
    config = model_config_pb2.ModelConfig()
    if path.exists():
        try:
            text_format.Parse(path.read_text(), config)
        except text_format.ParseError as exc:
            raise ModelLoadError(f"{path}: not a valid Triton model config: {exc}") from exc
    config.name = name or config.name or Path(model_dir).name
    for key, value in (parameters or {}).items():
        config.parameters[str(key)].string_value = str(value)
    as_dict = json_format.MessageToDict(config, preserving_proto_field_name=True)
    return json.dumps(apply_parameters(as_dict, parameters or {}))


def process_group_members(pgid: int) -> list[int]:
    """Pids still alive in a process group (read from /proc; zombies excluded)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def load_model(
    url: str,
    model_repository: str | os.PathLike,
    model: str,
    parameters: Mapping[str, str] | None = None,
    config: Mapping | str | None = None,
    timeout: float = DEFAULT_STARTUP_TIMEOUT,
) -> None:
    """Ask the server at gRPC `url` to (re)load `model` of `model_repository` with `parameters`
    overriding its config.pbtxt (or with `config` as the whole config)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    model_dir = Path(model_repository) / model
    if not model_dir.is_dir():
        raise ModelLoadError(f"model {model!r} not found in {model_repository}")
    if config is not None and parameters:
        raise ValueError("pass either `config` (a whole config) or `parameters`, not both")
    if isinstance(config, Mapping):
        config = json.dumps(config)
    elif config is None and parameters:
        config = model_config_json(model_dir, parameters, name=model)
    client = grpcclient.InferenceServerClient(url)
    try:
        client.load_model(model, config=config, client_timeout=timeout)
    except InferenceServerException as exc:
        raise ModelLoadError(f"model {model!r} failed to load at {url}: {exc.message()}") from exc
    finally:
        client.close()


_LIVE: set[TritonServer] = set()
_LIVE_LOCK = threading.Lock()


def stop_all() -> None:
    """Stop every server this process started (atexit, signal handlers)."""
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:  # shut down side by side, then reap
        server.terminate()
    for server in servers:
        server.stop()


atexit.register(stop_all)


def _child_setup(tie_to_parent: bool, cpus: frozenset[int] | None):
    """What the child runs before exec."""

    def setup() -> None:
        # Its own process group: stubs die with it, and a terminal's Ctrl-C reaches only us, who
        # stop it in order.
        os.setsid()
        if tie_to_parent:  # SIGTERM when the launching thread (the main one) dies, even by SIGKILL
            with contextlib.suppress(Exception):
                import ctypes

                ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


class TritonServer:
    """One real tritonserver process on loopback ports, model control explicit.

    Use as a context manager, or `start()` / `stop()`. `env` is passed to the server and its Python
    stubs (e.g. AIFLOW_TIER); `models` are loaded at startup (a failure there stops the start with
    the server's reason); `cpus` pins it (and its stubs) to those cores.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        *,
        models: Iterable[str] = (),
        ports: TritonPorts | None = None,
        env: Mapping[str, str] | None = None,
        name: str = "tritonserver",
        log_dir: str | os.PathLike | None = None,
        log_verbose: int = 0,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        extra_args: Iterable[str] = (),
        cpus: Iterable[int] | None = None,
    ):
        self.model_repository = Path(model_repository).resolve()
        self.models = list(models)
        self.ports = ports or TritonPorts(*free_ports(3))
        self.env = dict(env or {})
        self.name = name
        self._own_log_dir = log_dir is None  # then a temporary folder, made at launch, removed at stop
        self.log_dir = Path(log_dir) if log_dir else None
        self.log_verbose = log_verbose
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.cpus = frozenset(cpus) if cpus else None
        if self.cpus and not self.cpus <= os.sched_getaffinity(0):
            raise ValueError(
                f"bad cpus {sorted(self.cpus)} for {name}: this machine offers {sorted(os.sched_getaffinity(0))}"
            )
        self.process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------

    def command(self, backend_dir: Path, install: TritonInstall) -> list[str]:
        p = self.ports
        cmd = [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={backend_dir}",
            f"--http-address={p.host}",
            f"--http-port={p.http}",
            f"--grpc-address={p.host}",
            f"--grpc-port={p.grpc}",
            f"--metrics-address={p.host}",
            f"--metrics-port={p.metrics}",
            "--allow-gpu-metrics=false",
            f"--log-verbose={self.log_verbose}",
            f"--log-file={self.log_path}",
            "--exit-timeout-secs=5",
        ]
        cmd += [f"--load-model={m}" for m in self.models]
        return cmd + self.extra_args

    def start(self) -> TritonServer:
        """Start the process and wait until it is ready; raise with the log tail if it is not."""
        self.launch()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> None:
        """Start the process without waiting (several servers then boot side by side)."""
        if not self.model_repository.is_dir():
            raise TritonError(f"model repository {self.model_repository} is not a directory")
        missing = [m for m in self.models if not (self.model_repository / m).is_dir()]
        if missing:
            raise ModelLoadError(f"model(s) {missing} not found in {self.model_repository}")
        check_ports_free(self.ports.as_list(), self.ports.host, what=self.name)
        install = find_triton()
        backend_dir = backend_directory(install)
        if self._own_log_dir:
            self.log_dir = Path(tempfile.mkdtemp(prefix=f"aiflow-{self.name}-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("")
        # PR_SET_PDEATHSIG fires when the launching *thread* ends: only tie the server to the
        # main thread, which lives as long as the process.
        tie = threading.current_thread() is threading.main_thread()
        setup = _child_setup(tie, self.cpus)
        with self._lock:
            if self.process is not None:
                raise TritonError(f"{self.name} already started (pid {self.process.pid})")
            with open(self.log_dir / f"{self.name}.out", "wb") as out:  # the stubs' stdout/stderr
                self.process = subprocess.Popen(
                    self.command(backend_dir, install),
                    env=server_env(self.env, install),
                    cwd=self.log_dir,  # never a folder with a `triton/` subfolder in it
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=setup,
                )
        with _LIVE_LOCK:
            _LIVE.add(self)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll /v2/health/ready until ready; fail fast if the process exits."""
        if self.process is None:
            raise TritonError(f"{self.name} was not started; call start() or launch() first")
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while True:
            if (code := self.process.poll()) is not None:
                raise self._startup_error(f"exited with code {code} during startup")
            # Our own log must show every endpoint up: a server that lost a port race would
            # otherwise pass the health check by reaching the winner on the shared port, and the
            # metrics endpoint starts last, after the server already answers ready.
            if self._endpoints_started() and self._http_ok("/v2/health/ready"):
                return
            if time.monotonic() > deadline:
                raise self._startup_error(f"not ready after {timeout or self.startup_timeout:.0f}s")
            time.sleep(0.2)

    def _endpoints_started(self) -> bool:
        with contextlib.suppress(OSError):
            log = self.log_path.read_text(errors="replace")
            return all(f"Started {service} at" in log
                       for service in ("GRPCInferenceService", "HTTPService", "Metrics Service"))
        return False

    def _startup_error(self, what: str) -> TritonError:
        tail = self.log_tail()
        if "already in use" in tail or "Address already in use" in tail:
            return PortInUseError(
                f"{self.name} {what}: a port is already in use ({self.ports.as_list()}); "
                f"log tail:\n{tail}"
            )
        if "failed to load" in tail or "load failed" in tail:
            return ModelLoadError(f"{self.name} {what}: a model failed to load; log tail:\n{tail}")
        return TritonError(f"{self.name} {what}; log {self.log_path}, tail:\n{tail}")

    def terminate(self) -> None:
        """Ask the server to shut down (SIGTERM to its group) without waiting; `stop()` then reaps."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the process group, SIGKILL what is left after `grace` seconds. Idempotent."""
        with self._lock:
            proc = self.process
            if proc is None:
                return
            pgid = proc.pid  # setsid made the server its own group leader
            self.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
            # The stubs exit when the server does, but a stuck one must not outlive us.
            deadline = time.monotonic() + 2.0
            while process_group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            self.process = None
            if self._own_log_dir:  # a temporary folder of ours; callers who want logs pass log_dir
                shutil.rmtree(self.log_dir, ignore_errors=True)
                self.log_dir = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state -----------------------------------------------------------------------------------

    @property
    def log_path(self) -> Path | None:
        return self.log_dir / f"{self.name}.log" if self.log_dir else None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def grpc_url(self) -> str:
        return self.ports.grpc_url

    @property
    def http_url(self) -> str:
        return self.ports.http_url

    @property
    def metrics_url(self) -> str:
        return self.ports.metrics_url

    def log_tail(self, lines: int = 40) -> str:
        if self.log_dir is None:
            return ""
        text = ""
        for path in (self.log_path, self.log_dir / f"{self.name}.out"):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def is_model_ready(self, model: str) -> bool:
        return self._http_ok(f"/v2/models/{model}/ready")

    # -- models ----------------------------------------------------------------------------------

    def load_model(
        self,
        model: str,
        parameters: Mapping[str, str] | None = None,
        config: Mapping | str | None = None,
        timeout: float | None = None,
    ) -> None:
        """(Re)load `model`; `parameters` override its config.pbtxt parameters, `config` replaces it.

        A reload with new parameters swaps the model in place (Triton keeps serving the old one
        until the new one is ready).
        """
        try:
            load_model(self.grpc_url, self.model_repository, model, parameters, config,
                       timeout or self.startup_timeout)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{self.name}: {exc}\nlog tail:\n{self.log_tail(15)}") from exc

    def unload_model(self, model: str, wait: bool = True, timeout: float = 60.0) -> None:
        """Unload `model`; with `wait`, until it is gone."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            client.unload_model(model)
            deadline = time.monotonic() + timeout
            while wait and client.is_model_ready(model):
                if time.monotonic() > deadline:
                    raise TritonError(f"{self.name}: model {model!r} still loaded after {timeout}s")
                time.sleep(0.1)
        except InferenceServerException as exc:
            raise TritonError(f"{self.name}: unloading {model!r} failed: {exc.message()}") from exc
        finally:
            client.close()
