"""Triton stage metrics: what a stage's Triton server reports on its metrics port (8002, `/metrics`).

`parse_triton_metrics` (pure) reads the Prometheus text with `prometheus_client.parser`;
`stage_times` turns two readings of a stage into its mean request, queue and compute times between
them. The first stage calls every later one and waits for its answer, so its request time is the
flow's end-to-end latency minus the client's own call: the stage's own receipt-to-reply counters
(`aiflow_request_duration_us`), as Triton's request duration ends when a stage hands a request on
to the next one. Busy time is the compute per execution (Triton charges each request of a batch
the batch's compute). `read_stage_metrics` does the HTTP.
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace

from prometheus_client.parser import text_string_to_metric_families

from aiflow.render.manifests import METRICS_PORT

READ_TIMEOUT = 2.0  # seconds; an unreachable stage must not hold a reconcile up
# Metric family -> StageSample field. Durations are cumulative microseconds, counts cumulative.
_FIELDS = {
    "nv_inference_request_success": "success",
    "nv_inference_request_failure": "failure",
    "nv_inference_exec_count": "executions",
    "nv_inference_request_duration_us": "request_us",
    "nv_inference_queue_duration_us": "queue_us",
    "nv_inference_compute_infer_duration_us": "compute_us",
}
# A stage that answers after its next stage did (aiflow.stage.triton, forward async) counts its
# receipt-to-reply time itself: Triton's request duration ends when execute returns. Preferred.
_STAGE_FIELDS = {"aiflow_request_duration_us": "request_us", "aiflow_request_success": "replied"}


@dataclass(frozen=True)
class StageSample:
    """Cumulative counters of one Triton model (all its versions)."""

    success: float = 0.0
    failure: float = 0.0
    executions: float = 0.0
    request_us: float = 0.0
    queue_us: float = 0.0
    compute_us: float = 0.0
    at: float = 0.0  # when it was read (epoch seconds); 0: unknown


class StageMetricsError(ValueError):
    """Metrics text that says nothing usable about the model."""


def parse_triton_metrics(text: str, model: str) -> StageSample:
    """The counters of `model` in Triton's metrics text. Raises StageMetricsError when the text is
    not Prometheus text, has no sample of the model, or holds a negative or non-finite counter."""
    values = dict.fromkeys(_FIELDS.values(), 0.0)
    own = dict.fromkeys(_STAGE_FIELDS.values(), 0.0)
    seen = own_seen = False
    try:
        for family in text_string_to_metric_families(text):
            if family.name in _STAGE_FIELDS:
                for sample in family.samples:
                    if sample.labels.get("model") == model and math.isfinite(sample.value) and sample.value >= 0:
                        own[_STAGE_FIELDS[family.name]] += sample.value
                        own_seen = True
                continue
            key = _FIELDS.get(family.name)  # the parser names counter samples <family>_total
            for sample in family.samples if key else ():
                if sample.name not in (family.name, f"{family.name}_total") or sample.labels.get("model") != model:
                    continue
                if not math.isfinite(sample.value) or sample.value < 0:
                    raise StageMetricsError(f"{family.name} of {model} is {sample.value:g}")
                values[key] += sample.value
                seen = True
    except StageMetricsError:
        raise
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise StageMetricsError(f"not Prometheus metrics text: {exc}") from exc
    if not seen:
        raise StageMetricsError(f"no nv_inference_* samples of model {model!r}")
    if own_seen and own["replied"] > 0:  # the mean over the stage's own count of answered requests
        values["request_us"] = own["request_us"] * values["success"] / own["replied"]
    return StageSample(**values)


@dataclass(frozen=True)
class StageTimes:
    """A stage's mean times over the requests completed between two readings, in milliseconds."""

    requests: float
    request_ms: float  # receipt to reply (includes the calls to later stages)
    queue_ms: float
    compute_ms: float  # per model execution
    busy: float | None = None  # share of the time between the readings its instances computed

    def to_status(self, stage: str) -> dict:
        out = {"stage": stage, "requests": int(self.requests), "requestMs": round(self.request_ms, 3),
               "queueMs": round(self.queue_ms, 3), "computeMs": round(self.compute_ms, 3)}
        if self.busy is not None:
            out["busy"] = round(self.busy, 4)
        return out


def stage_times(previous: StageSample | None, current: StageSample) -> StageTimes | None:
    """Mean times between two readings (since the server started without a previous one, or when the
    counters went back: a restarted server); None when no request completed in between."""
    base = previous
    if base is None or current.success < base.success or current.request_us < base.request_us:
        base = StageSample()
    done = current.success - base.success
    if done <= 0:
        return None
    executions = max(current.executions - base.executions, 1.0)
    busy = None
    if base is previous and previous.at > 0 and current.at > previous.at:
        # Triton charges every request of a batch the batch's compute: per execution it is the
        # instance's busy time. Summed over the model's instances: above 1 means several were busy.
        busy = (current.compute_us - base.compute_us) / done * executions / 1e6 / (current.at - previous.at)
    return StageTimes(done, (current.request_us - base.request_us) / done / 1e3,
                      (current.queue_us - base.queue_us) / done / 1e3,
                      (current.compute_us - base.compute_us) / executions / 1e3, busy)


def metrics_url(host: str, port: int = METRICS_PORT) -> str:
    return f"http://{host}:{port}/metrics"


def read_stage_metrics(url: str, model: str, timeout: float = READ_TIMEOUT) -> StageSample:
    """GET a stage's metrics and parse them; StageMetricsError says why when that fails."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (an http URL we built)
            text = response.read(4 << 20).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise StageMetricsError(f"{url}: {getattr(exc, 'reason', exc)}") from exc
    return replace(parse_triton_metrics(text, model), at=time.time())
