"""Rate and quality of every way the device can send a scene: feature codecs and image files.

Each scene is captioned
- from an image as the device would upload it (PNG, JPEG, WebP, AVIF at quality settings, with
  Pillow): the edge's `captioner` stage decodes the file and captions it; bytes per image are the
  file, which is what the IMAGE tensor carries;
- from features through a split: the device's `vision_head` stage (encoder layers up to the split,
  then the codec) and the edge's `caption_decoder`; bytes per image are the whole wire message the
  head emits (aiflow.stage.wire: header, codec spec, positions, payload, CRC), one image per
  request as a camera sends them.

The stages are the very `aiflow.stage.logic.Stage` objects the Triton models run, called in process:
captions do not depend on the links, and the bytes are the messages' own. The decoder stage decodes
speculatively, which gives exactly the large decoder's captions (aiflow.model.family.verify) and
reports in its trace how many of the small decoder's draft tokens were accepted: the acceptance per
codec the planner's cost model uses. Used by `bench/rate_quality.py` and by `aiflow train` (the
manifest's measured rate and quality per codec).
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Callable, Sequence

import numpy as np

from aiflow.contract import ROLES_BY_NAME
from aiflow.model import quality
from aiflow.stage.config import stage_config
from aiflow.stage.logic import Stage, read_trace

JPEG_QUALITIES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95)
WEBP_QUALITIES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
AVIF_QUALITIES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def stage(role: str, family, **knobs) -> Stage:
    """A stage of `role` on `family` with load-time knobs, as a Triton model would hold it."""
    accepts, emits = ROLES_BY_NAME[role]
    params = {"aiflow.accepts": accepts, "aiflow.emits": emits, **{f"AIFLOW_{k.upper()}": str(v) for k, v in knobs.items()}}
    return Stage(stage_config(role, params, {}), family)


def image_formats() -> list[tuple[str, str, int | None, dict]]:
    """(Pillow format, name, quality setting, save options) of every image baseline this Pillow writes."""
    from PIL import features

    out = [("PNG", "PNG", None, {"optimize": True})]
    out += [("JPEG", "JPEG", q, {"quality": q}) for q in JPEG_QUALITIES]
    out += [("WEBP", "WebP", q, {"quality": q, "method": 6}) for q in WEBP_QUALITIES]
    if features.check("avif"):
        out += [("AVIF", "AVIF", q, {"quality": q, "speed": 6}) for q in AVIF_QUALITIES]
    return out


def encode_image(array: np.ndarray, fmt: str, options: dict | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **(options or {}))
    return buf.getvalue()


def _row(kind: str, name: str, setting, split, sizes: Sequence[int], captions: list[str], refs: list[str], acceptance=None) -> dict:
    q = quality.score(captions, refs)
    return {
        "kind": kind,
        "name": name,
        "setting": "" if setting is None else setting,
        "split": "" if split is None else split,
        "bytes_median": float(statistics.median(sizes)),
        "bytes_mean": round(float(statistics.mean(sizes)), 1),
        "bleu4": round(q.bleu4, 3),
        "cider": round(q.cider, 3),
        "exact_match": round(q.exact_match, 3),
        "acceptance": "" if acceptance is None else round(acceptance, 4),
        "count": q.count,
    }


def measure_images(family, arrays: np.ndarray, refs: list[str], log: Callable[[str], None] = print, batch: int = 50) -> list[dict]:
    """One row per image format and setting: bytes per file and caption quality."""
    captioner = stage("captioner", family)
    rows = []
    for fmt, name, setting, options in image_formats():
        blobs = [encode_image(a, fmt, options) for a in arrays]
        captions = []
        for i in range(0, len(blobs), batch):
            out = captioner.run({"IMAGE": np.array(blobs[i : i + batch], dtype=object)})["CAPTION"]
            captions += [c.decode() for c in out]
        rows.append(_row("image", name, setting, None, [len(b) for b in blobs], captions, refs))
        log(line(rows[-1]))
    return rows


def measure_codec(family, arrays: np.ndarray, refs: list[str], codec: str, split: int) -> dict:
    """Wire bytes per image, caption quality and draft acceptance of `codec` at split layer `split`."""
    head = stage("vision_head", family, split_layer=split, codec=codec)
    decoder = stage("caption_decoder", family, decoding="speculative")
    captions, sizes, drafted, accepted = [], [], 0, 0
    for array in arrays:  # one image per request, as the camera sends them
        message = head.run({"IMAGE": np.array([encode_image(array, "PNG")], dtype=object)})["MESSAGE"]
        sizes.append(int(message.size))
        out = decoder.run({"FEATURES": message})
        captions += [c.decode() for c in out["CAPTION"]]
        detail = read_trace(out["TRACE"])[0]["detail"]
        drafted += sum(detail["draft_tokens"])
        accepted += sum(detail["accepted_tokens"])
    return _row("features", codec, None, split, sizes, captions, refs, accepted / max(1, drafted))


def measure_codecs(family, arrays: np.ndarray, refs: list[str], codecs: Sequence[str], split: int, log: Callable[[str], None] = print) -> list[dict]:
    rows = []
    for codec in codecs:
        rows.append(measure_codec(family, arrays, refs, codec, split))
        log(line(rows[-1]))
    return rows


def line(r: dict) -> str:
    """One row as a line of text."""
    name = f"{r['name']} {r['setting']}".strip() if r["kind"] == "image" else f"split {r['split']} {r['name']}"
    acc = f"  acceptance {r['acceptance']:.3f}" if r["acceptance"] != "" else ""
    return (
        f"{name:<28} {r['bytes_median']:9,.0f} B  exact {r['exact_match']:5.1f}  CIDEr {r['cider']:6.1f}  "
        f"BLEU-4 {r['bleu4']:5.1f}{acc}"
    )


def learned_codec_manifest(family, data_seed: int, count: int, log: Callable[[str], None] = print) -> dict:
    """What the weights manifest says of each trained learned codec, measured on `count` held-out
    scenes of `data_seed` through the stages: `codecs` (rate, quality, acceptance at its split layer)
    and the planner's tables `bytes_by_codec`, `acceptance_by_codec`, `quality_by_codec` (one value
    per split layer 0..L; quality 0 where the codec has no bottleneck, so the planner never picks it
    there), with the lossless `fp32` quality on the same scenes, which the quality floor starts from."""
    from aiflow.model import scenes
    from aiflow.model.bottleneck import trained

    pairs = sorted(trained(family))
    if not pairs:
        return {}
    arrays, refs = scenes.make_batch(data_seed, 0, count, "heldout")
    layers = family.num_layers
    codecs, sizes, accept, large = {}, {}, {}, {}
    for channels, layer in pairs:
        spec = f"learned:{channels}"
        r = measure_codec(family, arrays, refs, spec, layer)
        log(line(r))
        codecs.setdefault(spec, {})[str(layer)] = {k: r[k] for k in ("bytes_median", "bytes_mean", "exact_match", "cider", "bleu4", "acceptance", "count")}
        sizes.setdefault(spec, [r["bytes_mean"]] * (layers + 1))[layer] = r["bytes_mean"]
        accept.setdefault(spec, [r["acceptance"]] * (layers + 1))[layer] = r["acceptance"]
        large.setdefault(spec, [0.0] * (layers + 1))[layer] = r["exact_match"]
    # The uncompressed quality on the same scenes: the planner's quality floor is measured from it.
    lossless = measure_codec(family, arrays, refs, "fp32", layers)
    log(line(lossless))
    large["fp32"] = [lossless["exact_match"]] * (layers + 1)  # lossless: the same captions at every split
    return {
        "codecs": codecs,
        "bytes_by_codec": sizes,
        "acceptance_by_codec": accept,
        "quality_by_codec": {"metric": "exact_match", "source": f"aiflow train: {count} held-out scenes", "large": large},
    }
