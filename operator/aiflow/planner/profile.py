"""The planner's profile: what each piece of the captioning model costs, on the wire and in quality.

A profile is a YAML (or JSON) document of kind `PlannerProfile`; `docs/planner.md` documents every field.
Compute figures are milliseconds on the reference machine (a tier's `computeFactor` scales them); byte
figures are what crosses a link. `default_profile.yaml` ships plausible numbers marked `source: default`
until `aiflow profile` measures them on real Triton servers and writes `source: measured`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from aiflow.contract import WIRE_HEADER_BYTES, CodecError, payload_size
from aiflow.contract import parse_codec as _parse_codec
from aiflow.planner.documents import DocumentError, check_schema, read_document

DEFAULT_PROFILE_PATH = Path(__file__).with_name("default_profile.yaml")
# The shipped model's weights manifest (aiflow.model's weights/), read as a file: the planner needs
# its measured quality, not the model code.
WEIGHTS_MANIFEST_PATH = Path(__file__).resolve().parents[1] / "model" / "weights" / "manifest.json"
DECODERS = ("small", "large")
LOSSLESS = "fp32"


class ProfileError(DocumentError):
    """A profile the planner cannot use."""


_NUM = {"type": "number", "minimum": 0}
_POS = {"type": "number", "exclusiveMinimum": 0}
_SCORE = {"type": "number", "minimum": 0, "maximum": 100}
_SHARE = {"type": "number", "minimum": 0, "maximum": 1}
_SCHEMA = {
    "type": "object",
    "required": ["kind", "encoder", "decoder", "image", "features", "quality", "memoryMiB"],
    # A measured profile says what it was measured on: its numbers hold for that machine.
    "if": {"properties": {"source": {"const": "measured"}}, "required": ["source"]},
    "then": {"required": ["machine"]},
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"const": "PlannerProfile"},
        "source": {"enum": ["default", "measured"]},
        "note": {"type": "string"},
        # Where and how a measured profile was taken (aiflow profile): free-form facts for people.
        "machine": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean", "null"]}},
        "measurement": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean", "null"]}},
        "encoder": {
            "type": "object",
            "required": ["embedMs", "layerMs", "tokens", "dims"],
            "additionalProperties": False,
            "properties": {
                "embedMs": _NUM,
                "layerMs": {"type": "array", "items": _NUM, "minItems": 1},
                "tokens": {"type": "integer", "minimum": 1},
                "dims": {"type": "integer", "minimum": 1},
            },
        },
        "decoder": {
            "type": "object",
            "required": ["smallTokenMs", "largeTokenMs", "verifyMs", "tokensPerCaption", "acceptance"],
            "additionalProperties": False,
            "properties": {
                "smallTokenMs": _NUM,
                "largeTokenMs": _NUM,
                "verifyMs": _NUM,
                "tokensPerCaption": _POS,
                "acceptance": {"type": "number", "minimum": 0, "maximum": 1},
                # per codec (one number, or one per split layer 0..L): drafts from coarser features
                # are accepted less; `acceptance` holds for uncompressed features and unlisted codecs
                "acceptanceByCodec": {
                    "type": "object",
                    "additionalProperties": {"oneOf": [_SHARE, {"type": "array", "items": _SHARE, "minItems": 1}]},
                },
            },
        },
        "image": {
            "type": "object",
            "required": ["pngBytes"],
            "additionalProperties": False,
            "properties": {"pngBytes": _POS, "jpegBytes": _POS},
        },
        "features": {
            "type": "object",
            "required": ["codecs"],
            "additionalProperties": False,
            "properties": {
                "codecs": {"type": "array", "items": {"type": "string"}, "minItems": 1, "uniqueItems": True},
                "zstdRatio": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {q: {"type": "number", "exclusiveMinimum": 0, "maximum": 1} for q in ("fp32", "fp16", "int8")},
                },
                "bytes": {
                    "type": "object",
                    "additionalProperties": {"oneOf": [_POS, {"type": "array", "items": _POS, "minItems": 1}]},
                },
                "codecMs": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"encode": _NUM, "decode": _NUM},
                    },
                },
            },
        },
        "quality": {
            "type": "object",
            "required": ["large"],
            "additionalProperties": False,
            "properties": {
                "metric": {"type": "string"},
                "source": {"type": "string"},
                **{d: {"type": "object", "additionalProperties": {"oneOf": [_SCORE, {"type": "array", "items": _SCORE, "minItems": 1}]}} for d in DECODERS},
            },
        },
        "memoryMiB": {"type": "object", "additionalProperties": _POS},
        "rpc": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"overheadMs": _NUM, "msPerMB": _NUM},
        },
    },
}

# Entropy-coding ratios used when a profile gives none (zstd on quantised ViT features).
_DEFAULT_ZSTD_RATIO = {"fp32": 0.93, "fp16": 0.9, "int8": 0.8}


# The solver asks for the same few specs many times; parsing is pure, so remember it.
parse_codec = functools.lru_cache(maxsize=1024)(_parse_codec)


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Profile:
    """Costs of the model pieces at reference speed, wire sizes and quality; see docs/planner.md."""

    embed_ms: float
    layer_ms: tuple[float, ...]  # one per encoder layer, at the full token count
    tokens: int  # encoder tokens including CLS
    dims: int
    small_token_ms: float
    large_token_ms: float
    verify_ms: float
    tokens_per_caption: float
    acceptance: float
    png_bytes: float
    jpeg_bytes: float | None
    codecs: tuple[str, ...]  # canonical specs the planner may choose from
    zstd_ratio: Mapping[str, float] = field(default_factory=lambda: _frozen(_DEFAULT_ZSTD_RATIO))
    measured_bytes: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: _frozen({}))  # per layer 0..L
    codec_ms: Mapping[str, tuple[float, float]] = field(default_factory=lambda: _frozen({}))  # (encode, decode)
    acceptance_by_codec: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: _frozen({}))  # per layer 0..L
    quality: Mapping[str, Mapping[str, tuple[float, ...]]] = field(default_factory=lambda: _frozen({}))  # per layer 0..L
    quality_metric: str = "exact_match"
    quality_source: str = "profile"
    memory_mib: Mapping[str, float] = field(default_factory=lambda: _frozen({}))
    rpc_overhead_ms: float = 0.5
    rpc_ms_per_mb: float = 3.0
    source: str = "default"
    machine: Mapping[str, object] = field(default_factory=lambda: _frozen({}))  # where a measured profile was taken

    @property
    def layers(self) -> int:
        return len(self.layer_ms)

    def kept_tokens(self, spec: str) -> int:
        """Tokens that leave a stage encoding with `spec` (CLS plus K when it reduces tokens)."""
        codec = parse_codec(spec)
        return min(self.tokens, codec.keep + 1) if codec.reduce else self.tokens

    @property
    def draft_bytes(self) -> float:
        """What a caption's draft ids add to a message (u16 count + u16 per token, aiflow.stage.wire)."""
        return 2 + 2 * self.tokens_per_caption

    def feature_bytes(self, layer: int, spec: str) -> float:
        """Bytes of one wire message carrying features taken after `layer` encoder layers, encoded with
        `spec` (aiflow.stage.wire framing). Measured sizes win over the formula."""
        return float(self.feature_bytes_by_layer(spec)[layer])

    def feature_bytes_by_layer(self, spec: str) -> np.ndarray:
        """`feature_bytes` for every split layer 0..L."""
        measured = self.measured_bytes.get(spec)
        if measured:
            return np.array(measured)
        codec = parse_codec(spec)
        if codec.learned:
            raise ProfileError(f"codec {spec}: a learned codec's size depends on the content; give its measured bytes in features.bytes (or the weights manifest's bytes_by_codec)")
        kept = self.kept_tokens(spec)
        payload = payload_size(codec.quant, (1, kept, self.dims))
        if codec.zstd_level is not None:
            payload *= self.zstd_ratio.get(codec.quant, _DEFAULT_ZSTD_RATIO[codec.quant])
        positions = 2 * kept if codec.reduce == "topk" else 0
        return np.full(self.layers + 1, WIRE_HEADER_BYTES + len(codec.spec) + positions + payload)

    def acceptance_by_layer(self, spec: str | None) -> np.ndarray:
        """Share of draft tokens the large decoder accepts on features through codec `spec` after each
        split layer 0..L (the profile's `acceptance` where it has nothing for the codec)."""
        measured = self.acceptance_by_codec.get(spec) if spec else None
        return np.array(measured) if measured else np.full(self.layers + 1, self.acceptance)

    def codec_cost(self, spec: str) -> tuple[float, float]:
        """(encode ms, decode ms) of a codec at reference speed; 0 where the profile says nothing."""
        return self.codec_ms.get(spec, (0.0, 0.0))

    def quality_of(self, spec: str | None, split: int | None = None, decoder: str = "large") -> float:
        """Caption quality (0..100, `quality_metric`) of `decoder` on features encoded with codec `spec`
        after `split` encoder layers (None: no codec on the way / after the whole encoder)."""
        return self.quality[decoder][spec or LOSSLESS][self.layers if split is None else split]

    def quality_by_layer(self, spec: str | None, decoder: str = "large") -> np.ndarray:
        """`quality_of` for every split layer 0..L."""
        return np.array(self.quality[decoder][spec or LOSSLESS])


