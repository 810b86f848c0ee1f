"""Run the real kopf operator, in a thread with its own event loop, logged in to an emulated API server."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import kopf

from tests.kube.apiserver import EmulatedApiServer

logger = logging.getLogger(__name__)

_LOGIN_ID = "emulated-apiserver-login"
_servers_by_thread: dict[int, tuple[str, str]] = {}  # operator thread id -> (API server URL, token)


async def _login_to_emulated_apiserver(**_: Any) -> kopf.ConnectionInfo | None:
    """kopf login handler: the operator in this thread talks to its emulated API server."""
    found = _servers_by_thread.get(threading.get_ident())
    if found is None:
        return None
    url, token = found
    return kopf.ConnectionInfo(server=url, scheme="Bearer", token=token, default_namespace="default")


def _ensure_login_handler(registry: kopf.OperatorRegistry) -> None:
    existing = registry._activities.get_all_handlers()
    if not any(h.id == _LOGIN_ID for h in existing):
        kopf.on.login(registry=registry, id=_LOGIN_ID)(_login_to_emulated_apiserver)


def load_handlers(modules_or_paths: str | Path | Iterable[str | Path]) -> None:
    """Import kopf handler modules (dotted names) or files (paths ending in .py), once each."""
    items = [modules_or_paths] if isinstance(modules_or_paths, (str, Path)) else list(modules_or_paths)
    for item in items:
        text = str(item)
        if text.endswith(".py"):
            path = Path(text).resolve()
            name = f"kopf_handlers_{path.stem}_{abs(hash(str(path)))}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load kopf handlers from {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(text)


@dataclasses.dataclass
class KopfOperator:
    """A running kopf operator; `stop()` ends it (the context manager does it for you)."""

    thread: threading.Thread
    stop_flag: threading.Event
    ready_flag: threading.Event
    errors: list[BaseException]

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 30) -> None:
        self.stop_flag.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"the kopf operator did not stop within {timeout} s")


@contextlib.contextmanager
def run_kopf_operator(
    apiserver: EmulatedApiServer,
    modules_or_paths: str | Path | Iterable[str | Path],
    *,
    namespaces: Iterable[str] = ("default",),
    clusterwide: bool = False,
    settings: kopf.OperatorSettings | None = None,
    startup_timeout: float = 30,
    token: str = "emulated",
    kubeconfig: Path | None = None,
) -> Iterator[KopfOperator]:
    """Run the real kopf operator with the given handlers against `apiserver`, stop it on exit.

    Handlers register in kopf's default registry (as `kopf run` does). The operator runs standalone
    (no peering) and logs in through a login handler that points it at the emulated server. While it
    runs, `KUBECONFIG` points at the server too, so API clients in handlers (e.g. the `kubernetes`
    package's `load_kube_config()`) reach the same server, as they would in a cluster (so run one
    operator per process at a time when its handlers rely on that).
    `token` is the bearer token kopf logs in with and `kubeconfig` what `KUBECONFIG` points at
    (default: the server's admin token and kubeconfig); with a token registered through
    `apiserver.authorize_token`, the operator runs under that user's RBAC.
    Raises if the operator dies at startup or does not become ready in `startup_timeout` seconds.
    """
    load_handlers(modules_or_paths)
    registry = kopf.get_default_registry()
    _ensure_login_handler(registry)
    stop_flag, ready_flag = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        _servers_by_thread[threading.get_ident()] = (apiserver.url, token)
        loop = asyncio.new_event_loop()
        try:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(kopf.operator(
                registry=registry, settings=settings, standalone=True, clusterwide=clusterwide,
                namespaces=() if clusterwide else tuple(namespaces), stop_flag=stop_flag, ready_flag=ready_flag,
            ))
        except BaseException as exc:  # kept for the test to see; a dead operator must not pass silently
            errors.append(exc)
            logger.exception("the kopf operator failed")
        finally:
            _servers_by_thread.pop(threading.get_ident(), None)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            ready_flag.set()

    previous_kubeconfig = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig or apiserver.kubeconfig)
    thread = threading.Thread(target=run, name="kopf-operator", daemon=True)
    thread.start()
    operator = KopfOperator(thread, stop_flag, ready_flag, errors)
    try:
        if not ready_flag.wait(startup_timeout):
            raise TimeoutError(f"the kopf operator was not ready within {startup_timeout} s")
        if errors or not thread.is_alive():
            raise RuntimeError(f"the kopf operator stopped at startup: {errors!r}")
        yield operator
    finally:
        operator.stop()
        if previous_kubeconfig is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous_kubeconfig
        if errors:
            raise RuntimeError(f"the kopf operator failed: {errors!r}") from errors[0]
