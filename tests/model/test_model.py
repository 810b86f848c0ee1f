"""The caption family: split encoder == monolithic encoder; speculative verify == large greedy; input errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from aiflow.model import scenes
from aiflow.model.family import load_family, random_family


@pytest.fixture(scope="module")
def family():
    return load_family()


@pytest.fixture(scope="module")
def heldout():
    # seed 99: scenes that neither training nor the manifest's evaluation used
    return scenes.make_batch(99, 0, 12, "heldout")


@pytest.fixture(scope="module")
def features(family, heldout):
    return family.encode(family.preprocess(heldout[0]))


def test_encoder_split_at_every_layer_equals_the_whole_encoder(family, heldout):
    pixels = family.preprocess(heldout[0][:4])
    whole = family.encode(pixels)
    assert whole.shape == (4, family.config.num_tokens, family.config.hidden_size)
    for split in range(family.num_layers + 1):
        head = family.encode_layers(family.embed(pixels), 0, split)
        tail = family.finish(family.encode_layers(head, split, family.num_layers))
        torch.testing.assert_close(tail, whole, rtol=1e-5, atol=1e-5)


def test_pruned_tokens_keep_cls_and_run_through_the_rest_of_the_encoder(family, heldout):
    hidden = family.encode_layers(family.embed(family.preprocess(heldout[0][:3])), 0, 2)
    kept, index = family.select_tokens(hidden, 10)
    assert kept.shape == (3, 11, family.config.hidden_size)
    assert (index[:, 0] == 0).all() and (index.diff(dim=1) > 0).all()
    importance = family.token_importance(hidden)
    assert torch.isinf(importance[:, 0]).all()
    for row in range(3):  # the kept patches are the most important ones
        assert importance[row, index[row, 1:]].min() >= importance[row, 1:].topk(10).values.min()
    torch.testing.assert_close(kept, hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])))
    features = family.finish(family.encode_layers(kept, 2, family.num_layers))
    assert features.shape == (3, 11, family.config.hidden_size)
    assert len(family.generate(features)) == 3


def test_verify_of_small_drafts_equals_large_greedy(family, features):
    large = family.generate(features, "large")
    drafts = family.draft(features)
    verified, accepted = family.verify(features, drafts)
    assert verified == large
    assert all(0 <= a <= len(d) for a, d in zip(accepted, drafts))
    for ids, draft, a in zip(large, drafts, accepted):  # accepted = common prefix length
        assert draft[:a] == ids[:a]
        assert a == len(draft) or a == len(ids) or draft[a] != ids[a]


def test_verify_equals_large_greedy_for_bad_drafts(family, features):
    large = family.generate(features, "large")
    rng = np.random.default_rng(0)
    vocab, eos = family.config.vocab_size, family.config.eos_token_id
    cases = {
        "empty": [[] for _ in large],
        "wrong": [rng.integers(4, vocab, size=len(ids)).tolist() for ids in large],
        "too long": [ids + rng.integers(0, vocab, size=40).tolist() for ids in large],
        "no end token": [ids[:-1] + [ids[-2]] * 30 for ids in large],
        "truncated": [ids[: len(ids) // 2] for ids in large],
        "early end": [ids[:2] + [eos] for ids in large],
        "exact": [list(ids) for ids in large],
    }
    for name, drafts in cases.items():
        verified, accepted = family.verify(features, drafts)
        assert verified == large, name
        if name == "exact":
            assert accepted == [len(ids) for ids in large]
        if name == "empty":
            assert accepted == [0] * len(large)


def test_verify_one_row_at_a_time_matches_the_batch(family, features):
    large = family.generate(features, "large")
    for row in (0, 5):
        ids, accepted = family.verify(features[row : row + 1], [large[row][:3]])
        assert ids == [large[row]] and accepted == [3]


def test_bundled_family_captions_heldout_scenes(family, heldout):
    images, captions = heldout
    large = family.caption(images)
    assert sum(p == c for p, c in zip(large, captions)) >= 10  # of 12 unseen scenes
    pil = [Image.fromarray(image) for image in images[:2]]
    assert family.caption(pil) == large[:2]


def test_bad_images_are_refused_with_a_reason(family):
    size = family.config.image_size
    good = np.zeros((size, size, 3), dtype=np.uint8)
    cases = [
        ([], "empty batch"),
        (np.zeros((0, size, size, 3), np.uint8), "empty batch"),
        (np.zeros((1, 64, 64, 3), np.uint8), f"{size}x{size}"),
        (good.astype(np.float32), "dtype uint8"),
        (np.zeros((1, size, size, 4), np.uint8), r"\[B,H,W,3\]"),
        ([Image.new("L", (size, size))], "convert it with image.convert"),
        ([Image.new("RGB", (size + 1, size))], f"{size}x{size}"),
        (["not an image"], "expected a PIL image"),
        (b"\x89PNG", "list of PIL images"),
    ]
    for images, message in cases:
        with pytest.raises(ValueError, match=message):
            family.preprocess(images)


def test_bad_tensors_and_arguments_are_refused(family, features):
    with pytest.raises(ValueError, match="layer range"):
        family.encode_layers(features, 0, family.num_layers + 1)
    with pytest.raises(ValueError, match=r"shape \[B,T,96\]"):
        family.encode_layers(features[..., :10], 0, 1)
    with pytest.raises(ValueError, match=r"\[B,3,96,96\]"):
        family.embed(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown decoder"):
        family.generate(features, "medium")
    with pytest.raises(ValueError, match="max_new_tokens"):
        family.generate(features, max_new_tokens=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        family.verify(features[:1], [[10_000]])
    with pytest.raises(ValueError, match="drafts for a batch"):
        family.verify(features[:2], [[]])
    with pytest.raises(ValueError, match="keep must be"):
        family.select_tokens(features, features.shape[1])


def test_training_is_deterministic_and_resumes_from_a_checkpoint(tmp_path):
    from aiflow.model.checkpoint import save_family
    from aiflow.model.train import TrainConfig, train_family, train_phase, training_phases

    quiet = lambda line: None  # noqa: E731
    cfg = TrainConfig(steps=3, pool_size=12, batch_size=4, warmup_steps=1, probe_every=0,
                      finetune_steps=2, finetune_pool_size=8,
                      bottlenecks=("4:2",), bottleneck_steps=3, bottleneck_pool_size=8)
    first, record = train_family(cfg, log=quiet)
    second, _ = train_family(cfg, log=quiet)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The bottleneck phase is deterministic too, and leaves the family's own weights alone.
    assert "bottleneck 4:2" in record["phases"]
    bn_a, bn_b = first.bottlenecks[(4, 2)].state_dict(), second.bottlenecks[(4, 2)].state_dict()
    assert all(torch.equal(bn_a[k], bn_b[k]) for k in bn_a)
    assert int(bn_a["tables"].sum(dim=1).unique()) == 1 << 16
    save_family(first, tmp_path / "with_bottleneck")
    loaded = load_family(tmp_path / "with_bottleneck").bottlenecks[(4, 2)].state_dict()
    assert all(torch.equal(bn_a[k], loaded[k]) for k in bn_a)
    untrained = random_family(cfg.seed).state_dict()
    assert any(not torch.equal(a[k], untrained[k]) for k in a)  # it did learn something

    # Fine-tuning a saved main-phase checkpoint gives the same weights as training in one go.
    main_only, _ = train_family(replace(cfg, finetune_steps=0, bottleneck_steps=0), log=quiet)
    save_family(main_only, tmp_path)
    resumed, _ = train_phase(load_family(tmp_path), cfg, training_phases(cfg)[1], log=quiet)
    c = resumed.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a if "pooler" not in k)
