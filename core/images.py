"""Decoding images safely: verify without loading full images, open upright as RGB, refuse bombs."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image, ImageOps

# HEIC/HEIF (every recent iPhone's photos): Pillow has no decoder of its own, so pillow-heif's is registered
# once, here, for every Image.open in the process. It applies the file's rotation and mirroring (irot/imir)
# as it decodes and resets the EXIF orientation to 1, so upright_rgb's exif_transpose turns it no further.
pillow_heif.register_heif_opener()

# Far above any photo (~89 Mpx), far below what a decompression bomb declares.
DEFAULT_MAX_PIXELS = 89_478_485
# ISO base media "ftyp" brands of HEIF files: one that pillow-heif still cannot open (damaged, or a variant
# libheif cannot read) is named for what it is rather than reported as "not an image".
HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"})
HEIF_REASON = "a HEIC/HEIF image that cannot be decoded (damaged, or a variant Loupe's HEIF decoder cannot read)"
# Formats whose `draft` only decodes at a reduced scale (JPEG's DCT scaling). pillow-heif's draft swaps in an
# embedded thumbnail instead, which would leave the image itself unchecked.
SCALED_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})


class DataError(ValueError):
    """A problem with the user's dataset, with a message meant for them."""


@dataclass(frozen=True)
class BadImage:
    path: Path
    reason: str


def is_heif_header(head: bytes) -> bool:
    """True when `head` (a file's first 12 bytes or more) opens a HEIF container: an "ftyp" box, HEIF brand."""
    return len(head) >= 12 and head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


def is_heif(path: str | os.PathLike) -> bool:
    """True when the file at `path` is a HEIF container, whatever its name."""
    try:
        with open(path, "rb") as f:
            return is_heif_header(f.read(12))
    except OSError:
        return False


def check_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why the image at `path` cannot be used, or None when it decodes.

    Reads the header first, so a decompression bomb is refused by its declared size and never
    decoded; JPEGs are then decoded at reduced scale (`draft`), which still finds truncation.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                return f"decompression bomb: declares {width}x{height} pixels, over the {max_pixels:,} limit"
            if width < 1 or height < 1:
                return f"no pixels ({width}x{height})"
            if img.format in SCALED_DRAFT_FORMATS:
                img.draft("RGB", (64, 64))
            img.load()
    except FileNotFoundError:
        return "file not found (moved or deleted)"
    except Image.DecompressionBombError as e:
        return f"decompression bomb: {e}"
    except OSError as e:
        if "cannot identify image file" in str(e):
            return HEIF_REASON if is_heif(path) else "not an image (content is not a known image format)"
        return f"cannot be decoded: {e}"
    except (ValueError, SyntaxError, EOFError, Image.DecompressionBombWarning) as e:
        return f"cannot be decoded: {e}"
    return None


def verify_images(
    paths: list[Path], max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None
) -> list[BadImage]:
    """Files among `paths` that cannot be used as images, each with the reason, checked in parallel."""
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(lambda p: check_image(p, max_pixels), paths, chunksize=32))
    return [BadImage(Path(p), r) for p, r in zip(paths, reasons) if r is not None]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit scaled (not clipped), transparency over white, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = arr.min(initial=0), arr.max(initial=1)
        img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def upright_rgb(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos are stored sideways) and convert any mode to RGB."""
    return to_rgb(ImageOps.exif_transpose(img))


def jpeg_bytes(img: Image.Image, quality: int = 85) -> bytes:
    """`img` encoded as JPEG: what pages send to the browser instead of the original file."""
    buffer = io.BytesIO()
    (img if img.mode == "RGB" else img.convert("RGB")).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def open_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> Image.Image:
    """Open an image upright (EXIF orientation applied) as RGB, refusing decompression bombs.

    `draft` lets JPEGs decode at a reduced scale that is still at least draft x draft (HEIC: an embedded
    thumbnail at least that big, when the file has one): far faster for thumbnails and small training sizes,
    and no loss once the image is resized down anyway.
    """
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as e:  # PIL's own refusal, at twice its limit: one error type for callers
        raise DataError(f"{Path(path).name}: decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        if is_heif(path):  # say what it is: a HEIF file the decoder cannot read
            raise DataError(f"{Path(path).name}: {HEIF_REASON}.") from None
        raise
    with img:
        if img.width * img.height > max_pixels:
            raise DataError(
                f"{Path(path).name}: declares {img.width}x{img.height} pixels, over the {max_pixels:,} limit."
            )
        if draft:
            img.draft(None, (draft, draft))
        img.load()  # animated GIFs and multi-page TIFFs: the first frame
        return upright_rgb(img)
