"""How a stage serves concurrent requests: Triton instances, threads, batching and its queue bound.

Torch-free: the operator renders these (AIFlow `spec.stages[].serving`) and the local runtime
applies them at model load. They land in the model's Triton configuration (`instance_group`,
`max_batch_size`, `dynamic_batching`) and in two stage knobs (`AIFLOW_THREADS`, `AIFLOW_FORWARD`).

`SERIAL` is the configuration a flow had before: one instance, no batching, no queue bound, and a
stage that waits for the next one inside `execute`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

FORWARD_MODES = ("async", "sync")
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_QUEUE_SIZE = 64


class ServingError(ValueError):
    """Serving settings that cannot be applied; the message says which field and why."""


@dataclass(frozen=True)
class Serving:
    instances: int = 1  # Triton model instances (one Python stub process each)
    threads: int = 1  # torch CPU threads per instance
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # requests per batched pass; 1: no batching
    max_queue_delay_us: int = 0  # how long the batcher may hold a request to fill a batch
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE  # waiting requests before "overloaded"; 0: unbounded
    forward: str = "async"  # async: the instance is free while the next stage works; sync: it waits

    def __post_init__(self):
        for name in ("instances", "threads", "max_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ServingError(f"serving.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("max_queue_delay_us", "max_queue_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ServingError(f"serving.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.forward not in FORWARD_MODES:
            raise ServingError(f"serving.forward must be one of {', '.join(FORWARD_MODES)}, got {self.forward!r}")

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1

    def knobs(self) -> dict[str, str]:
        """These settings as stage parameters named like the environment (AIFLOW_INSTANCES, ...):
        how they travel with the other knobs; `apply_parameters` turns the Triton-level ones into
        the model config."""
        return {
            "AIFLOW_INSTANCES": str(self.instances),
            "AIFLOW_THREADS": str(self.threads),
            "AIFLOW_MAX_BATCH_SIZE": str(self.max_batch_size),
            "AIFLOW_MAX_QUEUE_DELAY_US": str(self.max_queue_delay_us),
            "AIFLOW_MAX_QUEUE_SIZE": str(self.max_queue_size),
            "AIFLOW_FORWARD": self.forward,
        }


# Knobs that Triton itself reads from the model config (the others reach the stage's Python code).
TRITON_KNOBS = {
    "AIFLOW_INSTANCES": "instances",
    "AIFLOW_MAX_BATCH_SIZE": "max_batch_size",
    "AIFLOW_MAX_QUEUE_DELAY_US": "max_queue_delay_us",
    "AIFLOW_MAX_QUEUE_SIZE": "max_queue_size",
}


def apply_parameters(config: dict, parameters) -> dict:
    """Set a Triton model config's instances, batching and queue bound from those of `parameters`
    (AIFLOW_INSTANCES, AIFLOW_MAX_BATCH_SIZE, AIFLOW_MAX_QUEUE_DELAY_US, AIFLOW_MAX_QUEUE_SIZE)
    that are present; the rest of the config is kept. `max_batch_size` stays >= 1, so a request
    keeps its [1, n] shape whichever settings a stage runs with."""
    values = {}
    for key, name in TRITON_KNOBS.items():
        if key in parameters and str(parameters[key]).strip() != "":
            try:
                values[name] = int(str(parameters[key]).strip())
            except ValueError:
                raise ServingError(f"{key}={parameters[key]!r} is not an integer") from None
    if not values:
        return dict(config)
    batching = dict(config.get("dynamic_batching") or {})
    policy = dict(batching.get("default_queue_policy") or {})
    current = Serving(
        instances=int(((config.get("instance_group") or [{}])[0]).get("count", 1)),
        max_batch_size=max(1, int(config.get("max_batch_size", 1))),
        max_queue_delay_us=int(batching.get("max_queue_delay_microseconds", 0)),
        max_queue_size=int(policy.get("max_queue_size", 0)),
    )
    s = replace(current, **values)
    out = dict(config)
    out["max_batch_size"] = s.max_batch_size
    out["instance_group"] = [{"kind": "KIND_CPU", "count": s.instances}]
    out.pop("dynamic_batching", None)
    if s.batching or s.max_queue_size:
        batching = {"max_queue_delay_microseconds": str(s.max_queue_delay_us)}
        if s.max_queue_size:
            batching["default_queue_policy"] = {"max_queue_size": s.max_queue_size}
        out["dynamic_batching"] = batching
    return out


SERIAL = Serving(instances=1, threads=1, max_batch_size=1, max_queue_delay_us=0, max_queue_size=0, forward="sync")


def for_cpu(cpu: str | float | int | None, base: Serving = Serving()) -> Serving:
    """Defaults from a stage's CPU request: one instance per whole core (the instance is free while
    the next stage works, so more only pays for compute), one thread each."""
    cores = parse_cpu(cpu)
    return replace(base, instances=max(1, math.floor(cores)) if cores else base.instances)


def parse_cpu(cpu: str | float | int | None) -> float | None:
    """A Kubernetes CPU quantity ("500m", "2", 1.5) in cores; None when absent."""
    if cpu in (None, ""):
        return None
    from kubernetes.utils import parse_quantity  # the parser the planner, renderer and apply use

    try:
        return float(parse_quantity(str(cpu).strip()))
    except (TypeError, ValueError):
        raise ServingError(f"CPU request {cpu!r} is not a Kubernetes quantity (e.g. 500m or 2)") from None


def from_spec(spec: dict | None, cpu: str | float | int | None = None) -> Serving:
    """`spec.stages[].serving` (camelCase) -> Serving, missing fields from the CPU-derived defaults."""
    base = for_cpu(cpu)
    spec = spec or {}
    fields = {
        "instances": "instances",
        "threads": "threads",
        "maxBatchSize": "max_batch_size",
        "maxQueueDelayMicroseconds": "max_queue_delay_us",
        "maxQueueSize": "max_queue_size",
        "forward": "forward",
    }
    unknown = sorted(set(spec) - set(fields))
    if unknown:
        raise ServingError(f"serving: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    return replace(base, **{fields[k]: v for k, v in spec.items()})
