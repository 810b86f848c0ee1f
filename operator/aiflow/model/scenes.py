"""Synthetic captioning scenes: camera-like images of 1-3 shapes with unambiguous captions.

Objects sit in distinct cells of a 3x3 grid (small jitter), so "same row" / "same column" and the
left/right/above relations are always decidable with a wide margin, and sizes are clearly apart.
A caption names the objects in reading order (top row first, then left to right) and links each
consecutive pair with its relation, e.g. "a large red circle left of a small blue cross".

The held-out split puts colour-shape pairs at grid cells where they never occur in the training
split, so scores on it measure generalisation rather than memory.  Every image is a pure function of
(seed, split, index).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
GRID = 3
SPLITS = ("train", "heldout")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 220),
    "yellow": (235, 215, 35),
    "purple": (135, 50, 185),
    "orange": (245, 135, 25),
    "cyan": (35, 205, 215),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Diameter as a fraction of a grid cell: small and large are ~2x apart, so size is never in doubt.
SIZES = {"small": 0.42, "large": 0.76}
# Centre jitter as a fraction of a cell: keeps rows/columns separated by >= 0.5 cell.
JITTER = 0.1
OBJECT_COUNT_WEIGHTS = {1: 0.2, 2: 0.4, 3: 0.4}

PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
# Held out: each colour-shape pair has one grid cell where it never appears in training (spread so
# every cell holds ~3 of them and a colour's cells differ).  Every pair and every cell is seen in
# training; a held-out scene shows at least one pair at its unseen place.  The captions' word
# statistics are the same in both splits, so the held-out score measures visual generalisation.
HELDOUT_PLACEMENTS = frozenset((c, s, (i * 4) % (GRID * GRID)) for i, (c, s) in enumerate(PAIRS))

RELATION_WORDS = ("left of", "above", "above and left of", "above and right of")


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    row: int
    col: int
    cx: float  # centre in pixels
    cy: float
    diameter: float

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in reading order
    caption: str


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order."""
    words = ["a", *SIZES, *COLOURS, *SHAPES]
    for relation in RELATION_WORDS:
        words.extend(w for w in relation.split() if w not in words)
    return words


def relation(a: SceneObject, b: SceneObject) -> str:
    """Relation of `a` to the next object `b` in reading order."""
    if a.row == b.row:
        return "left of"
    if a.col == b.col:
        return "above"
    return "above and left of" if a.col < b.col else "above and right of"


def caption_for(objects: tuple[SceneObject, ...]) -> str:
    parts = [objects[0].phrase]
    for a, b in zip(objects, objects[1:]):
        parts += [relation(a, b), b.phrase]
    return " ".join(parts)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS.index(split), int(index)])


