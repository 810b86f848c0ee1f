"""Field ownership (managedFields) and server-side apply, as the API server's field manager keeps them.

A field set is a set of paths; a path is a tuple of elements as managedFields' FieldsV1 writes them:
`f:<field>` for a field of an object or a key of a map, `k:{"name":"x"}` for an item of a list of
type `map` (by its `x-kubernetes-list-map-keys`), `v:<json>` for an item of a list of type `set`.
Lists of type `atomic` (and lists without a type) are one leaf, as are scalars. The list types come
from the schema: the published 1.32 schemas for built-in kinds, the CRD's openAPIV3Schema for custom
resources (where lists are atomic unless the schema says otherwise, as on a real server).

What is emulated: an apply sets the fields it sends, merges map-lists item by item, and removes the
fields this manager applied before and applies no more unless another manager owns them; an apply
that would change a field another manager owns is a 409 conflict unless forced, and a forced apply
takes the field over; every other write (create, update, patch) gives the manager the fields it
changed. Not emulated: ownership of status (writes to the status subresource leave managedFields
alone), versions other than the one written, and the `.` member/child distinction beyond writing it
for every owned node that has owned children.
"""
from __future__ import annotations

import copy
import datetime
import json
from typing import Any

Path = tuple[str, ...]
# Identity fields: part of no field set (name/namespace come from the URL).
_META_FIELDS = ("labels", "annotations", "ownerReferences", "finalizers")
# Map-list keys the server defaults before comparing items (a container port without protocol is TCP).
_KEY_DEFAULTS = {"protocol": "TCP"}


class Schema:
    """Navigates a JSON schema with `$ref`s into a definitions table."""

    def __init__(self, root: dict | None, definitions: dict | None = None):
        self.root, self.definitions = root, definitions or {}

    def resolve(self, node: Any) -> dict:
        seen = 0
        while isinstance(node, dict) and "$ref" in node and seen < 50:
            node = self.definitions.get(node["$ref"].rsplit("/", 1)[-1], {})
            seen += 1
        if isinstance(node, dict) and "allOf" in node and len(node["allOf"]) == 1 and "properties" not in node:
            return self.resolve(node["allOf"][0])
        return node if isinstance(node, dict) else {}

    def child(self, node: dict, key: str) -> dict:
        node = self.resolve(node)
        props = node.get("properties") or {}
        if key in props:
            return self.resolve(props[key])
        extra = node.get("additionalProperties")
        return self.resolve(extra) if isinstance(extra, dict) else {}

    def items(self, node: dict) -> dict:
        return self.resolve(self.resolve(node).get("items") or {})


def list_type(schema: Schema, node: dict) -> tuple[str, tuple[str, ...]]:
    node = schema.resolve(node)
    kind = node.get("x-kubernetes-list-type") or "atomic"
    return kind, tuple(node.get("x-kubernetes-list-map-keys") or ())


def _item_key(item: Any, keys: tuple[str, ...]) -> str:
    values = {k: item.get(k, _KEY_DEFAULTS.get(k)) for k in keys} if isinstance(item, dict) else {}
    return "k:" + json.dumps({k: v for k, v in values.items() if v is not None}, separators=(",", ":"))


def _set_key(item: Any) -> str:
    return "v:" + json.dumps(item, separators=(",", ":"))


def _top(obj: dict) -> dict:
    """The parts of an object that have owners: everything but identity, server metadata and status."""
    meta = obj.get("metadata") or {}
    out = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata", "status")}
    owned_meta = {k: meta[k] for k in _META_FIELDS if k in meta}
    if owned_meta:
        out["metadata"] = owned_meta
    return out


def field_set(obj: dict, schema: Schema) -> set[Path]:
    """The members of `obj` an owner can hold: its leaves (scalars, atomic lists, empty objects) and
    the items of its map- and set-lists (the objects on the way to them are implied)."""
    out: set[Path] = set()
    _walk(_top(obj), schema.root or {}, schema, (), out)
    return out


