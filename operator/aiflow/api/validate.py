"""Everything wrong with an AIFlow manifest, each problem with its field path and what to fix.

Order of the checks: identity (apiVersion, kind, name), fields the schema does not declare (strict
field validation), the CRD's schema and CEL rules (what a cluster would reject at apply time), then
semantics the schema cannot know: models that exist in the model repository, the data contract
between consecutive stages (both only for a flow that serves the bundled repository, the one the
operator can read), and — given a view of the cluster — tiers that have nodes.
"""

from __future__ import annotations

import functools
import json
import re

from aiflow import GROUP, KIND, TIER_LABEL, TIERS, VERSION
from aiflow.api.catalog import ModelInfo, load_catalog
from aiflow.api.cluster import ClusterView
from aiflow.api.locations import model_repo_path
from aiflow.api.problems import NO_NODES_FOR_TIER, Problem
from aiflow.api.schema import apply_defaults, cel_problems, schema_problems, unknown_field_problems
from aiflow.contract import ACCEPTS, EMITS

API_VERSION = f"{GROUP}/{VERSION}"
FIRST_INPUT = "image"
LAST_OUTPUT = "caption"
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def validate_manifest(
    manifest,
    catalog: dict[str, ModelInfo] | None = None,
    cluster: ClusterView | None = None,
) -> list[Problem]:
    """All problems of `manifest` (empty = valid). `catalog` defaults to the configured model
    repository; tier problems (reason NoNodesForTier) are reported only when `cluster` is given."""
    if not isinstance(manifest, dict):
        return [Problem("<root>", f"an AIFlow manifest must be a mapping, not {type(manifest).__name__}")]
    problems = identity_problems(manifest) + unknown_field_problems(manifest)
    doc = apply_defaults(manifest)
    # The user's part of the object: status is the operator's, and of metadata only the name is checked.
    meta = doc.get("metadata")
    user_part = {**doc, "metadata": {"name": meta.get("name")} if isinstance(meta, dict) else meta}
    user_part.pop("status", None)
    problems += _schema_and_cel_problems(json.dumps(user_part, sort_keys=True))
    if uses_bundled_repository(doc):
        problems += model_problems(doc, load_catalog() if catalog is None else catalog)
    # Any other repository (a volume, object storage, another image's) the operator cannot read: the
    # stages load what it holds, and a model that fails to load is reported in status (ModelsLoaded).
    if cluster is not None:
        problems += tier_problems(doc, cluster)
    return _unique(problems)


@functools.lru_cache(maxsize=1024)
def _schema_and_cel_problems(doc_json: str) -> tuple[Problem, ...]:
    """Schema and CEL problems of a spec; cached, because the operator checks the same spec on every
    reconcile and CEL evaluation is the costly part."""
    doc = json.loads(doc_json)
    return tuple(schema_problems(doc) + cel_problems(doc))


BUNDLED_REPOSITORY = "/opt/aiflow/model_repo"


def uses_bundled_repository(doc: dict) -> bool:
    """Whether the flow serves the model repository baked into the stage image (the one the operator
    ships too and checks against), rather than a volume or object storage of its own."""
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    triton = spec.get("triton") if isinstance(spec.get("triton"), dict) else {}
    repo = triton.get("modelRepository") if isinstance(triton.get("modelRepository"), dict) else {}
    return repo.get("path", BUNDLED_REPOSITORY) == BUNDLED_REPOSITORY and "persistentVolumeClaim" not in repo


def identity_problems(manifest: dict) -> list[Problem]:
    problems = []
    if manifest.get("apiVersion") != API_VERSION:
        problems.append(Problem("apiVersion", f"must be {API_VERSION}, not {manifest.get('apiVersion')!r}"))
    if manifest.get("kind") != KIND:
        problems.append(Problem("kind", f"must be {KIND}, not {manifest.get('kind')!r}"))
    meta = manifest.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        problems.append(Problem("metadata.name", "is required: give the flow a name"))
    elif not _DNS_SUBDOMAIN.match(name):
        problems.append(
            Problem("metadata.name", f"{name!r} must be lower-case letters, digits, '-' and '.', "
                    "starting and ending with a letter or digit")
        )
    return problems


