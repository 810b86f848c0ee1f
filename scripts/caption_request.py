"""Send one image to a flow's first stage and print the caption (the last step of the kind demo).

    python scripts/caption_request.py --url 127.0.0.1:18001 --model vision_head [IMAGE.png ...]

Without images it captions a freshly generated held-out scene and prints its reference caption too.
"""

from __future__ import annotations

import argparse
import io
import sys
import time


def wait_until_ready(client, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.is_server_ready():
                return
        except Exception as exc:  # connection refused while the port-forward starts
            if time.monotonic() > deadline:
                raise SystemExit(f"caption_request: {url} is not reachable: {exc}") from None
        time.sleep(1)


def fresh_scene(seed: int) -> tuple[bytes, str]:
    from PIL import Image

    from aiflow.model.scenes import make_scene

    pixels, scene = make_scene(seed, 0, split="heldout")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue(), scene.caption


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="gRPC host:port of the first stage's Triton")
    p.add_argument("--model", required=True, help="the first stage's model")
    p.add_argument("--seed", type=int, default=2026, help="seed of the generated scene")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the server")
    p.add_argument("images", nargs="*", help="image files (default: a generated scene)")
    args = p.parse_args(argv)

    import tritonclient.grpc as grpcclient

    from aiflow.local.client import CaptionError, infer

    if args.images:
        items = [(path, open(path, "rb").read(), None) for path in args.images]
    else:
        blob, reference = fresh_scene(args.seed)
        items = [("generated scene", blob, reference)]
    with grpcclient.InferenceServerClient(args.url) as client:
        wait_until_ready(client, args.url, args.wait)
        for name, blob, reference in items:
            try:
                (caption,), hops, latency_ms = infer(client, args.url, args.model, [blob])
            except CaptionError as exc:
                print(f"caption_request: {exc}", file=sys.stderr)
                return 1
            print(f"{name}: {caption}")
            if reference is not None:
                print(f"  reference: {reference}")
            route = " -> ".join(f"{h.get('tier', '?')}:{h.get('model', '?')}" for h in hops)
            print(f"  {latency_ms:.0f} ms via {route}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