def _walk(value: Any, node: dict, schema: Schema, path: Path, out: set[Path], member: bool = False) -> None:
    kind, keys = list_type(schema, node) if isinstance(value, list) else ("", ())
    if isinstance(value, dict) and value:
        if member:
            out.add(path)
        for key, sub in value.items():
            _walk(sub, schema.child(node, key), schema, path + (f"f:{key}",), out)
    elif isinstance(value, list) and value and kind == "map" and keys:
        for item in value:
            _walk(item, schema.items(node), schema, path + (_item_key(item, keys),), out, member=True)
    elif isinstance(value, list) and value and kind == "set":
        out.update(path + (_set_key(item),) for item in value)
    elif path:
        out.add(path)


def _locate(container: Any, element: str, node: dict, schema: Schema) -> tuple[Any, Any, dict]:
    """(the value at `element` under `container` or None, how to address it, its schema)."""
    if element.startswith("f:") and isinstance(container, dict):
        key = element[2:]
        return container.get(key), key, schema.child(node, key)
    if element.startswith("k:") and isinstance(container, list):
        _, keys = list_type(schema, node)
        for index, item in enumerate(container):
            if _item_key(item, keys) == element:
                return item, index, schema.items(node)
        return None, None, schema.items(node)
    if element.startswith("v:") and isinstance(container, list):
        for index, item in enumerate(container):
            if _set_key(item) == element:
                return item, index, {}
    return None, None, {}


def value_at(obj: dict, path: Path, schema: Schema) -> Any:
    value, node = _top(obj), schema.root or {}
    for element in path:
        value, _, node = _locate(value, element, node, schema)
        if value is None:
            return None
    return value


def remove_path(obj: dict, path: Path, schema: Schema) -> None:
    """Delete, in place, the field or list item at `path` (nothing when it is not there)."""
    container, node = obj, schema.root or {}
    for element in path[:-1]:
        container, _, node = _locate(container, element, node, schema)
        if container is None:
            return
    _, where, _ = _locate(container, path[-1], node, schema)
    if where is not None:
        del container[where]


def merge(live: Any, applied: Any, node: dict, schema: Schema) -> Any:
    """The live value with the applied one laid over it: objects and map-lists merge, the rest replaces.
    Parts of `live` that the apply does not touch are shared, not copied (callers pass a copy)."""
    if isinstance(applied, dict) and isinstance(live, dict):
        out = dict(live)
        for key, value in applied.items():
            out[key] = merge(live.get(key), value, schema.child(node, key), schema)
        return out
    if isinstance(applied, list) and isinstance(live, list):
        kind, keys = list_type(schema, node)
        if kind == "map" and keys:
            by_key = {_item_key(item, keys): item for item in live}
            applied_keys = [_item_key(item, keys) for item in applied]
            out = [merge(by_key.get(k), item, schema.items(node), schema) for k, item in zip(applied_keys, applied)]
            return out + [item for item in live if _item_key(item, keys) not in applied_keys]
        if kind == "set":
            return copy.deepcopy(applied) + [i for i in live if i not in applied]
    return copy.deepcopy(applied)


# ------------------------------------------------------------------ managedFields <-> field sets
def to_fields_v1(paths: set[Path]) -> dict:
    tree: dict = {}
    for path in sorted(paths, key=len):
        node = tree
        for element in path:
            node = node.setdefault(element, {})
    def mark(node: dict, path: Path) -> None:
        for element, child in node.items():
            if element == ".":
                continue
            if child and path + (element,) in paths:
                child["."] = {}
            mark(child, path + (element,))
    mark(tree, ())
    return tree