def load_profile(path: str | Path | None = None, manifest: str | Path | None = WEIGHTS_MANIFEST_PATH) -> Profile:
    """Read a profile file (the shipped default when `path` is None); overlay quality from the model's
    weights manifest when it exists. ProfileError says which field is wrong and how."""
    path = Path(path) if path else DEFAULT_PROFILE_PATH
    try:
        doc = read_document(path, "profile")
    except DocumentError as exc:
        raise ProfileError(str(exc)) from exc
    profile = profile_from_dict(doc, where=str(path))
    if manifest and Path(manifest).is_file():
        try:
            data = json.loads(Path(manifest).read_text())
        except (OSError, ValueError) as exc:
            raise ProfileError(f"weights manifest {manifest} is not readable JSON: {exc}") from exc
        check_model_shape(profile, data, str(manifest))
        profile = with_manifest_quality(profile, data, str(manifest))
    unpriced = [c for c in profile.codecs if parse_codec(c).learned and c not in profile.measured_bytes]
    if unpriced:
        raise ProfileError(
            f"{path}: no measured size for learned codec(s) {unpriced} (its size depends on the content): give it in "
            "features.bytes, or use weights whose manifest lists it in bytes_by_codec"
        )
    return profile


def check_model_shape(profile: Profile, manifest: dict, where: str) -> None:
    """A profile must describe the model the weights manifest describes (layers, tokens, channels):
    splits and byte counts of another model would be wrong."""
    config = manifest.get("config") if isinstance(manifest, dict) else None
    if not isinstance(config, dict):
        return
    try:
        expected = {
            "encoder layers": int(config["num_layers"]),
            "tokens": (int(config["image_size"]) // int(config["patch_size"])) ** 2 + 1,
            "channels": int(config["hidden_size"]),
        }
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return  # a manifest without the shape: nothing to check against
    actual = {"encoder layers": profile.layers, "tokens": profile.tokens, "channels": profile.dims}
    wrong = [f"{k} {actual[k]} (model: {v})" for k, v in expected.items() if actual[k] != v]
    if wrong:
        raise ProfileError(
            f"the profile does not describe the model of {where}: {', '.join(wrong)}; profile this model "
            "or pass a profile made for it"
        )


def profile_from_dict(doc: Any, where: str = "profile") -> Profile:
    """Validate a parsed profile document and build a Profile."""
    try:
        check_schema(doc, _SCHEMA, f"profile {where}")
    except DocumentError as exc:
        raise ProfileError(str(exc)) from exc
    enc, dec, feats, qual = doc["encoder"], doc["decoder"], doc["features"], doc["quality"]
    layers = len(enc["layerMs"])
    codecs = tuple(_canonical(spec, f"{where}: features.codecs") for spec in feats["codecs"])
    if len(set(codecs)) != len(codecs):
        raise ProfileError(f"{where}: features.codecs lists the same codec twice under different spellings: {list(feats['codecs'])}")
    measured = _per_layer_table(feats.get("bytes", {}), layers, f"{where}: features.bytes")
    accept = _per_layer_table(dec.get("acceptanceByCodec", {}), layers, f"{where}: decoder.acceptanceByCodec")
    quality = {d: _per_layer_table(qual[d], layers, f"{where}: quality.{d}") for d in DECODERS if d in qual}
    missing = [c for c in (*codecs, LOSSLESS) if c not in quality["large"]]
    if missing:
        raise ProfileError(f"{where}: quality.large has no score for codec(s) {missing}; add one per codec in features.codecs and for {LOSSLESS!r} (no codec)")
    rpc = doc.get("rpc", {})
    return Profile(
        embed_ms=float(enc["embedMs"]),
        layer_ms=tuple(float(x) for x in enc["layerMs"]),
        tokens=int(enc["tokens"]),
        dims=int(enc["dims"]),
        small_token_ms=float(dec["smallTokenMs"]),
        large_token_ms=float(dec["largeTokenMs"]),
        verify_ms=float(dec["verifyMs"]),
        tokens_per_caption=float(dec["tokensPerCaption"]),
        acceptance=float(dec["acceptance"]),
        png_bytes=float(doc["image"]["pngBytes"]),
        jpeg_bytes=float(doc["image"]["jpegBytes"]) if "jpegBytes" in doc["image"] else None,
        codecs=codecs,
        zstd_ratio=_frozen({**_DEFAULT_ZSTD_RATIO, **feats.get("zstdRatio", {})}),
        measured_bytes=_frozen(measured),
        acceptance_by_codec=_frozen(accept),
        codec_ms=_frozen(
            {_canonical(k, f"{where}: features.codecMs"): (float(v.get("encode", 0)), float(v.get("decode", 0))) for k, v in feats.get("codecMs", {}).items()}
        ),
        quality=_frozen({d: _frozen(q) for d, q in quality.items()}),
        quality_metric=str(qual.get("metric", "exact_match")),
        quality_source=str(qual.get("source", "profile")),
        memory_mib=_frozen({k: float(v) for k, v in doc["memoryMiB"].items()}),
        rpc_overhead_ms=float(rpc.get("overheadMs", 0.5)),
        rpc_ms_per_mb=float(rpc.get("msPerMB", 3.0)),
        source=str(doc.get("source", "default")),
        machine=_frozen(doc.get("machine", {})),
    )


def with_manifest_quality(profile: Profile, manifest: dict, where: str) -> Profile:
    """Take quality per (decoder, codec) from the weights manifest's `quality_by_codec` mapping
    (`{"large": {"int8+zstd": 98.5, ...}, "metric": "exact_match"}`) when it has one, and the measured
    wire bytes and draft acceptance per codec from `bytes_by_codec` / `acceptance_by_codec`
    (`{codec: number | [one per split layer]}`): they belong to the weights, a learned codec's above all."""
    if not isinstance(manifest, dict):
        return profile
    measured = {}
    for key, field_name, item in (("bytes_by_codec", "measured_bytes", _POS), ("acceptance_by_codec", "acceptance_by_codec", _SHARE)):
        table = manifest.get(key)
        if not isinstance(table, dict):
            continue
        schema = {"type": "object", "additionalProperties": {"oneOf": [item, {"type": "array", "items": item, "minItems": 1}]}}
        try:
            check_schema(table, schema, f"weights manifest {where}: {key}")
        except DocumentError as exc:
            raise ProfileError(str(exc)) from exc
        measured[field_name] = _frozen({**getattr(profile, field_name), **_per_layer_table(table, profile.layers, f"weights manifest {where}: {key}")})
    profile = replace(profile, **measured)
    table = manifest.get("quality_by_codec")
    if not isinstance(table, dict):
        return profile
    try:
        check_schema(table, _SCHEMA["properties"]["quality"], f"weights manifest {where}: quality_by_codec")
    except DocumentError as exc:
        raise ProfileError(str(exc)) from exc
    metric = str(table.get("metric", profile.quality_metric))
    quality = {d: dict(q) for d, q in profile.quality.items()}
    for decoder in DECODERS:
        scores = _per_layer_table(table.get(decoder, {}), profile.layers, f"weights manifest {where}: quality_by_codec.{decoder}")
        quality.setdefault(decoder, {}).update(scores)
    return replace(profile, quality=_frozen({d: _frozen(q) for d, q in quality.items()}), quality_metric=metric, quality_source=f"manifest {where}")


def _per_layer_table(table: Mapping, layers: int, where: str) -> dict[str, tuple[float, ...]]:
    """`{codec: number | [number per split layer 0..layers]}` -> `{canonical codec: one value per layer}`."""
    out = {}
    for spec, values in table.items():
        values = tuple(float(v) for v in values) if isinstance(values, list) else (float(values),) * (layers + 1)
        if len(values) != layers + 1:
            raise ProfileError(f"{where}[{spec!r}] has {len(values)} values; give one number, or one per split layer 0..{layers} ({layers + 1} values)")
        out[_canonical(spec, where)] = values
    return out


def _canonical(spec: str, where: str) -> str:
    try:
        return parse_codec(spec).spec
    except CodecError as exc:
        raise ProfileError(f"{where}: {exc}") from exc
