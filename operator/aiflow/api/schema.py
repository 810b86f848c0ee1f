"""The AIFlow schema as the CRD declares it: defaulting, structural validation and CEL rules.

The CRD's openAPIV3Schema is the single definition of the API. These functions do offline what the
API server does at apply time, so `aiflow validate`, `aiflow render` and the operator see a manifest
exactly as a cluster would store it.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Iterator

import yaml

from aiflow.api.locations import crd_path
from aiflow.api.problems import Problem, field_path


@functools.lru_cache(maxsize=4)
def _load_crd(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def crd() -> dict:
    """The AIFlow CustomResourceDefinition."""
    return _load_crd(crd_path())


def openapi_schema() -> dict:
    """The openAPIV3Schema of the stored version."""
    (version,) = [v for v in crd()["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]


@functools.lru_cache(maxsize=4)
def _validator_for(path: Path):
    import jsonschema

    # OpenAPI 3.0 schemas follow JSON Schema draft 4 (boolean exclusiveMinimum); the x-kubernetes-*
    # keywords are unknown to jsonschema and ignored.
    return jsonschema.Draft4Validator(openapi_schema())


def apply_defaults(manifest: dict) -> dict:
    """A copy of `manifest` with the schema's `default`s filled in where a field is absent, the way
    the API server defaults a custom resource (defaults inside a defaulted object apply too)."""
    out = copy.deepcopy(manifest)
    _default(out, openapi_schema())
    return out


def _default(value: Any, schema: dict) -> None:
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _default(value[key], sub)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _default(item, schema["items"])


def schema_problems(manifest: dict) -> list[Problem]:
    """Every violation of the openAPIV3Schema (types, required fields, enums, ranges, patterns)."""
    validator = _validator_for(crd_path())
    problems = []
    for err in validator.iter_errors(manifest):
        problems.append(Problem(field_path(err.absolute_path), _schema_message(err)))
    return sorted(set(problems))


def _schema_message(err) -> str:
    schema = err.schema if isinstance(err.schema, dict) else {}
    kind, bound = err.validator, err.validator_value
    if kind == "enum":
        return f"{err.instance!r} is not allowed; use one of: {', '.join(str(v) for v in bound)}"
    if kind == "pattern" and schema.get("x-kubernetes-int-or-string"):
        return f"{err.instance!r} is not a Kubernetes quantity; write e.g. 500m, 2 or 1Gi"
    if kind == "pattern":
        return f"{err.instance!r} does not match {bound!r}: {schema.get('description', '').strip()}"
    if kind == "minimum":
        strict = schema.get("exclusiveMinimum") is True
        return f"{err.instance!r} is too small; it must be {'greater than' if strict else 'at least'} {bound}"
    if kind == "maximum":
        strict = schema.get("exclusiveMaximum") is True
        return f"{err.instance!r} is too large; it must be {'less than' if strict else 'at most'} {bound}"
    if kind == "required":
        return err.message.replace("is a required property", "is required")
    if kind == "anyOf" and schema.get("x-kubernetes-int-or-string"):
        return f"{err.instance!r} must be an integer or a string such as 500m or 1Gi"
    return err.message


@functools.lru_cache(maxsize=256)
def _cel_program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_rules(schema: dict | None = None, path: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """Every x-kubernetes-validations rule of the schema with the schema path it is attached to
    ("*" stands for the items of an array)."""
    schema = openapi_schema() if schema is None else schema
    for rule in schema.get("x-kubernetes-validations") or ():
        yield path, rule
    for key, sub in (schema.get("properties") or {}).items():
        yield from cel_rules(sub, path + (key,))
    if isinstance(schema.get("items"), dict):
        yield from cel_rules(schema["items"], path + ("*",))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from cel_rules(schema["additionalProperties"], path + ("**",))


def cel_problems(manifest: dict) -> list[Problem]:
    """Every x-kubernetes-validations rule the (defaulted) manifest breaks, evaluated with cel-python
    on the value the rule is attached to, as the API server does. A value a rule cannot be evaluated
    on (its fields are missing or mistyped) is left to the schema's own problems."""
    from celpy import CELEvalError, json_to_cel

    problems = []
    for schema_path, rule in cel_rules():
        program = _cel_program(rule["rule"])
        for where, value in _values_at(manifest, schema_path, ()):
            try:
                ok = program.evaluate({"self": json_to_cel(value)})
            except (CELEvalError, TypeError, KeyError, ValueError):
                continue
            if isinstance(ok, CELEvalError) or bool(ok):
                continue
            problems.append(Problem(field_path(where), rule.get("message") or f"must satisfy {rule['rule']}"))
    return problems


def _values_at(value: Any, schema_path: tuple, where: tuple) -> Iterator[tuple[tuple, Any]]:
    if not schema_path:
        yield where, value
        return
    head, rest = schema_path[0], schema_path[1:]
    if head == "*":
        if isinstance(value, list):
            for i, item in enumerate(value):
                yield from _values_at(item, rest, where + (i,))
    elif head == "**":
        if isinstance(value, dict):
            for key, item in value.items():
                yield from _values_at(item, rest, where + (key,))
    elif isinstance(value, dict) and head in value:
        yield from _values_at(value[head], rest, where + (head,))
