"""A problem found in an AIFlow manifest: where it is and what to do about it."""

from __future__ import annotations

from dataclasses import dataclass

# Reasons, as they appear in status conditions and Events.
INVALID_SPEC = "InvalidSpec"
NO_NODES_FOR_TIER = "NoNodesForTier"


@dataclass(frozen=True, order=True)
class Problem:
    """`path` is a field path such as `spec.stages[1].model`; `message` says what to fix."""

    path: str
    message: str
    reason: str = INVALID_SPEC

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def field_path(parts) -> str:
    """`("spec", "stages", 1, "model")` -> `spec.stages[1].model`."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"
