"""`aiflow data generate`, `aiflow train`, `aiflow evaluate`: the scenes and the caption family."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aiflow.cli import CLIError


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="generate synthetic captioning scenes")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND")
    data.set_defaults(func=lambda args: data.print_help() or 2)
    p = data_sub.add_parser(
        "generate",
        help="write scenes as PNG files plus captions.json",
        description="Write COUNT generated scenes as PNG files and their reference captions "
        "(captions.json: {file: caption}) into OUT.",
    )
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    p.add_argument("--count", type=int, default=8, help="number of scenes (default 8)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--split",
        choices=("train", "heldout"),
        default="heldout",
        help="heldout (default): scenes with a colour-shape pair in a grid cell where training never shows it",
    )
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser(
        "train",
        help="train the caption family (deterministic) and write weights + manifest",
        description="Train the encoder and both decoders from scratch on generated scenes, score them "
        "on the held-out split and write a checkpoint directory with manifest.json. With the defaults "
        "it reproduces the bundled weights.",
    )
    p.add_argument("--out", default="aiflow-weights", help="output directory (default ./aiflow-weights)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: as the bundled weights)")
    p.add_argument("--seed", type=int, default=None, help="initialisation seed (default: as the bundled weights)")
    p.add_argument("--data-seed", type=int, default=None, help="scene seed (default: as the bundled weights)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1; the weights depend on it)")
    p.add_argument(
        "--bottleneck-only",
        action="store_true",
        help="train only the learned codec's bottlenecks, on the frozen family of --weights (default: the bundled one)",
    )
    p.add_argument("--weights", default=None, help="with --bottleneck-only: the family to start from (default: the bundled weights)")
    p.add_argument("--bottleneck", action="append", default=None, metavar="C:L",
                   help="a bottleneck to train: C channels at split layer L (repeatable; default: as the bundled weights)")
    p.add_argument("--rate-weight", type=float, default=None,
                   help="the rate knob: loss per bit per image in the bottleneck phase (default: as the bundled weights)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "evaluate",
        help="score a caption family on fresh held-out scenes",
        description="Caption COUNT held-out scenes with both decoders, speculative decoding and a "
        "simulated compressed split; print BLEU-4, CIDEr, ROUGE-L and exact match (0-100).",
    )
    p.add_argument("--weights", default=None, help="checkpoint directory (default: the bundled weights)")
    p.add_argument("--count", type=int, default=200, help="number of scenes (default 200)")
    p.add_argument("--seed", type=int, default=1, help="data seed (default 1: scenes not used in the manifest)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_evaluate)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise CLIError(f"--{name} must be at least 1, got {value}")


def cmd_generate(args: argparse.Namespace) -> int:
    from aiflow.model.scenes import write_dataset

    _positive("count", args.count)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    try:
        path = write_dataset(out, args.seed, args.count, args.split)
    except OSError as exc:
        raise CLIError(f"cannot write to {out}: {exc.strerror or exc}") from exc
    print(f"wrote {args.count} {args.split} scenes (seed {args.seed}) and {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from aiflow.model.checkpoint import WEIGHTS_DIR, CheckpointError, read_manifest
    from aiflow.model.train import TrainConfig, bottleneck_specs, train_and_save

    for name in ("steps", "threads"):
        _positive(name, getattr(args, name))
    out = Path(args.out)
    if out.resolve() == WEIGHTS_DIR.resolve():
        raise CLIError("--out must not be the bundled weights directory; train elsewhere and compare")
    try:
        bundled = read_manifest()
    except CheckpointError:
        bundled = {}
    cfg = TrainConfig(**_train_fields(bundled["train"])) if bundled.get("trained") else TrainConfig()
    overrides = {"steps": args.steps, "seed": args.seed, "data_seed": args.data_seed, "threads": args.threads,
                 "bottlenecks": tuple(args.bottleneck) if args.bottleneck else None, "bottleneck_rate_weight": args.rate_weight}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.rate_weight is not None and args.rate_weight < 0:
        raise CLIError(f"--rate-weight must be >= 0, got {args.rate_weight}")
    try:
        bottleneck_specs(cfg)
    except ValueError as exc:
        raise CLIError(f"--bottleneck: {exc}") from exc
    log = lambda line: print(line, flush=True)  # noqa: E731
    print(f"training with {cfg}")
    if args.bottleneck_only:
        manifest = _train_bottlenecks_only(cfg, args.weights, out, log)
    else:
        if args.weights:
            raise CLIError("--weights only goes with --bottleneck-only (a full run trains the family from scratch)")
        manifest = train_and_save(cfg, out, log=log)
    manifest = _measure_learned_codecs(cfg, out, manifest, log)
    _print_scores(manifest["heldout_scores"])
    if args.bottleneck_only:
        seconds = sum(r["train_seconds"] for k, r in manifest["phases"].items() if k.startswith("bottleneck"))
        print(f"bottlenecks trained in {seconds:.0f} s; weights and manifest in {out}")
    else:
        print(f"trained in {manifest['train_seconds']:.0f} s; weights and manifest in {out}")
    if bundled.get("trained"):
        same = manifest["sha256"].get("model.safetensors") == bundled["sha256"].get("model.safetensors")
        same_draft = manifest["sha256"].get("draft_decoder/model.safetensors") == bundled["sha256"].get(
            "draft_decoder/model.safetensors"
        )
        print(
            "weights are bit-identical to the bundled ones"
            if same and same_draft
            else "weights differ from the bundled ones (different settings, thread count or library versions)"
        )
    return 0


def _train_fields(recorded: dict) -> dict:
    """A manifest's `train` record as TrainConfig keywords (lists back to tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()}


