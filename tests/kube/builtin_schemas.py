"""Built-in kinds against the Kubernetes 1.32 JSON schemas that the `kubernetes-validate` package ships.

A real API server decodes built-in kinds into typed structs: unknown fields are dropped (or rejected
with fieldValidation=Strict), wrong types answer 400, and missing required fields 422. This reproduces
that from the published schemas, and what decoding into a struct and encoding it again does to
what is stored (`drop_empty`: `omitempty` fields with empty values are not kept). The kinds' deeper
Go validation (e.g. a selector matching the template's labels) is not emulated.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources
from typing import Any

import jsonschema
from referencing import Registry, Resource

from tests.kube.fieldmanager import Schema
from tests.kube.schemas import Cause

SCHEMA_VERSION = "v1.32.0-local-strict"


def _schema_file(name: str) -> Any:
    return resources.files("kubernetes_validate").joinpath("kubernetes-json-schema", SCHEMA_VERSION, name)


@functools.lru_cache(maxsize=1)
def _registry() -> Registry:
    definitions = json.loads(_schema_file("_definitions.json").read_text())
    return Resource.from_contents(definitions) @ Registry()


@functools.lru_cache(maxsize=None)
def validator_for(group: str, version: str, kind: str) -> jsonschema.Validator | None:
    """A compiled validator for the kind, or None if no schema is published for it."""
    api_version = f"{group.split('.')[0]}-{version}" if group else version
    path = _schema_file(f"{kind.lower()}-{api_version}.json")
    if not path.is_file():
        return None
    schema = json.loads(path.read_text())
    return jsonschema.validators.Draft202012Validator(schema, registry=_registry())


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


@dataclasses.dataclass
class Verdict:
    unknown: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)  # paths of unknown fields
    type_errors: list[str] = dataclasses.field(default_factory=list)  # answered 400
    causes: list[Cause] = dataclasses.field(default_factory=list)  # answered 422


def check(obj: dict[str, Any], group: str, version: str, kind: str) -> Verdict:
    """Check a built-in object against its published schema (no schema: nothing to say)."""
    verdict = Verdict()
    validator = validator_for(group, version, kind)
    if validator is None:
        return verdict
    for error in validator.iter_errors(obj):
        _classify(error, verdict)
    return verdict


def _classify(error: jsonschema.ValidationError, verdict: Verdict) -> None:
    where = tuple(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = set((error.schema or {}).get("properties") or {})
        verdict.unknown += [where + (key,) for key in error.instance if key not in known]
    elif error.validator == "type":
        expected = error.validator_value
        expected = [t for t in (expected if isinstance(expected, list) else [expected]) if t != "null"]
        verdict.type_errors.append(f"{_path(where)}: cannot decode {json.dumps(error.instance)[:60]} as "
                                   f"{' or '.join(expected)}")
    elif error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else ""
        verdict.causes.append(Cause(_path(where + (missing,)), "FieldValueRequired", "Required value"))
    elif error.validator in ("anyOf", "oneOf", "allOf") and error.context:
        for sub in error.context:
            _classify(sub, verdict)
    else:
        verdict.causes.append(Cause(_path(where), "FieldValueInvalid",
                                    f"Invalid value: {json.dumps(error.instance)[:60]}: {error.message[:200]}"))


def drop(obj: Any, path: tuple[Any, ...]) -> None:
    """Remove the field at `path` from `obj` in place (as decoding into a typed struct does)."""
    for part in path[:-1]:
        obj = obj[part]
    if isinstance(obj, dict):
        obj.pop(path[-1], None)


@functools.lru_cache(maxsize=1)
def _definitions() -> dict[str, Any]:
    return json.loads(_schema_file("_definitions.json").read_text())["$defs"]


@functools.lru_cache(maxsize=None)
def schema_for(group: str, version: str, kind: str) -> Schema:
    """The kind's published schema, navigable (list types, map keys) for field ownership."""
    api_version = f"{group.split('.')[0]}-{version}" if group else version
    path = _schema_file(f"{kind.lower()}-{api_version}.json")
    root = json.loads(path.read_text()) if path.is_file() else {}
    return Schema(root, _definitions())


def _types(node: dict[str, Any]) -> set[str]:
    kind = node.get("type")
    return set(kind if isinstance(kind, list) else [kind] if kind else [])


def drop_empty(value: Any, node: dict[str, Any], schema: Schema) -> None:
    """Drop, in place, what a typed struct with `omitempty` does not keep: optional fields that are
    null, empty strings, empty lists and empty maps (`additionalProperties`). Empty structs stay
    (`resources: {}`), as do `false` and `0` (the schema does not say which fields are pointers)."""
    node = schema.resolve(node)
    if isinstance(value, dict):
        required = set(node.get("required") or ())
        struct = bool(node.get("properties"))
        for key in list(value):
            sub = schema.child(node, key)
            item = value[key]
            if struct and key not in required and (
                    item is None or (item == "" and "string" in _types(sub)) or
                    (item == [] and "array" in _types(sub)) or
                    (item == {} and not sub.get("properties") and isinstance(sub.get("additionalProperties"), dict))):
                del value[key]
            elif isinstance(item, (dict, list)):
                drop_empty(item, sub, schema)
    elif isinstance(value, list):
        for item in value:
            drop_empty(item, schema.items(node), schema)
