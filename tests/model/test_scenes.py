"""The scene generator: deterministic, unambiguous captions, a held-out split of unseen combinations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from aiflow.cli import main
from aiflow.model import scenes

CELL = scenes.IMAGE_SIZE / scenes.GRID


def caption_from_geometry(objects) -> str:
    """Caption rebuilt from pixel positions only (no grid cells): rows are clusters of centres."""
    by_y = sorted(objects, key=lambda o: o.cy)
    rows: list[list] = []
    for obj in by_y:
        if rows and obj.cy - rows[-1][-1].cy < CELL / 2:
            rows[-1].append(obj)
        else:
            rows.append([obj])
    ordered = [o for row in rows for o in sorted(row, key=lambda o: o.cx)]
    parts = [ordered[0].phrase]
    for a, b in zip(ordered, ordered[1:]):
        if abs(a.cy - b.cy) < CELL / 2:
            rel = "left of"
        elif abs(a.cx - b.cx) < CELL / 2:
            rel = "above"
        else:
            rel = "above and left of" if a.cx < b.cx else "above and right of"
        parts += [rel, b.phrase]
    return " ".join(parts)


@pytest.fixture(scope="module")
def sample():
    return {split: [scenes.make_scene(7, i, split) for i in range(300)] for split in scenes.SPLITS}


def test_same_seed_same_scene_different_seed_different_scene():
    a_img, a = scenes.make_scene(3, 11, "train")
    b_img, b = scenes.make_scene(3, 11, "train")
    c_img, _ = scenes.make_scene(4, 11, "train")
    assert a == b and np.array_equal(a_img, b_img)
    assert not np.array_equal(a_img, c_img)
    # A scene does not depend on how many others are generated with it.
    batch, captions = scenes.make_batch(3, 10, 3, "train")
    assert np.array_equal(batch[1], a_img) and captions[1] == a.caption


@pytest.mark.parametrize("split", scenes.SPLITS)
def test_caption_is_decidable_from_the_geometry(sample, split):
    for _, scene in sample[split]:
        objs = scene.objects
        assert 1 <= len(objs) <= 3
        assert caption_from_geometry(objs) == scene.caption
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
                # same row/column within a quarter cell, different ones at least half a cell apart
                assert dy < CELL / 4 or dy > CELL / 2
                assert dx < CELL / 4 or dx > CELL / 2
                assert np.hypot(dx, dy) > (a.diameter + b.diameter) / 2  # no overlap
        small = [o.diameter for o in objs if o.size == "small"]
        large = [o.diameter for o in objs if o.size == "large"]
        assert all(s * 1.5 < CELL * scenes.SIZES["large"] for s in small)
        assert all(l > 1.5 * CELL * scenes.SIZES["small"] for l in large)


def test_image_shows_the_captioned_colours(sample):
    palette = {name: np.array(rgb, dtype=float) for name, rgb in scenes.COLOURS.items()}
    for image, scene in sample["train"][:100]:
        assert image.shape == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3) and image.dtype == np.uint8
        for obj in scene.objects:
            y, x = int(round(obj.cy)), int(round(obj.cx))
            seen = image[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0)
            nearest = min(palette, key=lambda n: np.linalg.norm(palette[n] - seen))
            assert nearest == obj.colour, (scene.caption, obj, seen)


def test_captions_use_the_vocabulary(sample):
    vocab = set(scenes.vocabulary())
    for split in scenes.SPLITS:
        for _, scene in sample[split]:
            assert set(scene.caption.split()) <= vocab


def test_heldout_placements_never_appear_in_training(sample):
    placement = lambda o: (o.colour, o.shape, o.row * scenes.GRID + o.col)  # noqa: E731
    train = [placement(o) for _, scene in sample["train"] for o in scene.objects]
    train += [placement(o) for i in range(300, 700) for o in scenes.make_scene(7, i, "train")[1].objects]
    assert not set(train) & scenes.HELDOUT_PLACEMENTS
    # every colour-shape pair and every cell is seen in training; only the placements are new
    assert {p[:2] for p in train} == set(scenes.PAIRS)
    assert {p[2] for p in train} == set(range(scenes.GRID**2))
    for _, scene in sample["heldout"]:
        assert any(placement(o) in scenes.HELDOUT_PLACEMENTS for o in scene.objects)


def test_images_are_photo_like_png_large_jpeg_moderate(sample):
    import io

    image, _ = sample["heldout"][0]
    png, jpeg = io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(png, "PNG")
    Image.fromarray(image).save(jpeg, "JPEG", quality=90)
    # sensor noise makes the lossless file big, as a photograph's would be
    assert png.tell() > 3 * jpeg.tell()
    assert png.tell() > 0.5 * image.size


def test_generate_command_writes_pngs_and_captions(tmp_path):
    assert main(["data", "generate", "--seed", "5", "--count", "3", "--out", str(tmp_path)]) == 0
    captions = scenes.read_captions(tmp_path)
    assert len(captions) == 3
    for name, caption in captions.items():
        image = np.asarray(Image.open(tmp_path / name))
        expected, scene = scenes.make_scene(5, int(name[-9:-4]), "heldout")
        assert np.array_equal(image, expected) and caption == scene.caption
    meta = json.loads((tmp_path / scenes.CAPTIONS_FILE).read_text())
    assert meta["seed"] == 5 and meta["split"] == "heldout"


def test_bad_generate_arguments_are_explained(tmp_path, capsys):
    assert main(["data", "generate", "--count", "0", "--out", str(tmp_path)]) == 2
    assert "--count must be at least 1" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["data", "generate", "--count", "1", "--out", str(blocker)]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown split"):
        scenes.write_dataset(tmp_path, 0, 1, "test")
    with pytest.raises(FileNotFoundError, match="aiflow data generate"):
        scenes.read_captions(tmp_path / "missing")
