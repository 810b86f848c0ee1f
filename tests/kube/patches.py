"""The patch formats of the Kubernetes API: JSON patch, JSON merge patch, a strategic merge subset."""
from __future__ import annotations

import copy
from typing import Any

import jsonpatch

# Lists that strategic merge patch merges item by item, by field name -> merge key(s).
# The first key present in the items wins (container ports by containerPort, service ports by port).
MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "ports": ("containerPort", "port"),
    "imagePullSecrets": ("name",),
    "conditions": ("type",),
    "ownerReferences": ("uid",),
    "hostAliases": ("ip",),
    "topologySpreadConstraints": ("topologyKey",),
}
# Lists of scalars that strategic merge patch treats as sets.
MERGED_SCALAR_LISTS = {"finalizers"}


class PatchError(ValueError):
    """A patch that cannot be applied (the API server answers 422)."""


class PatchTestFailed(PatchError):
    """A JSON patch `test` operation that did not hold."""


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch; raise PatchTestFailed on a failed `test`, PatchError on other failures."""
    if not isinstance(ops, list):
        raise PatchError("a JSON patch must be a list of operations")
    try:
        return jsonpatch.JsonPatch(ops).apply(target, in_place=False)
    except jsonpatch.JsonPatchTestFailed as exc:
        raise PatchTestFailed(f"the server rejected our request due to an error in our request: {exc}") from exc
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, KeyError, IndexError, TypeError) as exc:
        raise PatchError(f"the server rejected our request due to an error in our request: {exc}") from exc


def _merge_key(field: str, items: list[Any]) -> str | None:
    for key in MERGE_KEYS.get(field, ()):
        if any(isinstance(item, dict) and key in item for item in items):
            return key
    return None


def _merge_list(field: str, target: list[Any], patch: list[Any]) -> list[Any]:
    if field in MERGED_SCALAR_LISTS:
        return list(target) + [item for item in patch if item not in target]
    key = _merge_key(field, list(target) + list(patch))
    if key is None:
        return [_strip_directives(item) for item in patch]
    result = [copy.deepcopy(item) for item in target]
    for item in patch:
        if not isinstance(item, dict):
            raise PatchError(f"strategic merge patch: list {field!r} expects objects keyed by {key!r}")
        index = next((i for i, old in enumerate(result)
                      if isinstance(old, dict) and old.get(key) == item.get(key)), None)
        directive = item.get("$patch")
        if directive == "delete":
            if index is not None:
                del result[index]
        elif directive == "replace" or index is None:
            clean = _strip_directives({k: v for k, v in item.items() if k != "$patch"})
            if index is None:
                result.append(clean)
            else:
                result[index] = clean
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$") and v is not None}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch, the subset built-in kinds need: lists of containers/env/ports/... merge by key.

    Honours `$patch: replace|delete`, `$deleteFromPrimitiveList/<field>`, `$retainKeys`, and drops
    `$setElementOrder` (the element order of merged lists is not emulated).
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return _strip_directives({k: v for k, v in patch.items() if k != "$patch"})
    if patch.get("$patch") == "delete":
        return None
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [item for item in result.get(field) or [] if item not in (value or [])]
        elif key.startswith("$"):
            continue
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _merge_list(key, result[key], value)
        else:
            result[key] = _strip_directives(value)
    return result
