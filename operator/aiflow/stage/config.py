"""A stage's configuration: its role (from what its config.pbtxt accepts and emits) and its knobs.

Knobs are looked up per model parameter `AIFLOW_X` (the local runtime's load-time override), then
the process environment `AIFLOW_X` (the operator's wiring), then the config.pbtxt default `x`.
Every failure becomes a StageError whose message says what to fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aiflow.contract import DECODINGS, PASSTHROUGH, ROLES, CodecError, parse_codec

DEFAULT_CODEC = "fp32"
DEFAULT_TIMEOUT_S = 60.0
MAX_IMAGE_BYTES = 2 * 1024 * 1024
MAX_IMAGE_SIDE = 2048
MAX_BATCH = 64

# knob -> (kind, default); looked up as parameter AIFLOW_<KNOB>, env AIFLOW_<KNOB>, parameter <knob>.
KNOBS: dict[str, tuple[type, object]] = {
    "split_layer": (int, None),
    "codec": (str, DEFAULT_CODEC),
    "decoding": (str, "greedy"),
    "next_url": (str, ""),
    "next_model": (str, ""),
    "tier": (str, ""),
    "flow": (str, ""),
    "stage": (str, ""),
    "compute_factor": (float, 1.0),
    "timeout_s": (float, DEFAULT_TIMEOUT_S),
    "max_image_bytes": (int, MAX_IMAGE_BYTES),
    "max_image_side": (int, MAX_IMAGE_SIDE),
    "max_batch": (int, MAX_BATCH),
    "model_path": (str, ""),  # a checkpoint directory; empty = the bundled trained weights
    "forward": (str, "async"),  # async: the instance is free while the next stage works; sync: it waits
    "threads": (int, 1),  # torch CPU threads per Triton model instance
}
FORWARD_MODES = ("async", "sync")


class StageError(Exception):
    """A request or configuration this stage cannot serve; the message goes back to the caller.

    `code` names the Triton error code: INVALID_ARG (the request), UNAVAILABLE (the next stage).
    """

    def __init__(self, message: str, code: str = "INVALID_ARG"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class StageConfig:
    model: str
    accepts: str
    emits: str
    split_layer: int | None = None
    codec: str = DEFAULT_CODEC
    decoding: str = "greedy"
    next_url: str = ""
    next_model: str = ""
    tier: str = ""
    flow: str = ""
    stage: str = ""
    compute_factor: float = 1.0
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_side: int = MAX_IMAGE_SIDE
    max_batch: int = MAX_BATCH
    model_path: str = ""
    forward: str = "async"
    threads: int = 1

    @property
    def role(self) -> str:
        return ROLES[(self.accepts, self.emits)]

    @property
    def name(self) -> str:
        return self.stage or self.model

    def describe(self) -> str:
        """One line for the server log: what runs here, where it goes, how slow it is made."""
        knobs = [f"codec={self.codec}"] if self.emits in ("features", "drafts") else []
        if self.split_layer is not None and self.accepts != "drafts":
            knobs.append(f"split_layer={self.split_layer}")
        if self.emits == "caption":
            knobs.append(f"decoding={self.decoding}")
        nxt = f"-> {self.next_model} at {self.next_url}" if self.next_url else "(last stage)"
        return (
            f"aiflow stage {self.name} [{self.role}] tier={self.tier or '?'} {' '.join(knobs)} {nxt}; "
            f"compute factor {self.compute_factor:g} (emulated: sleeps {self.compute_factor - 1:g}x compute)"
        )


def stage_config(model: str, parameters: Mapping[str, str], env: Mapping[str, str]) -> StageConfig:
    """Resolve a stage's configuration from its config parameters and environment; StageError if bad."""
    accepts, emits = parameters.get("aiflow.accepts", ""), parameters.get("aiflow.emits", "")
    if (accepts, emits) not in ROLES:
        known = ", ".join(f"{a}->{e}" for a, e in ROLES)
        raise StageError(f"model {model}: aiflow.accepts/emits {accepts!r}->{emits!r} is not a stage ({known})")
    values: dict[str, object] = {}
    for knob, (kind, default) in KNOBS.items():
        key = f"AIFLOW_{knob.upper()}"
        raw = parameters.get(key) or env.get(key) or parameters.get(knob) or parameters.get(f"aiflow.{knob}")
        if raw in (None, ""):
            values[knob] = default
            continue
        try:
            values[knob] = kind(str(raw).strip())
        except ValueError:
            raise StageError(f"model {model}: {key}={raw!r} is not a valid {kind.__name__}") from None
    config = StageConfig(model=model, accepts=accepts, emits=emits, **values)
    _check_config(config)
    return config


def _check_config(c: StageConfig) -> None:
    where = f"model {c.model}"
    if c.decoding not in DECODINGS:
        raise StageError(f"{where}: decoding {c.decoding!r} must be one of {', '.join(DECODINGS)}")
    if c.emits in ("features", "drafts") and c.codec != PASSTHROUGH:
        try:
            parse_codec(c.codec)
        except CodecError as exc:
            raise StageError(f"{where}: {exc}") from None
    if c.codec == PASSTHROUGH and c.role != "caption_drafter":
        raise StageError(f"{where}: codec {PASSTHROUGH!r} only applies to a drafter")
    if bool(c.next_url) != bool(c.next_model):
        raise StageError(f"{where}: set both next_url and next_model (AIFLOW_NEXT_URL, AIFLOW_NEXT_MODEL) or neither")
    if c.next_url and c.emits == "caption":
        raise StageError(f"{where}: emits the caption, so it cannot have a next stage ({c.next_model} at {c.next_url})")
    if c.compute_factor < 1:
        raise StageError(f"{where}: compute factor {c.compute_factor} must be >= 1 (1 = real speed)")
    if c.forward not in FORWARD_MODES:
        raise StageError(f"{where}: forward {c.forward!r} must be one of {', '.join(FORWARD_MODES)}")
    if c.threads < 1:
        raise StageError(f"{where}: threads {c.threads} must be >= 1")
    if c.timeout_s <= 0:
        raise StageError(f"{where}: timeout_s must be positive")


