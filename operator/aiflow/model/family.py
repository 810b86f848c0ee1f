"""The captioning model family: one ViT encoder, a small and a large GPT-2 decoder sharing its features.

All parts are transformers classes (`ViTModel`, `GPT2LMHeadModel` with cross-attention), so the
encoder and the large decoder are exactly a `VisionEncoderDecoderModel`, and such a checkpoint
loads as a family (see `aiflow.model.checkpoint`).

The encoder is exposed layer by layer so a stage can stop after any layer, ship the hidden
states (possibly with fewer tokens), and another stage can finish the job.  Decoding is greedy
with a KV cache; `verify` checks the small decoder's drafts with the large decoder in one forward
pass and returns exactly what `generate(decoder="large")` returns.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

DECODERS = ("small", "large")
THREADS_ENV = "AIFLOW_TORCH_THREADS"


@dataclass(frozen=True)
class FamilyConfig:
    """Sizes of the family; json-serialisable with `to_dict` / `from_dict`."""

    image_size: int = 96
    patch_size: int = 16
    hidden_size: int = 96
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    vocab_size: int = 23
    large_layers: int = 3
    large_hidden: int = 96
    large_heads: int = 4
    small_layers: int = 1
    small_hidden: int = 64
    small_heads: int = 2
    max_caption_tokens: int = 24  # including the end token
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def num_tokens(self) -> int:
        """Encoder tokens per image: CLS plus one per patch."""
        return 1 + (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FamilyConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown FamilyConfig keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (env AIFLOW_TORCH_THREADS, else 1).

    One thread by default: the model is small, batch 1 gains little from more, and several stages
    share a host; spinning OpenMP threads on a busy CPU were measured to slow training 5x."""
    if threads is None:
        threads = int(os.environ.get(THREADS_ENV, "0") or 0) or 1
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


