"""An emulated Kubernetes API server, layered over kmock, for tests and the operator benchmark.

It serves the HTTP API of a kube-apiserver for what kopf and kubectl use: discovery, CRUD with
uid/resourceVersion/generation/creationTimestamp/generateName, optimistic concurrency, label and field
selectors, the status subresource, PUT, JSON / merge / strategic merge patches, server-side apply
with field ownership (managedFields, conflicts, force), CRDs that register their resources and validate custom resources against their
openAPIV3Schema (pruning, defaults, CEL rules), watches with resourceVersion, finalizers and
deletionTimestamp, namespaces, and Events. It emulates the API server only: no controller, scheduler or
kubelet runs (see tests/kube/controllers.py for the explicit stand-ins tests may start).

kmock provides the HTTP server (`kmock.Server`), the request parsing and recording (`handler.requests`)
and its DSL, so a test can still inject faults: `server.handler['get /api/v1/nodes'] << 500` wins over
the emulation, which serves whatever no kmock reaction claims. kmock's own object store and fallback
handlers are not used: their semantics (merge-only writes, no resourceVersion) are what this replaces.

Not emulated (a test that needs one of these needs a real cluster):
- protobuf/CBOR request bodies (answered 415): typed kubectl commands such as `kubectl create
  namespace X` or `kubectl scale`; `kubectl apply/create/get/delete -f` use JSON and work;
- OpenAPI schemas: /openapi/v3 is a skeleton that tells kubectl the server validates fields, so
  `kubectl apply` works with its default validation; `kubectl explain` does not;
- server-side apply and managedFields are emulated for objects (tests/kube/fieldmanager.py), not
  for status;
- foreground deletion (treated as background), pagination (`limit` is ignored: one page), reads at an
  older resourceVersion, watch bookmarks, authentication (every token is accepted: RBAC is
  enforced only for the tokens a test registers with `authorize_token`, tests/kube/rbac.py; the
  others act as the cluster's admin; `derive_rbac_rules` turns the request log into the rules a
  role would need);
- built-in kinds are checked against the published 1.32 JSON schemas (no deeper Go validation than
  the immutable Deployment selector and Service clusterIP) and stored as the real server stores them
  for the kinds the tests write: empty `omitempty` values dropped, unknown fields pruned, the Go
  defaulters' values filled in for Deployments and Services (tests/kube/defaults.py);
- subresources other than `status`; admission and conversion webhooks (a multi-version CRD stores
  one object and serves it under each version unchanged); core and events.k8s.io Events are
  separate stores.
Namespace deletion is carried out by the server itself (the namespace controller's part).
"""
from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import datetime
import json
import logging
import random
import re
import os
import subprocess
import time
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import yaml

from tests.kube import builtin_schemas, defaults, fieldmanager, patches, rbac, schemas, selectors
from tests.kube.resources import BUILTIN_RESOURCES, NODE_METRICS, SUBRESOURCE_VERBS, ResourceType, crd_resource_types

logger = logging.getLogger(__name__)

SERVED_SUBRESOURCES = ("status",)
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
HISTORY_SIZE = 10_000  # watch events kept for resuming watches; older resourceVersions get 410 Gone
KEPT_REQUESTS = 20_000  # kmock keeps every request with its body; keep the recent ones only
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_GENERATE_CHARS = "bcdfghjklmnpqrstvwxz2456789"
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

Obj = dict[str, Any]
StoreKey = tuple[str, str]  # (group, plural): one store for all versions of a resource
ObjKey = tuple[str, str]  # (namespace or "", name)


class ApiError(Exception):
    """An error answered as a Kubernetes `Status` body with the given HTTP code and reason."""

    def __init__(self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, dict(details or {})

    def status(self) -> Obj:
        body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                     "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def _details(rt: ResourceType, name: str | None, causes: Iterable[schemas.Cause] = ()) -> Obj:
    # As the real server: `kind` holds the resource plural, except for Invalid where it holds the kind.
    details: Obj = {"name": name or "", "group": rt.group, "kind": rt.kind if causes else rt.plural}
    causes = list(causes)
    if causes:
        details["causes"] = [{"reason": c.reason, "message": c.message, "field": c.field} for c in causes]
    return details


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.qualified} "{name}" not found', _details(rt, name))


def invalid(rt: ResourceType, name: str | None, causes: list[schemas.Cause]) -> ApiError:
    causes = causes or [schemas.Cause("", "FieldValueInvalid", "Invalid value")]
    text = "; ".join(c.render() for c in causes) if len(causes) == 1 else \
        "[" + ", ".join(c.render() for c in causes) + "]"
    return ApiError(422, "Invalid", f'{rt.kind}.{rt.group or "core"} "{name or ""}" is invalid: {text}'
                    .replace(".core ", " "), _details(rt, name, causes))


def conflict(rt: ResourceType, name: str) -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rt.qualified} "{name}": the object has '
                    "been modified; please apply your changes to the latest version and try again",
                    _details(rt, name))


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass
class RequestRecord:
    """One API request as RBAC sees it: verb, resource, subresource, namespace (for deriving rules)."""

    method: str
    path: str
    verb: str
    group: str | None = None
    version: str | None = None
    resource: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None
    user_agent: str = ""
    code: int | None = None
    label_selector: str | None = None  # of a list or watch
    also: tuple[str, ...] = ()  # further verbs the request needed (an apply that creates: create)

    @property
    def verbs(self) -> tuple[str, ...]:
        return (self.verb, *self.also)


@dataclasses.dataclass(frozen=True)
class Route:
    """A parsed resource URL."""

    group: str
    version: str
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None
    legacy_watch: bool = False  # the deprecated `/api/v1/watch/...` form


