"""Compare schemes on a running flow: latency, bytes upstream and caption quality (demo and bench)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiflow.local.client import Captioned, caption_images
from aiflow.local.schemes import CLIENT_TIER, RunningFlow, Scheme, get_scheme
from aiflow.model import quality


@dataclass
class SchemeRun:
    """One scheme over a set of images: every figure measured on the running Triton servers."""

    scheme: Scheme
    results: list[Captioned]
    quality: quality.Quality
    wire_bytes_up: dict[str, float] = field(default_factory=dict)  # per image, as the link proxies counted

    @property
    def name(self) -> str:
        return self.scheme.name

    @property
    def median_latency_ms(self) -> float:
        return statistics.median(r.latency_ms for r in self.results)

    @property
    def bytes_from_device(self) -> float:
        """Mean payload bytes per image leaving the device."""
        return statistics.mean(r.bytes_from_device for r in self.results)

    @property
    def wire_bytes_from_device(self) -> float:
        return sum(v for k, v in self.wire_bytes_up.items() if k.startswith(f"{CLIENT_TIER}->"))

    def as_dict(self) -> dict:
        return {
            "scheme": self.name,
            "chain": self.scheme.describe(),
            "median_latency_ms": self.median_latency_ms,
            "bytes_from_device": self.bytes_from_device,
            "wire_bytes_up": self.wire_bytes_up,
            **self.quality.as_dict(),
        }


def demo_schemes(split_layer: int | None = None, codec: str | None = None) -> list[Scheme]:
    """The schemes of the demo table, with two reference rows: the JPEG upload (bytes) and the split
    with lossless features (the quality a compressed split is held to)."""
    return [
        get_scheme("device-only"),
        get_scheme("edge-only"),
        replace(get_scheme("edge-only", upload="jpeg"), name="edge-only (jpeg)"),
        get_scheme("cloud-only"),
        replace(get_scheme("split", split_layer=split_layer, codec="fp32"), name="split (fp32)"),
        get_scheme("split", split_layer=split_layer, codec=codec),
        get_scheme("split-spec", split_layer=split_layer, codec=codec),
    ]


def run_scheme(
    flow: RunningFlow,
    scheme: Scheme,
    images: Sequence[tuple[str, bytes]],
    references: Sequence[str],
    warmup: int = 1,
) -> SchemeRun:
    """Wire `scheme`, send `warmup` images unmeasured, then caption every image one request each."""
    from aiflow.local.schemes import wiring

    flow.apply(wiring(scheme))
    if warmup:
        caption_images(flow, scheme, images[:warmup])
    before = flow.link_counters()
    results = caption_images(flow, scheme, images)
    after = flow.link_counters()
    wire = {k: (after[k]["bytes_up"] - before[k]["bytes_up"]) / len(images) for k in after}
    score = quality.score([r.caption for r in results], list(references))
    return SchemeRun(scheme, results, score, wire)


def format_table(runs: Sequence[SchemeRun]) -> list[str]:
    """The scheme table as aligned text lines."""
    head = ["scheme", "median latency", "bytes up from device", "(on the wire)", "BLEU-4", "CIDEr", "ROUGE-L", "exact match"]
    rows = [
        [
            r.name,
            f"{r.median_latency_ms:.1f} ms",
            f"{r.bytes_from_device:,.0f} B",
            f"{r.wire_bytes_from_device:,.0f} B",
            f"{r.quality.bleu4:.1f}",
            f"{r.quality.cider:.1f}",
            f"{r.quality.rouge_l:.1f}",
            f"{r.quality.exact_match:.1f}%",
        ]
        for r in runs
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [fmt(head), "-+-".join("-" * w for w in widths), *map(fmt, rows)]


def target_report(runs: Sequence[SchemeRun]) -> list[str]:
    """Issue targets, checked on the runs: split sends >=5x fewer bytes than the PNG and fewer than the
    JPEG, with quality within 1 point of the lossless split."""
    by = {r.name: r for r in runs}
    needed = ("edge-only", "edge-only (jpeg)", "split (fp32)", "split")
    if any(n not in by for n in needed):
        return []
    png, jpeg, lossless, split = (by[n] for n in needed)
    ratio = png.bytes_from_device / split.bytes_from_device
    wire_ratio = png.wire_bytes_from_device / max(split.wire_bytes_from_device, 1)
    lines = [
        f"split sends {ratio:.1f}x fewer payload bytes than the PNG ({ratio >= 5 and 'met' or 'MISSED'}: target >= 5x); "
        f"{wire_ratio:.1f}x on the wire",
        f"split payload {split.bytes_from_device:,.0f} B vs JPEG {jpeg.bytes_from_device:,.0f} B "
        f"({split.bytes_from_device < jpeg.bytes_from_device and 'met' or 'MISSED'}: target fewer than the JPEG); "
        f"on the wire {split.wire_bytes_from_device:,.0f} B vs {jpeg.wire_bytes_from_device:,.0f} B",
    ]
    for metric in ("bleu4", "cider", "rouge_l", "exact_match"):
        delta = getattr(split.quality, metric) - getattr(lossless.quality, metric)
        verdict = "met" if delta >= -1.0 else "MISSED"
        lines.append(f"{metric}: split {getattr(split.quality, metric):.1f} vs lossless {getattr(lossless.quality, metric):.1f} "
                     f"({delta:+.1f}; {verdict}: target within 1 point)")
    return lines


def heldout_images(seed: int, count: int, out_dir) -> tuple[list[tuple[str, bytes]], list[str]]:
    """Write `count` held-out scenes as PNG into `out_dir`; return (name, PNG bytes) pairs and references."""
    from aiflow.model import scenes

    scenes.write_dataset(out_dir, seed=seed, count=count, split="heldout")
    captions = scenes.read_captions(out_dir)
    names = sorted(captions)
    return [(n, (Path(out_dir) / n).read_bytes()) for n in names], [captions[n] for n in names]
