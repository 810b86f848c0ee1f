"""Saving and loading a caption family as a transformers checkpoint directory.

Layout (what `save_family` writes and `load_checkpoint` reads):
  config.json, model.safetensors     a VisionEncoderDecoderModel: the encoder and the large decoder
  draft_decoder/                     optional: the small decoder (GPT2LMHeadModel save_pretrained) and
                                     enc_to_dec_proj.safetensors when its width differs from the encoder's
  tokenizer.json, tokenizer_config.json
  preprocessor_config.json           optional: image_mean / image_std (ViTImageProcessor)
  aiflow_family.json                 optional: the FamilyConfig (derived from the configs when absent)
  bottleneck/                        optional: trained learned-codec bottlenecks (aiflow.model.bottleneck),
                                     learned-C-layerL.safetensors each
  manifest.json                      bundled weights only: training record, scores, sha256 of every file

Any user checkpoint saved with `VisionEncoderDecoderModel.save_pretrained` (a ViT-style encoder and a
decoder with cross-attention) plus its tokenizer loads too; without `draft_decoder/` the large
decoder also drafts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import replace
from pathlib import Path

from aiflow.model.bottleneck import load_bottlenecks, save_bottlenecks
from aiflow.model.family import CaptionFamily, Decoder, FamilyConfig, configure_threads, encoder_layers

WEIGHTS_DIR = Path(__file__).parent / "weights"
DRAFT_DIR = "draft_decoder"
PROJECTION_FILE = "enc_to_dec_proj.safetensors"
FAMILY_FILE = "aiflow_family.json"
MANIFEST_FILE = "manifest.json"
DEFAULT_MAX_CAPTION_TOKENS = 32


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as a caption family; the message says why."""


def save_family(family: CaptionFamily, out_dir: str | Path) -> Path:
    """Write `family` as a VisionEncoderDecoderModel checkpoint (+ draft decoder, tokenizer)."""
    from safetensors.torch import save_file
    from transformers import VisionEncoderDecoderModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = family.config
    large, small = family.decoders["large"], family.decoders["small"]
    ved = VisionEncoderDecoderModel(encoder=family.encoder, decoder=large.lm)
    if getattr(ved, "enc_to_dec_proj", None) is not None:
        ved.enc_to_dec_proj.load_state_dict(large.projection.state_dict())
    ved.config.decoder_start_token_id = cfg.bos_token_id
    ved.config.pad_token_id = cfg.pad_token_id
    ved.config.eos_token_id = cfg.eos_token_id
    with _quiet_transformers():
        ved.save_pretrained(out)
        draft = out / DRAFT_DIR
        small.lm.save_pretrained(draft)
    if small.projection is not None:
        state = {k: v.detach().contiguous() for k, v in small.projection.state_dict().items()}
        save_file(state, draft / PROJECTION_FILE)
    family.tokenizer.save_pretrained(out)
    processor = {  # what ViTImageProcessor reads; written directly to avoid its optional backends
        "image_processor_type": "ViTImageProcessor",
        "do_resize": False,
        "size": {"height": cfg.image_size, "width": cfg.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(cfg.image_mean),
        "image_std": list(cfg.image_std),
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=1) + "\n")
    (out / FAMILY_FILE).write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    save_bottlenecks(family, out)
    return out


