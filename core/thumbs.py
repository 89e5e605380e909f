"""Thumbnails for galleries: small JPEGs made once per file version and kept in a disk cache.

Pages never send full-size images to the browser; the cache key includes the file's size and mtime,
so an edited or replaced image gets a fresh thumbnail and stale ones are simply never read again.
"""

from __future__ import annotations

import os
from pathlib import Path

from core.env import workspace_dir
from core.fileio import atomic_write_bytes, file_version_key
from core.images import DEFAULT_MAX_PIXELS, jpeg_bytes, open_image

THUMB_SIZE = 192


def cache_dir() -> Path:
    return workspace_dir() / "cache" / "thumbs"


def thumbnail(path: str | os.PathLike, size: int = THUMB_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """JPEG bytes of the image at `path`, upright, fitting in size x size; raises OSError/ValueError if unreadable."""
    path = Path(path)
    cached = cache_dir() / f"{file_version_key(path, size)}.jpg"
    if cached.exists():
        return cached.read_bytes()
    img = open_image(path, max_pixels, draft=size * 2)  # JPEGs decode at reduced scale: fast for big photos
    img.thumbnail((size, size))
    data = jpeg_bytes(img)
    atomic_write_bytes(cached, data)
    return data
