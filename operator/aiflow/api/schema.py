"""The AIFlow schema as the CRD declares it: defaulting, structural validation and CEL rules.

The CRD's openAPIV3Schema is the single definition of the API. These functions do offline what the
API server does at apply time, so `aiflow validate`, `aiflow render` and the operator see a manifest
exactly as a cluster would store it.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

from aiflow.api.locations import crd_path
from aiflow.api.problems import Problem, field_path
from aiflow.api.structural import StructuralValidator


@functools.lru_cache(maxsize=4)
def _load_crd(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        # libyaml's loader when PyYAML has it: the CRD is large, the pure-Python parser slow.
        return yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def crd() -> dict:
    """The AIFlow CustomResourceDefinition."""
    return _load_crd(crd_path())


def openapi_schema() -> dict:
    """The openAPIV3Schema of the stored version."""
    (version,) = [v for v in crd()["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]


@functools.lru_cache(maxsize=4)
def _validator_for(path: Path) -> StructuralValidator:
    # OpenAPI 3.0 schemas follow JSON Schema draft 4 (boolean exclusiveMinimum); the x-kubernetes-*
    # keywords are checked elsewhere (CEL) or not at all (list types: the API server's own).
    return StructuralValidator(openapi_schema())


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


# Where the CEL grammar's parse tables are cached between processes (building them is most of what a
# short `aiflow validate` costs): $AIFLOW_CACHE_DIR, else $XDG_CACHE_HOME/aiflow or ~/.cache/aiflow.
CACHE_DIR_ENV = "AIFLOW_CACHE_DIR"


def _cache_dir() -> Path | None:
    """A writable directory for the parser cache, or None (read-only filesystem: build in memory)."""
    for raw in (os.environ.get(CACHE_DIR_ENV), os.environ.get("XDG_CACHE_HOME") and
                os.path.join(os.environ["XDG_CACHE_HOME"], "aiflow"), os.path.expanduser("~/.cache/aiflow")):
        if not raw:
            continue
        try:
            os.makedirs(raw, exist_ok=True)
        except OSError:
            continue
        if os.access(raw, os.W_OK):
            return Path(raw)
    return None


@functools.lru_cache(maxsize=1)
def _cel_environment():
    """cel-python's environment, with its parser built from cached LALR tables when there are some.

    celpy builds its Lark parser on first use and keeps it in `CELParser.CEL_PARSER`; it is built
    here first, with the same options plus Lark's `cache` (a file keyed by the grammar, the options
    and the Lark version, rebuilt when any of them changes), which takes the build from about
    0.15 s to 0.01 s."""
    import celpy
    import lark
    from celpy.celparser import CELParser

    where = _cache_dir()
    if CELParser.CEL_PARSER is None:
        grammar = (Path(celpy.__file__).parent / "cel.lark").read_text(encoding="utf-8")
        cache = str(where / f"cel-lark-{lark.__version__}.cache") if where else False
        CELParser.CEL_PARSER = lark.Lark(
            grammar, parser="lalr", start="expr", debug=True, g_regex_flags=re.M,
            lexer_callbacks={"IDENT": CELParser.ambiguous_literals}, propagate_positions=True,
            maybe_placeholders=False, priority="invert", tree_class=celpy.InterpretedRunner.tree_node_class,
            cache=cache)
    return celpy.Environment()


@functools.lru_cache(maxsize=1)
def _cel_asts() -> dict:
    """Parsed CEL rules kept between processes, by rule text (the file is keyed by celpy's grammar
    and the Lark version, the two that shape a parse tree): parsing is the next cost after
    building the parser."""
    import hashlib
    import pickle

    import celpy
    import lark

    where = _cache_dir()
    grammar = hashlib.sha256((Path(celpy.__file__).parent / "cel.lark").read_bytes()).hexdigest()[:16]
    path = where / f"cel-asts-{grammar}-{lark.__version__}.pickle" if where else None
    try:
        with open(path, "rb") as fh:
            cached = pickle.load(fh)
        return {"path": path, "asts": cached if isinstance(cached, dict) else {}}
    except (OSError, TypeError, ValueError, EOFError, pickle.UnpicklingError, AttributeError):
        return {"path": path, "asts": {}}


def _cel_ast(rule: str):
    cache = _cel_asts()
    ast = cache["asts"].get(rule)
    if ast is None:
        ast = cache["asts"][rule] = _cel_environment().compile(rule)
        if cache["path"] is not None:
            import pickle

            try:  # written whole then renamed: a concurrent reader never sees half a file
                partial = cache["path"].with_suffix(f".{os.getpid()}.tmp")
                partial.write_bytes(pickle.dumps(cache["asts"]))
                partial.replace(cache["path"])
            except OSError:
                pass
    return ast


@functools.lru_cache(maxsize=256)
def _cel_program(rule: str):
    return _cel_environment().program(_cel_ast(rule))


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


# ObjectMeta's fields (metadata is the API server's, not the CRD's schema).
OBJECT_META_FIELDS = frozenset({
    "name", "generateName", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "finalizers", "ownerReferences",
    "managedFields", "selfLink"})


def unknown_field_problems(manifest: dict) -> list[Problem]:
    """Every field the schema does not declare, as strict field validation (kubectl's default)
    refuses it; a cluster with `--validate=false` would drop it silently (pruning). Status is
    the operator's and not checked."""
    problems = []
    meta = manifest.get("metadata")
    if isinstance(meta, dict):
        problems += [_unknown(("metadata", key), sorted(OBJECT_META_FIELDS)) for key in meta if key not in OBJECT_META_FIELDS]
    root = {k: v for k, v in manifest.items() if k not in ("metadata", "status")}
    schema = openapi_schema()
    props = {k: v for k, v in (schema.get("properties") or {}).items() if k not in ("metadata", "status")}
    return problems + list(_unknown_fields(root, {**schema, "properties": {**props, "apiVersion": {}, "kind": {}}}, ()))


def _unknown_fields(value: Any, schema: dict, where: tuple) -> Iterator[Problem]:
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                yield from _unknown_fields(item, props[key], where + (key,))
            elif isinstance(extra, dict):
                yield from _unknown_fields(item, extra, where + (key,))
            elif props is not None and extra is not True:
                yield _unknown(where + (key,), sorted(props))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _unknown_fields(item, schema["items"], where + (i,))


def _unknown(where: tuple, known: list[str]) -> Problem:
    import difflib

    path = field_path(where)
    close = difflib.get_close_matches(str(where[-1]), known, n=1, cutoff=0.6)
    fix = f'did you mean "{close[0]}"?' if close else f"the fields here are: {', '.join(known)}"
    return Problem(path, f'unknown field "{path}": the API server refuses it (strict field validation, '
                         f"kubectl's default) or drops it; {fix}")