def load_checkpoint(path: str | Path | None = None) -> CaptionFamily:
    """Load a family from a checkpoint directory (default: the bundled weights)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, VisionEncoderDecoderModel

    root = Path(path) if path is not None else WEIGHTS_DIR
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    if not (root / "config.json").is_file():
        hint = " (run `aiflow train` to create the bundled weights)" if path is None else ""
        raise CheckpointError(f"{root} holds no config.json of a VisionEncoderDecoderModel{hint}")
    if not (root / "tokenizer.json").is_file():
        raise CheckpointError(f"{root} holds no tokenizer.json; save the tokenizer with save_pretrained()")
    configure_threads()
    try:
        with _quiet_transformers():
            ved = VisionEncoderDecoderModel.from_pretrained(root)
    except Exception as exc:  # transformers raises many kinds; the user needs the path and the cause
        raise CheckpointError(f"cannot load {root} as a VisionEncoderDecoderModel: {exc}") from exc
    encoder = ved.encoder
    for attr in ("embeddings", "layernorm"):
        if not hasattr(encoder, attr):
            raise CheckpointError(f"encoder {type(encoder).__name__} is not ViT-style (no .{attr})")
    try:
        encoder_layers(encoder)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    if not getattr(ved.decoder.config, "add_cross_attention", False):
        raise CheckpointError("the decoder has no cross-attention (add_cross_attention=False)")
    large = Decoder(ved.decoder, getattr(ved, "enc_to_dec_proj", None))

    small = large
    draft_dir = root / DRAFT_DIR
    if (draft_dir / "config.json").is_file():
        with _quiet_transformers():
            lm = AutoModelForCausalLM.from_pretrained(draft_dir)
        projection = None
        if (draft_dir / PROJECTION_FILE).is_file():
            projection = _load_projection(draft_dir / PROJECTION_FILE)
        width = lm.config.hidden_size
        if projection is None and width != encoder.config.hidden_size:
            raise CheckpointError(
                f"draft decoder width {width} differs from the encoder's {encoder.config.hidden_size} "
                f"and {draft_dir / PROJECTION_FILE} is missing"
            )
        small = Decoder(lm, projection)

    tokenizer = PreTrainedTokenizerFast.from_pretrained(root)
    config = _family_config(root, ved, small.lm.config, tokenizer)
    # Same module order as a freshly built family, so training can continue from a checkpoint.
    family = CaptionFamily(config, encoder, {"small": small, "large": large}, tokenizer).eval()
    try:
        family.bottlenecks = load_bottlenecks(root)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    for (channels, layer), bn in family.bottlenecks.items():
        if bn.dims != config.hidden_size or not 0 <= layer <= config.num_layers:
            raise CheckpointError(f"bottleneck learned:{channels} at layer {layer} does not fit this model ({config.hidden_size} channels, {config.num_layers} layers)")
    return family


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars while loading/saving: stage logs should hold requests, not bars."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_projection(path: Path):
    from safetensors.torch import load_file
    from torch import nn

    state = load_file(path)
    if set(state) != {"weight", "bias"}:
        raise CheckpointError(f"{path} must hold 'weight' and 'bias', got {sorted(state)}")
    out_features, in_features = state["weight"].shape
    projection = nn.Linear(in_features, out_features)
    projection.load_state_dict(state)
    return projection


def _family_config(root: Path, ved, small_config, tokenizer) -> FamilyConfig:
    enc, dec = ved.config.encoder, ved.config.decoder
    max_tokens = min(DEFAULT_MAX_CAPTION_TOKENS, getattr(dec, "n_positions", 1024) - 1)
    derived = FamilyConfig(
        image_size=enc.image_size,
        patch_size=enc.patch_size,
        hidden_size=enc.hidden_size,
        num_layers=enc.num_hidden_layers,
        num_heads=enc.num_attention_heads,
        intermediate_size=enc.intermediate_size,
        vocab_size=dec.vocab_size,
        large_layers=dec.num_hidden_layers,
        large_hidden=dec.hidden_size,
        large_heads=dec.num_attention_heads,
        small_layers=small_config.num_hidden_layers,
        small_hidden=small_config.hidden_size,
        small_heads=small_config.num_attention_heads,
        max_caption_tokens=max_tokens,
        bos_token_id=_first_id(ved.config.decoder_start_token_id, tokenizer.bos_token_id, dec.bos_token_id),
        eos_token_id=_first_id(tokenizer.eos_token_id, dec.eos_token_id),
        pad_token_id=_first_id(tokenizer.pad_token_id, ved.config.pad_token_id, tokenizer.eos_token_id),
    )
    processor = root / "preprocessor_config.json"
    if processor.is_file():
        data = json.loads(processor.read_text())
        if "image_mean" in data and "image_std" in data:
            derived = replace(derived, image_mean=tuple(data["image_mean"]), image_std=tuple(data["image_std"]))
    family_file = root / FAMILY_FILE
    if family_file.is_file():
        saved = FamilyConfig.from_dict(json.loads(family_file.read_text()))
        if saved != derived:
            # The saved file only adds what the transformers configs cannot say (caption length).
            mismatched = {k for k, v in saved.to_dict().items() if derived.to_dict()[k] != v} - {"max_caption_tokens"}
            if mismatched:
                raise CheckpointError(f"{family_file} disagrees with the model configs on {sorted(mismatched)}")
        return saved
    return derived


def _first_id(*candidates) -> int:
    for value in candidates:
        if value is not None:
            return int(value)
    raise CheckpointError("the checkpoint defines no start/end token id (set decoder_start_token_id and eos_token_id)")


def file_checksums(root: str | Path) -> dict[str, str]:
    """sha256 of every file under `root` except the manifest, keyed by relative path."""
    root = Path(root)
    sums = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        sums[file.relative_to(root).as_posix()] = hashlib.sha256(file.read_bytes()).hexdigest()
    return sums


def read_manifest(root: str | Path | None = None) -> dict:
    path = Path(root or WEIGHTS_DIR) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    return json.loads(path.read_text())


def verify_checksums(root: str | Path | None = None) -> list[str]:
    """Files whose sha256 differs from the manifest (or that are missing / unlisted); empty when intact."""
    root = Path(root or WEIGHTS_DIR)
    expected = read_manifest(root).get("sha256", {})
    actual = file_checksums(root)
    bad = [name for name, digest in expected.items() if actual.get(name) != digest]
    bad += [name for name in actual if name not in expected]
    return sorted(bad)