def from_fields_v1(tree: dict, prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for element, child in (tree or {}).items():
        if element == ".":
            continue
        path = prefix + (element,)
        if not child or "." in child:
            out.add(path)
        out |= from_fields_v1(child, path)
    return out


def _leaves(paths: set[Path]) -> set[Path]:
    """The fields among `paths` that hold values (not list items, not objects with members below)."""
    parents = {p[:i] for p in paths for i in range(1, len(p))}
    return {p for p in paths - parents if p[-1].startswith("f:")}


def entries(obj: dict) -> list[dict]:
    return list((obj.get("metadata") or {}).get("managedFields") or [])


def _entry(manager: str, operation: str, api_version: str, paths: set[Path], subresource: str = "") -> dict:
    entry = {"manager": manager, "operation": operation, "apiVersion": api_version,
             "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(paths)}
    if subresource:
        entry["subresource"] = subresource
    return entry


def _rebuild(old_entries: list[dict], sets: dict[tuple[str, str], set[Path]], api_version: str) -> list[dict]:
    """managedFields for the new sets: an entry whose set did not change is kept as it was (time too)."""
    out, seen = [], set()
    for entry in old_entries:
        key = (entry.get("manager", ""), entry.get("operation", ""))
        seen.add(key)
        paths = sets.get(key, set())
        if not paths:
            continue
        if paths == from_fields_v1(entry.get("fieldsV1") or {}):
            out.append(entry)
        else:
            out.append(_entry(key[0], key[1], api_version, paths))
    for key, paths in sets.items():
        if key not in seen and paths:
            out.append(_entry(key[0], key[1], api_version, paths))
    return out


def _sets(old_entries: list[dict]) -> dict[tuple[str, str], set[Path]]:
    return {(e.get("manager", ""), e.get("operation", "")): from_fields_v1(e.get("fieldsV1") or {})
            for e in old_entries if not e.get("subresource")}


def after_update(old: dict | None, new: dict, manager: str, schema: Schema, api_version: str) -> list[dict]:
    """managedFields after a create/update/patch by `manager`: it owns what it changed; fields that
    are gone are owned by no one."""
    old_entries = entries(old) if old is not None else []
    sets = _sets(old_entries)
    new_paths = field_set(new, schema)
    if old is None:
        changed = new_paths
    else:
        old_paths = field_set(old, schema)
        gone = old_paths - new_paths
        for key in sets:
            sets[key] -= gone
        leaves = _leaves(new_paths)
        changed = {p for p in new_paths if p not in old_paths or
                   (p in leaves and value_at(old, p, schema) != value_at(new, p, schema))}
    if changed:
        for key in sets:
            if key != (manager, "Update"):
                sets[key] -= changed
        sets[(manager, "Update")] = sets.get((manager, "Update"), set()) | changed
    return _rebuild(old_entries, sets, api_version)


class Conflicts(Exception):
    def __init__(self, conflicts: list[tuple[str, Path]], api_version: str):
        self.conflicts = conflicts
        lines = [f'conflict with "{m}" using {api_version}: {render(p)}' for m, p in conflicts]
        super().__init__(f"Apply failed with {len(conflicts)} conflict{'s' if len(conflicts) > 1 else ''}: " +
                         "; ".join(lines))


def render(path: Path) -> str:
    return "".join(f".{e[2:]}" if e.startswith("f:") else f"[{e[2:]}]" for e in path)


def apply(live: dict, applied: dict, manager: str, schema: Schema, api_version: str, force: bool) -> dict:
    """The object after `manager` applies `applied` to `live`, with its managedFields (may raise
    Conflicts)."""
    old_entries = entries(live)
    sets = _sets(old_entries)
    key = (manager, "Apply")
    previous = sets.get(key, set())
    applied_paths = field_set(applied, schema)
    conflicts = []
    for other, paths in sets.items():
        if other == key:
            continue
        for path in sorted(_leaves(applied_paths) & paths):
            if value_at(live, path, schema) != value_at(applied, path, schema):
                conflicts.append((other, path))
    if conflicts and not force:
        raise Conflicts([(m, p) for (m, _), p in conflicts], api_version)
    for other, path in conflicts:
        sets[other].discard(path)
    merged = dict(live)
    body = merge(_top(live), _top(applied), schema.root or {}, schema)
    meta = dict(live.get("metadata") or {})
    meta.update(body.pop("metadata", {}))
    for field, value in body.items():
        merged[field] = value
    merged["metadata"] = meta
    sets[key] = applied_paths
    still_owned = set().union(*sets.values()) if sets else set()
    for path in sorted(previous - applied_paths, key=len, reverse=True):
        if not any(p[:len(path)] == path for p in still_owned):
            remove_path(merged, path, schema)
    merged["metadata"]["managedFields"] = _rebuild(old_entries, sets, api_version)
    return merged


def created(obj: dict, manager: str, operation: str, schema: Schema, api_version: str) -> list[dict]:
    """managedFields of a new object: `manager` owns all it sent."""
    paths = field_set(obj, schema)
    return [_entry(manager, operation, api_version, paths)] if paths else []
