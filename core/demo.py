"""A demo dataset of drawn shapes, for tests and for a first run with no data and no internet.

Each class is a shape drawn at a random place and size over a noisy background, in a hue of its own
(with jitter), so a small model learns it from scratch in a minute on a CPU. A few
files are deliberately put in the wrong class folder, so top losses and the cleaner have real
mistakes to find; their names are recorded in a hidden file (hidden files are not dataset items).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEMO_CLASSES = ("circle", "square", "triangle")
# A base colour per shape: what makes the demo learnable in a few epochs without pretrained weights.
SHAPE_COLOURS = {
    "circle": (230, 80, 60),
    "square": (70, 200, 90),
    "triangle": (70, 110, 235),
    "star": (235, 205, 60),
    "cross": (190, 80, 220),
}
MISLABELLED_RECORD = ".mislabelled.json"


@dataclass
class DemoSpec:
    """What to generate."""

    classes: tuple[str, ...] = DEMO_CLASSES  # shape names; any of circle, square, triangle, star, cross
    n_per_class: int = 40  # images drawn per class
    size: int = 64  # side of each square image, in pixels
    mislabel_frac: float = 0.05  # share of images moved to a wrong class folder
    seed: int = 0  # same seed, same dataset
    colours: dict[str, tuple[int, int, int]] | None = None  # base colour per shape, overriding SHAPE_COLOURS:
    # shapes given one colour are told apart by their outline alone (look-alike classes)


def _polygon(kind: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    if kind == "square":
        corners, radius = 4, lambda k: r
    elif kind == "triangle":
        corners, radius = 3, lambda k: r
    elif kind == "star":
        corners, radius = 10, lambda k: r if k % 2 == 0 else r * 0.45
    else:
        raise ValueError(f"unknown shape {kind!r}; choose from {', '.join(SHAPE_COLOURS)}")
    return [
        (
            cx + radius(k) * math.cos(turn + 2 * math.pi * k / corners),
            cy + radius(k) * math.sin(turn + 2 * math.pi * k / corners),
        )
        for k in range(corners)
    ]


def draw_shape(kind: str, size: int, rng: np.random.Generator, base: Sequence[int] | None = None) -> Image.Image:
    """One image of a `kind` shape (one of SHAPE_COLOURS) on a noisy background, in `base` colour
    (default: the shape's own) with some jitter."""
    background = rng.integers(0, 90, size=3)
    noise = rng.normal(0, 12, size=(size, size, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    jittered = np.array(base or SHAPE_COLOURS[kind]) + rng.integers(-40, 41, size=3)
    colour = tuple(int(c) for c in np.clip(jittered, 0, 255))
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=colour)
    return img


def make_demo_dataset(root: str | Path, spec: DemoSpec | None = None) -> Path:
    """Write the demo dataset to `root` (one folder per class) and return it.

    Built in a temporary folder and renamed into place, so an interrupted run leaves no half dataset.
    An existing non-empty `root` is left alone and an error raised.
    """
    spec = spec or DemoSpec()
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} already exists and is not empty.")
    rng = np.random.default_rng(spec.seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        mislabelled = []
        for kind in spec.classes:
            for i in range(spec.n_per_class):
                label = kind
                if rng.random() < spec.mislabel_frac:
                    label = str(rng.choice([c for c in spec.classes if c != kind]))
                name = f"{kind}_{i:04d}.png"
                (staging / label).mkdir(exist_ok=True)
                draw_shape(kind, spec.size, rng, (spec.colours or {}).get(kind)).save(staging / label / name)
                if label != kind:
                    mislabelled.append(f"{label}/{name}")
        (staging / MISLABELLED_RECORD).write_text(json.dumps(mislabelled, indent=2))
        if root.exists():
            root.rmdir()
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def mislabelled_files(root: str | Path) -> list[Path]:
    """The files the generator put in a wrong class folder (empty for a dataset it did not make)."""
    record = Path(root) / MISLABELLED_RECORD
    if not record.exists():
        return []
    return [Path(root) / rel for rel in json.loads(record.read_text())]