def parse_resource_path(path: str) -> Route | None:
    """Parse `/api/v1/...` and `/apis/<g>/<v>/...` URLs, including `/api/v1/namespaces/<name>`."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if not rest:
        return Route(group, version)
    legacy_watch = rest[0] == "watch"
    if legacy_watch:
        rest = rest[1:]
    if rest and rest[0] == "namespaces" and (len(rest) <= 2 or (len(rest) == 3 and rest[2] in ("status", "finalize"))):
        return Route(group, version, "namespaces", None, rest[1] if len(rest) > 1 else None,
                     rest[2] if len(rest) > 2 else None, legacy_watch)
    namespace = None
    if rest and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest:
        return Route(group, version)
    return Route(group, version, rest[0], namespace, rest[1] if len(rest) > 1 else None,
                 "/".join(rest[2:]) or None, legacy_watch)


@dataclasses.dataclass
class _Watch:
    store: StoreKey
    namespace: str | None
    matches: Callable[[Obj], bool]
    queue: asyncio.Queue


class KubeApiHandler(kmock.RawHandler):
    """The API server's request handling and state. All state lives in (and is touched from) one loop."""

    def __init__(self, namespaces: Iterable[str] = DEFAULT_NAMESPACES, validate_builtin: bool = True) -> None:
        super().__init__()
        self.validate_builtin = validate_builtin  # check built-in kinds against the published schemas
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        self.crd_types: dict[str, list[ResourceType]] = {}
        self.store: dict[StoreKey, dict[ObjKey, Obj]] = collections.defaultdict(dict)
        self.resource_version = 0
        self.history: collections.deque = collections.deque(maxlen=HISTORY_SIZE)
        self.compacted_rv = 0
        self.watches: list[_Watch] = []
        self.request_log: list[RequestRecord] = []
        self._current: RequestRecord | None = None  # the request being answered
        self.restricted_tokens: dict[str, rbac.User] = {}  # bearer token -> user whose RBAC is enforced
        self.orphaned_uids: set[str] = set()  # owners deleted with propagationPolicy=Orphan
        self.warnings: list[str] = []  # what the emulator could not check (e.g. a CEL rule it cannot run)
        self.listeners: list[Callable[[str, ResourceType, Obj], None]] = []  # called on every stored change
        for rt in BUILTIN_RESOURCES:
            self.types[(rt.group, rt.version, rt.plural)] = rt
        ns_type = self.types[("", "v1", "namespaces")]
        for name in namespaces:
            self.create_object(ns_type, None, {"metadata": {"name": name}})

    # ----------------------------------------------------------------- resource types
    def resolve(self, ref: str) -> ResourceType:
        """A resource type by plural, kind, short name, `plural.group` or `group/version/plural`."""
        ref_l = ref.lower()
        candidates = []
        for (group, version, plural), rt in self.types.items():
            names = {plural, rt.kind.lower(), *rt.short_names, f"{plural}.{group}", f"{group}/{version}/{plural}",
                     f"{rt.kind.lower()}.{group}"}
            if ref_l in names:
                candidates.append(rt)
        if not candidates:
            raise KeyError(f"no resource type {ref!r} is served")
        # Prefer core and well-known groups over same-named ones (e.g. core events over events.k8s.io).
        return sorted(candidates, key=lambda r: (r.custom, r.group != "", r.group == "events.k8s.io"))[0]

    def type_of_store(self, group: str, plural: str) -> ResourceType | None:
        """A served type of the store `(group, plural)` (any version), None once its CRD is gone."""
        return next((t for t in self.types.values() if (t.group, t.plural) == (group, plural)), None)

    def _type(self, route: Route) -> ResourceType:
        rt = self.types.get((route.group, route.version, route.plural or ""))
        if rt is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource",
                           {"group": route.group, "kind": route.plural or ""})
        return rt

    def register_crd(self, crd: Obj) -> None:
        name = crd["metadata"]["name"]
        self.unregister_crd(name, delete_objects=False)
        new_types = crd_resource_types(crd)
        self.crd_types[name] = new_types
        for rt in new_types:
            self.types[(rt.group, rt.version, rt.plural)] = rt

    def unregister_crd(self, name: str, delete_objects: bool = True) -> None:
        for rt in self.crd_types.pop(name, []):
            self.types.pop((rt.group, rt.version, rt.plural), None)
            if delete_objects:
                for obj in list(self.store[(rt.group, rt.plural)].values()):
                    self._remove(rt, obj)

    # ----------------------------------------------------------------- storage and events
    def _next_rv(self) -> str:
        self.resource_version += 1
        return str(self.resource_version)

    def _emit(self, event_type: str, rt: ResourceType, obj: Obj, old: Obj | None = None) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        if len(self.history) == self.history.maxlen:
            self.compacted_rv = self.history[0][0]
        event = (rv, (rt.group, rt.plural), event_type, obj, old)
        self.history.append(event)
        for watch in self.watches:
            if watch.store == (rt.group, rt.plural):
                watch.queue.put_nowait(event)
        for listener in self.listeners:
            listener(event_type, rt, obj)

    def get_object(self, rt: ResourceType, namespace: str | None, name: str) -> Obj | None:
        return self.store[(rt.group, rt.plural)].get((namespace or "" if rt.namespaced else "", name))

    def _key(self, rt: ResourceType, obj: Obj) -> ObjKey:
        meta = obj["metadata"]
        return (meta.get("namespace", "") if rt.namespaced else "", meta["name"])

    def _put(self, rt: ResourceType, obj: Obj) -> None:
        self.store[(rt.group, rt.plural)][self._key(rt, obj)] = obj

    def _remove(self, rt: ResourceType, obj: Obj) -> None:
        """Remove an object for good and tell watchers (DELETED carries a fresh resourceVersion)."""
        self.store[(rt.group, rt.plural)].pop(self._key(rt, obj), None)
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = self._next_rv()
        self._emit("DELETED", rt, gone, obj)
        if rt.plural == "customresourcedefinitions" and not rt.group == "":
            self.unregister_crd(obj["metadata"]["name"])
        namespace = obj["metadata"].get("namespace")
        if rt.namespaced and namespace:
            self._finish_namespace_if_empty(namespace)

    def serve(self, rt: ResourceType, obj: Obj) -> Obj:
        """An object as a client sees it at the requested version: a copy with apiVersion and kind."""
        result = {"apiVersion": rt.group_version, "kind": rt.kind}
        result.update({k: v for k, v in obj.items() if k not in ("apiVersion", "kind")})
        # Stored objects are plain JSON: a JSON round trip copies them several times faster than
        # deepcopy, which matters for lists of large objects (managedFields included).
        return json.loads(json.dumps(result))

    # ----------------------------------------------------------------- writes
    def _check_name(self, rt: ResourceType, name: Any) -> None:
        if not isinstance(name, str) or not name:
            raise invalid(rt, None, [schemas.Cause("metadata.name", "FieldValueRequired",
                                                   "Required value: name or generateName is required")])
        if len(name) > 253 or not _NAME_RE.match(name):
            raise invalid(rt, name, [schemas.Cause("metadata.name", "FieldValueInvalid",
                                                   f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must '
                                                   "consist of lower case alphanumeric characters, '-' or '.', and "
                                                   "must start and end with an alphanumeric character")])

    def _check_namespace(self, rt: ResourceType, namespace: str | None) -> None:
        if not rt.namespaced:
            return
        if not namespace:
            raise ApiError(400, "BadRequest", "the server could not find the requested resource: a namespace "
                                              "must be given for a namespaced resource")
        ns = self.store[("", "namespaces")].get(("", namespace))
        if ns is None:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})
        if ns["metadata"].get("deletionTimestamp"):
            raise ApiError(403, "Forbidden", f"unable to create new content in namespace {namespace} because it "
                                             "is being terminated", {"name": namespace, "kind": "namespaces"})

    def _admit(self, rt: ResourceType, obj: Obj, old: Obj | None, field_validation: str) -> tuple[Obj, list[str]]:
        """Schema checks (the CRD's for custom resources, the published ones for built-in kinds).

        Returns the admitted object (unknown fields dropped, defaults applied) and warnings.
        """
        if not rt.custom:
            return self._admit_builtin(rt, obj, field_validation)
        admitted, pruned, causes, skipped = schemas.admit(obj, rt.schema, old)
        for rule in skipped:
            self.warnings.append(f"{rt.kind}: CEL rule not evaluated: {rule}")
        if causes:
            raise invalid(rt, obj["metadata"].get("name"), causes)
        warnings = []
        if pruned:
            if field_validation == "Strict":
                raise ApiError(400, "BadRequest", "strict decoding error: " +
                               ", ".join(f'unknown field "{p}"' for p in pruned))
            if field_validation == "Warn":
                warnings = [f'unknown field "{p}"' for p in pruned]
        return admitted, warnings

    def _admit_builtin(self, rt: ResourceType, obj: Obj, field_validation: str) -> tuple[Obj, list[str]]:
        if not self.validate_builtin:
            return obj, []
        verdict = builtin_schemas.check({**obj, "apiVersion": rt.group_version, "kind": rt.kind},
                                        rt.group, rt.version, rt.kind)
        if verdict.type_errors:
            raise ApiError(400, "BadRequest", f'{rt.kind} in version "{rt.version}" cannot be handled as a '
                                              f'{rt.kind}: ' + "; ".join(verdict.type_errors))
        if verdict.causes:
            raise invalid(rt, obj["metadata"].get("name"), verdict.causes)
        unknown = [schemas._path(p) for p in verdict.unknown]
        if unknown and field_validation == "Strict":
            raise ApiError(400, "BadRequest", "strict decoding error: " +
                           ", ".join(f'unknown field "{p}"' for p in unknown))
        obj = copy.deepcopy(obj)
        for path in verdict.unknown:
            builtin_schemas.drop(obj, path)
        # Stored as decoding into the kind's struct and encoding it again leaves it: empty omitempty
        # values gone, the kind's defaults filled in.
        schema = builtin_schemas.schema_for(rt.group, rt.version, rt.kind)
        builtin_schemas.drop_empty(obj, schema.root or {}, schema)
        defaults.apply_defaults(rt.group, rt.kind, obj)
        return obj, [f'unknown field "{p}"' for p in unknown] if field_validation == "Warn" else []

    def field_schema(self, rt: ResourceType) -> fieldmanager.Schema:
        """The schema that says how the kind's lists merge (for field ownership)."""
        if rt.custom:
            return fieldmanager.Schema(rt.schema)
        return builtin_schemas.schema_for(rt.group, rt.version, rt.kind)

    def create_object(self, rt: ResourceType, namespace: str | None, body: Any, *, dry_run: bool = False,
                      field_validation: str = "Ignore", manager: str | None = None,
                      operation: str = "Update") -> tuple[Obj, list[str]]:
        """Create: the semantics of POST (and of apply/PUT when the object does not exist)."""
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request must be a JSON object")
        obj = copy.deepcopy(body)
        self._check_kind(rt, obj)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if rt.namespaced:
            if namespace and meta.get("namespace") and meta["namespace"] != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the "
                                                  "namespace sent on the request")
            meta["namespace"] = namespace or meta.get("namespace")
        else:
            meta.pop("namespace", None)
        self._check_namespace(rt, meta.get("namespace"))
        if not meta.get("name") and meta.get("generateName"):
            for _ in range(100):
                meta["name"] = meta["generateName"] + "".join(random.choices(_GENERATE_CHARS, k=5))
                if self.get_object(rt, meta.get("namespace"), meta["name"]) is None:
                    break
        self._check_name(rt, meta.get("name"))
        if self.get_object(rt, meta.get("namespace"), meta["name"]) is not None:
            raise ApiError(409, "AlreadyExists", f'{rt.qualified} "{meta["name"]}" already exists',
                           _details(rt, meta["name"]))
        if "status" in rt.subresources and rt.plural != "nodes":
            obj.pop("status", None)
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion", "uid",
                      "creationTimestamp", "generation", "managedFields", "selfLink"):
            meta.pop(field, None)
        if manager:
            managed = fieldmanager.created(obj, manager, operation, self.field_schema(rt), rt.group_version)
            if managed:
                meta["managedFields"] = managed
        obj, warnings = self._admit(rt, obj, None, field_validation)
        meta = obj["metadata"]
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
        self._defaults_on_create(rt, obj)
        if dry_run:
            meta["resourceVersion"] = str(self.resource_version)
            return self.serve(rt, obj), warnings
        meta["resourceVersion"] = self._next_rv()
        obj["apiVersion"], obj["kind"] = rt.group_version, rt.kind
        self._put(rt, obj)
        self._emit("ADDED", rt, obj)
        if rt.group == "apiextensions.k8s.io" and rt.plural == "customresourcedefinitions":
            self._establish_crd(rt, obj)
        return self.serve(rt, self.get_object(rt, meta.get("namespace"), meta["name"]) or obj), warnings

    def _check_kind(self, rt: ResourceType, obj: Obj) -> None:
        if obj.get("kind") and obj["kind"] != rt.kind:
            raise ApiError(400, "BadRequest", f'the kind in the data ({obj["kind"]}) does not match the expected '
                                              f"kind ({rt.kind})")
        if obj.get("apiVersion") and obj["apiVersion"].split("/")[0] != rt.group_version.split("/")[0] \
                and rt.group:
            raise ApiError(400, "BadRequest", f'the API version in the data ({obj["apiVersion"]}) does not match '
                                              f"the expected API version ({rt.group_version})")

    def _defaults_on_create(self, rt: ResourceType, obj: Obj) -> None:
        """The few server-side defaults clients rely on (the rest of a kind's defaulting is not emulated)."""
        if rt.plural == "namespaces" and rt.group == "":
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj["status"] = {"phase": "Active"}
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
        elif rt.plural == "services" and rt.group == "":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            if spec.get("clusterIP") != "None":
                spec.setdefault("clusterIP", f"10.96.{random.randint(0, 255)}.{random.randint(1, 254)}")
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        elif rt.plural == "deployments" and rt.group == "apps":
            defaults.deployment(obj)

    def _establish_crd(self, rt: ResourceType, crd: Obj) -> None:
        """Register the CRD's resources and mark it Established, as the apiextensions server does."""
        names = (crd.get("spec") or {}).get("names") or {}
        try:
            self.register_crd(crd)
        except (KeyError, TypeError) as exc:
            self.warnings.append(f"CRD {crd['metadata']['name']} not registered: {exc!r}")
            return
        stamp = now_rfc3339()
        new = copy.deepcopy(crd)
        new["status"] = {
            "acceptedNames": {k: v for k, v in names.items()},
            "storedVersions": [v["name"] for v in crd["spec"].get("versions", []) if v.get("storage")],
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                 "message": "no conflicts found", "lastTransitionTime": stamp},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "message": "the initial names have been accepted", "lastTransitionTime": stamp},
            ],
        }
        new["metadata"]["resourceVersion"] = self._next_rv()
        self._put(rt, new)
        self._emit("MODIFIED", rt, new, crd)

    def write_object(self, rt: ResourceType, old: Obj, desired: Obj, subresource: str | None, *,
                     dry_run: bool = False, field_validation: str = "Ignore", manager: str | None = None,
                     managed_fields: list[Obj] | None = None) -> tuple[Obj, list[str]]:
        """Replace an existing object with `desired` (PUT, and the result of every patch).

        `manager` (the request's field manager) becomes the owner of the fields it changed;
        `managed_fields` (from a server-side apply) replaces the object's managedFields.
        """
        name = old["metadata"]["name"]
        if not isinstance(desired, dict) or not isinstance(desired.get("metadata", {}), dict):
            raise ApiError(400, "BadRequest", "the body of the request must be a JSON object with metadata")
        self._check_kind(rt, desired)
        dmeta = desired.get("metadata") or {}
        if dmeta.get("name") not in (None, name):
            raise ApiError(400, "BadRequest", f'the name of the object ({dmeta["name"]}) does not match the name '
                                              f"on the URL ({name})")
        if dmeta.get("resourceVersion") not in (None, "", old["metadata"]["resourceVersion"]):
            raise conflict(rt, name)
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in desired:
                new["status"] = copy.deepcopy(desired["status"])
            else:
                new.pop("status", None)
        else:
            new = copy.deepcopy(desired)
            new["metadata"] = copy.deepcopy(dmeta)
            if "status" in rt.subresources:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
        meta = new["metadata"]
        for field in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "namespace",
                      "name", "generation"):
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
            else:
                meta.pop(field, None)
        meta.pop("resourceVersion", None)
        sent = dmeta.get("managedFields")
        if managed_fields is None and manager and sent is not None and sent != fieldmanager.entries(old):
            managed_fields = list(sent)  # a client that rewrites managedFields (kubectl's CSA->SSA upgrade)
        if subresource == "status" or (managed_fields is None and not manager):
            managed_fields = fieldmanager.entries(old)
        elif managed_fields is None:
            managed_fields = fieldmanager.after_update(old, new, manager, self.field_schema(rt), rt.group_version)
        meta.pop("managedFields", None)
        if managed_fields:
            meta["managedFields"] = managed_fields
        if old["metadata"].get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
            if added:
                raise invalid(rt, name, [schemas.Cause("metadata.finalizers", "FieldValueForbidden",
                                                       f"Forbidden: no new finalizers can be added if the object "
                                                       f"is being deleted, found new finalizers {sorted(added)!r}")])
        new["apiVersion"], new["kind"] = rt.group_version, rt.kind
        new, warnings = self._admit(rt, new, old, field_validation)
        self._check_immutable(rt, old, new)
        meta = new["metadata"]
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return self.serve(rt, old), warnings  # a no-op write changes nothing, not even resourceVersion
        spec_old = {k: v for k, v in old.items() if k not in ("metadata", "status")}
        spec_new = {k: v for k, v in new.items() if k not in ("metadata", "status")}
        if spec_old != spec_new:
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if dry_run:
            return self.serve(rt, new), warnings
        meta["resourceVersion"] = self._next_rv()
        self._put(rt, new)
        self._emit("MODIFIED", rt, new, old)
        if rt.group == "apiextensions.k8s.io" and rt.plural == "customresourcedefinitions" and \
                new.get("spec") != old.get("spec"):
            self.register_crd(new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(rt, new)
        return self.serve(rt, new), warnings

    def _check_immutable(self, rt: ResourceType, old: Obj, new: Obj) -> None:
        """Fields the kind's update validation refuses to change (422), and the allocated ones an
        update keeps when it leaves them out."""
        spec_old, spec_new = old.get("spec") or {}, new.get("spec")
        if not isinstance(spec_new, dict):
            return
        name = old["metadata"]["name"]
        if (rt.group, rt.plural) == ("apps", "deployments") and spec_new.get("selector") != spec_old.get("selector"):
            shown = json.dumps(spec_new.get("selector"), sort_keys=True)
            raise invalid(rt, name, [schemas.Cause("spec.selector", "FieldValueInvalid",
                                                   f"Invalid value: {shown}: field is immutable")])
        if (rt.group, rt.plural) == ("", "services") and spec_old.get("clusterIP"):
            for field in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
                if field in spec_old and field not in spec_new:
                    spec_new[field] = copy.deepcopy(spec_old[field])
            if spec_new["clusterIP"] != spec_old["clusterIP"]:
                raise invalid(rt, name, [schemas.Cause("spec.clusterIPs[0]", "FieldValueInvalid",
                                                       f'Invalid value: "{spec_new["clusterIP"]}": may not change '
                                                       "once set")])

    def delete_object(self, rt: ResourceType, obj: Obj, options: Obj | None = None, *,
                      dry_run: bool = False) -> Obj:
        """Delete now, or mark for deletion (deletionTimestamp) while finalizers remain."""
        options = options or {}
        pre = options.get("preconditions") or {}
        meta = obj["metadata"]
        if pre.get("uid") and pre["uid"] != meta["uid"] or \
                pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
            raise conflict(rt, meta["name"])
        if dry_run:
            return self.serve(rt, obj)
        if options.get("propagationPolicy") == "Orphan":
            self.orphaned_uids.add(meta["uid"])
        if rt.plural == "namespaces" and rt.group == "":
            return self._delete_namespace(rt, obj)
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return self.serve(rt, obj)
            new = copy.deepcopy(obj)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new["metadata"]["resourceVersion"] = self._next_rv()
            self._put(rt, new)
            self._emit("MODIFIED", rt, new, obj)
            return self.serve(rt, new)
        self._remove(rt, obj)
        return self.serve(rt, obj)

    def _delete_namespace(self, rt: ResourceType, ns: Obj) -> Obj:
        """Namespace deletion: Terminating, delete its content (honouring finalizers), gone when empty.

        This plays the namespace lifecycle controller's part, which every cluster runs.
        """
        name = ns["metadata"]["name"]
        if not ns["metadata"].get("deletionTimestamp"):
            new = copy.deepcopy(ns)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            new["status"] = {"phase": "Terminating"}
            new["metadata"]["resourceVersion"] = self._next_rv()
            self._put(rt, new)
            self._emit("MODIFIED", rt, new, ns)
            for (group, plural), objects in list(self.store.items()):
                for (namespace, _), obj in list(objects.items()):
                    child_rt = self.type_of_store(group, plural)
                    if namespace == name and child_rt is not None:
                        self.delete_object(child_rt, obj)
        self._finish_namespace_if_empty(name)
        current = self.get_object(rt, None, name)
        return self.serve(rt, current or ns)

    def _finish_namespace_if_empty(self, name: str) -> None:
        ns_rt = self.types[("", "v1", "namespaces")]
        ns = self.get_object(ns_rt, None, name)
        if ns is None or not ns["metadata"].get("deletionTimestamp"):
            return
        if any(key[0] == name for (group, plural), objects in self.store.items() for key in objects):
            return
        self._remove(ns_rt, ns)

    # ----------------------------------------------------------------- HTTP
    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Parse with kmock; where its parser fails (e.g. `/api/v1/namespaces`), keep the HTTP part only."""
        body = await raw_request.read()
        try:
            request = await kmock.Request._parse(raw_request, id=len(self._requests))
        except ValueError:
            request = kmock.Request(id=len(self._requests), raw_request=raw_request, url=raw_request.url,
                                    method=raw_request.method, params=dict(raw_request.query),
                                    headers=dict(raw_request.headers), body=body)
        self._requests.append(request)
        if len(self._requests) > KEPT_REQUESTS:
            del self._requests[: KEPT_REQUESTS // 2]
        return await self._handle(request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """kmock reactions first (fault injection in tests), then the emulated API server."""
        if self._payloads:
            try:
                return await super()._handle(request)
            except NotImplementedError:
                pass
        raw = request._raw_request
        assert raw is not None
        route = parse_resource_path(raw.path)
        record = self._record(raw, route)
        self._current = record
        try:
            self._authorize(raw, route, record)
            response = await self._dispatch(raw, route, request.body)
        except ApiError as exc:
            response = aiohttp.web.json_response(exc.status(), status=exc.code)
        except Exception as exc:  # a bug in the emulator: answer 500 with the reason, and log it
            logger.exception("emulated API server failed on %s %s", raw.method, raw.path_qs)
            body = ApiError(500, "InternalError", f"emulated API server error: {exc!r}").status()
            response = aiohttp.web.json_response(body, status=500)
        record.code = response.status
        return response

    def _authorize(self, raw: aiohttp.web.BaseRequest, route: Route | None, record: RequestRecord) -> None:
        """RBAC, for the tokens registered as restricted (403 for what their roles do not grant)."""
        auth = raw.headers.get("Authorization", "")
        user = self.restricted_tokens.get(auth[7:]) if auth.startswith("Bearer ") else None
        if user is None or route is None or route.plural is None or record.group is None:
            return  # the admin, or discovery (granted to every authenticated user)
        if raw.method.upper() == "PATCH" and raw.content_type == APPLY_PATCH and route.name:
            rt = self.types.get((route.group, route.version, route.plural))
            if rt is not None and self.get_object(rt, route.namespace, route.name) is None:
                record.also = ("create",)
        resource = f"{record.resource}/{record.subresource}" if record.subresource else record.resource
        store = self.store
        roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
                 for plural in ("roles", "clusterroles")
                 for o in store[("rbac.authorization.k8s.io", plural)].values()}
        bindings = [o for plural in ("rolebindings", "clusterrolebindings")
                    for o in store[("rbac.authorization.k8s.io", plural)].values()]
        for verb in record.verbs:
            request = rbac.Request(verb, record.group, resource, record.namespace, record.name)
            if not rbac.allowed(request, user, roles, bindings):
                raise ApiError(403, "Forbidden", rbac.forbidden_message(request, user),
                               {"name": record.name or "", "group": record.group, "kind": record.resource})

    def _record(self, raw: aiohttp.web.BaseRequest, route: Route | None) -> RequestRecord:
        method = raw.method.upper()
        if route is None or route.plural is None:
            record = RequestRecord(method, raw.path, method.lower(), user_agent=raw.headers.get("User-Agent", ""))
        else:
            if method == "GET":
                watching = raw.query.get("watch") in ("true", "1") or route.legacy_watch
                verb = "watch" if watching else "get" if route.name else "list"
            else:
                verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                        "DELETE": "delete" if route.name else "deletecollection"}.get(method, method.lower())
            record = RequestRecord(method, raw.path, verb, route.group, route.version, route.plural,
                                   route.namespace, route.name, route.subresource,
                                   raw.headers.get("User-Agent", ""), label_selector=raw.query.get("labelSelector"))
        self.request_log.append(record)
        return record

    async def _dispatch(self, raw: aiohttp.web.BaseRequest, route: Route | None, body: bytes
                        ) -> aiohttp.web.StreamResponse:
        path = raw.path.rstrip("/") or "/"
        if route is None:
            return await self._serve_non_resource(raw, path)
        if route.plural is None:
            return aiohttp.web.json_response(self._discovery_version(route.group, route.version))
        rt = self._type(route)
        method = raw.method.upper()
        query = raw.query
        if route.namespace is not None and not rt.namespaced:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if route.subresource and (route.subresource not in SERVED_SUBRESOURCES
                                  or route.subresource not in rt.subresources):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if rt.namespaced and route.namespace is None and method in ("POST", "PUT", "PATCH", "DELETE") \
                and route.name is None and method != "DELETE":
            raise ApiError(405, "MethodNotAllowed", f"{rt.plural} must be created in a namespace")
        dry_run = query.get("dryRun") == "All"
        field_validation = query.get("fieldValidation", "Ignore")
        # As the real server: the request's fieldManager, else the client's name from its User-Agent.
        manager = query.get("fieldManager") or raw.headers.get("User-Agent", "unknown").split("/")[0] or "unknown"
        if method == "GET" and (query.get("watch") in ("true", "1") or route.legacy_watch):
            return await self._watch(raw, rt, route)
        if method == "GET" and route.name is None:
            return self._json(self._list(rt, route.namespace, query), raw)
        if method == "GET":
            return self._json(self.serve(rt, self._existing(rt, route)), raw)
        if method == "POST" and route.name is None:
            obj, warnings = self.create_object(rt, route.namespace, self._parse_body(body, raw),
                                               dry_run=dry_run, field_validation=field_validation, manager=manager)
            return self._json(obj, raw, 201, warnings)
        if method == "PUT" and route.name is not None:
            obj, warnings = self.write_object(rt, self._existing(rt, route), self._parse_body(body, raw),
                                              route.subresource, dry_run=dry_run, field_validation=field_validation,
                                              manager=manager)
            return self._json(obj, raw, 200, warnings)
        if method == "PATCH" and route.name is not None:
            return await self._patch(raw, rt, route, body, dry_run, field_validation, manager)
        if method == "DELETE" and route.name is not None:
            options = self._parse_body(body, raw) if body.strip() else {}
            return self._json(self.delete_object(rt, self._existing(rt, route), options, dry_run=dry_run), raw)
        if method == "DELETE":
            options = self._parse_body(body, raw) if body.strip() else {}
            listed = self._list(rt, route.namespace, query)
            for item in listed["items"]:
                obj = self.get_object(rt, item["metadata"].get("namespace"), item["metadata"]["name"])
                if obj is not None:
                    self.delete_object(rt, obj, options, dry_run=dry_run)
            return self._json(listed, raw)
        raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on the requested resource")

    def _existing(self, rt: ResourceType, route: Route) -> Obj:
        obj = self.get_object(rt, route.namespace, route.name or "")
        if obj is None:
            raise not_found(rt, route.name or "")
        return obj

    @staticmethod
    def _parse_body(body: bytes, raw: aiohttp.web.BaseRequest) -> Any:
        if "protobuf" in raw.content_type or "cbor" in raw.content_type:
            # Answered like a server without that encoding: clients (kubectl) fall back to JSON.
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                        f"accepted media types include: application/json, "
                                                        f"application/yaml ({raw.content_type} is not emulated)")
        try:
            if "yaml" in raw.content_type:
                return yaml.safe_load(body)
            return json.loads(body)
        except (ValueError, yaml.YAMLError) as exc:
            raise ApiError(400, "BadRequest", f"the request body could not be decoded: {exc}") from exc

    def _json(self, body: Any, raw: aiohttp.web.BaseRequest, status: int = 200,
              warnings: Iterable[str] = ()) -> aiohttp.web.Response:
        if body.get("kind", "").endswith("List") and "as=Table" in raw.headers.get("Accept", "") \
                and "items" in body:
            body = self._table(body)
        headers = {"Warning": ", ".join(f'299 - "{w}"' for w in warnings)} if warnings else None
        return aiohttp.web.json_response(body, status=status, headers=headers)

    def _list(self, rt: ResourceType, namespace: str | None, query: Mapping[str, str]) -> Obj:
        try:
            matches = selectors.make_matcher(query.get("labelSelector"), query.get("fieldSelector"))
        except selectors.SelectorError as exc:
            raise ApiError(400, "BadRequest", str(exc)) from exc
        items = [
            self.serve(rt, obj)
            for (ns, _), obj in sorted(self.store[(rt.group, rt.plural)].items())
            if (namespace is None or ns == namespace) and matches(obj)
        ]
        return {"apiVersion": rt.group_version, "kind": f"{rt.kind}List",
                "metadata": {"resourceVersion": str(self.resource_version)}, "items": items}

    async def _patch(self, raw: aiohttp.web.BaseRequest, rt: ResourceType, route: Route, body: bytes,
                     dry_run: bool, field_validation: str, manager: str) -> aiohttp.web.Response:
        content_type = raw.content_type
        patch = self._parse_body(body, raw)
        old = self.get_object(rt, route.namespace, route.name or "")
        if content_type == APPLY_PATCH:
            if not raw.query.get("fieldManager"):
                raise ApiError(422, "Invalid", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required "
                                               "value: is required for apply patch")
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "an apply patch must be an object")
            for field in ("apiVersion", "kind"):
                if not patch.get(field):
                    raise ApiError(400, "BadRequest", f"error decoding YAML: Object '{field}' is missing")
            self._check_kind(rt, patch)
            if old is None:
                meta = patch.setdefault("metadata", {})
                if meta.get("name") not in (None, route.name):
                    raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
                meta["name"] = route.name
                if route.subresource:
                    raise not_found(rt, route.name or "")
                self._current.also = ("create",)  # as RBAC sees it: an apply that creates needs create
                obj, warnings = self.create_object(rt, route.namespace, patch, dry_run=dry_run,
                                                   field_validation=field_validation, manager=manager,
                                                   operation="Apply")
                return self._json(obj, raw, 201, warnings)
            if route.subresource:  # ownership of status is not emulated: the apply merges
                desired = patches.json_merge_patch(self.serve(rt, old), patch)
            else:
                meta = patch.get("metadata") or {}
                if meta.get("name") not in (None, route.name):
                    raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
                try:
                    desired = fieldmanager.apply(self.serve(rt, old), patch, manager, self.field_schema(rt),
                                                 rt.group_version, force=raw.query.get("force") == "true")
                except fieldmanager.Conflicts as exc:
                    causes = [schemas.Cause(fieldmanager.render(p), "FieldManagerConflict",
                                            f'conflict with "{m}"') for m, p in exc.conflicts]
                    raise ApiError(409, "Conflict", str(exc), _details(rt, route.name, causes)) from exc
                obj, warnings = self.write_object(rt, old, desired, None, dry_run=dry_run,
                                                  field_validation=field_validation,
                                                  managed_fields=desired["metadata"].get("managedFields") or [])
                return self._json(obj, raw, 200, warnings)
        else:
            if old is None:
                raise not_found(rt, route.name or "")
            current = self.serve(rt, old)
            try:
                if content_type == JSON_PATCH:
                    desired = patches.json_patch(current, patch)
                elif content_type == MERGE_PATCH:
                    desired = patches.json_merge_patch(current, patch)
                elif content_type == STRATEGIC_PATCH:
                    if rt.custom:
                        raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown "
                                       "format - accepted media types include: application/json-patch+json, "
                                       "application/merge-patch+json, application/apply-patch+yaml")
                    desired = patches.strategic_merge_patch(current, patch)
                else:
                    raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format "
                                   f"({content_type})")
            except patches.PatchError as exc:
                raise ApiError(422, "Invalid", str(exc), _details(rt, route.name)) from exc
        if not isinstance(desired, dict):
            raise ApiError(422, "Invalid", "the patch must leave an object", _details(rt, route.name))
        obj, warnings = self.write_object(rt, old, desired, route.subresource, dry_run=dry_run,
                                          field_validation=field_validation, manager=manager)
        return self._json(obj, raw, 200, warnings)

    async def _watch(self, raw: aiohttp.web.BaseRequest, rt: ResourceType, route: Route
                     ) -> aiohttp.web.StreamResponse:
        query = raw.query
        field_selector = query.get("fieldSelector")
        if route.name:
            field_selector = ",".join(filter(None, [field_selector, f"metadata.name={route.name}"]))
        try:
            matches = selectors.make_matcher(query.get("labelSelector"), field_selector)
        except selectors.SelectorError as exc:
            raise ApiError(400, "BadRequest", str(exc)) from exc
        namespace = route.namespace
        store_key = (rt.group, rt.plural)

        def visible(obj: Obj | None) -> bool:
            if obj is None:
                return False
            return (namespace is None or obj["metadata"].get("namespace") == namespace) and matches(obj)

        watch = _Watch(store_key, namespace, matches, asyncio.Queue())
        since = query.get("resourceVersion", "")
        initial: list[Obj] = []
        # No await between registering and taking the snapshot: no event can fall between the two.
        self.watches.append(watch)
        try:
            if since in ("", "0"):
                initial = [{"type": "ADDED", "object": self.serve(rt, obj)}
                           for _, obj in sorted(self.store[store_key].items()) if visible(obj)]
            else:
                try:
                    since_rv = int(since)
                except ValueError:
                    raise ApiError(400, "BadRequest", f"invalid resourceVersion {since!r}") from None
                if since_rv < self.compacted_rv:
                    initial = [{"type": "ERROR", "object": ApiError(
                        410, "Expired", f"too old resource version: {since_rv} ({self.compacted_rv})").status()}]
                else:
                    for event in self.history:
                        if event[0] > since_rv and event[1] == store_key:
                            watch.queue.put_nowait(event)
            response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            await response.prepare(raw)
            for item in initial:
                await response.write(json.dumps(item).encode() + b"\n")
            if initial and initial[0]["type"] == "ERROR":
                return response
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
            deadline = asyncio.get_running_loop().time() + timeout if timeout else None
            while True:
                remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(watch.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                if event is None:  # the server is stopping
                    break
                _, _, event_type, obj, old = event
                now_visible, was_visible = visible(obj), visible(old)
                if event_type == "MODIFIED" and now_visible and not was_visible:
                    event_type = "ADDED"
                elif event_type == "MODIFIED" and was_visible and not now_visible:
                    event_type, now_visible = "DELETED", True
                elif event_type == "DELETED":
                    now_visible = was_visible or now_visible
                if now_visible:
                    line = json.dumps({"type": event_type, "object": self.serve(rt, obj)})
                    await response.write(line.encode() + b"\n")
            return response
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        finally:
            self.watches.remove(watch)

    def close_watches(self) -> None:
        for watch in self.watches:
            watch.queue.put_nowait(None)

    # ----------------------------------------------------------------- discovery and non-resource URLs
    async def _serve_non_resource(self, raw: aiohttp.web.BaseRequest, path: str) -> aiohttp.web.StreamResponse:
        if path == "/version":
            return aiohttp.web.json_response({
                "major": "1", "minor": "32", "gitVersion": "v1.32.0-aiflow-emulated", "gitCommit": "",
                "gitTreeState": "clean", "buildDate": "2024-12-11T00:00:00Z", "goVersion": "go1.23",
                "compiler": "gc", "platform": "linux/amd64"})
        if path in ("/healthz", "/livez", "/readyz"):
            return aiohttp.web.Response(text="ok")
        if path == "/api":
            host = f"{raw.host}"
            return aiohttp.web.json_response({"kind": "APIVersions", "versions": ["v1"],
                                              "serverAddressByClientCIDRs": [
                                                  {"clientCIDR": "0.0.0.0/0", "serverAddress": host}]})
        if path == "/apis":
            return aiohttp.web.json_response({"kind": "APIGroupList", "apiVersion": "v1",
                                              "groups": list(self._groups().values())})
        if path.startswith("/apis/") and path.count("/") == 2:
            group = self._groups().get(path.split("/")[2])
            if group is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return aiohttp.web.json_response({"kind": "APIGroup", "apiVersion": "v1", **group})
        if path == "/":
            paths = {"/api", "/api/v1", "/apis", "/version", "/healthz", "/livez", "/readyz"}
            for name, group in self._groups().items():
                paths.add(f"/apis/{name}")
                paths.update(f"/apis/{v['groupVersion']}" for v in group["versions"])
            return aiohttp.web.json_response({"paths": sorted(paths)})
        if path == "/openapi/v3":
            return aiohttp.web.json_response({"paths": {
                self._gv_path(g, v): {"serverRelativeURL": f"/openapi/v3/{self._gv_path(g, v)}?hash=emulated"}
                for g, v in sorted({(g, v) for (g, v, _) in self.types})}})
        if path.startswith("/openapi/v3/"):
            return aiohttp.web.json_response(self._openapi_v3(path[len("/openapi/v3/"):]))
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    @staticmethod
    def _gv_path(group: str, version: str) -> str:
        return f"apis/{group}/{version}" if group else f"api/{version}"

    def _openapi_v3(self, gv_path: str) -> Obj:
        """A skeleton OpenAPI v3 document: the PATCH operations and their `fieldValidation` parameter.

        It carries no schemas. That is enough for kubectl to see that the server validates fields
        (so `kubectl apply` works with its default --validate=strict); schema-based client features
        (`kubectl explain`, client-side validation) are not emulated.
        """
        served = [rt for (g, v, _), rt in self.types.items() if self._gv_path(g, v) == gv_path]
        if not served:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        params = [{"name": name, "in": "query", "schema": {"type": "string"}}
                  for name in ("dryRun", "fieldManager", "fieldValidation", "force")]
        paths = {}
        for rt in served:
            gvk = {"group": rt.group, "version": rt.version, "kind": rt.kind}
            url = rt.url("{namespace}", "{name}") if rt.namespaced else rt.url(None, "{name}")
            paths[url] = {"patch": {"operationId": f"patch{rt.kind}", "parameters": params,
                                    "x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": gvk}}
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes (emulated)", "version": "v1.32.0"},
                "paths": paths, "components": {"schemas": {}}}

    def _groups(self) -> dict[str, Obj]:
        groups: dict[str, Obj] = {}
        for (group, version, _), _rt in self.types.items():
            if not group:
                continue
            entry = groups.setdefault(group, {"name": group, "versions": []})
            gv = {"groupVersion": f"{group}/{version}", "version": version}
            if gv not in entry["versions"]:
                entry["versions"].append(gv)
        for entry in groups.values():
            entry["preferredVersion"] = entry["versions"][0]
        return groups

    def _discovery_version(self, group: str, version: str) -> Obj:
        served = [rt for (g, v, _), rt in self.types.items() if g == group and v == version]
        if not served:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        resources = []
        for rt in served:
            resources.append({"name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced,
                              "kind": rt.kind, "verbs": list(rt.verbs), "shortNames": list(rt.short_names),
                              "categories": list(rt.categories)})
            for sub in rt.subresources:
                if sub in SERVED_SUBRESOURCES:
                    resources.append({"name": f"{rt.plural}/{sub}", "singularName": "", "namespaced": rt.namespaced,
                                      "kind": rt.kind, "verbs": list(SUBRESOURCE_VERBS)})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": resources}

    def _table(self, listing: Obj) -> Obj:
        """`kubectl get` asks for a Table: NAME, the CRD's printer columns, AGE."""
        kind = listing["kind"][:-4]
        rt = next((t for t in self.types.values() if t.kind == kind and t.group_version == listing["apiVersion"]),
                  None)
        columns = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
        extra = list(rt.printer_columns) if rt else []
        has_age = any(c.get("jsonPath") == ".metadata.creationTimestamp" for c in extra)
        columns += [{"name": c["name"], "type": c.get("type", "string"), "format": c.get("format", ""),
                     "description": c.get("description", ""), "priority": c.get("priority", 0)} for c in extra]
        if not has_age:
            columns.append({"name": "Age", "type": "date", "format": "", "description": "Age", "priority": 0})
        rows = []
        for item in listing["items"]:
            cells: list[Any] = [item["metadata"]["name"]]
            cells += [_json_path(item, c.get("jsonPath", "")) for c in extra]
            if not has_age:
                cells.append(item["metadata"].get("creationTimestamp"))
            cells = [_age(v) if columns[i]["type"] == "date" and isinstance(v, str) else v
                     for i, v in enumerate(cells)]
            rows.append({"cells": cells, "object": {"kind": "PartialObjectMetadata",
                                                    "apiVersion": "meta.k8s.io/v1",
                                                    "metadata": item["metadata"]}})
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": listing["metadata"]["resourceVersion"]},
                "columnDefinitions": columns, "rows": rows}


