"""The CRD schema's own validator (aiflow.api.structural) against jsonschema's draft 4 validator:
the same errors, path for path and message for message, on every malformed manifest the schema
tests use (and on a few more), so that dropping jsonschema from `aiflow validate` changed nothing."""

from __future__ import annotations

import jsonschema
import pytest

from aiflow.api.schema import apply_defaults, openapi_schema
from aiflow.api.structural import StructuralValidator
from tests.unit.test_crd_schema import CEL_CASES, VALID, with_change
from tests.unit.test_crd_schema import test_schema_rejects_malformed_fields as malformed

CASES = [m.args for m in malformed.pytestmark if m.name == "parametrize"][0][1]
MORE = [
    (("spec", "stages", 0, "replicas"), True),
    (("spec", "stages", 0, "replicas"), 1.0),
    (("spec", "stages"), "all"),
    (("spec", "stages", 0, "env"), [{"name": 1}]),
    (("spec", "stages", 2, "resources", "requests"), {"cpu": [1]}),
    (("spec", "links", 0, "bandwidthMbps"), "fast"),
    (("spec", "triton", "image"), ""),
]


def errors(validator, manifest) -> list[tuple]:
    return sorted((tuple(e.absolute_path), e.validator, e.message) for e in validator.iter_errors(manifest))


@pytest.mark.parametrize("path, value", [c[:2] for c in CASES] + MORE)
def test_the_same_errors_as_jsonschema(path, value):
    manifest = apply_defaults(with_change(path, value))
    expected = errors(jsonschema.Draft4Validator(openapi_schema()), manifest)
    assert expected, "a malformed case, or the comparison means nothing"
    assert errors(StructuralValidator(openapi_schema()), manifest) == expected


@pytest.mark.parametrize("path, value", [c[:2] for c in CEL_CASES.values()])
def test_what_only_cel_refuses_passes_both(path, value):
    manifest = apply_defaults(with_change(path, value))
    assert errors(StructuralValidator(openapi_schema()), manifest) == \
        errors(jsonschema.Draft4Validator(openapi_schema()), manifest)


def test_a_valid_manifest_has_no_errors():
    assert list(StructuralValidator(openapi_schema()).iter_errors(apply_defaults(VALID))) == []
