"""Make the cluster hold exactly the rendered objects of a flow: create what is missing, patch only
the fields that differ, delete the flow's objects that are no longer rendered.

`merge_patch` (pure) decides what to send; `apply_flow` does the calls. Comparison treats the live
object as a superset of what was rendered, because the API server adds defaults and status.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubernetes.utils import parse_quantity

from aiflow.controller.kube import DEPLOYMENTS, SERVICES, ApiError, KubeApi, Resource
from aiflow.render.names import selector_string

KINDS: dict[str, Resource] = {"Service": SERVICES, "Deployment": DEPLOYMENTS}
_SAME = object()


@dataclass(frozen=True)
class Action:
    verb: str  # Created | Updated | Deleted
    kind: str
    name: str
    fields: tuple[str, ...] = ()  # top-level paths an update changed

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


def covers(live, desired, in_resources: bool = False) -> bool:
    """Whether `live` holds every field of `desired` with the same value (extra live fields, such
    as server defaults, are ignored; lists must match item by item)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(
            k in live and covers(live[k], v, in_resources or k == "resources") for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (isinstance(live, list) and len(live) == len(desired)
                and all(covers(l, d, in_resources) for l, d in zip(live, desired)))
    return _same_scalar(desired, live, in_resources)


def merge_patch(desired: dict, live: dict) -> dict | None:
    """The JSON merge patch (RFC 7386) that makes `live` cover `desired`, limited to the fields that
    differ; None when nothing differs. Lists are replaced whole, as merge patches do."""
    out = _patch(desired, live, False)
    return None if out is _SAME else out


def _patch(desired, live, in_resources):
    if isinstance(desired, dict) and isinstance(live, dict):
        out = {}
        for key, value in desired.items():
            sub = _patch(value, live[key], in_resources or key == "resources") if key in live else value
            if sub is not _SAME:
                out[key] = sub
        return out or _SAME
    return _SAME if covers(live, desired, in_resources) else desired


def _managed(obj: dict) -> dict:
    """The parts of an object the operator manages (name and namespace are its identity)."""
    meta = obj.get("metadata") or {}
    out = {"metadata": {k: meta[k] for k in ("labels", "annotations", "ownerReferences") if k in meta}}
    if "spec" in obj:
        out["spec"] = obj["spec"]
    return out


def owned_by(obj: dict, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or ())


def list_owned(api: KubeApi, namespace: str, selector: dict[str, str]) -> dict[tuple[str, str], dict]:
    """The live Services and Deployments that carry the flow's labels, by (kind, name)."""
    live = {}
    for kind, resource in KINDS.items():
        for obj in api.list(resource.path(namespace), selector_string(selector)):
            live[(kind, obj["metadata"]["name"])] = obj
    return live


def apply_flow(api: KubeApi, desired: list[dict], live: dict[tuple[str, str], dict], owner_uid: str) -> tuple[list[Action], dict]:
    """Creates, patches and deletes so that the flow's objects are exactly `desired`. `live` is what
    `list_owned` found; objects of the flow not owned by `owner_uid` are never deleted. Returns the
    actions taken and the objects as they are now, by (kind, name)."""
    actions, now = [], {}
    for obj in desired:
        kind, name = obj["kind"], obj["metadata"]["name"]
        path = KINDS[kind].path(obj["metadata"]["namespace"])
        current = live.get((kind, name))
        if current is None:
            try:
                now[(kind, name)] = api.create(path, obj)
                actions.append(Action("Created", kind, name))
                continue
            except ApiError as exc:
                if exc.status != 409:
                    raise
                current = api.get(KINDS[kind].path(obj["metadata"]["namespace"], name))
                if current is None or not owned_by(current, owner_uid):
                    raise NameConflict(
                        f"{kind} {name} already exists and does not belong to this flow; delete it "
                        "or rename the flow or the stage") from exc
        patch = merge_patch(_managed(obj), _managed(current))
        if patch is None:
            now[(kind, name)] = current
            continue
        now[(kind, name)] = api.patch(KINDS[kind].path(obj["metadata"]["namespace"], name), patch)
        actions.append(Action("Updated", kind, name, tuple(_paths(patch))))
    for (kind, name), obj in sorted(live.items()):
        if (kind, name) not in now and (not owner_uid or owned_by(obj, owner_uid)):
            api.delete(KINDS[kind].path(obj["metadata"]["namespace"], name))
            actions.append(Action("Deleted", kind, name))
    return actions, now


def _paths(patch: dict, prefix: str = "", depth: int = 3):
    for key, value in patch.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value and depth > 1:
            yield from _paths(value, path, depth - 1)
        else:
            yield path
