"""A validator for the OpenAPI v3 subset a structural CRD schema uses, with JSON Schema draft 4's
semantics and messages (what `jsonschema.Draft4Validator` reports for the same schema).

Why not jsonschema itself: importing it costs more than the rest of `aiflow validate` together
(about 0.12 s of a 0.4 s run), for a schema that uses a dozen keywords. tests/unit/test_structural.py
checks this validator against jsonschema on the AIFlow schema, error for error.

Keywords: type, properties, required, additionalProperties (a schema), items, enum,
minimum/maximum (and draft 4's boolean exclusiveMinimum/exclusiveMaximum), minLength/maxLength,
minItems/maxItems, pattern, anyOf. Other keywords (format, nullable, description, x-kubernetes-*)
are ignored, as jsonschema ignores them; a CRD's int-or-string fields spell out their anyOf.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


@dataclass
class SchemaError:
    """One violation, with the attributes of a jsonschema ValidationError that callers read."""

    validator: str
    validator_value: Any
    instance: Any
    schema: dict
    message: str
    absolute_path: tuple = ()
    context: list = field(default_factory=list)


@lru_cache(maxsize=64)
def _pattern(text: str) -> re.Pattern:
    return re.compile(text)


class StructuralValidator:
    def __init__(self, schema: dict):
        self.schema = schema

    def iter_errors(self, instance: Any) -> Iterator[SchemaError]:
        yield from _errors(instance, self.schema, ())


def _error(kind: str, instance: Any, schema: dict, path: tuple, message: str, context=()) -> SchemaError:
    return SchemaError(kind, schema.get(kind), instance, schema, message, path, list(context))


def _length(kind: str, instance: Any, bound: int, schema: dict, path: tuple) -> Iterator[SchemaError]:
    size = len(instance)
    if kind.startswith("min") and size < bound:
        yield _error(kind, instance, schema, path,
                     f"{instance!r} should be non-empty" if bound == 1 else f"{instance!r} is too short")
    elif kind.startswith("max") and size > bound:
        yield _error(kind, instance, schema, path, f"{instance!r} is too long")


def _errors(instance: Any, schema: dict, path: tuple) -> Iterator[SchemaError]:
    if not isinstance(schema, dict):
        return
    kind = schema.get("type")
    if kind is not None:
        kinds = [kind] if isinstance(kind, str) else list(kind)
        if not any(_TYPES[k](instance) for k in kinds if k in _TYPES):
            yield _error("type", instance, schema, path,
                         f"{instance!r} is not of type {', '.join(repr(k) for k in kinds)}")
    if "enum" in schema and instance not in schema["enum"]:
        yield _error("enum", instance, schema, path, f"{instance!r} is not one of {schema['enum']!r}")
    if _TYPES["number"](instance):
        if "minimum" in schema:
            low, strict = schema["minimum"], schema.get("exclusiveMinimum") is True
            if instance < low or (strict and instance == low):
                yield _error("minimum", instance, schema, path,
                             f"{instance!r} is less than {'or equal to ' if strict else ''}the minimum of {low!r}")
        if "maximum" in schema:
            high, strict = schema["maximum"], schema.get("exclusiveMaximum") is True
            if instance > high or (strict and instance == high):
                yield _error("maximum", instance, schema, path,
                             f"{instance!r} is greater than {'or equal to ' if strict else ''}the maximum of {high!r}")
    if isinstance(instance, str):
        for key in ("minLength", "maxLength"):
            if key in schema:
                yield from _length(key, instance, schema[key], schema, path)
        if "pattern" in schema and not _pattern(schema["pattern"]).search(instance):
            yield _error("pattern", instance, schema, path, f"{instance!r} does not match {schema['pattern']!r}")
    if isinstance(instance, list):
        for key in ("minItems", "maxItems"):
            if key in schema:
                yield from _length(key, instance, schema[key], schema, path)
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(instance):
                yield from _errors(item, schema["items"], path + (i,))
    if isinstance(instance, dict):
        for name in schema.get("required") or ():
            if name not in instance:
                yield _error("required", instance, schema, path, f"{name!r} is a required property")
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            if key in props:
                yield from _errors(value, props[key], path + (key,))
            elif isinstance(extra, dict):
                yield from _errors(value, extra, path + (key,))
    if "anyOf" in schema:
        tried = [list(_errors(instance, sub, path)) for sub in schema["anyOf"]]
        if all(tried):
            yield _error("anyOf", instance, schema, path, f"{instance!r} is not valid under any of the given schemas",
                         [e for errors in tried for e in errors])