def _train_bottlenecks_only(cfg, weights: str | None, out: Path, log) -> dict:
    """The bottleneck phase alone on a trained family: its files stay as they are, bottleneck/ and the
    manifest are written anew."""
    from dataclasses import asdict

    from aiflow.model.checkpoint import MANIFEST_FILE, CheckpointError, file_checksums, read_manifest, save_family
    from aiflow.model.family import load_family
    from aiflow.model.train import train_bottlenecks

    try:
        family = load_family(weights)
        manifest = read_manifest(weights)
    except CheckpointError as exc:
        raise CLIError(str(exc)) from exc
    family.bottlenecks = {}
    phases = train_bottlenecks(family, cfg, log)
    save_family(family, out)
    manifest["train"] = asdict(cfg)
    manifest["phases"] = {**{k: v for k, v in manifest.get("phases", {}).items() if not k.startswith("bottleneck")}, **phases}
    manifest["sha256"] = file_checksums(out)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _measure_learned_codecs(cfg, out: Path, manifest: dict, log) -> dict:
    """Add each learned codec's measured rate, quality and acceptance (through the stages) to the manifest."""
    from aiflow.local.rates import learned_codec_manifest
    from aiflow.model.checkpoint import MANIFEST_FILE
    from aiflow.model.family import load_family

    log(f"measuring the learned codecs on {cfg.eval_count} held-out scenes")
    measured = learned_codec_manifest(load_family(out), cfg.data_seed, cfg.eval_count, log)
    manifest = {**{k: v for k, v in manifest.items() if k not in ("codecs", "bytes_by_codec", "acceptance_by_codec", "quality_by_codec")}, **measured}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def cmd_evaluate(args: argparse.Namespace) -> int:
    from aiflow.model.checkpoint import CheckpointError
    from aiflow.model.family import load_family
    from aiflow.model.train import evaluate_family

    _positive("count", args.count)
    try:
        family = load_family(args.weights)
    except CheckpointError as exc:
        raise CLIError(str(exc)) from exc
    scores = evaluate_family(family, args.seed, args.count)
    if args.output == "json":
        print(json.dumps(scores, indent=1))
    else:
        _print_scores(scores)
    return 0


def _print_scores(scores: dict) -> None:
    print(f"{'decoding':<20} {'exact':>7} {'BLEU-4':>7} {'CIDEr':>7} {'ROUGE-L':>7}")
    for name, s in scores.items():
        print(f"{name:<20} {s['exact_match']:7.1f} {s['bleu4']:7.1f} {s['cider']:7.1f} {s['rouge_l']:7.1f}")
    spec = scores.get("speculative", {})
    if spec:
        print(
            f"speculative == large: {spec['identical_to_large']}; "
            f"draft tokens accepted: {100 * spec['draft_acceptance']:.1f}%"
        )
