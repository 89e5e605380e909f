"""How long Loupe takes to find the images of a big dataset: list_images and load_source on N files.

    python bench/listing.py            # 100,000 files
    python bench/listing.py --n 20000 --classes 20

The files are empty (listing reads directory entries only, never file contents) and live in a temporary
folder, removed at the end: <root>/<class>/<subfolder>/<i>.jpg, a few hundred files per folder as in
real datasets. Checking that every file decodes (core.images.verify_images) is a separate, per-file cost
that this does not measure. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.data import DataConfig  # noqa: E402
from core.layouts import load_source  # noqa: E402
from core.listing import list_images  # noqa: E402


def make_files(root: Path, n: int, classes: int, per_folder: int) -> None:
    """n empty .jpg files spread over `classes` class folders, `per_folder` files per subfolder."""
    made: set[Path] = set()
    for i in range(n):
        folder = root / f"class_{i % classes:03d}" / f"part_{i // (classes * per_folder):04d}"
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        os.close(os.open(folder / f"img_{i:07d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="number of files")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-folder", type=int, default=500, help="files per subfolder")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="loupe-listing-") as tmp:
        root = Path(tmp) / "big"
        _, made = timed(make_files, root, a.n, a.classes, a.per_folder)
        files, listed = timed(list_images, root)
        source, loaded = timed(load_source, DataConfig(path=str(root)))
        assert len(files) == len(source) == a.n, (len(files), len(source), a.n)
        print(json.dumps({
            "files": a.n, "classes": len(source.vocab), "create_s": round(made, 2),
            "list_images_s": round(listed, 3), "load_source_s": round(loaded, 3),
        }))


if __name__ == "__main__":
    main()
