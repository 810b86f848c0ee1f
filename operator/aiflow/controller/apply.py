"""Make the cluster hold exactly the rendered objects of a flow: apply what differs, delete the flow's
objects that are no longer rendered.

Every object is written with server-side apply under one field manager (`FIELD_MANAGER`) with
conflicts forced: the API server merges, owns the diffing, and removes the fields the operator
applied before and renders no more (a stage's removed resource limit, an env var dropped).

An apply that would change nothing is not sent (`unchanged`, pure): the fields the operator owns
(its entry in the live object's managedFields) are read back from the live object and compared with
what is rendered. A real API server would answer such an apply without a write (same
resourceVersion), but skipping it saves a request per object per resync and keeps the operator's
writes in the audit log meaningful. The comparison allows for what the server does to what it
stores: an empty value is not kept (`value: ""` of an env var: `omitempty`), quantities are
normalised (`1000m` is `1`), and defaults appear only in fields the operator does not own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kubernetes.utils import parse_quantity

from aiflow.controller.kube import AUTOSCALERS, DEPLOYMENTS, DISRUPTION_BUDGETS, FIELD_MANAGER, SERVICES, KubeApi, Resource
from aiflow.render.names import selector_string

KINDS: dict[str, Resource] = {"Service": SERVICES, "Deployment": DEPLOYMENTS, "PodDisruptionBudget": DISRUPTION_BUDGETS,
                             "HorizontalPodAutoscaler": AUTOSCALERS}
# The parts of an object the operator manages (name and namespace are its identity).
MANAGED_METADATA = ("labels", "annotations", "ownerReferences")
# Values the API server does not store (omitempty): rendering one is the same as leaving it out.
_EMPTY = ("", None, {}, [])


@dataclass(frozen=True)
class Action:
    verb: str  # Created | Updated | Deleted
    kind: str
    name: str
    fields: tuple[str, ...] = ()  # paths an update changed (up to three levels deep)

    def __str__(self) -> str:
        changed = f" ({', '.join(self.fields)})" if self.fields else ""
        return f"{self.verb.lower()} {self.kind} {self.name}{changed}"


class NameConflict(Exception):
    """An object the flow needs exists under the same name but belongs to something else."""


def _same_scalar(desired, live, in_resources: bool) -> bool:
    if desired == live:
        return True
    if in_resources and isinstance(desired, (str, int)) and isinstance(live, (str, int)):
        try:  # "1000m" and "1" are one CPU: the API server normalises quantities
            return parse_quantity(desired) == parse_quantity(live)
        except ValueError:
            return False
    return False


def same(desired, owned, in_resources: bool = False) -> bool:
    """Whether the fields the operator owns (`owned`, read back from the live object) hold exactly
    what it renders (`desired`): no field missing or different, none the operator would remove."""
    if isinstance(desired, dict) and isinstance(owned, dict):
        return all(same(v, owned[k], in_resources or k == "resources") if k in owned else v in _EMPTY
                   for k, v in desired.items()) and all(k in desired for k in owned)
    if isinstance(desired, list) and isinstance(owned, list):
        return len(desired) == len(owned) and all(same(d, o, in_resources) for d, o in zip(desired, owned))
    return _same_scalar(desired, owned, in_resources)


def managed(obj: dict) -> dict:
    """The parts of an object the operator manages: its labels, annotations, owners and spec."""
    meta = obj.get("metadata") or {}
    out = {"metadata": {k: meta[k] for k in MANAGED_METADATA if k in meta}}
    if "spec" in obj:
        out["spec"] = obj["spec"]
    return out


def owned_fields(live: dict, manager: str = FIELD_MANAGER) -> dict | None:
    """The managedFields (FieldsV1) the manager's last apply left on `live`; None when it never applied."""
    for entry in (live.get("metadata") or {}).get("managedFields") or ():
        if entry.get("manager") == manager and entry.get("operation") == "Apply" and not entry.get("subresource"):
            return entry.get("fieldsV1") or {}
    return None


def extract(value, fields: dict):
    """The part of `value` that the FieldsV1 tree `fields` names (`f:` fields, `k:` items of keyed
    lists, `v:` items of sets; a leaf takes the whole value)."""
    members = {k: v for k, v in fields.items() if k != "."}
    if not members:
        return value
    if isinstance(value, dict):
        return {k[2:]: extract(value[k[2:]], sub) for k, sub in members.items()
                if k.startswith("f:") and k[2:] in value}
    if isinstance(value, list):
        out = []
        for item in value:
            for key, sub in members.items():
                wanted = json.loads(key[2:]) if key[:2] in ("k:", "v:") else None
                if key.startswith("k:") and isinstance(item, dict) and all(item.get(f) == v for f, v in wanted.items()):
                    out.append(extract(item, sub))
                    break
                if key.startswith("v:") and item == wanted:
                    out.append(item)
                    break
        return out
    return value


