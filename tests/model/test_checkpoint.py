"""Loading families: the bundled trained weights and any VisionEncoderDecoderModel checkpoint directory."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, VisionEncoderDecoderModel, ViTConfig, ViTModel

from aiflow.model import scenes
from aiflow.model.checkpoint import (
    DRAFT_DIR,
    WEIGHTS_DIR,
    CheckpointError,
    read_manifest,
    save_family,
    verify_checksums,
)
from aiflow.model.family import load_family, random_family
from aiflow.model.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def pixels_and_captions():
    images, captions = scenes.make_batch(123, 0, 20, "heldout")
    return images, captions


@pytest.fixture(scope="module")
def user_checkpoint(tmp_path_factory):
    """A tiny VisionEncoderDecoderModel saved the standard way, decoder narrower than the encoder."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(scenes.vocabulary())
    encoder = ViTModel(ViTConfig(image_size=96, patch_size=32, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64))
    decoder = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=40, n_embd=24, n_layer=1,
                                         n_head=2, add_cross_attention=True))
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    path = tmp_path_factory.mktemp("user_ved")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def test_a_saved_vision_encoder_decoder_loads_as_a_family(user_checkpoint, pixels_and_captions):
    path, model = user_checkpoint
    family = load_family(path)
    assert family.num_layers == 2 and family.config.hidden_size == 32 and family.config.large_hidden == 24
    assert family.decoders["small"] is family.decoders["large"]  # no draft decoder: large drafts too
    pixels = family.preprocess(pixels_and_captions[0][:3])
    with torch.inference_mode():
        reference = model.encoder(pixel_values=pixels).last_hidden_state
        features = family.encode(pixels)
        torch.testing.assert_close(features, reference, rtol=1e-5, atol=1e-5)
        ids = torch.tensor([[family.config.bos_token_id, 5, 9, 7]] * 3)
        expected = model(pixel_values=pixels, decoder_input_ids=ids).logits
        large = family.decoders["large"]
        logits = large.lm(input_ids=ids, encoder_hidden_states=large.project(features)).logits
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
        generated = family.generate(features, max_new_tokens=8)
    verified, _ = family.verify(features, family.draft(features, max_new_tokens=8), max_new_tokens=8)
    assert verified == generated
    assert all(1 <= len(ids) <= 8 for ids in generated)


def test_save_and_load_round_trip_keeps_outputs(tmp_path, pixels_and_captions):
    family = random_family(seed=3)
    save_family(family, tmp_path)
    loaded = load_family(tmp_path)
    assert loaded.config == family.config
    pixels = family.preprocess(pixels_and_captions[0][:2])
    features = family.encode(pixels)
    torch.testing.assert_close(loaded.encode(pixels), features)
    for decoder in ("small", "large"):
        assert loaded.generate(features, decoder) == family.generate(features, decoder)


def test_unusable_checkpoints_are_explained(tmp_path, user_checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_family(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_family(tmp_path)
    path, _ = user_checkpoint
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(path, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_family(no_tokenizer)
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot load"):
        load_family(broken)


def test_draft_decoder_without_its_projection_is_refused(tmp_path):
    save_family(random_family(seed=1), tmp_path)
    (tmp_path / DRAFT_DIR / "enc_to_dec_proj.safetensors").unlink()
    with pytest.raises(CheckpointError, match="enc_to_dec_proj"):
        load_family(tmp_path)


def test_bundled_weights_match_their_manifest():
    manifest = read_manifest()
    assert manifest["trained"], "bundled weights are untrained; run `aiflow train` and install them"
    assert verify_checksums() == []
    scores = manifest["heldout_scores"]
    assert scores["large"]["exact_match"] >= 95
    assert scores["small"]["exact_match"] < scores["large"]["exact_match"]
    assert scores["speculative"]["identical_to_large"]
    assert sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file()) < 8_000_000


def test_bundled_weights_caption_fresh_heldout_scenes(pixels_and_captions):
    family = load_family()
    images, captions = pixels_and_captions
    predicted = family.caption(images)
    assert sum(p == c for p, c in zip(predicted, captions)) >= 18  # of 20 unseen scenes
