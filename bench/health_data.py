"""The planted problems of the health benchmark: near-copies across and within the split, and off-topic images.

`make_injected(src, dst, ...)` writes a train/ + valid/ copy of a one-folder-per-class dataset (so the
benchmark, not a random draw, decides which side each copy lands on) and `truth.json` beside it:

- copies of --copy-frac of the images, each re-encoded as JPEG at quality 40-85, resized by 0.5-0.8, cropped
  by 10% (a random offset), mirrored half the time; half of them land on the other side of the split from
  their original (leaks), half on the same side;
- --off-topic images that belong to no class (no internet here: windows of scikit-learn's two sample photos,
  and rendered text, charts, tiles, noisy gradients and shapes), all in one class folder of train/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from core.listing import list_images


def _copy_of(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    scale = float(rng.uniform(0.5, 0.8))
    small = img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))), Image.Resampling.BICUBIC)
    keep = 0.9  # a 10% crop of each side's length, at a random offset
    w, h = round(small.width * keep), round(small.height * keep)
    x, y = int(rng.integers(0, small.width - w + 1)), int(rng.integers(0, small.height - h + 1))
    out = small.crop((x, y, x + w, y + h))
    mirrored = bool(rng.random() < 0.5)
    if mirrored:
        out = ImageOps.mirror(out)
    return out, {"scale": round(scale, 3), "crop": [x, y, w, h], "mirrored": mirrored}


def _sample_photo(name: str, rng: np.random.Generator) -> Image.Image:
    """A random window (30-60% of each side) of one of scikit-learn's two sample photos (a temple, a flower):
    real photographs that are on every machine with Loupe's requirements, and no bears."""
    from sklearn.datasets import load_sample_image

    photo = Image.fromarray(load_sample_image(name))
    w, h = round(photo.width * rng.uniform(0.3, 0.6)), round(photo.height * rng.uniform(0.3, 0.6))
    x, y = int(rng.integers(0, photo.width - w)), int(rng.integers(0, photo.height - h))
    return photo.crop((x, y, x + w, y + h))


def off_topic_image(i: int, rng: np.random.Generator, side: int = 320) -> Image.Image:
    """One of seven kinds of image no bear classifier was meant for: two real photos (windows of scikit-learn's
    samples), text, a bar chart, tiles, a noisy gradient, random shapes; each drawn with its own parameters."""
    kind = i % 7
    if kind < 2:
        return _sample_photo(("china.jpg", "flower.jpg")[kind], rng)
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", (side, round(side * rng.uniform(0.6, 1.0))), bg)
    draw = ImageDraw.Draw(img)
    fg = tuple(int(v) for v in rng.integers(0, 256, 3))
    if kind == 2:
        for row in range(int(rng.integers(4, 10))):
            draw.text((10, 10 + row * 28), "".join(rng.choice(list("abcdefghij klmnop"), 30)), fill=fg)
    elif kind == 3:
        bars = int(rng.integers(4, 10))
        for bar in range(bars):
            top = int(rng.integers(20, img.height - 10))
            draw.rectangle((20 + bar * 280 // bars, top, 20 + bar * 280 // bars + 20, img.height - 10), fill=fg)
    elif kind == 4:
        n = int(rng.integers(3, 12))
        cell = side // n
        for r in range(n):
            for c in range(n):
                if (r + c) % 2:
                    draw.rectangle((c * cell, r * cell, (c + 1) * cell, (r + 1) * cell), fill=fg)
    elif kind == 5:
        ramp = np.linspace(0, 1, img.width)[None, :, None]
        a, b = np.array(bg)[None, None], np.array(fg)[None, None]
        noise = rng.normal(0, rng.uniform(5, 40), (img.height, img.width, 3))
        pixels = np.repeat(a + (b - a) * ramp, img.height, 0) + noise
        img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    else:
        for _ in range(int(rng.integers(3, 15))):
            x, y, r = (int(v) for v in rng.integers(0, side, 3) // (1, 1, 3))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    return img


def make_injected(src: Path, dst: Path, copy_frac: float = 0.05, off_topic: int = 20, valid_pct: float = 0.2,
                  seed: int = 0) -> dict:
    """Write the benchmark's dataset at `dst` (replaced) and return its truth (also in dst/../truth.json)."""
    rng = np.random.default_rng(seed)
    src, dst = src.resolve(), dst.resolve()
    if dst.exists():
        shutil.rmtree(dst)
    files = list_images(src)
    sides = {f: ("valid" if rng.random() < valid_pct else "train") for f in files}
    placed: dict[Path, str] = {}
    for f in files:
        rel = f.relative_to(src)
        target = dst / sides[f] / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
        placed[f] = target.relative_to(dst).as_posix()
    chosen = rng.choice(len(files), round(len(files) * copy_frac), replace=False)
    copies = []
    for n, i in enumerate(sorted(chosen)):
        original = files[i]
        with Image.open(original) as im:
            img = ImageOps.exif_transpose(im).convert("RGB")
        copy, how = _copy_of(img, rng)
        across = n % 2 == 0
        side = sides[original] if not across else ("train" if sides[original] == "valid" else "valid")
        rel = original.relative_to(src)
        target = dst / side / rel.parent / f"copy_{rel.stem}.jpg"
        quality = int(rng.integers(40, 86))
        copy.save(target, quality=quality)
        copies.append({"original": placed[original], "copy": target.relative_to(dst).as_posix(),
                       "across": across, "quality": quality, **how})
    classes = sorted({f.relative_to(src).parts[0] for f in files})
    off = []
    folder = dst / "train" / classes[0]
    for i in range(off_topic):
        target = folder / f"offtopic_{i:02d}.jpg"
        off_topic_image(i, rng).save(target, quality=90)
        off.append(target.relative_to(dst).as_posix())
    truth = {"copies": copies, "off_topic": off, "source": src.name}
    (dst.parent / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth
