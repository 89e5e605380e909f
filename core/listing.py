"""Finding the image files of a dataset folder: the walk every layout and listing share, and its signature."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

# .heic/.heif (iPhone photos) are decoded by pillow-heif, registered in core.images.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic", ".heif"})


def path_text(path: str | os.PathLike) -> str:
    """`path` as text that is valid UTF-8, for tables, logs and pages.

    A file name that is not valid UTF-8 (from an old zip or another OS) reaches Python with its bad bytes
    as lone surrogates; Arrow strings (pandas' default), protobuf and a UTF-8 stdout all refuse those, so
    they are shown as backslash escapes (`bad\\xff.png`). Every other path comes back unchanged.
    JSON needs no such care: json.dumps escapes surrogates and json.loads restores them exactly.
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under `root`, sorted; hidden files and folders skipped.

    Symlinks are followed only where they resolve inside `root`, so a dataset cannot
    pull in files from elsewhere on the machine, and link cycles are visited once.
    """
    return sorted(iter_images(root))


def iter_images(root: str | os.PathLike) -> Iterator[Path]:
    """The image files of `list_images`, unsorted and one at a time: asking whether there is any stops early."""
    for _, files in _walk(root):
        yield from (path for path in files if is_image_file(path))


def listing_signature(root: str | os.PathLike) -> tuple[int, int]:
    """(entries, newest mtime in ns) over the folders `list_images` walks and the files at the top: a key that
    changes whenever the listing may have (adding, removing or renaming a file changes its folder's mtime; a CSV
    edited in place changes its own). Only directory entries are read: a few ms for thousands of images."""
    count, newest = 0, 0
    for folder, files in _walk(root):
        with contextlib.suppress(OSError):
            newest = max(newest, folder.stat().st_mtime_ns)
        count += len(files)
        if folder == Path(root).resolve():
            for path in files:
                with contextlib.suppress(OSError):
                    newest = max(newest, path.stat().st_mtime_ns)
    return count, newest


def _walk(root: str | os.PathLike) -> Iterator[tuple[Path, list[Path]]]:
    """(folder, its visible files) for every folder under `root`, hidden ones skipped. Symlinks are followed only
    where they resolve inside `root` (a dataset cannot pull in files from elsewhere), link cycles once."""
    root = Path(root).resolve()
    seen_dirs: set[Path] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        if folder in seen_dirs:
            continue
        seen_dirs.add(folder)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        files = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(folder, entry.name)
            if entry.is_symlink():
                try:
                    target = path.resolve()
                except (OSError, RuntimeError):  # a link loop (a -> b -> a): Python 3.11 raises RuntimeError
                    continue
                if not target.is_relative_to(root) or not target.exists():
                    continue
                if target.is_dir():
                    stack.append(target)
                else:
                    files.append(path)
            elif entry.is_dir(follow_symlinks=False):
                stack.append(path)
            else:
                files.append(path)
        yield folder, files
