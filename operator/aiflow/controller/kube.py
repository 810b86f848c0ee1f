"""Access to the Kubernetes API as plain JSON, through the `kubernetes` client's configuration
(kubeconfig or in-cluster) and authentication, without its model classes (faster, and the rest of
the operator works on dicts anyway). Synchronous: the kopf handlers call it in worker threads."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from urllib.parse import quote

import kubernetes

from aiflow import __version__

MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
JSON_PATCH = "application/json-patch+json"
# The one field manager of every object the operator applies (server-side apply).
FIELD_MANAGER = "aiflow-operator"
USER_AGENT = f"aiflow-operator/{__version__}"
REQUEST_TIMEOUT = 30  # seconds; a hung API server must not hang a reconcile forever


@dataclass(frozen=True)
class Resource:
    api_version: str  # "v1", "apps/v1", "aiflow.io/v1alpha1"
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        root = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [root]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{quote(namespace)}")
        parts.append(self.plural)
        if name:
            parts.append(quote(name))
        if subresource:
            parts.append(subresource)
        return "/".join(parts)


NODES = Resource("v1", "nodes", namespaced=False)
SERVICES = Resource("v1", "services")
DEPLOYMENTS = Resource("apps/v1", "deployments")
DISRUPTION_BUDGETS = Resource("policy/v1", "poddisruptionbudgets")
PODS = Resource("v1", "pods")
CONFIGMAPS = Resource("v1", "configmaps")
AUTOSCALERS = Resource("autoscaling/v2", "horizontalpodautoscalers")
ENDPOINT_SLICES = Resource("discovery.k8s.io/v1", "endpointslices")


class ApiError(Exception):
    """A failed API call: HTTP status and the server's message."""

    def __init__(self, status: int, method: str, path: str, message: str):
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status


class KubeApi:
    def __init__(self, api_client: "kubernetes.client.ApiClient"):
        self.client = api_client

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None, context: str | None = None) -> "KubeApi":
        """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG,
        ~/.kube/config, or `kubeconfig`)."""
        configuration = kubernetes.client.Configuration()
        try:
            if kubeconfig or context:
                raise kubernetes.config.ConfigException("explicit kubeconfig")
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            # $KUBECONFIG is read now: the kubernetes package fixes its default at import time.
            kubernetes.config.load_kube_config(
                config_file=kubeconfig or os.environ.get("KUBECONFIG"), context=context,
                client_configuration=configuration,
            )
        # One connection per worker thread, so that concurrent reconciles do not queue.
        configuration.connection_pool_maxsize = 16
        client = kubernetes.client.ApiClient(configuration)
        client.user_agent = USER_AGENT
        return cls(client)

    def request(self, method: str, path: str, *, query: dict | None = None, body=None,
                content_type: str = "application/json") -> dict | None:
        """One API call; returns the decoded JSON answer. Raises ApiError on a non-2xx answer."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        params = self.client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.client.call_api(*params, _request_timeout=REQUEST_TIMEOUT)
        data = response.read()
        if not 200 <= response.status < 300:
            try:
                message = json.loads(data).get("message") or data.decode()
            except (ValueError, AttributeError):
                message = (data or b"").decode(errors="replace")
            raise ApiError(response.status, method, path, message)
        return json.loads(data) if data else None

    def get(self, path: str) -> dict | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, path: str, label_selector: str | None = None) -> list[dict]:
        query = {"labelSelector": label_selector} if label_selector else None
        return (self.request("GET", path, query=query) or {}).get("items") or []

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body=body)

    def patch(self, path: str, body: dict) -> dict:
        return self.request("PATCH", path, body=body, content_type=MERGE_PATCH)

    def apply(self, path: str, body: dict, field_manager: str = FIELD_MANAGER) -> dict:
        """Server-side apply of `body` (a complete object: apiVersion, kind, metadata.name) as
        `field_manager`, conflicts forced: the object ends up with exactly the fields this manager
        applies now (those it applied before and no longer does are removed, unless another manager
        owns them too); created when it does not exist."""
        return self.request("PATCH", path, query={"fieldManager": field_manager, "force": "true"},
                            body=body, content_type=APPLY_PATCH)

    def json_patch(self, path: str, operations: list[dict]) -> dict:
        return self.request("PATCH", path, body=operations, content_type=JSON_PATCH)

    def delete(self, path: str) -> None:
        try:
            self.request("DELETE", path, query={"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status != 404:
                raise