def sample_scene(rng: np.random.Generator, split: str, image_size: int = IMAGE_SIZE) -> Scene:
    """Lay out a scene: object attributes, grid cells and pixel positions."""
    _check_split(split)
    counts = list(OBJECT_COUNT_WEIGHTS)
    n = int(rng.choice(counts, p=list(OBJECT_COUNT_WEIGHTS.values())))
    cells = [int(c) for c in rng.choice(GRID * GRID, size=n, replace=False)]
    pairs = []
    for c in cells:
        allowed = PAIRS if split == "heldout" else [p for p in PAIRS if (*p, c) not in HELDOUT_PLACEMENTS]
        pairs.append(allowed[rng.integers(len(allowed))])
    if split == "heldout":
        k = int(rng.integers(n))  # at least one object, at a random place, is at an unseen place
        unseen = [p for p in PAIRS if (*p, cells[k]) in HELDOUT_PLACEMENTS]
        pairs[k] = unseen[rng.integers(len(unseen))]
    cell = image_size / GRID
    objects = []
    for (colour, shape), c in zip(pairs, cells):
        size = ("small", "large")[rng.integers(2)]
        row, col = divmod(c, GRID)
        jx, jy = rng.uniform(-JITTER, JITTER, size=2) * cell
        diameter = SIZES[size] * cell * rng.uniform(0.95, 1.05)
        objects.append(
            SceneObject(
                colour, shape, size, row, col,
                cx=(col + 0.5) * cell + jx, cy=(row + 0.5) * cell + jy, diameter=diameter,
            )
        )
    objects.sort(key=lambda o: (o.row, o.col))
    ordered = tuple(objects)
    return Scene(ordered, caption_for(ordered))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted gradient plus low-frequency texture, like a photographed table top."""
    base = rng.uniform(85, 165)
    tint = rng.uniform(-18, 18, size=3)
    c0 = base + tint
    c1 = c0 + rng.uniform(-40, 40) + rng.uniform(-8, 8, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    texture = np.zeros((size, size))
    for cells, amplitude in ((8, 9.0), (size // 4, 5.0)):  # blotches and fine grain
        coarse = rng.normal(0, amplitude, size=(cells, cells)).astype(np.float32)
        texture += np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
    return img + texture[..., None]


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, colour: tuple[int, ...], scale: int) -> None:
    cx, cy, r = obj.cx * scale, obj.cy * scale, obj.diameter * scale / 2
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif obj.shape == "square":
        s = r * 0.88  # equal visual area to the circle, roughly
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=colour)
    elif obj.shape == "cross":
        w = r * 0.36
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(scene: Scene, rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Render a scene to a uint8 [H, W, 3] array: antialiased shapes, lighting, sensor noise."""
    scale = 4  # supersample for smooth edges, as a lens would give
    big = image_size * scale
    canvas = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        colour = np.clip(np.array(COLOURS[obj.colour]) + rng.integers(-14, 15, size=3), 0, 255)
        _draw(draw, obj, (*map(int, colour), 255), scale)
    layer = np.asarray(canvas.resize((image_size, image_size), Image.LANCZOS), dtype=np.float64)
    alpha = np.clip(layer[..., 3:4] / 255.0, 0, 1)
    img = _background(rng, image_size)
    img = img * (1 - alpha) + layer[..., :3] * alpha
    # Uneven illumination and sensor noise (incompressible, like a real photograph).
    gain = rng.uniform(0.9, 1.1)
    img = img * gain + rng.normal(0, 4.0, size=img.shape)  # chroma noise
    img += rng.normal(0, 8.0, size=img.shape[:2])[..., None]  # luma noise, as sensors mostly show
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_scene(seed: int, index: int, split: str = "train", image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, Scene]:
    """Image and scene number `index` of a split; a pure function of its arguments."""
    rng = _rng(seed, split, index)
    scene = sample_scene(rng, split, image_size)
    return render_scene(scene, rng, image_size), scene


def make_batch(seed: int, start: int, count: int, split: str = "train", image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str]]:
    """Images [count, H, W, 3] uint8 and captions of scenes start..start+count-1."""
    images, captions = [], []
    for index in range(start, start + count):
        image, scene = make_scene(seed, index, split, image_size)
        images.append(image)
        captions.append(scene.caption)
    return np.stack(images), captions


CAPTIONS_FILE = "captions.json"


def write_dataset(out_dir: str | Path, seed: int, count: int, split: str = "heldout") -> Path:
    """Write `count` scenes as PNG files plus `captions.json` ({file: caption}) into `out_dir`."""
    _check_split(split)
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    captions = {}
    for index in range(count):
        image, scene = make_scene(seed, index, split)
        name = f"{split}_{seed}_{index:05d}.png"
        Image.fromarray(image).save(out / name)
        captions[name] = scene.caption
    meta = {"seed": seed, "split": split, "count": count, "image_size": IMAGE_SIZE, "captions": captions}
    path = out / CAPTIONS_FILE
    path.write_text(json.dumps(meta, indent=1) + "\n")
    return path


def read_captions(data_dir: str | Path) -> dict[str, str]:
    """The {file name: reference caption} map written by `write_dataset`."""
    path = Path(data_dir) / CAPTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; create it with `aiflow data generate`")
    return dict(json.loads(path.read_text())["captions"])