def _stages(doc: dict) -> list[tuple[int, dict]]:
    spec = doc.get("spec")
    stages = spec.get("stages") if isinstance(spec, dict) else None
    if not isinstance(stages, list):
        return []
    return [(i, s) for i, s in enumerate(stages) if isinstance(s, dict)]


def model_problems(doc: dict, catalog: dict[str, ModelInfo]) -> list[Problem]:
    """Unknown models, and the chain contract: the first stage accepts an image, each stage accepts
    what the previous one emits, the last emits a caption."""
    stages = [(i, s, s.get("model")) for i, s in _stages(doc) if isinstance(s.get("model"), str)]
    if not stages:
        return []
    if not catalog:
        return [Problem("spec.stages", f"no Triton models found in {model_repo_path()}; point "
                        "AIFLOW_MODEL_REPO at the model repository the stages serve")]
    known = ", ".join(sorted(catalog))
    problems = []
    for i, _, model in stages:
        if model not in catalog:
            problems.append(Problem(f"spec.stages[{i}].model", f"unknown model {model!r}; known models: {known}"))
        else:
            for key in (ACCEPTS, EMITS):
                if not catalog[model].parameters.get(key):
                    problems.append(Problem(
                        f"spec.stages[{i}].model",
                        f"model {model!r} declares no {key!r} parameter in its config.pbtxt, so the "
                        "flow cannot be checked; add it to the model's parameters"))
    if problems:
        return problems
    consumers = lambda kind: ", ".join(sorted(m for m, info in catalog.items() if info.accepts == kind)) or "none"
    first_i, _, first_model = stages[0]
    if catalog[first_model].accepts != FIRST_INPUT:
        problems.append(Problem(
            f"spec.stages[{first_i}].model",
            f"the first stage receives an {FIRST_INPUT} but model {first_model!r} accepts "
            f"{catalog[first_model].accepts}; start the flow with a model that accepts {FIRST_INPUT} "
            f"({consumers(FIRST_INPUT)})"))
    for (_, prev, prev_model), (i, stage, model) in zip(stages, stages[1:]):
        sent, wanted = catalog[prev_model].emits, catalog[model].accepts
        if sent != wanted:
            problems.append(Problem(
                f"spec.stages[{i}].model",
                f"model {model!r} accepts {wanted} but the previous stage {prev.get('name')!r} "
                f"(model {prev_model!r}) emits {sent}; use a model that accepts {sent} here "
                f"({consumers(sent)}) or change the previous stage"))
    last_i, last, last_model = stages[-1]
    if catalog[last_model].emits != LAST_OUTPUT:
        producers = ", ".join(sorted(m for m, info in catalog.items() if info.emits == LAST_OUTPUT)) or "none"
        problems.append(Problem(
            f"spec.stages[{last_i}].model",
            f"the last stage must produce a {LAST_OUTPUT} but model {last_model!r} emits "
            f"{catalog[last_model].emits}; end the flow with a model that emits {LAST_OUTPUT} ({producers})"))
    return problems


def tier_problems(doc: dict, cluster: ClusterView) -> list[Problem]:
    """Stages pinned to a tier without usable nodes; `auto` stages when no tier has any."""
    problems = []
    available = cluster.tiers_with_nodes
    for i, stage in _stages(doc):
        tier = stage.get("tier", "auto")
        if tier in TIERS and tier not in available:
            alternatives = ", ".join(available + ("auto",)) if available else "none yet"
            problems.append(Problem(
                f"spec.stages[{i}].tier",
                f"stage {stage.get('name')!r}: tier {tier} has no ready nodes labelled "
                f"{TIER_LABEL}={tier}; add nodes to that tier or move the stage to a tier that has "
                f"nodes ({alternatives})",
                reason=NO_NODES_FOR_TIER))
        elif tier == "auto" and not available:
            problems.append(Problem(
                f"spec.stages[{i}].tier",
                f"stage {stage.get('name')!r}: no tier has ready nodes labelled {TIER_LABEL}; label "
                f"nodes with {TIER_LABEL}=device|edge|cloud",
                reason=NO_NODES_FOR_TIER))
    return problems


def _unique(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out
