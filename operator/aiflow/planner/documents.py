"""Reading the planner's input documents (profile, cluster snapshot, flow manifest) with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

from aiflow.api.problems import field_path


class DocumentError(ValueError):
    """A document the planner cannot use; the message names the file, the field and the fix."""


def read_document(path: str | Path, what: str) -> Any:
    """Parse a YAML or JSON file (JSON is YAML); DocumentError if it is missing or unreadable."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DocumentError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise DocumentError(f"{what} {path} is not valid YAML/JSON: {exc}") from exc
    if not docs:
        raise DocumentError(f"{what} {path} is empty")
    return docs[0] if len(docs) == 1 else docs


def check_schema(doc: Any, schema: dict, what: str) -> None:
    """Validate `doc` against a JSON schema; DocumentError listing every problem with its field path."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if errors:
        lines = [f"  {field_path(e.absolute_path)}: {_message(e)}" for e in errors]
        raise DocumentError(f"invalid {what}:\n" + "\n".join(lines))


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator in ("oneOf", "anyOf") and error.context:
        # The branch of the right type says what is wrong; "is not of type" from the others does not.
        relevant = [e.message for e in error.context if e.validator != "type"]
        return "; ".join(dict.fromkeys(relevant)) or error.message
    if error.validator == "additionalProperties":
        return f"{error.message} (known fields: {', '.join(sorted(error.schema.get('properties', {})))})"
    return error.message
