"""`aiflow up`, `aiflow caption`, `aiflow demo`, `aiflow link`: the local flow on real Triton servers."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from aiflow.cli import CLIError
from aiflow.local.schemes import DEFAULT_CODEC, DEFAULT_SPLIT_LAYER, SCHEME_NAMES, UPLOADS, Conditions

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
    g = p.add_argument_group("adaptive mode: re-plan as the links change (`aiflow link set`), re-partition live")
    g.add_argument("--adaptive", action="store_true",
                   help="run the planner's plan of the captioning flow instead of every scheme, and move it "
                   "make-before-break when a better plan beats the current one by --min-improvement")
    g.add_argument("--min-improvement", type=float, default=10.0, metavar="PERCENT",
                   help="predicted latency gain a move needs (default 10)")
    g.add_argument("--cooldown", type=float, default=60.0, metavar="SECONDS",
                   help="least time between two moves (default 60)")
    g.add_argument("--interval", type=float, default=10.0, metavar="SECONDS",
                   help="re-plan at least this often; a link change re-plans at once (default 10)")
    g.add_argument("--profile", default=None, metavar="FILE",
                   help="planner profile (default $AIFLOW_PLANNER_PROFILE, else the shipped one)")
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

    link = subparsers.add_parser(
        "link",
        help="show or change the emulated links of the running flow",
        description="Show or change, live, the emulated links of the running `aiflow up` (in adaptive "
        "mode a change makes the flow re-plan).",
    )
    link_sub = link.add_subparsers(dest="link_command", metavar="COMMAND")
    link.set_defaults(func=lambda args: link.print_help() or 2)
    p = link_sub.add_parser("show", help="each link's settings and the bytes it carried")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.add_argument("--state-dir", default=None, help="state directory of the running `aiflow up`")
    p.set_defaults(func=cmd_link_show)
    p = link_sub.add_parser(
        "set", help="change a link live",
        description="Change some settings of one link; the others keep their values. Bandwidth in bits/s "
        "with a unit (2mbit, 800kbit, unlimited), latency one way (20ms, 0.1s). Up = towards the cloud.",
    )
    p.add_argument("--link", default="device->edge", help="device->edge (default) or edge->cloud")
    for direction in ("up", "down"):
        p.add_argument(f"--bandwidth-{direction}", default=None, metavar="RATE")
        p.add_argument(f"--latency-{direction}", default=None, metavar="DURATION")
    p.add_argument("--state-dir", default=None, help="state directory of the running `aiflow up`")
    p.set_defaults(func=cmd_link_set)


def _scheme_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheme", choices=SCHEME_NAMES + ("adaptive",), default=None,
                   help="default: the adaptive plan when `aiflow up --adaptive` runs, else split")
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
    from aiflow.local.client import CaptionError
    from aiflow.local.tritonserver import TritonError

    try:
        yield
    except (TritonError, CaptionError, ValueError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from None


@contextlib.contextmanager
def _runtime(conditions: Conditions, wires=None, base_port=None, state_dir=None):
    """A started local flow, stopped on exit, Ctrl-C or SIGTERM."""
    from aiflow.local.runtime import handle_termination
    from aiflow.local.schemes import start_runtime

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
    from aiflow.local.schemes import build_schemes

    conditions = conditions_from(args)
    if args.adaptive:
        return _up_adaptive(args, conditions)
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


def _adaptive_policy(args):
    from aiflow.planner.hysteresis import Policy

    if not 0 <= args.min_improvement < 100:
        raise CLIError(f"--min-improvement {args.min_improvement:g}: choose a percentage in 0..100")
    if not args.cooldown >= 0:
        raise CLIError(f"--cooldown {args.cooldown:g}: seconds, 0 or more")
    if not args.interval > 0:
        raise CLIError(f"--interval {args.interval:g}: seconds, more than 0")
    return Policy(args.min_improvement / 100.0, float(args.cooldown))


def _up_adaptive(args, conditions: Conditions) -> int:
    from aiflow.local.adaptive import AdaptiveController
    from aiflow.planner.documents import DocumentError
    from aiflow.planner.placement import planner_profile
    from aiflow.planner.profile import load_profile

    policy = _adaptive_policy(args)
    try:
        profile = load_profile(args.profile) if args.profile else planner_profile()
    except DocumentError as exc:
        raise CLIError(str(exc)) from None
    with _flow_errors():
        print("aiflow up --adaptive: starting one tritonserver per tier ...", flush=True)
        with _runtime(conditions, wires=[], base_port=args.base_port, state_dir=args.state_dir) as (runtime, _):
            _print_runtime(runtime, conditions)
            print(f"  planning with the {profile.source} profile; a move needs {policy.min_improvement:.0%} "
                  f"predicted gain, {policy.cooldown_s:g} s apart", flush=True)
            controller = AdaptiveController(runtime, profile, policy, interval_s=args.interval,
                                            say=lambda line: print(line, flush=True))
            try:
                controller.start()
            except RuntimeError as exc:
                raise CLIError(str(exc)) from None
            print("ready: try `aiflow caption IMAGE.png`, then `aiflow link set --bandwidth-up 500kbit` "
                  "(Ctrl-C to stop)", flush=True)
            try:
                runtime.serve_forever()
            finally:
                controller.stop()
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
    from aiflow.local.client import caption_images
    from aiflow.local.schemes import RunningFlow, get_scheme, wiring

    images = _read_images(args.images)
    with _flow_errors():
        if args.scheme == "adaptive" or (args.scheme is None and not args.ephemeral and _adaptive_running(args.state_dir)):
            return _caption_adaptive(args, images)
        scheme = get_scheme(args.scheme or "split", args.split_layer, args.codec, args.upload)
        if args.ephemeral:
            conditions = conditions_from(args)
            with tempfile.TemporaryDirectory(prefix="aiflow-caption-") as state, \
                    _runtime(conditions, wiring(scheme), state_dir=state) as (_, flow):
                results = caption_images(flow, scheme, images, args.timeout)
        else:
            from aiflow.local.runtime import read_state

            flow = RunningFlow(read_state(args.state_dir))
            flow.apply(wiring(scheme))
            results = caption_images(flow, scheme, images, args.timeout)
    _print_captions(results, args.output)
    return 0


def _print_captions(results, output: str) -> None:
    from aiflow.local.client import format_result

    if output == "json":
        print(json.dumps([r.as_dict() for r in results], indent=1))
    else:
        for r in results:
            print("\n".join(format_result(r)))


def _adaptive_running(state_dir) -> bool:
    from aiflow.local.adaptive import STATE_KEY
    from aiflow.local.runtime import RuntimeNotRunning, read_state

    try:
        return bool(read_state(state_dir).get(STATE_KEY))
    except RuntimeNotRunning:
        return False


def _caption_adaptive(args, images) -> int:
    from aiflow.local.adaptive import caption_serving

    if args.ephemeral:
        raise CLIError("--scheme adaptive follows a running `aiflow up --adaptive`; drop --ephemeral")
    if args.split_layer is not None or args.codec is not None or args.upload != "png":
        raise CLIError("--split-layer, --codec and --upload are the planner's choice with --scheme adaptive; drop them")
    _print_captions(caption_serving(args.state_dir, images, args.timeout), args.output)
    return 0


def cmd_link_show(args) -> int:
    from aiflow.local.links import LinkConfig, remote_links
    from aiflow.local.runtime import read_state

    with _flow_errors():
        try:
            links = remote_links(read_state(args.state_dir)["control_url"])
        except ConnectionError as exc:
            raise CLIError(str(exc)) from None
    if args.output == "json":
        print(json.dumps(links, indent=1))
        return 0
    for name, view in links.items():
        config = LinkConfig(**view["config"])
        print(f"{name}: {config.describe()}; carried up {view['bytes_up']:,} B, down {view['bytes_down']:,} B; "
              f"{view['connections']} open connection(s)")
    return 0


def cmd_link_set(args) -> int:
    from aiflow.local.links import LinkConfig, parse_duration, parse_rate
    from aiflow.local.runtime import set_link

    changes = {}
    for direction in ("up", "down"):
        for knob, parse in (("bandwidth", parse_rate), ("latency", parse_duration)):
            value = getattr(args, f"{knob}_{direction}")
            if value is not None:
                try:
                    parse(value)  # say what is wrong here, before asking the running flow
                except ValueError as exc:
                    raise CLIError(f"--{knob}-{direction}: {exc}") from None
                changes[f"{knob}_{direction}"] = value
    if not changes:
        raise CLIError("nothing to change: give --bandwidth-up/--bandwidth-down and/or --latency-up/--latency-down")
    with _flow_errors():
        try:
            view = set_link(args.link, args.state_dir, **changes)
        except ConnectionError as exc:
            raise CLIError(str(exc)) from None
    for name, link in view.items():
        print(f"{name}: {LinkConfig(**link['config']).describe()}")
    return 0


def cmd_demo(args) -> int:
    from aiflow.local.compare import demo_schemes, format_table, heldout_images, run_scheme, target_report

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

