"""Deterministic training of the caption family on generated scenes, and its evaluation.

Training has two phases: the main one on a pool of generated scenes (cycled), then a short
fine-tune at a low learning rate on scenes never seen before.  Both decoders learn from the same
encoder features (the small one on detached features, so the
encoder serves the large decoder).  To make a compressed split cheap in quality, the encoder is
trained with the split's damage: at a random layer, tokens are pruned to CLS + top-K (K random) with
the same `select_tokens` the pruning codec uses, and hidden states get int8 rounding noise (per
sample and channel, like the int8 codec) before the remaining layers run.
"""

from __future__ import annotations

import io
import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from aiflow.model import scenes
from aiflow.model.family import CaptionFamily, random_family

AUGMENT_PROBABILITY = 0.7  # share of batches trained through a simulated compressed split
AUGMENT_FROM = 0.3  # ... once this share of the steps is done: first learn the task, then robustness
MIN_KEEP = 12  # fewest patch tokens kept by training-time pruning
FINETUNE_WARMUP = 50


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 5000
    seed: int = 0  # model initialisation and augmentation choices
    data_seed: int = 0  # the generated scenes
    batch_size: int = 32
    pool_size: int = 10000  # training scenes, generated once and cycled
    learning_rate: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    threads: int = 1
    finetune_steps: int = 800
    finetune_pool_size: int = 4000  # fresh scenes after the main pool
    finetune_learning_rate: float = 5e-4
    eval_count: int = 500  # held-out scenes scored at the end
    probe_every: int = 500  # log held-out exact match every N steps (0: never); no effect on the weights
    # The learned codec's bottlenecks ("C:L": C channels at split layer L), trained after the family
    # on the frozen family; `bottleneck_rate_weight` is the rate knob (loss per bit per image).
    bottlenecks: tuple[str, ...] = ("16:4",)
    bottleneck_steps: int = 3000
    bottleneck_pool_size: int = 8000  # fresh scenes after the fine-tune pool
    bottleneck_learning_rate: float = 3e-3
    bottleneck_rate_weight: float = 2e-5
    bottleneck_distill_weight: float = 1.0  # KL to the large decoder on uncompressed features


def simulate_int8(hidden: torch.Tensor) -> torch.Tensor:
    """Round to int8 with one scale per sample and channel; gradients pass straight through."""
    scale = hidden.detach().abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0
    rounded = torch.round(hidden.detach() / scale).clamp(-127, 127) * scale
    return hidden + (rounded - hidden.detach())


def compressed_features(family: CaptionFamily, pixels: torch.Tensor, split: int, keep: int | None, int8: bool) -> torch.Tensor:
    """Encoder features through a split at layer `split` with token pruning and/or int8 rounding."""
    hidden = family.encode_layers(family.embed(pixels), 0, split)
    if keep is not None:
        hidden, _ = family.select_tokens(hidden, keep)
    if int8:
        hidden = simulate_int8(hidden)
    return family.finish(family.encode_layers(hidden, split, family.num_layers))


