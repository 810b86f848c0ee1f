"""Forwarding to the next stage: a gRPC call to the next tier's Triton, errors that name it.

`GrpcForward` blocks its caller (the serial configuration); `AsyncGrpcForward` runs on an event
loop of its own, so that the stage's Triton instance takes the next request while the tiers after
it work. A next stage whose queue is full answers at once with an "overloaded" error naming it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
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
        inputs, outputs = request_tensors(grpcclient, input_name, data)
        try:
            result = self._client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise self.error(exc) from None
        return read_reply(result)

    def error(self, exc) -> StageError:
        down = any(s in str(exc.status()) for s in ("UNAVAILABLE", "DEADLINE_EXCEEDED"))
        message = describe_call_error(exc, self.model, self.url, self.timeout_s)
        return StageError(message, "UNAVAILABLE" if down else "INTERNAL")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class AsyncGrpcForward(GrpcForward):
    """The same call with tritonclient's asyncio client, awaited on `loop` (one per stage instance:
    the Python backend stub runs `execute` on its own thread, the calls live on this loop's)."""

    def __init__(self, url: str, model: str, timeout_s: float):
        super().__init__(url, model, timeout_s)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"forward-{model}", daemon=True)
        self._thread.start()
        self._aclient = None

    async def call(self, input_name: str, data: np.ndarray) -> dict[str, np.ndarray]:
        import tritonclient.grpc.aio as aioclient
        from tritonclient.utils import InferenceServerException

        if self._aclient is None:
            self._aclient = aioclient.InferenceServerClient(self.url)
        inputs, outputs = request_tensors(aioclient, input_name, data)
        try:
            result = await self._aclient.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise self.error(exc) from None
        return read_reply(result)

    def submit(self, coroutine) -> concurrent.futures.Future:
        """Run `coroutine` on this forward's loop, from any thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self) -> None:
        if self._aclient is not None:
            self.submit(self._aclient.close()).result(timeout=5)
            self._aclient = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        super().close()


def request_tensors(client_module, input_name: str, data: np.ndarray) -> tuple[list, list]:
    """One message as a request of batch dimension 1, asking for the caption and the trace."""
    inp = client_module.InferInput(input_name, [1, data.size], "UINT8")
    inp.set_data_from_numpy(data.reshape(1, -1))
    return [inp], [client_module.InferRequestedOutput(n) for n in (TENSORS["caption"], TRACE)]


def read_reply(result) -> dict[str, np.ndarray]:
    """A next stage's reply as 1-D tensors (its outputs carry Triton's batch dimension of 1)."""
    return {name: result.as_numpy(name).reshape(-1) for name in (TENSORS["caption"], TRACE)}


OVERLOADED = "overloaded"
QUEUE_FULL = "Exceeds maximum queue size"  # Triton's message when a model's queue is at max_queue_size


def is_overloaded(message: str) -> bool:
    """Whether an error (a Triton message or one of ours) says a stage's queue is full."""
    return QUEUE_FULL in message or f"is {OVERLOADED}:" in message


def describe_call_error(exc, model: str, url: str, timeout_s: float, what: str = "next stage") -> str:
    """A tritonclient error as a sentence naming the stage called and its address."""
    status, message = str(exc.status() or ""), exc.message() or str(exc)
    if f"is {OVERLOADED}:" in message:  # a stage further down, named in the message
        return f"{what} {model} at {url} failed: {message}"
    if QUEUE_FULL in message:  # this stage's own queue
        return f"{what} {model} at {url} is {OVERLOADED}: its queue is full ({message}); retry later, on another replica, or add replicas"
    if "UNAVAILABLE" in status:
        return f"{what} {model} at {url} is unreachable (is its Triton server running?): {message}"
    if "DEADLINE_EXCEEDED" in status:
        return f"{what} {model} at {url} did not answer within {timeout_s:g}s"
    return f"{what} {model} at {url} failed: {message}"


