"""Custom resources against their CRD's openAPIV3Schema: pruning, defaults, validation, CEL rules.

The API server's order is kept: prune unknown fields, apply defaults, validate the schema, then
evaluate `x-kubernetes-validations` (CEL, via cel-python). Errors come back as Kubernetes `causes`
(field path, reason, message) so the server can answer 422 like a real one.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from typing import Any

import celpy
import jsonschema

logger = logging.getLogger(__name__)

ROOT_FIELDS = ("apiVersion", "kind", "metadata")


@dataclasses.dataclass(frozen=True)
class Cause:
    field: str
    reason: str  # FieldValueInvalid, FieldValueRequired, FieldValueNotSupported, FieldValueUnknown
    message: str

    def render(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _to_json_schema(schema: Any) -> Any:
    """OpenAPI v3 (as CRDs use it) to JSON Schema draft 4: `nullable`, int-or-string."""
    if isinstance(schema, list):
        return [_to_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    result = {k: _to_json_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-validations")}
    if schema.get("x-kubernetes-int-or-string"):
        result.pop("type", None)
        result.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("nullable") and "type" in result:
        result["type"] = [result["type"], "null"]
    return result


def prune(obj: Any, schema: dict[str, Any] | None, path: tuple = ()) -> list[str]:
    """Drop, in place, fields the schema does not know (structural pruning); return their paths."""
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        if isinstance(obj, dict) and isinstance(schema, dict) and schema.get("properties"):
            for key, sub in schema["properties"].items():
                if key in obj:
                    prune(obj[key], sub, path + (key,))
        return []
    unknown: list[str] = []
    if isinstance(obj, dict) and schema.get("type", "object") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key in list(obj):
            if not path and key in ROOT_FIELDS:
                continue
            if props is not None and key in props:
                unknown += prune(obj[key], props[key], path + (key,))
            elif isinstance(extra, dict):
                unknown += prune(obj[key], extra, path + (key,))
            elif extra is True or (props is None and extra is None and not schema.get("type")):
                continue
            else:
                unknown.append(_path(path + (key,)))
                del obj[key]
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(obj):
            unknown += prune(item, schema["items"], path + (index,))
    return unknown


def apply_defaults(obj: Any, schema: dict[str, Any] | None) -> None:
    """Fill, in place, missing fields that declare a `default` (recursively, as the API server does)."""
    if not isinstance(schema, dict):
        return
    if isinstance(obj, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in obj and isinstance(sub, dict) and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                apply_defaults(obj[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in obj:
                if key not in (schema.get("properties") or {}):
                    apply_defaults(obj[key], extra)
    elif isinstance(obj, list):
        for item in obj:
            apply_defaults(item, schema.get("items"))


def _cause_of(error: jsonschema.ValidationError) -> Cause:
    path = list(error.absolute_path)
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else ""
        return Cause(_path(path + [missing]), "FieldValueRequired", "Required value")
    if error.validator == "enum":
        allowed = ", ".join(json.dumps(v) for v in error.validator_value)
        return Cause(_path(path), "FieldValueNotSupported",
                     f"Unsupported value: {json.dumps(error.instance)}: supported values: {allowed}")
    shown = _shown_type(error.instance) if isinstance(error.instance, (dict, list)) else json.dumps(error.instance)
    return Cause(_path(path), "FieldValueInvalid", f"Invalid value: {shown}: {error.message}")


_CEL_ENV = celpy.Environment()


def _cel_rules(obj: Any, old: Any, schema: Any, path: tuple, causes: list[Cause], skipped: list[str]) -> None:
    if not isinstance(schema, dict) or obj is None:
        return
    for rule in schema.get("x-kubernetes-validations") or []:
        text = rule.get("rule", "")
        if "oldSelf" in text and old is None:
            continue  # transition rules only apply to updates
        try:
            program = _CEL_ENV.program(_CEL_ENV.compile(text))
            activation = {"self": celpy.json_to_cel(obj)}
            if old is not None:
                activation["oldSelf"] = celpy.json_to_cel(old)
            result = program.evaluate(activation)
        except Exception as exc:  # a rule cel-python cannot run is reported, never silently passed
            skipped.append(f"{_path(path) or '<root>'}: {text!r}: {exc}")
            continue
        if result is not True and not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            message = rule.get("message") or f"failed rule: {text}"
            field_path = tuple(rule["fieldPath"].strip(".").split(".")) if rule.get("fieldPath") else ()
            field = _path(path + field_path)
            causes.append(Cause(field, rule.get("reason", "FieldValueInvalid"),
                                f"Invalid value: {_shown_type(obj)}: {message}"))
    if isinstance(obj, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in obj:
                old_value = old.get(key) if isinstance(old, dict) else None
                _cel_rules(obj[key], old_value, sub, path + (key,), causes, skipped)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(obj):
            _cel_rules(item, None, schema["items"], path + (index,), causes, skipped)


def _shown_type(value: Any) -> str:
    return f'"{type(value).__name__.replace("dict", "object").replace("list", "array")}"'


def admit(obj: dict[str, Any], schema: dict[str, Any] | None, old: dict[str, Any] | None = None,
          ) -> tuple[dict[str, Any], list[str], list[Cause], list[str]]:
    """Prune, default and validate a custom resource: (object, pruned paths, causes, CEL rules not run)."""
    obj = copy.deepcopy(obj)
    if not schema:
        return obj, [], [], []
    pruned = prune(obj, schema)
    apply_defaults(obj, schema)
    body_schema = _to_json_schema({k: v for k, v in schema.items()})
    body_schema["properties"] = {k: v for k, v in (body_schema.get("properties") or {}).items() if k not in ROOT_FIELDS}
    body = {k: v for k, v in obj.items() if k not in ROOT_FIELDS}
    validator = jsonschema.Draft4Validator(body_schema)
    causes = [_cause_of(e) for e in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))]
    skipped: list[str] = []
    if not causes:
        cel_schema = {**schema, "properties": {k: v for k, v in (schema.get("properties") or {}).items()
                                               if k not in ROOT_FIELDS}}
        _cel_rules(_cel_root(obj), _cel_root(old) if old else None, cel_schema, (), causes, skipped)
    return obj, pruned, causes, skipped


def _cel_root(obj: dict[str, Any]) -> dict[str, Any]:
    """`self` of root-level rules: the object, with only metadata.name/generateName, as Kubernetes gives."""
    meta = obj.get("metadata") or {}
    return {**obj, "metadata": {k: meta[k] for k in ("name", "generateName") if k in meta}}
