"""Names and labels of the objects a flow owns: deterministic, valid, and at most 63 characters."""

from __future__ import annotations

import hashlib
import re

MAX_NAME = 63  # DNS-1035 label (Service names) and label values

MANAGED_BY = "aiflow-operator"
APP_NAME = "aiflow-stage"
PART_OF = "aiflow"
FLOW_LABEL = "aiflow.io/flow"
STAGE_LABEL = "aiflow.io/stage"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"


def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def bounded(text: str, limit: int = MAX_NAME) -> str:
    """`text` itself when short enough, else its head and a hash of the whole (still unique)."""
    if len(text) <= limit:
        return text
    return text[: limit - 9].rstrip("-.") + "-" + _digest(text)


def object_name(flow: str, stage: str) -> str:
    """Name of a stage's Deployment and Service: `<flow>-<stage>` as a DNS-1035 label."""
    base = re.sub(r"[^a-z0-9-]", "-", f"{flow}-{stage}".lower())
    if not base[0].isalpha():
        base = "af-" + base
    return bounded(base)


def label_value(text: str) -> str:
    return bounded(text)


def flow_selector(flow: str) -> dict[str, str]:
    """Labels every object of the flow carries (a list selector)."""
    return {FLOW_LABEL: label_value(flow), MANAGED_BY_LABEL: MANAGED_BY}


def stage_selector(flow: str, stage: str) -> dict[str, str]:
    """The Deployment's immutable pod selector and the Service's selector."""
    return {FLOW_LABEL: label_value(flow), STAGE_LABEL: label_value(stage)}


def stage_labels(flow: str, stage: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": label_value(flow),
        "app.kubernetes.io/component": label_value(stage),
        "app.kubernetes.io/part-of": PART_OF,
        MANAGED_BY_LABEL: MANAGED_BY,
        **stage_selector(flow, stage),
    }


def selector_string(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