class Decoder(nn.Module):
    """A GPT-2 LM with cross-attention, plus the projection from encoder width when they differ."""

    def __init__(self, lm: nn.Module, projection: nn.Linear | None = None):
        super().__init__()
        self.lm = lm
        self.projection = projection

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(features) if self.projection is not None else features


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a ViT-style encoder (`.layers` in transformers 5, `.encoder.layer` before)."""
    layers = getattr(encoder, "layers", None)
    if layers is None and hasattr(encoder, "encoder"):
        layers = getattr(encoder.encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"encoder {type(encoder).__name__} is not ViT-style: no list of layers")
    return layers


def build_encoder(config: FamilyConfig):
    from transformers import ViTConfig, ViTModel

    vit = ViTConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=3,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        qkv_bias=True,
    )
    # The pooler is unused but kept so the checkpoint is a standard VisionEncoderDecoderModel.
    encoder = ViTModel(vit, add_pooling_layer=True)
    # 2-D sin-cos positions as the starting point: captions hinge on where objects are, and the
    # default near-zero init makes the encoder learn positions slowly.
    grid = config.image_size // config.patch_size
    with torch.no_grad():
        encoder.embeddings.position_embeddings[0, 1:] = _sincos_2d(grid, config.hidden_size)
        encoder.embeddings.position_embeddings[0, 0] = 0.0
    return encoder


def _sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] sin-cos embedding of patch rows and columns (MAE-style)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    out = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(out, (0, dim - out.shape[1]))


def build_decoder(config: FamilyConfig, which: str) -> Decoder:
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, width, heads = {
        "large": (config.large_layers, config.large_hidden, config.large_heads),
        "small": (config.small_layers, config.small_hidden, config.small_heads),
    }[which]
    gpt = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_caption_tokens + 8,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        n_inner=4 * width,
        add_cross_attention=True,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    lm = GPT2LMHeadModel(gpt)
    projection = nn.Linear(config.hidden_size, width) if width != config.hidden_size else None
    return Decoder(lm, projection)


class CaptionFamily(nn.Module):
    """The encoder (split-able at any layer) and the small/large decoders, with the tokenizer."""

    def __init__(self, config: FamilyConfig, encoder: nn.Module, decoders: dict[str, Decoder], tokenizer):
        super().__init__()
        missing = [d for d in DECODERS if d not in decoders]
        if missing:
            raise ValueError(f"decoders {missing} missing; a family needs {DECODERS}")
        self.config = config
        self.encoder = encoder
        self.decoders = nn.ModuleDict(decoders)
        self.tokenizer = tokenizer
        self.layers = encoder_layers(encoder)
        self.num_layers = len(self.layers)
        # Trained learned-codec bottlenecks by (channels, split layer) (aiflow.model.bottleneck). A
        # plain dict, not submodules: training the family never touches them, the bottleneck phase
        # trains them on the frozen family.
        self.bottlenecks: dict = {}
        self.eval()

    # ----------------------------------------------------------------- encoder side
    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def _grad_context(self):
        # Training (train.py) needs gradients through these methods; serving never does.
        return torch.enable_grad() if self.training else torch.inference_mode()

    def preprocess(self, images) -> torch.Tensor:
        """PIL RGB images or a uint8 array [B,H,W,3] -> normalised pixels [B,3,H,W]."""
        array = _images_to_array(images, self.config.image_size)
        mean = torch.tensor(self.config.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        pixels = torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(255.0)
        return ((pixels - mean) / std).to(self.dtype)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings: hidden states [B,T,D] before layer 0, CLS first."""
        s = self.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"pixels must have shape [B,3,{s},{s}], got {list(pixels.shape)}; use preprocess()")
        with self._grad_context():
            return self.encoder.embeddings(pixels.to(self.dtype))

    def encode_layers(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Run encoder layers [start, end) on hidden states [B,T',D] (any T' >= 1, e.g. pruned)."""
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is not within [0, {self.num_layers}]")
        self._check_hidden(hidden)
        with self._grad_context():
            hidden = hidden.to(self.dtype)
            for layer in self.layers[start:end]:
                hidden = layer(hidden)
            return hidden

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final layernorm: encoder features [B,T',D] for the decoders."""
        self._check_hidden(hidden)
        with self._grad_context():
            return self.encoder.layernorm(hidden.to(self.dtype))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.finish(self.encode_layers(self.embed(pixels), 0, self.num_layers))

    def token_importance(self, hidden: torch.Tensor) -> torch.Tensor:
        """Score [B,T] per token: distance of a patch token from the mean patch (objects stand out from
        the background); CLS scores +inf so it is always kept."""
        self._check_hidden(hidden)
        with torch.no_grad():
            patches = hidden[:, 1:].float()
            score = (patches - patches.mean(dim=1, keepdim=True)).norm(dim=-1)
            cls = torch.full_like(score[:, :1], float("inf"))
            return torch.cat([cls, score], dim=1)

    def select_tokens(self, hidden: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep CLS plus the `keep` most important patch tokens, in their original order.

        Returns (hidden [B,1+keep,D], token indices [B,1+keep]); the training-time token dropping
        and the token-pruning codec use this one function, so they select the same tokens.
        """
        patches = hidden.shape[1] - 1
        if not 0 <= keep <= patches:
            raise ValueError(f"keep must be within [0, {patches}], got {keep}")
        score = self.token_importance(hidden)
        index = score.topk(1 + keep, dim=1).indices.sort(dim=1).values
        gathered = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return gathered, index

    def _check_hidden(self, hidden: torch.Tensor) -> None:
        d = self.config.hidden_size
        if hidden.ndim != 3 or hidden.shape[-1] != d or hidden.shape[1] < 1 or hidden.shape[0] < 1:
            raise ValueError(f"hidden states must have shape [B,T,{d}] with B, T >= 1, got {list(hidden.shape)}")

    # ----------------------------------------------------------------- decoder side
    def _decoder(self, name: str) -> Decoder:
        if name not in self.decoders:
            raise ValueError(f"unknown decoder {name!r}; use one of {DECODERS}")
        return self.decoders[name]

    def _max_new(self, max_new_tokens: int | None) -> int:
        limit = self.config.max_caption_tokens
        if max_new_tokens is None:
            return limit
        if not 1 <= max_new_tokens <= limit:
            raise ValueError(f"max_new_tokens must be within [1, {limit}], got {max_new_tokens}")
        return max_new_tokens

    def _features(self, features: torch.Tensor) -> torch.Tensor:
        self._check_hidden(features)
        return features.to(self.dtype)

    def generate(self, features: torch.Tensor, decoder: str = "large", max_new_tokens: int | None = None) -> list[list[int]]:
        """Greedy, KV-cached decoding; each row ends with the end token unless the limit cut it."""
        dec = self._decoder(decoder)
        max_new = self._max_new(max_new_tokens)
        with torch.inference_mode():
            memory = dec.project(self._features(features))
            start = torch.full((memory.shape[0], 1), self.config.bos_token_id, dtype=torch.long)
            return self._greedy(dec, memory, start, None, [[] for _ in range(memory.shape[0])], max_new)

    def draft(self, features: torch.Tensor, max_new_tokens: int | None = None) -> list[list[int]]:
        """The small decoder's greedy caption, used as drafts for `verify`."""
        return self.generate(features, decoder="small", max_new_tokens=max_new_tokens)

    def verify(self, features: torch.Tensor, drafts: Sequence[Sequence[int]], max_new_tokens: int | None = None) -> tuple[list[list[int]], list[int]]:
        """Check drafts with the large decoder in one forward pass, keep the longest prefix it agrees
        with plus its own next token, then finish greedily.  Returns (ids, accepted draft tokens);
        ids equal `generate(features, "large")`."""
        max_new = self._max_new(max_new_tokens)
        eos, vocab = self.config.eos_token_id, self.config.vocab_size
        features = self._features(features)
        batch = features.shape[0]
        if len(drafts) != batch:
            raise ValueError(f"got {len(drafts)} drafts for a batch of {batch} feature rows")
        clean = []
        for row in drafts:
            row = [int(t) for t in row]
            bad = [t for t in row if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"draft token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
            if eos in row:  # nothing after the end token can matter
                row = row[: row.index(eos) + 1]
            clean.append(row[:max_new])  # the target never exceeds max_new tokens
        dec = self.decoders["large"]
        with torch.inference_mode():
            memory = dec.project(features)
            width = max(len(r) for r in clean)
            tokens = torch.full((batch, 1 + width), self.config.pad_token_id, dtype=torch.long)
            tokens[:, 0] = self.config.bos_token_id
            for i, row in enumerate(clean):
                tokens[i, 1 : 1 + len(row)] = torch.tensor(row, dtype=torch.long)
            # Right padding is harmless: attention is causal, so position j only sees tokens <= j.
            mask = torch.ones_like(tokens)  # explicit, so transformers does not warn about the padding
            out = dec.lm(input_ids=tokens, attention_mask=mask, encoder_hidden_states=memory, use_cache=True)
            predicted = out.logits.argmax(-1)  # predicted[:, j] follows tokens[:, : j + 1]
            results, accepted = [], []
            for i, row in enumerate(clean):
                a = 0
                while a < len(row) and row[a] == int(predicted[i, a]):
                    a += 1
                ids = row[:a]
                accepted.append(a)
                if (ids and ids[-1] == eos) or len(ids) >= max_new:
                    results.append(ids)
                    continue
                ids.append(int(predicted[i, a]))
                if ids[-1] == eos or len(ids) >= max_new:
                    results.append(ids)
                    continue
                cache = out.past_key_values
                if batch > 1:
                    cache = copy.deepcopy(cache)
                    cache.batch_select_indices(torch.tensor([i]))
                cache.crop(-(width - a))  # keep BOS + the accepted draft tokens
                nxt = torch.tensor([[ids[-1]]], dtype=torch.long)
                results.append(self._greedy(dec, memory[i : i + 1], nxt, cache, [ids], max_new)[0])
            return results, accepted

    def _greedy(self, dec: Decoder, memory, inputs, cache, produced: list[list[int]], max_new: int) -> list[list[int]]:
        """Extend `produced` greedily: feed `inputs` [B,P] on top of `cache` until the end token."""
        eos = self.config.eos_token_id
        done = [bool(p) and (p[-1] == eos or len(p) >= max_new) for p in produced]
        while not all(done):
            out = dec.lm(input_ids=inputs, encoder_hidden_states=memory, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
            for i, token in enumerate(nxt.tolist()):
                if not done[i]:
                    produced[i].append(token)
                    done[i] = token == eos or len(produced[i]) >= max_new
            inputs = nxt.unsqueeze(1)
        return produced

    # ----------------------------------------------------------------- text
    def decode_text(self, ids: Sequence[int]) -> str:
        """Caption text of token ids (special tokens dropped)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def encode_text(self, caption: str) -> list[int]:
        """Token ids of a caption followed by the end token."""
        ids = self.tokenizer(caption, add_special_tokens=False)["input_ids"]
        if self.tokenizer.unk_token_id in ids:
            raise ValueError(f"caption {caption!r} has words outside the vocabulary")
        return ids + [self.config.eos_token_id]

    def caption(self, images, decoder: str = "large") -> list[str]:
        """Captions of images (PIL RGB or uint8 [B,H,W,3]) with one decoder."""
        features = self.encode(self.preprocess(images))
        return [self.decode_text(ids) for ids in self.generate(features, decoder)]

    def parameter_counts(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"encoder": count(self.encoder), **{n: count(self.decoders[n]) for n in DECODERS}}


def _images_to_array(images, size: int) -> np.ndarray:
    """Validate images and stack them into uint8 [B,size,size,3]."""
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"image array must be uint8 [B,H,W,3], got shape {list(images.shape)}")
        if images.dtype != np.uint8:
            raise ValueError(f"image array must have dtype uint8, got {images.dtype}")
        if images.shape[0] == 0:
            raise ValueError("empty batch: give at least one image")
        if images.shape[1:3] != (size, size):
            raise ValueError(f"images must be {size}x{size} pixels, got {images.shape[2]}x{images.shape[1]}")
        return np.ascontiguousarray(images)
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"images must be a list of PIL images or a uint8 array, got {type(images).__name__}")
    if not images:
        raise ValueError("empty batch: give at least one image")
    arrays = []
    for i, image in enumerate(images):
        if isinstance(image, np.ndarray):
            arrays.append(_images_to_array(image, size)[0] if image.ndim == 3 else None)
            if arrays[-1] is None:
                raise ValueError(f"image {i}: array must be uint8 [H,W,3], got shape {list(image.shape)}")
            continue
        mode = getattr(image, "mode", None)
        if mode is None:
            raise ValueError(f"image {i}: expected a PIL image or array, got {type(image).__name__}")
        if mode != "RGB":
            raise ValueError(f"image {i}: mode {mode} is not supported; convert it with image.convert('RGB')")
        if image.size != (size, size):
            raise ValueError(f"image {i}: must be {size}x{size} pixels, got {image.size[0]}x{image.size[1]}")
        arrays.append(np.asarray(image, dtype=np.uint8))
    return np.stack(arrays)


def default_tokenizer():
    from aiflow.model import scenes
    from aiflow.model.tokenizer import build_tokenizer

    return build_tokenizer(scenes.vocabulary())


def random_family(seed: int = 0, config: FamilyConfig | None = None) -> CaptionFamily:
    """A freshly initialised family (deterministic in `seed`) with the scene vocabulary."""
    tokenizer = default_tokenizer()
    if config is None:
        config = FamilyConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {config.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    configure_threads()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = build_encoder(config)
        decoders = {name: build_decoder(config, name) for name in DECODERS}
    return CaptionFamily(config, encoder, decoders, tokenizer)


def load_family(path: str | Path | None = None) -> CaptionFamily:
    """The bundled trained family (default) or a local VisionEncoderDecoderModel checkpoint directory."""
    from aiflow.model.checkpoint import load_checkpoint

    return load_checkpoint(path)
