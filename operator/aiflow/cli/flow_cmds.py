"""`aiflow up`, `aiflow caption`, `aiflow demo`: the local flow on real Triton servers."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from aiflow.cli import CLIError
from aiflow.flow.schemes import DEFAULT_CODEC, DEFAULT_SPLIT_LAYER, SCHEME_NAMES, UPLOADS, Conditions

DEMO_SEED = 2026  # held-out scenes; the weights manifest scores other seeds
DEMO_COUNT = 16


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "up",
        help="run the local flow: one tritonserver per tier, emulated links (until Ctrl-C)",
        description="Start one real tritonserver per tier (device, edge, cloud) on loopback ports with "
        "emulated links between them, load every scheme's stages, and serve until Ctrl-C. "
        "`aiflow caption` sends images through it.",
    )
    _conditions_args(p)
    p.add_argument("--base-port", type=int, default=None, help="first of consecutive ports (default: free ports)")
    p.add_argument("--state-dir", default=None, help="where the running flow records itself (default ~/.cache/aiflow/local)")
    p.set_defaults(func=cmd_up)

    p = subparsers.add_parser(
        "caption",
        help="caption images through a scheme of the running flow",
        description="Send images (PNG/JPEG files, as the camera gives them) from the device through a "
        "scheme of the running `aiflow up` (or of an ephemeral one with --ephemeral) and print each "
        "caption with its per-hop latency and the bytes each link carried upstream.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    _scheme_args(p)
    p.add_argument("--upload", choices=UPLOADS, default="png",
                   help="what the camera uploads for raw-image schemes: the file as is (png) or a JPEG of it")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait per image (default 120)")
    p.add_argument("--ephemeral", action="store_true", help="start a flow for this command and stop it after")
    p.add_argument("--state-dir", default=None, help="state directory of the running `aiflow up`")
    _conditions_args(p, "with --ephemeral: ")
    p.set_defaults(func=cmd_caption)

    p = subparsers.add_parser(
        "demo",
        help="generate held-out images, run every scheme on real Triton servers, print the table",
        description="Generate a handful of held-out scenes, start the local flow, caption them with every "
        "scheme, and print scheme | median latency | bytes upstream | BLEU-4 | CIDEr | ROUGE-L | exact "
        "match. Every figure comes from the Triton servers of this run.",
    )
    p.add_argument("--count", type=int, default=DEMO_COUNT, help=f"images (default {DEMO_COUNT})")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help=f"scene seed (default {DEMO_SEED})")
    p.add_argument("--out", default=None, help="keep the generated images here (default: a temporary folder)")
    p.add_argument("--split-layer", type=int, default=None, help=f"encoder layers on the device (default {DEFAULT_SPLIT_LAYER})")
    p.add_argument("--codec", default=None, help=f"feature codec of the split schemes (default {DEFAULT_CODEC})")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    _conditions_args(p)
    p.set_defaults(func=cmd_demo)


def _scheme_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheme", choices=SCHEME_NAMES, default="split", help="default split")
    p.add_argument("--split-layer", type=int, default=None,
                   help=f"split schemes: encoder layers run on the device (default {DEFAULT_SPLIT_LAYER})")
    p.add_argument("--codec", default=None, help=f"split schemes: feature codec (default {DEFAULT_CODEC})")


def _conditions_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    d = Conditions()
    g = p.add_argument_group(f"{prefix}emulated tiers and links")
    g.add_argument("--device-factor", type=float, default=d.device_factor,
                   help=f"device compute factor: x slower than this machine (default {d.device_factor:g})")
    g.add_argument("--edge-factor", type=float, default=d.edge_factor, help=f"(default {d.edge_factor:g})")
    g.add_argument("--cloud-factor", type=float, default=d.cloud_factor, help=f"(default {d.cloud_factor:g})")
    g.add_argument("--uplink-mbps", type=float, default=d.uplink_mbps, help=f"device->edge up, Mbit/s (default {d.uplink_mbps:g})")
    g.add_argument("--downlink-mbps", type=float, default=d.downlink_mbps, help=f"edge->device (default {d.downlink_mbps:g})")
    g.add_argument("--rtt-ms", type=float, default=d.rtt_ms, help=f"device<->edge round trip, ms (default {d.rtt_ms:g})")
    g.add_argument("--edge-uplink-mbps", type=float, default=d.edge_uplink_mbps, help=f"edge->cloud up (default {d.edge_uplink_mbps:g})")
    g.add_argument("--edge-downlink-mbps", type=float, default=d.edge_downlink_mbps, help=f"(default {d.edge_downlink_mbps:g})")
    g.add_argument("--edge-rtt-ms", type=float, default=d.edge_rtt_ms, help=f"edge<->cloud round trip (default {d.edge_rtt_ms:g})")


def conditions_from(args) -> Conditions:
    names = Conditions.__dataclass_fields__
    values = {k: getattr(args, k) for k in names}
    for k, v in values.items():
        if k.endswith("factor") and not v >= 1:
            raise CLIError(f"--{k.replace('_', '-')} {v:g}: a compute factor is >= 1 (4 = four times slower)")
        if k.endswith("mbps") and not v > 0:
            raise CLIError(f"--{k.replace('_', '-')} {v:g}: bandwidth must be positive")
        if k.endswith("rtt_ms") and not v >= 0:
            raise CLIError(f"--{k.replace('_', '-')} {v:g}: round trip must be >= 0")
    return Conditions(**values)


@contextlib.contextmanager
def _flow_errors():
    """Turn the flow's expected failures into CLIErrors (message only, exit 2)."""
    from aiflow.flow.client import CaptionError
    from aiflow.flow.tritonserver import TritonError

    try:
        yield
    except (TritonError, CaptionError, ValueError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from None


@contextlib.contextmanager
def _runtime(conditions: Conditions, wires=None, base_port=None, state_dir=None):
    """A started local flow, stopped on exit, Ctrl-C or SIGTERM."""
    from aiflow.flow.local import handle_termination
    from aiflow.flow.schemes import start_runtime

    with handle_termination():
        runtime, flow = start_runtime(conditions, wires, base_port=base_port, state_path=state_dir)
        try:
            yield runtime, flow
        finally:
            runtime.stop()


def _print_runtime(runtime, conditions: Conditions, out=sys.stdout) -> None:
    for line in runtime.describe():
        print(f"  {line}", file=out)
    f = conditions.compute_factors()
    print(
        "  compute factors (declared; a stage sleeps (factor-1) x its compute time): "
        + ", ".join(f"{t} {v:g}x" for t, v in f.items()),
        file=out,
    )


def cmd_up(args) -> int:
    from aiflow.flow.schemes import build_schemes

    conditions = conditions_from(args)
    with _flow_errors():
        print("aiflow up: starting one tritonserver per tier and loading every scheme's stages ...", flush=True)
        with _runtime(conditions, base_port=args.base_port, state_dir=args.state_dir) as (runtime, flow):
            _print_runtime(runtime, conditions)
            for scheme in build_schemes().values():
                print(f"  scheme {scheme.describe()}")
            print("ready: try `aiflow caption IMAGE.png --scheme split` (Ctrl-C to stop)", flush=True)
            runtime.serve_forever()
    print("aiflow up: stopped")
    return 0


def _read_images(paths) -> list[tuple[str, bytes]]:
    images = []
    for p in map(Path, paths):
        if not p.is_file():
            raise CLIError(f"{p}: no such image file (create some with `aiflow data generate --out DIR`)")
        images.append((str(p), p.read_bytes()))
    return images


def cmd_caption(args) -> int:
    from aiflow.flow.client import caption_images, format_result
    from aiflow.flow.schemes import RunningFlow, get_scheme, wiring

    images = _read_images(args.images)
    with _flow_errors():
        scheme = get_scheme(args.scheme, args.split_layer, args.codec, args.upload)
        if args.ephemeral:
            conditions = conditions_from(args)
            with tempfile.TemporaryDirectory(prefix="aiflow-caption-") as state, \
                    _runtime(conditions, wiring(scheme), state_dir=state) as (_, flow):
                results = caption_images(flow, scheme, images, args.timeout)
        else:
            from aiflow.flow.local import read_state

            flow = RunningFlow(read_state(args.state_dir))
            flow.apply(wiring(scheme))
            results = caption_images(flow, scheme, images, args.timeout)
    if args.output == "json":
        print(json.dumps([r.as_dict() for r in results], indent=1))
    else:
        for r in results:
            print("\n".join(format_result(r)))
    return 0


def cmd_demo(args) -> int:
    from aiflow.flow.compare import demo_schemes, format_table, heldout_images, run_scheme, target_report

    if not 1 <= args.count <= 500:
        raise CLIError(f"--count {args.count}: choose 1..500 images")
    conditions = conditions_from(args)
    with _flow_errors(), contextlib.ExitStack() as stack:
        schemes = demo_schemes(args.split_layer, args.codec)
        out = args.out or stack.enter_context(tempfile.TemporaryDirectory(prefix="aiflow-demo-"))
        images, references = heldout_images(args.seed, args.count, out)
        say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.output == "json" else (lambda *a: print(*a, flush=True))
        say(f"aiflow demo: {len(images)} held-out scenes (seed {args.seed}) in {out}, uploaded as the camera's PNG files")
        say("starting one tritonserver per tier ...")
        state = stack.enter_context(tempfile.TemporaryDirectory(prefix="aiflow-demo-state-"))
        runtime, flow = stack.enter_context(_runtime(conditions, state_dir=state))
        _print_runtime(runtime, conditions, sys.stderr if args.output == "json" else sys.stdout)
        runs = []
        for scheme in schemes:
            say(f"  running {scheme.describe()}")
            runs.append(run_scheme(flow, scheme, images, references))
    if args.output == "json":
        print(json.dumps({"conditions": dataclasses.asdict(conditions), "runs": [r.as_dict() for r in runs]}, indent=1))
        return 0
    print()
    print("\n".join(format_table(runs)))
    print()
    print("bytes up from device: payload per image (the image, or the features message); on the wire: what the")
    print("device->edge link carried per image, gRPC framing included. Latency: median per image, one image per request.")
    print("Quality: BLEU-4, CIDEr, ROUGE-L (pycocoevalcap, x100) and exact match against the generator's captions.")
    for line in target_report(runs):
        print(f"  {line}")
    return 0

