"""Forwarding to the next stage: a gRPC call to the next tier's Triton, errors that name it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from aiflow.contract import TENSORS, TRACE
from aiflow.stage.config import StageError

Forward = Callable[[str, np.ndarray], dict[str, np.ndarray]]


class GrpcForward:
    """Calls the next stage's Triton over gRPC; every failure names the next stage and its address."""

    def __init__(self, url: str, model: str, timeout_s: float):
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self._client = None

    def __call__(self, input_name: str, data: np.ndarray) -> dict[str, np.ndarray]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.url)
        inp = grpcclient.InferInput(input_name, list(data.shape), "UINT8")
        inp.set_data_from_numpy(data)
        outputs = [grpcclient.InferRequestedOutput(n) for n in (TENSORS["caption"], TRACE)]
        try:
            result = self._client.infer(self.model, [inp], outputs=outputs, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            down = any(s in str(exc.status()) for s in ("UNAVAILABLE", "DEADLINE_EXCEEDED"))
            message = describe_call_error(exc, self.model, self.url, self.timeout_s)
            raise StageError(message, "UNAVAILABLE" if down else "INTERNAL") from None
        return {name: result.as_numpy(name) for name in (TENSORS["caption"], TRACE)}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def describe_call_error(exc, model: str, url: str, timeout_s: float, what: str = "next stage") -> str:
    """A tritonclient error as a sentence naming the stage called and its address."""
    status, message = str(exc.status() or ""), exc.message() or str(exc)
    if "UNAVAILABLE" in status:
        return f"{what} {model} at {url} is unreachable (is its Triton server running?): {message}"
    if "DEADLINE_EXCEEDED" in status:
        return f"{what} {model} at {url} did not answer within {timeout_s:g}s"
    return f"{what} {model} at {url} failed: {message}"


