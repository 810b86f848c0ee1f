"""Codecs x split layers, in process: bytes per image and caption quality, against PNG and JPEG.

    python bench/codec_bench.py [--count 200] [--splits 0,2,4] [--codecs fp32,int8,topk:16+int8+zstd,...]

Runs the same stage logic as the Triton models (vision_head -> caption_decoder, called directly) on
held-out scenes; prints a table and writes codec_bench.csv and codec_bench.png (quality against bytes).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python bench/<name>.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiflow.contract import ROLES_BY_NAME
from aiflow.model import quality, scenes
from aiflow.stage.config import stage_config
from aiflow.stage.logic import Stage
from bench.report import write_csv  # noqa: E402

CODECS = (
    "fp32",
    "fp16",
    "int8",
    "int8+zstd",
    "topk:24+int8",
    "topk:20+int8",
    "topk:16+int8",
    "topk:16+int8+zstd",
    "topk:12+int8",
    "merge:16+int8",
)

def encoded(arrays, fmt: str, **kw) -> list[bytes]:
    from PIL import Image

    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt, **kw)
        out.append(buf.getvalue())
    return out


def stage(role: str, family, **knobs) -> Stage:
    accepts, emits = ROLES_BY_NAME[role]
    params = {"aiflow.accepts": accepts, "aiflow.emits": emits, **{f"AIFLOW_{k.upper()}": str(v) for k, v in knobs.items()}}
    return Stage(stage_config(role, params, {}), family)


def run(family, count: int, seed: int, splits: list[int], codecs: list[str]) -> list[dict]:
    arrays, refs = scenes.make_batch(seed, 0, count, "heldout")
    pngs = encoded(arrays, "PNG")
    rows = [
        {"split": "", "codec": "PNG image", "bytes": statistics.mean(map(len, pngs))},
        {"split": "", "codec": "JPEG q75 image", "bytes": statistics.mean(map(len, encoded(arrays, "JPEG", quality=75)))},
    ]
    decoder = stage("caption_decoder", family)
    for split in splits:
        for codec in codecs:
            head = stage("vision_head", family, split_layer=split, codec=codec)
            captions, sizes = [], []
            for png in pngs:  # one image per message, as the client sends them
                msg = head.run({"IMAGE": np.array([png], dtype=object)})["MESSAGE"]
                sizes.append(msg.size)
                captions += [c.decode() for c in decoder.run({"FEATURES": msg})["CAPTION"]]
            q = quality.score(captions, refs)
            rows.append({"split": split, "codec": codec, "bytes": statistics.mean(sizes), **q.as_dict()})
            print(f"split {split} {codec:<22} {rows[-1]['bytes']:8.0f} B  exact {q.exact_match:5.1f}  BLEU-4 {q.bleu4:5.1f}  CIDEr {q.cider:6.1f}", flush=True)
    return rows


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = ["split", "codec", "bytes", "bleu4", "cider", "rouge_l", "exact_match", "count"]
    write_csv(out / "codec_bench.csv", rows, fields)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for split in dict.fromkeys(r["split"] for r in rows if r["split"] != ""):
        mine = [r for r in rows if r["split"] == split]
        ax.scatter([r["bytes"] for r in mine], [r["exact_match"] for r in mine], label=f"split at layer {split}")
    for r in rows:
        if r["split"] == "":
            ax.axvline(r["bytes"], linestyle="--", color="grey")
            ax.text(r["bytes"], 0.02, r["codec"], rotation=90, fontsize=8, transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.set_xlabel("bytes per image on the device uplink")
    ax.set_ylabel("exact match (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "codec_bench.png", dpi=120)


def main() -> None:
    from aiflow.model.family import load_family

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2028)
    parser.add_argument("--splits", default="0,2,4")
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--weights", default=None, help="checkpoint directory (default: the bundled weights)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    family = load_family(args.weights)
    rows = run(family, args.count, args.seed, [int(s) for s in args.splits.split(",")], args.codecs.split(","))
    write(rows, Path(args.out))
    print(f"wrote {args.out}/codec_bench.csv and codec_bench.png")


if __name__ == "__main__":
    main()
