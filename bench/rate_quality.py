"""Rate against caption quality: every feature codec and every image codec on the same held-out scenes.

    python bench/rate_quality.py [--count 300] [--seed 9091] [--out docs/results]

Fresh held-out scenes (seed 9091: no training run, test or other benchmark uses it) are captioned
from every image baseline (PNG; JPEG and WebP quality sweeps; AVIF when this Pillow writes it) and
through a split with every feature codec, the learned ones included. What is measured and how is in
`aiflow.local.rates`: the stages are the very `aiflow.stage.logic.Stage` objects the Triton models run,
called in process (captions do not depend on the links), and bytes per image are the file for an
image and the whole wire message (aiflow.stage.wire) for features. Scores: BLEU-4, CIDEr, exact match;
speculative acceptance per codec. Writes rate_quality.csv, rate_quality.json and rate_quality.png
(bytes on a log axis) to --out, and prints the comparison the issue asks for: the default codec
against the PNG and against the smallest image whose captions are at least as good.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from aiflow.local.rates import measure_codecs, measure_images
from aiflow.model import scenes

FEATURE_CODECS = ("fp32", "fp16", "int8", "int8+zstd", "topk:16+int8", "topk:16+int8+zstd", "merge:16+int8")
FIELDS = ["kind", "name", "setting", "split", "bytes_median", "bytes_mean", "bleu4", "cider", "exact_match", "acceptance", "count"]


def summary(rows: list[dict], default: str) -> dict:
    """The issue's comparison: the default codec against PNG and against the smallest image whose
    captions are at least as good (exact match and CIDEr both)."""
    by_name = {r["name"]: r for r in rows if r["kind"] == "features"}
    png = next(r for r in rows if r["name"] == "PNG")
    codec = by_name.get(default)
    if codec is None:
        return {}
    as_good = [r for r in rows if r["kind"] == "image" and r["exact_match"] >= codec["exact_match"] and r["cider"] >= codec["cider"]]
    best = min(as_good, key=lambda r: r["bytes_median"]) if as_good else None
    out = {
        "codec": default,
        "codec_bytes_median": codec["bytes_median"],
        "codec_exact_match": codec["exact_match"],
        "codec_cider": codec["cider"],
        "png_bytes_median": png["bytes_median"],
        "png_exact_match": png["exact_match"],
        "png_cider": png["cider"],
        "exact_match_vs_png": round(codec["exact_match"] - png["exact_match"], 3),
        "cider_vs_png": round(codec["cider"] - png["cider"], 3),
        "fewer_bytes_than_png": round(png["bytes_median"] / codec["bytes_median"], 1),
        "smallest_image_as_good": None if best is None else f"{best['name']} {best['setting']}".strip(),
        "smallest_image_as_good_bytes": None if best is None else best["bytes_median"],
        "fewer_bytes_than_smallest_image_as_good": None if best is None else round(best["bytes_median"] / codec["bytes_median"], 1),
    }
    out["targets"] = {
        "within 1 point of PNG (exact match and CIDEr)": out["exact_match_vs_png"] >= -1 and out["cider_vs_png"] >= -1,
        ">= 10x fewer bytes than the smallest image at least as good": best is None or out["fewer_bytes_than_smallest_image_as_good"] >= 10,
        ">= 50x fewer bytes than the PNG": out["fewer_bytes_than_png"] >= 50,
    }
    return out


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, metric, label in ((axes[0], "exact_match", "exact match (%)"), (axes[1], "cider", "CIDEr")):
        for name in dict.fromkeys(r["name"] for r in rows if r["kind"] == "image"):
            mine = sorted((r for r in rows if r["name"] == name), key=lambda r: r["bytes_median"])
            ax.plot([r["bytes_median"] for r in mine], [r[metric] for r in mine], marker="o", ms=4, label=f"{name} image")
        feats = [r for r in rows if r["kind"] == "features"]
        ax.scatter([r["bytes_median"] for r in feats], [r[metric] for r in feats], marker="*", s=90, color="black", zorder=3,
                   label=f"split features (layer {feats[0]['split']})" if feats else None)
        for r in feats:
            ax.annotate(r["name"], (r["bytes_median"], r[metric]), fontsize=7, xytext=(4, -10), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per image on the device uplink (median, log scale)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Caption quality against bytes sent, held-out scenes")
    fig.tight_layout()
    fig.savefig(out / "rate_quality.png", dpi=120)


def write(rows: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rate_quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "rate_quality.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    plot(rows, out)


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: list[str] | None = None) -> dict:
    import torch

    from aiflow.local.schemes import DEFAULT_CODEC, DEFAULT_SPLIT_LAYER
    from aiflow.model.family import load_family

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300, help="held-out scenes (default 300)")
    parser.add_argument("--seed", type=int, default=9091, help="scene seed: one no training or test uses")
    parser.add_argument("--split", type=int, default=DEFAULT_SPLIT_LAYER, help="split layer of the feature codecs")
    parser.add_argument("--codecs", default=None, help="feature codecs, comma-separated (default: the fixed ones and every learned codec the weights have at --split)")
    parser.add_argument("--no-images", action="store_true", help="skip the image baselines")
    parser.add_argument("--weights", default=None, help="checkpoint directory (default: the bundled weights)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "results"))
    args = parser.parse_args(argv)
    started = time.monotonic()
    load = os.getloadavg()[0]
    family = load_family(args.weights)
    learned = [f"learned:{c}" for c, layer in sorted(family.bottlenecks) if layer == args.split]
    codecs = [c for c in args.codecs.split(",") if c] if args.codecs else [*FEATURE_CODECS, *learned]
    arrays, refs = scenes.make_batch(args.seed, 0, args.count, "heldout")
    rows = [] if args.no_images else measure_images(family, arrays, refs)
    rows += measure_codecs(family, arrays, refs, codecs, args.split)
    meta = {
        "command": "python bench/rate_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git": _git_revision(),
        "scenes": {"seed": args.seed, "count": args.count, "split": "heldout"},
        "split_layer": args.split,
        "default_codec": DEFAULT_CODEC,
        "weights": str(args.weights or "bundled"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "load_start": round(load, 2), "load_end": round(os.getloadavg()[0], 2)},
        "seconds": round(time.monotonic() - started, 1),
    }
    meta["summary"] = {c: summary(rows, c) for c in codecs} if not args.no_images else {}
    write(rows, meta, Path(args.out))
    for codec, s in meta["summary"].items():
        print(
            f"{codec:<18} {s['codec_bytes_median']:7,.0f} B  exact {s['exact_match_vs_png']:+5.1f} / CIDEr {s['cider_vs_png']:+6.1f} vs PNG; "
            f"{s['fewer_bytes_than_png']:6.1f}x fewer bytes than PNG; smallest image as good: {s['smallest_image_as_good']} "
            f"({s['fewer_bytes_than_smallest_image_as_good']}x)"
        )
    print(f"wrote {args.out}/rate_quality.csv, rate_quality.json, rate_quality.png")
    return meta


if __name__ == "__main__":
    main()