def upgrade_operations(live: dict, manager: str = FIELD_MANAGER) -> list[dict] | None:
    """A JSON patch that turns the manager's `Update` entry into its `Apply` entry, for an object an
    operator version before server-side apply wrote (with merge patches, as the same manager name):
    without it the old entry keeps owning the fields it set, and the first apply that no longer
    renders one of them would not remove it. None when there is nothing to upgrade."""
    entries = (live.get("metadata") or {}).get("managedFields") or []
    if owned_fields(live, manager) is not None:
        return None
    for index, entry in enumerate(entries):
        if entry.get("manager") == manager and entry.get("operation") == "Update" and not entry.get("subresource"):
            return [{"op": "test", "path": "/metadata/resourceVersion", "value": live["metadata"]["resourceVersion"]},
                    {"op": "replace", "path": f"/metadata/managedFields/{index}/operation", "value": "Apply"}]
    return None


def unchanged(desired: dict, live: dict, manager: str = FIELD_MANAGER) -> bool:
    """Whether applying `desired` to `live` as `manager` would change nothing."""
    fields = owned_fields(live, manager)
    if fields is None:
        return False
    owned = managed(extract(live, fields))
    return same(managed(desired), owned)


def differences(desired, owned, prefix: str = "", depth: int = 3):
    """The paths (up to `depth` levels) where `desired` and the owned fields differ."""
    if depth > 0 and isinstance(desired, dict) and isinstance(owned, dict):
        for key in list(desired) + [k for k in owned if k not in desired]:
            path = f"{prefix}.{key}" if prefix else key
            if key not in owned:
                if desired[key] not in _EMPTY:
                    yield path
            elif key not in desired:
                yield path  # applied before, rendered no more: the apply removes it
            elif not same(desired[key], owned[key], "resources" in path.split(".")):
                yield from differences(desired[key], owned[key], path, depth - 1)
    elif not same(desired, owned, "resources" in prefix.split(".")):
        yield prefix


def owned_by(obj: dict, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or ())


def list_owned(api: KubeApi, namespace: str, selector: dict[str, str]) -> dict[tuple[str, str], dict]:
    """The live Services, Deployments and PodDisruptionBudgets that carry the flow's labels, by (kind, name)."""
    live = {}
    for kind, resource in KINDS.items():
        for obj in api.list(resource.path(namespace), selector_string(selector)):
            live[(kind, obj["metadata"]["name"])] = obj
    return live


def apply_flow(api: KubeApi, desired: list[dict], live: dict[tuple[str, str], dict], owner_uid: str) -> tuple[list[Action], dict]:
    """Applies and deletes so that the flow's objects are exactly `desired`. `live` is what
    `list_owned` found; objects of the flow not owned by `owner_uid` are never deleted, and an object
    of someone else under a needed name is never taken over (NameConflict). Returns the actions
    taken and the objects as they are now, by (kind, name)."""
    actions, now = [], {}
    for obj in desired:
        kind, name = obj["kind"], obj["metadata"]["name"]
        path = KINDS[kind].path(obj["metadata"]["namespace"], name)
        current = live.get((kind, name))
        if current is None:
            # A forced apply would take over an object of the same name: look first.
            current = api.get(path)
            if current is not None and not owned_by(current, owner_uid):
                raise NameConflict(
                    f"{kind} {name} already exists and does not belong to this flow; delete it "
                    "or rename the flow or the stage")
        upgrade = upgrade_operations(current) if current is not None else None
        if upgrade is not None:
            current = api.json_patch(path, upgrade)
        if current is not None and unchanged(obj, current):
            now[(kind, name)] = current
            continue
        now[(kind, name)] = api.apply(path, obj)
        if current is None:
            actions.append(Action("Created", kind, name))
        else:
            owned = managed(extract(current, owned_fields(current) or {}))
            actions.append(Action("Updated", kind, name, tuple(differences(managed(obj), owned))))
    for (kind, name), obj in sorted(live.items()):
        if (kind, name) not in now and (not owner_uid or owned_by(obj, owner_uid)):
            api.delete(KINDS[kind].path(obj["metadata"]["namespace"], name))
            actions.append(Action("Deleted", kind, name))
    return actions, now