def caption_batch(family: CaptionFamily, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs [BOS, words..., EOS, PAD...] and labels (PAD -> -100) for teacher forcing."""
    cfg = family.config
    encoded = [family.encode_text(c) for c in captions]
    width = 1 + max(len(e) for e in encoded)
    ids = torch.full((len(captions), width), cfg.pad_token_id, dtype=torch.long)
    ids[:, 0] = cfg.bos_token_id
    for i, e in enumerate(encoded):
        ids[i, 1 : 1 + len(e)] = torch.tensor(e)
    labels = ids.clone()
    labels[:, 1:][ids[:, 1:] == cfg.pad_token_id] = -100
    return ids, labels


def _optimise(optimizer, schedule, loss: torch.Tensor, parameters) -> None:
    """One step: gradients of `loss`, clipped to norm 1, then the optimizer and its schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    schedule.step()


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Phase:
    """One training phase: its scene pool, schedule and seed."""

    name: str
    first_scene: int  # scenes first_scene .. first_scene + pool - 1 of the training split
    pool: int
    steps: int
    learning_rate: float
    warmup: int
    augment_from: int  # step from which compressed-split augmentation is used
    seed: int


def training_phases(cfg: TrainConfig) -> list[Phase]:
    main = Phase("main", 0, cfg.pool_size, cfg.steps, cfg.learning_rate, cfg.warmup_steps,
                  int(AUGMENT_FROM * cfg.steps), cfg.seed)
    # Fine-tuning on scenes never seen before: the main phase has fit its pool, and the remaining
    # errors (small shapes) shrink with fresh examples at a low learning rate.
    tune = Phase("finetune", cfg.pool_size, cfg.finetune_pool_size, cfg.finetune_steps,
                  cfg.finetune_learning_rate, FINETUNE_WARMUP, 0, cfg.seed + 1)
    return [main, tune] if cfg.finetune_steps else [main]


def bottleneck_specs(cfg: TrainConfig, layers: int | None = None) -> list[tuple[int, int]]:
    """(channels, layer) of every bottleneck the config trains; ValueError for a malformed entry."""
    out = []
    for spec in cfg.bottlenecks:
        channels, _, layer = str(spec).partition(":")
        try:
            pair = (int(channels), int(layer))
        except ValueError:
            raise ValueError(f"bottleneck {spec!r} must be CHANNELS:LAYER, e.g. 8:4") from None
        if pair[0] < 1 or pair[1] < 0 or layers is not None and pair[1] > layers:
            raise ValueError(f"bottleneck {spec!r}: channels must be >= 1 and the layer within 0..{layers}")
        out.append(pair)
    return out


def train_family(cfg: TrainConfig, log: Callable[[str], None] = print) -> tuple[CaptionFamily, dict]:
    """Train a family from scratch; the same config (and thread count) gives the same weights."""
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    family = random_family(cfg.seed)
    record = {}
    for phase in training_phases(cfg):
        family, record[phase.name] = train_phase(family, cfg, phase, log)
    record.update(train_bottlenecks(family, cfg, log))
    record = {
        "train_seconds": round(sum(r["train_seconds"] for r in record.values()), 1),
        "total_seconds": round(sum(r["total_seconds"] for r in record.values()), 1),
        "phases": record,
    }
    return family, record


def train_phase(family: CaptionFamily, cfg: TrainConfig, phase: Phase, log: Callable[[str], None] = print) -> tuple[CaptionFamily, dict]:
    """One phase of training: its own scene pool, optimizer, schedule and random choices."""
    torch.set_num_threads(cfg.threads)  # random_family caps threads for serving; training wants cfg.threads
    torch.use_deterministic_algorithms(True)
    choices = random.Random(phase.seed)
    started = time.monotonic()
    images, captions = scenes.make_batch(cfg.data_seed, phase.first_scene, phase.pool, "train")
    log(f"{phase.name}: generated {phase.pool} training scenes in {time.monotonic() - started:.0f} s")
    order_gen = torch.Generator().manual_seed(phase.seed)

    decay = [p for n, p in family.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in family.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=phase.learning_rate,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, phase.steps, phase.warmup))
    large, small = family.decoders["large"], family.decoders["small"]
    order = torch.randperm(phase.pool, generator=order_gen)
    cursor = 0
    train_started = time.monotonic()
    family.train()
    for step in range(phase.steps):
        if cursor + cfg.batch_size > phase.pool:
            order, cursor = torch.randperm(phase.pool, generator=order_gen), 0
        index = order[cursor : cursor + cfg.batch_size].numpy()
        cursor += cfg.batch_size
        pixels = family.preprocess(images[index])
        ids, labels = caption_batch(family, [captions[i] for i in index])

        if choices.random() < AUGMENT_PROBABILITY and step >= phase.augment_from:
            split = choices.randint(0, family.num_layers)
            keep = choices.randint(MIN_KEEP, family.config.num_tokens - 1) if choices.random() < 0.7 else None
            int8 = choices.random() < 0.7
            features = compressed_features(family, pixels, split, keep, int8)
        else:
            features = family.encode(pixels)
        mask = torch.ones_like(ids)
        loss_large = large.lm(input_ids=ids, attention_mask=mask, encoder_hidden_states=large.project(features), labels=labels).loss
        loss_small = small.lm(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=small.project(features.detach()), labels=labels
        ).loss
        _optimise(optimizer, schedule, loss_large + loss_small, family.parameters())
        if step % 50 == 0 or step == phase.steps - 1:
            log(
                f"{phase.name}: step {step:5d}  loss large {loss_large.item():.4f}  small {loss_small.item():.4f}  "
                f"lr {schedule.get_last_lr()[0]:.2e}  {time.monotonic() - train_started:.0f} s"
            )
        if cfg.probe_every and step and step % cfg.probe_every == 0:
            family.eval()
            log(f"{phase.name}: step {step:5d}  exact match {_probe(family, cfg.data_seed)}")
            family.train()
    family.eval()
    record = {
        "steps": phase.steps,
        "scenes": [phase.first_scene, phase.first_scene + phase.pool],
        "train_seconds": round(time.monotonic() - train_started, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "final_loss": {"large": round(loss_large.item(), 5), "small": round(loss_small.item(), 5)},
    }
    return family, record


def train_bottlenecks(family: CaptionFamily, cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """The bottleneck phase: every bottleneck of `cfg.bottlenecks` on the frozen family; returns the
    phase records by name (`bottleneck 8:4`). Deterministic: same family, config and threads give
    the same bottleneck weights and tables."""
    records = {}
    if not cfg.bottleneck_steps:
        return records
    for channels, layer in bottleneck_specs(cfg, family.num_layers):
        name = f"bottleneck {channels}:{layer}"
        family.bottlenecks[(channels, layer)], records[name] = train_bottleneck(family, cfg, channels, layer, log)
    return records


def train_bottleneck(family: CaptionFamily, cfg: TrainConfig, channels: int, layer: int, log: Callable[[str], None] = print):
    """Train one bottleneck at split layer `layer` on the frozen family: caption cross-entropy of both
    decoders on the reconstructed features, plus KL to the large decoder on the uncompressed ones,
    plus `bottleneck_rate_weight` x bits per image under the learned prior."""
    from aiflow.model.bottleneck import Bottleneck

    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    seed = cfg.seed + 100 + 10 * channels + layer
    torch.manual_seed(seed)
    name = f"bottleneck {channels}:{layer}"
    started = time.monotonic()
    first = cfg.pool_size + cfg.finetune_pool_size
    pool = cfg.bottleneck_pool_size
    images, captions = scenes.make_batch(cfg.data_seed, first, pool, "train")
    was_training = family.training
    family.eval()
    with torch.inference_mode():  # the frozen encoder before the split: computed once per scene
        cached = torch.cat([family.encode_layers(family.embed(family.preprocess(images[i : i + 200])), 0, layer) for i in range(0, pool, 200)])
    cached = cached.clone()
    log(f"{name}: {pool} training scenes through layers [0, {layer}) in {time.monotonic() - started:.0f} s")
    frozen = [p for p in family.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    bn = Bottleneck(family.config.hidden_size, channels, layer)
    optimizer = torch.optim.Adam(bn.parameters(), lr=cfg.bottleneck_learning_rate)
    warmup = 50
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg.bottleneck_steps, warmup))
    order_gen = torch.Generator().manual_seed(seed)
    large, small = family.decoders["large"], family.decoders["small"]
    train_started = time.monotonic()
    family.train()  # gradients flow through the frozen modules to the bottleneck (no dropout here)
    bn.train()
    try:
        for step in range(cfg.bottleneck_steps):
            index = torch.randint(0, pool, (cfg.batch_size,), generator=order_gen)
            hidden = cached[index]
            rebuilt, bits = bn(hidden)
            features = family.finish(family.encode_layers(rebuilt, layer, family.num_layers))
            ids, labels = caption_batch(family, [captions[i] for i in index.tolist()])
            mask = torch.ones_like(ids)
            out_large = large.lm(input_ids=ids, attention_mask=mask, encoder_hidden_states=large.project(features), labels=labels)
            loss_small = small.lm(input_ids=ids, attention_mask=mask, encoder_hidden_states=small.project(features), labels=labels).loss
            loss = out_large.loss + 0.5 * loss_small + cfg.bottleneck_rate_weight * bits.mean()
            distill = torch.zeros(())
            if cfg.bottleneck_distill_weight:
                with torch.no_grad():
                    teacher = family.finish(family.encode_layers(hidden, layer, family.num_layers))
                    target = large.lm(input_ids=ids, attention_mask=mask, encoder_hidden_states=large.project(teacher)).logits
                tokens = (labels != -100).float()
                kl = torch.nn.functional.kl_div(out_large.logits.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="none")
                distill = (kl.sum(-1) * tokens).sum() / tokens.sum()
                loss = loss + cfg.bottleneck_distill_weight * distill
            _optimise(optimizer, schedule, loss, bn.parameters())
            if step % 100 == 0 or step == cfg.bottleneck_steps - 1:
                log(
                    f"{name}: step {step:5d}  loss large {out_large.loss.item():.4f}  small {loss_small.item():.4f}  "
                    f"distill {distill.item():.4f}  bits/image {bits.mean().item():.0f}  {time.monotonic() - train_started:.0f} s"
                )
    finally:
        for p in frozen:
            p.requires_grad_(True)
        family.train(was_training)
    bn.eval()
    bn.freeze_tables()
    record = {
        "steps": cfg.bottleneck_steps,
        "scenes": [first, first + pool],
        "channels": channels,
        "layer": layer,
        "rate_weight": cfg.bottleneck_rate_weight,
        "train_seconds": round(time.monotonic() - train_started, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "final_loss": {"large": round(out_large.loss.item(), 5), "small": round(loss_small.item(), 5), "bits_per_image": round(bits.mean().item(), 1)},
    }
    return bn, record


def _probe(family: CaptionFamily, data_seed: int, count: int = 100) -> dict[str, float]:
    """Quick exact match (%) of both decoders on training and held-out scenes."""
    result = {}
    for split in scenes.SPLITS:
        images, captions = scenes.make_batch(data_seed + 1, 0, count, split)
        features = family.encode(family.preprocess(images))
        for name in ("large", "small"):
            hits = [family.decode_text(i) == c for i, c in zip(family.generate(features, name), captions)]
            result[f"{split}/{name}"] = round(100 * float(np.mean(hits)), 1)
    return result


def evaluate_family(family: CaptionFamily, data_seed: int, count: int, split: str = "heldout", batch: int = 100) -> dict:
    """Held-out scores of both decoders, speculative decoding and a compressed split."""
    from aiflow.model.quality import score

    refs, preds = [], {"large": [], "small": [], "speculative": [], "split2_top24_int8": [], "split0_top16_int8": []}
    drafted = accepted = 0
    identical = True
    for start in range(0, count, batch):
        n = min(batch, count - start)
        images, captions = scenes.make_batch(data_seed, start, n, split)
        refs += captions
        with torch.inference_mode():
            pixels = family.preprocess(images)
            features = family.encode(pixels)
            large_ids = family.generate(features, "large")
            drafts = family.draft(features)
            verified, counts = family.verify(features, drafts)
            identical &= verified == large_ids
            drafted += sum(len(d) for d in drafts)
            accepted += sum(counts)
            preds["large"] += [family.decode_text(i) for i in large_ids]
            preds["small"] += [family.decode_text(i) for i in drafts]
            preds["speculative"] += [family.decode_text(i) for i in verified]
            for name, s, keep in (("split2_top24_int8", 2, 24), ("split0_top16_int8", 0, 16)):
                feats = compressed_features(family, pixels, min(s, family.num_layers), keep, True)
                preds[name] += [family.decode_text(i) for i in family.generate(feats, "large")]
    scores = {name: _rounded(score(p, refs).as_dict()) for name, p in preds.items()}
    scores["speculative"]["identical_to_large"] = bool(identical)
    scores["speculative"]["draft_acceptance"] = round(accepted / max(1, drafted), 4)
    return scores


def _rounded(d: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def image_sizes(data_seed: int, count: int = 100, split: str = "heldout") -> dict:
    """Median PNG and JPEG (quality 90) sizes in bytes of generated scenes."""
    from PIL import Image

    png, jpeg = [], []
    images, _ = scenes.make_batch(data_seed, 0, count, split)
    for image in images:
        for fmt, sizes, kwargs in (("PNG", png, {}), ("JPEG", jpeg, {"quality": 90})):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, fmt, **kwargs)
            sizes.append(buf.tell())
    return {"png_median_bytes": int(np.median(png)), "jpeg90_median_bytes": int(np.median(jpeg)), "count": count}


def train_and_save(cfg: TrainConfig, out_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """Train, evaluate on the held-out split, write the checkpoint and its manifest; returns the manifest."""
    family, record = train_family(cfg, log)
    return save_trained(family, cfg, record, out_dir, log)


def save_trained(family: CaptionFamily, cfg: TrainConfig, record: dict, out_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """Score a trained family on the held-out split and write it with its manifest."""
    import transformers

    from aiflow.model.checkpoint import MANIFEST_FILE, file_checksums, save_family

    log(f"evaluating on {cfg.eval_count} held-out scenes")
    scores = evaluate_family(family, cfg.data_seed, cfg.eval_count)
    out = Path(out_dir)
    save_family(family, out)
    manifest = {
        "trained": True,
        "config": family.config.to_dict(),
        "train": asdict(cfg),
        "data": {
            "generator": "aiflow.model.scenes",
            "data_seed": cfg.data_seed,
            "heldout_placements": sorted(f"{c} {s} at cell {i}" for c, s, i in scenes.HELDOUT_PLACEMENTS),
            "image_sizes": image_sizes(cfg.data_seed),
        },
        "parameters": family.parameter_counts(),
        **record,
        "heldout_scores": scores,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "sha256": file_checksums(out),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
