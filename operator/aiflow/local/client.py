"""The caption client: a camera on the device tier sending images into a scheme's first stage.

It reads the trace the stages return and turns it into a per-hop breakdown (compute, emulated
slowdown, time on the links) and the bytes each link carried upstream.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from aiflow.contract import TENSORS, TRACE
from aiflow.local.schemes import CLIENT_TIER, JPEG_QUALITY, RunningFlow, Scheme
from aiflow.stage.forward import describe_call_error, is_overloaded
from aiflow.stage.logic import read_trace

DEFAULT_TIMEOUT_S = 120.0


class CaptionError(RuntimeError):
    """The flow answered with an error, or could not be reached. `overloaded`: a stage's queue was
    full (it answered at once; another replica, or later, may serve the request)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.overloaded = is_overloaded(message)


@dataclass
class Captioned:
    """One image through one scheme."""

    image: str
    caption: str
    scheme: str
    latency_ms: float  # client send to client receive
    upload_bytes: int  # the image as the client sent it
    link_bytes: dict[str, int]  # payload bytes that crossed each link upstream
    hops: list[dict] = field(default_factory=list)  # the stages' trace, plus link_ms per hop

    @property
    def bytes_from_device(self) -> int:
        """Bytes that left the device tier (the thin uplink)."""
        return sum(v for k, v in self.link_bytes.items() if k.startswith(f"{CLIENT_TIER}->"))

    def as_dict(self) -> dict:
        return {**asdict(self), "bytes_from_device": self.bytes_from_device}


def encode_upload(image: bytes, upload: str) -> bytes:
    """The bytes the camera uploads: the image as given (`png`), or re-encoded as JPEG."""
    if upload == "png":
        return image
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(image)).convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def infer(client, url: str, model: str, blobs: Sequence[bytes], timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[list[str], list[dict], float]:
    """Send encoded images to `model` over a tritonclient gRPC `client` connected to `url`; return
    captions, trace hops and the latency in ms."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    inp = grpcclient.InferInput(TENSORS["image"], [1, len(blobs)], "BYTES")  # one request: batch dimension 1
    inp.set_data_from_numpy(np.array([list(blobs)], dtype=object))
    outputs = [grpcclient.InferRequestedOutput(n) for n in (TENSORS["caption"], TRACE)]
    start = time.perf_counter()
    try:
        result = client.infer(model, [inp], outputs=outputs, client_timeout=timeout_s)
    except InferenceServerException as exc:
        raise CaptionError(describe_call_error(exc, model, url, timeout_s, what="stage")) from None
    latency = 1000 * (time.perf_counter() - start)
    captions = [c.decode() for c in result.as_numpy(TENSORS["caption"]).reshape(-1)]
    return captions, read_trace(result.as_numpy(TRACE)), latency


def infer_any(replicas: Sequence[tuple[object, str]], model: str, blobs: Sequence[bytes], timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[list[str], list[dict], float]:
    """`infer` on the first of `replicas` ((client, url) pairs of the entry stage) that is not
    overloaded; any other error, or every replica overloaded, is reported (CaptionError)."""
    if not replicas:
        raise ValueError("no replica to send to")
    refused = []
    for client, url in replicas:
        try:
            return infer(client, url, model, blobs, timeout_s)
        except CaptionError as exc:
            if not exc.overloaded:
                raise
            refused.append(str(exc))
    raise CaptionError(f"every replica of {model} is overloaded ({len(refused)} tried): " + "; ".join(refused))


def link_bytes(tiers: Sequence[str], upload_bytes: int, hops: Sequence[Mapping]) -> dict[str, int]:
    """Payload bytes per link, upstream: the upload into the first stage, then each hop's output."""
    from aiflow.local.runtime import link_name, route_links, tier_links

    totals = {link_name(k): 0 for k in tier_links(tuple(tiers))}
    crossings = [(CLIENT_TIER, hops[0]["tier"], upload_bytes)] if hops else []
    crossings += [(a["tier"], b["tier"], a["bytes_to_next"]) for a, b in zip(hops, hops[1:])]
    for src, dst, nbytes in crossings:
        if src and dst and src != dst:
            for key in route_links(tuple(tiers), src, dst):
                totals[link_name(key)] += int(nbytes)
    return totals


def add_link_times(hops: list[dict], latency_ms: float) -> list[dict]:
    """Time spent reaching each hop and coming back (transfer, links, queueing), beyond its own work."""
    before = [latency_ms] + [h["wait_next_ms"] for h in hops[:-1]]
    for hop, outer in zip(hops, before):
        hop["link_ms"] = max(0.0, outer - hop["total_ms"])
    return hops


def caption_images(flow: RunningFlow, scheme: Scheme, images: Sequence[tuple[str, bytes]], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Captioned]:
    """Caption (name, image bytes) pairs one request each through `scheme` on a running flow."""
    import tritonclient.grpc as grpcclient

    url = flow.entry_address(scheme)
    results = []
    client = grpcclient.InferenceServerClient(url)  # one connection: a camera keeps its channel open
    try:
        for name, blob in images:
            upload = encode_upload(blob, scheme.upload)
            (caption,), hops, latency = infer(client, url, scheme.entry.model, [upload], timeout_s)
            add_link_times(hops, latency)
            results.append(
                Captioned(
                    image=name,
                    caption=caption,
                    scheme=scheme.name,
                    latency_ms=latency,
                    upload_bytes=len(upload),
                    link_bytes=link_bytes(flow.tiers, len(upload), hops),
                    hops=hops,
                )
            )
    finally:
        client.close()
    return results


def format_result(c: Captioned) -> list[str]:
    """Human-readable lines: the caption, then one line per hop, then bytes per link."""
    lines = [f'{c.image}: "{c.caption}"', f"  scheme {c.scheme}: {c.latency_ms:.1f} ms end to end"]
    for hop in c.hops:
        slow = f" (+{hop['emulated_ms']:.1f} ms emulated, x{hop['compute_factor']:g})" if hop["emulated_ms"] else ""
        sent = f", {hop['bytes_to_next']:,} B to next" if hop["bytes_to_next"] else ""
        lines.append(
            f"  {hop['tier'] or '?':<6} {hop['model']:<17} compute {hop['compute_ms']:7.1f} ms{slow}"
            f"{sent}; getting there and back {hop['link_ms']:.1f} ms"
        )
    links = ", ".join(f"{k} {v:,} B" for k, v in c.link_bytes.items())
    lines.append(f"  upstream payload: {links} (uploaded {c.upload_bytes:,} B)")
    return lines