def _json_path(obj: Any, path: str) -> Any:
    """The simple `.a.b[0].c` JSONPaths printer columns use (None when absent); `{...}` templates."""
    if path.startswith("{"):
        return re.sub(r"\{([^}]*)\}", lambda m: str(_json_path(obj, m.group(1)) or 0), path)
    for part in re.findall(r"(?:\\.|[^.\[\]])+|\[\d+\]", path):
        part = part.replace("\\.", ".")
        if part.startswith("["):
            index = int(part[1:-1])
            obj = obj[index] if isinstance(obj, list) and len(obj) > index else None
        else:
            obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _age(stamp: str) -> str:
    try:
        then = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return stamp
    seconds = int((datetime.datetime.now(datetime.timezone.utc) - then).total_seconds())
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h"


class EmulatedApiServer:
    """The emulated API server on 127.0.0.1, running in its own thread and event loop.

    Use as a context manager (`with EmulatedApiServer() as server:`); `server.url` and
    `server.kubeconfig` point clients at it. The helper methods act on the state directly, from any
    thread; they are not requests and do not appear in `request_log`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, namespaces: Iterable[str] = DEFAULT_NAMESPACES,
                 workdir: str | Path | None = None, validate_builtin: bool = True) -> None:
        self.host, self.port = host, port
        self.validate_builtin = validate_builtin
        self._namespaces = tuple(namespaces)
        self._own_dir = tempfile.TemporaryDirectory(prefix="kube-apiserver-") if workdir is None else None
        self.workdir = Path(workdir or self._own_dir.name)  # type: ignore[union-attr]
        self.handler: KubeApiHandler | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.url = ""
        self.kubeconfig = self.workdir / "kubeconfig"
        self._controllers: list[Any] = []

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "EmulatedApiServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="emulated-kube-apiserver", daemon=True)
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise RuntimeError("the emulated API server failed to start") from self._error
        if not self.url:
            raise RuntimeError("the emulated API server did not start within 30 s")
        self.kubeconfig.write_text(yaml.safe_dump(self.kubeconfig_data()))

    def stop(self) -> None:
        while self._controllers:
            self._controllers.pop().stop()
        if self.loop is not None and self._stopping is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(30)
        self._thread = None
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._error = exc
            self._started.set()

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self.handler = KubeApiHandler(self._namespaces, self.validate_builtin)
        async with self.handler, kmock.Server(self.handler, host=self.host, port=self.port or None) as server:
            self.port = server.port
            self.url = f"http://{self.host}:{server.port}"
            self._started.set()
            await self._stopping.wait()
            self.handler.close_watches()
            await asyncio.sleep(0.05)  # let the watch streams end before the server closes

    def kubectl_env(self) -> dict[str, str]:
        """Environment for a `kubectl` subprocess: this server's kubeconfig, a private discovery cache."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "KUBECACHEDIR": str(self.workdir / "cache")}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the real `kubectl` against this server; raise with its stderr if it fails and `check`."""
        result = subprocess.run(["kubectl", *args], input=input, env=self.kubectl_env(), capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def authorize_token(self, token: str, user: "rbac.User") -> Path:
        """Requests with bearer `token` are made as `user` and authorized by RBAC (the Roles,
        ClusterRoles and bindings stored here); returns a kubeconfig with that token."""
        self.call(lambda h: h.restricted_tokens.__setitem__(token, user))
        path = self.workdir / f"kubeconfig-{token}"
        path.write_text(yaml.safe_dump(self.kubeconfig_data(token=token)))
        return path

    def kubeconfig_data(self, namespace: str = "default", token: str = "emulated") -> Obj:
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "emulated",
            "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
            "users": [{"name": "emulated", "user": {"token": token}}],
            "contexts": [{"name": "emulated", "context": {"cluster": "emulated", "user": "emulated",
                                                           "namespace": namespace}}],
        }

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn(handler, ...)` in the server's loop (state is only ever touched there)."""
        assert self.loop is not None and self.handler is not None, "the server is not running"
        handler = self.handler

        async def run() -> Any:
            return fn(handler, *args, **kwargs)

        if threading.current_thread() is self._thread:
            return fn(handler, *args, **kwargs)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    # ------------------------------------------------------------ reading
    def get(self, resource: str, name: str, namespace: str | None = None) -> Obj | None:
        """The stored object (a copy) or None; `resource` is a plural, kind or short name."""
        def read(h: KubeApiHandler) -> Obj | None:
            rt = h.resolve(resource)
            obj = h.get_object(rt, namespace, name)
            return None if obj is None else h.serve(rt, obj)
        return self.call(read)

    def list(self, resource: str, namespace: str | None = None, label_selector: str | None = None) -> list[Obj]:
        """Stored objects (copies), optionally by namespace and label selector."""
        def read(h: KubeApiHandler) -> list[Obj]:
            rt = h.resolve(resource)
            return h._list(rt, namespace, {"labelSelector": label_selector or ""})["items"]
        return self.call(read)

    @property
    def request_log(self) -> list[RequestRecord]:
        return self.call(lambda h: list(h.request_log))

    def clear_request_log(self) -> None:
        self.call(lambda h: h.request_log.clear())

    @property
    def warnings(self) -> list[str]:
        return self.call(lambda h: list(h.warnings))

    # ------------------------------------------------------------ writing (as the API server's own writes)
    def create(self, obj: Obj) -> Obj:
        """Create an object (resource found from apiVersion/kind), as POST would."""
        def write(h: KubeApiHandler) -> Obj:
            rt = self._type_of(h, obj)
            return h.create_object(rt, obj.get("metadata", {}).get("namespace"), obj)[0]
        return self.call(write)

    def patch(self, resource: str, name: str, patch: Obj, namespace: str | None = None,
              subresource: str | None = None) -> Obj:
        """JSON-merge-patch an object (or its status with subresource="status"), as PATCH would."""
        def write(h: KubeApiHandler) -> Obj:
            rt = h.resolve(resource)
            old = h.get_object(rt, namespace, name)
            if old is None:
                raise not_found(rt, name)
            desired = patches.json_merge_patch(h.serve(rt, old), patch)
            return h.write_object(rt, old, desired, subresource)[0]
        return self.call(write)

    def delete(self, resource: str, name: str, namespace: str | None = None) -> Obj | None:
        """Delete an object (finalizers honoured), as DELETE would; None if it did not exist."""
        def write(h: KubeApiHandler) -> Obj | None:
            rt = h.resolve(resource)
            old = h.get_object(rt, namespace, name)
            return None if old is None else h.delete_object(rt, old)
        return self.call(write)

    def create_namespace(self, name: str) -> Obj:
        return self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    @staticmethod
    def _type_of(h: KubeApiHandler, obj: Obj) -> ResourceType:
        api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
        group, _, version = api_version.rpartition("/")
        for rt in h.types.values():
            if rt.group == group and rt.version == version and rt.kind == kind:
                return rt
        raise KeyError(f"no resource type serves {api_version} {kind}")

    # ------------------------------------------------------------ nodes (a cluster's nodes, seeded)
    def seed_node(self, name: str, tier: str | None = None, *, labels: Mapping[str, str] | None = None,
                  allocatable: Mapping[str, str] | None = None, ready: bool = True,
                  taints: list[Obj] | None = None) -> Obj:
        """Add a Node as a kubelet would register it: labels (tier in `aiflow.io/tier`), Ready, allocatable."""
        all_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", **(labels or {})}
        if tier is not None:
            all_labels["aiflow.io/tier"] = tier
        resources = dict(allocatable or {"cpu": "4", "memory": "8Gi", "pods": "110"})
        node = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": all_labels},
            "spec": {"taints": list(taints)} if taints else {},
            "status": {"capacity": resources, "allocatable": resources,
                       "conditions": [_node_ready_condition(ready)],
                       "addresses": [{"type": "Hostname", "address": name}]},
        }
        return self.create(node)

    def set_node_ready(self, name: str, ready: bool) -> Obj:
        """Flip the node's Ready condition, as the node lifecycle controller would."""
        return self.patch("nodes", name, {"status": {"conditions": [_node_ready_condition(ready)]}},
                          subresource="status")

    def patch_node(self, name: str, patch: Obj) -> Obj:
        return self.patch("nodes", name, patch)

    def remove_node(self, name: str) -> Obj | None:
        return self.delete("nodes", name)

    # ------------------------------------------------------------ metrics.k8s.io (what metrics-server serves)
    def serve_node_metrics(self) -> None:
        """Serve metrics.k8s.io/v1beta1 NodeMetrics (discovery, get, list), as a cluster does once
        metrics-server has registered its APIService. Nothing samples the nodes here: the values are
        what `set_node_metrics` wrote."""
        self.call(lambda h: h.types.setdefault((NODE_METRICS.group, NODE_METRICS.version, NODE_METRICS.plural),
                                               NODE_METRICS))

    def set_node_metrics(self, name: str, cpu: str, memory: str = "0") -> Obj:
        """Write a node's NodeMetrics (`usage.cpu` like "1500m"), as metrics-server reports it."""
        def write(h: KubeApiHandler) -> Obj:
            obj = {"apiVersion": NODE_METRICS.group_version, "kind": NODE_METRICS.kind, "metadata": {"name": name},
                   "timestamp": now_rfc3339(), "window": "10s", "usage": {"cpu": cpu, "memory": memory}}
            old = h.get_object(NODE_METRICS, None, name)
            if old is None:
                return h.create_object(NODE_METRICS, None, obj)[0]
            return h.write_object(NODE_METRICS, old, {**h.serve(NODE_METRICS, old), **obj,
                                                      "metadata": old["metadata"]}, None)[0]
        return self.call(write)

    # ------------------------------------------------------------ controllers (explicit stand-ins)
    def start_garbage_collector(self, interval: float = 0.1) -> Any:
        """Run the garbage collector stand-in (tests/kube/controllers.py) until the server stops."""
        from tests.kube.controllers import GarbageCollector

        controller = GarbageCollector(self)
        controller.interval = interval
        self._controllers.append(controller.start())
        return controller

    def start_deployment_controller(self, selector: Callable[[Obj], bool] | None = None,
                                    namespace: str | None = None, interval: float = 0.1) -> Any:
        """Run the Deployment controller stand-in: selected Deployments report all replicas ready."""
        from tests.kube.controllers import DeploymentController

        controller = DeploymentController(self, selector, namespace)
        controller.interval = interval
        self._controllers.append(controller.start())
        return controller

    def start_endpointslice_controller(self, selector: Callable[[Obj], bool] | None = None,
                                       namespace: str | None = None, interval: float = 0.1) -> Any:
        """Run the EndpointSlice controller stand-in: selected Services' slices follow the ready
        replicas of the Deployments they select."""
        from tests.kube.controllers import EndpointSliceController

        controller = EndpointSliceController(self, selector, namespace)
        controller.interval = interval
        self._controllers.append(controller.start())
        return controller

    def mark_deployments_ready(self, namespace: str | None = None, names: Iterable[str] | None = None,
                               label_selector: str | None = None, ready: bool = True) -> list[str]:
        """Once: write Deployment status as if all replicas were (or were not) ready."""
        from tests.kube.controllers import mark_deployments_ready

        return mark_deployments_ready(self, namespace, names, label_selector, ready)

    def collect_garbage(self) -> list[tuple[str, str | None, str]]:
        """Once: delete (cascading) every object whose owners are all gone."""
        from tests.kube.controllers import GarbageCollector

        return GarbageCollector(self).collect()

    # ------------------------------------------------------------ waiting
    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.05,
                 message: str = "condition") -> Any:
        """Poll `predicate` until it returns a truthy value; raise TimeoutError with `message` otherwise."""
        return wait_for(predicate, timeout, interval, message)


def wait_for(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.05,
             message: str = "condition") -> Any:
    """Poll `predicate` until it returns a truthy value (returned); raise TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def derive_rbac_rules(records: Iterable[RequestRecord]) -> list[Obj]:
    """RBAC PolicyRules covering the resource requests recorded (one rule per API group, sorted)."""
    by_group: dict[str, dict[str, set[str]]] = collections.defaultdict(lambda: collections.defaultdict(set))
    for record in records:
        if record.resource is None or record.group is None:
            continue
        resource = f"{record.resource}/{record.subresource}" if record.subresource else record.resource
        by_group[record.group][resource].update(record.verbs)
    rules = []
    for group in sorted(by_group):
        # Resources with identical verbs share a rule, as hand-written roles do.
        by_verbs: dict[tuple[str, ...], list[str]] = collections.defaultdict(list)
        for resource, verbs in sorted(by_group[group].items()):
            by_verbs[tuple(sorted(verbs))].append(resource)
        for verbs, resources in sorted(by_verbs.items(), key=lambda item: item[1]):
            rules.append({"apiGroups": [group], "resources": resources, "verbs": list(verbs)})
    return rules


def _node_ready_condition(ready: bool) -> Obj:
    stamp = now_rfc3339()
    return {"type": "Ready", "status": "True" if ready else "False",
            "reason": "KubeletReady" if ready else "KubeletNotReady",
            "message": "kubelet is posting ready status" if ready else "node is not ready",
            "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.kube.apiserver [--port N] [--kubeconfig PATH]`: serve until interrupted.

    For measuring an operator process apart from the server (e.g. its memory in bench/), and for
    trying kubectl by hand. Prints the URL and the kubeconfig path.
    """
    import argparse
    import shutil
    import signal

    parser = argparse.ArgumentParser(prog="python -m tests.kube.apiserver", description=main.__doc__)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--kubeconfig", type=Path, help="also write the kubeconfig here")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with EmulatedApiServer(port=args.port) as server:
        if args.kubeconfig:
            shutil.copyfile(server.kubeconfig, args.kubeconfig)
        print(f"serving {server.url}; KUBECONFIG={args.kubeconfig or server.kubeconfig}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
