"""Images that come in from outside (uploads, camera shots), and the feedback dataset built from wrong answers.

An uploaded file is untrusted: its name and the browser's content type say nothing reliable, so an image
is judged by its bytes only (size first, then the format PIL recognises in the content, then the declared
pixel count before anything is decoded, then a full decode).

When the user says a prediction is wrong, the image is stored under <workspace>/feedback/<right label>/,
named by its content hash: a one-folder-per-class dataset (layout "folders") that a later run can add to
its training data. Every correction is also appended to the hidden feedback/.feedback_log.jsonl
(hidden files are never dataset items).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from core.env import workspace_dir
from core.fileio import append_jsonl, atomic_write_bytes, read_jsonl
from core.images import DEFAULT_MAX_PIXELS, HEIF_REASON, SCALED_DRAFT_FORMATS, is_heif_header, jpeg_bytes, upright_rgb
from core.listing import list_images

FEEDBACK_DIR = "feedback"
LOG_FILE = ".feedback_log.jsonl"
MAX_UPLOAD_MB = 25  # per image: far above a phone photo (~5 MB), far below what would strain memory
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 2**20
MAX_LABEL_CHARS = 100
HASH_CHARS = 16
# PIL formats accepted, by what the content is; the extension a stored file gets follows the format.
# Restricting Image.open to these also keeps PIL away from formats that shell out (EPS runs Ghostscript).
FORMAT_EXTENSIONS = {
    "JPEG": ".jpg",
    "MPO": ".jpg",  # phones' multi-picture JPEGs: opened by the JPEG plugin, reported as MPO
    "PNG": ".png",
    "GIF": ".gif",
    "BMP": ".bmp",
    "WEBP": ".webp",
    "TIFF": ".tif",
    "HEIF": ".heic",  # iPhone photos, decoded by pillow-heif (registered in core.images)
}
OPEN_FORMATS = [f for f in FORMAT_EXTENSIONS if f != "MPO"]


class BadUpload(ValueError):
    """An uploaded file that is not a usable image, with a message meant for the user."""


@dataclass
class UploadedImage:
    """A checked, decoded upload: upright RGB pixels plus what is needed to store or describe it."""

    image: Image.Image  # upright (EXIF orientation applied), RGB
    format: str  # the PIL format found in the content, one of FORMAT_EXTENSIONS
    digest: str  # sha256 of the bytes, hex
    width: int  # original size, before any downscaling
    height: int

    @property
    def extension(self) -> str:
        return FORMAT_EXTENSIONS[self.format]


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_image(
    data: bytes,
    max_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> UploadedImage:
    """Check `data` by content and decode it upright as RGB; raise BadUpload saying why it cannot be used.

    `min_side` downscales big photos as they are decoded, keeping the shorter side at least that many pixels
    (a model that resizes to 224 loses nothing, and a 12 MP photo stops costing 36 MB of memory).
    """
    if not data:
        raise BadUpload("the file is empty (0 bytes).")
    if len(data) > max_bytes:
        raise BadUpload(f"the file is {len(data) / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit per image.")
    try:
        img = Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
    except Image.DecompressionBombError as e:
        raise BadUpload(f"refused as a decompression bomb ({e}).") from None
    except Image.UnidentifiedImageError:
        if is_heif_header(data[:64]):
            raise BadUpload(f"{HEIF_REASON}.") from None
        raise BadUpload(
            "this is not an image Loupe can read (its content is not JPEG, PNG, GIF, BMP, WebP, TIFF or HEIC, "
            "whatever its name says)."
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadUpload(f"the image cannot be read: {e}.") from None
    with img:
        width, height = img.size
        if width < 1 or height < 1:
            raise BadUpload(f"the image has no pixels ({width}x{height}).")
        if width * height > max_pixels:
            raise BadUpload(
                f"the image declares {width}x{height} pixels, over the {max_pixels:,} limit "
                "(refused as a possible decompression bomb)."
            )
        fmt = img.format or ""
        try:
            if min_side and fmt in SCALED_DRAFT_FORMATS:  # not HEIC's draft: a thumbnail would go unchecked
                img.draft("RGB", (min_side, min_side))  # JPEG only: decode at a reduced scale, never below min_side
            img.load()  # animated GIFs and multi-page TIFFs: the first frame
            upright = _upright(img)
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise BadUpload(f"the image is damaged or truncated and cannot be decoded ({e}).") from None
    if min_side:
        upright = _shrink(upright, min_side)
    return UploadedImage(upright, fmt, digest_of(data), width, height)


def _upright(img: Image.Image) -> Image.Image:
    try:
        return upright_rgb(img)
    except (TypeError, SyntaxError, struct.error):  # a malformed EXIF block: keep the pixels as stored
        return img.convert("RGB")


def _shrink(img: Image.Image, min_side: int) -> Image.Image:
    """Resize down so the shorter side is `min_side` (never up)."""
    scale = min_side / min(img.size)
    if scale >= 1:
        return img
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def preview_jpeg(img: Image.Image, size: int = 384, quality: int = 85) -> bytes:
    """JPEG bytes of `img` fitting in size x size: what a page sends to the browser instead of the upload."""
    small = img.copy()
    small.thumbnail((size, size))
    return jpeg_bytes(small, quality)


# ---------------------------------------------------------------- the feedback dataset


def feedback_dir(root: Path | None = None) -> Path:
    """Where feedback images live: `root` if given, else <workspace>/feedback (not created here)."""
    return Path(root) if root is not None else workspace_dir() / FEEDBACK_DIR


def sanitize_label(label: str) -> str:
    """A class name safe as one folder name: no path separators, no control characters, no leading dot
    (so never "." or ".." nor a hidden folder), trimmed; raises ValueError when nothing usable is left."""
    text = unicodedata.normalize("NFC", str(label))
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    parts = [p.strip() for p in re.split(r"[/\\:]+", text)]
    text = "_".join(p for p in parts if p.strip(".")) if len(parts) > 1 else text  # "../x" -> "x"
    text = re.sub(r"\s+", " ", text).strip().lstrip(".").strip()
    text = text[:MAX_LABEL_CHARS].rstrip()
    if not text or set(text) <= {".", "_", " "}:
        raise ValueError(f"{label!r} cannot be used as a class name; use letters or digits.")
    return text


def _stored_copies(root: Path, stem: str) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.glob(f"*/{stem}.*") if p.is_file() and not p.parent.name.startswith(".")]


def save_feedback(
    image_bytes: bytes,
    filename: str,
    predicted: str,
    correct_label: str,
    run_id: str,
    root: Path | None = None,
) -> Path:
    """Store a wrongly predicted image under <feedback>/<correct label>/<sha256[:16]><ext>; return its path.

    The image is checked by content first (BadUpload, nothing written); the label is sanitised
    (ValueError if nothing usable is left). The same image saved again is stored once: under the same
    label nothing is written, under another label it moves there (the latest correction wins).
    Every call appends one line to <feedback>/.feedback_log.jsonl.
    """
    checked = read_image(image_bytes, min_side=16)  # validates; the small decode is thrown away
    label = sanitize_label(correct_label)
    base = feedback_dir(root)
    stem = checked.digest[:HASH_CHARS]
    target = base / label / f"{stem}{checked.extension}"
    previous = [p for p in _stored_copies(base, stem) if p != target]
    if not target.exists():
        if previous:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(previous[0], target)
        else:
            atomic_write_bytes(target, image_bytes)
    for stale in previous:
        stale.unlink(missing_ok=True)
        _remove_if_empty(stale.parent)
    _log(
        base,
        {
            "time": time.time(),
            "run": run_id,
            "predicted": predicted,
            "correct": label,
            "file": target.relative_to(base).as_posix(),
            "source_name": Path(str(filename)).name[:200],
            "sha256": checked.digest,
            "moved_from": [p.parent.name for p in previous] or None,
        },
    )
    return target


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (or already gone)


def _log(base: Path, record: dict) -> None:
    base.mkdir(parents=True, exist_ok=True)
    append_jsonl(base / LOG_FILE, record)


def feedback_log(root: Path | None = None) -> list[dict]:
    """Every correction recorded, oldest first (corrupt lines skipped)."""
    return read_jsonl(feedback_dir(root) / LOG_FILE)


def feedback_counts(root: Path | None = None) -> dict[str, int]:
    """Images per class in the feedback dataset, sorted by class name (empty when there is none)."""
    base = feedback_dir(root)
    if not base.is_dir():
        return {}
    counts: dict[str, int] = {}
    for f in list_images(base):
        parts = f.relative_to(base.resolve()).parts
        if len(parts) > 1:
            counts[parts[0]] = counts.get(parts[0], 0) + 1
    return dict(sorted(counts.items()))


def feedback_dataset(root: Path | None = None) -> Path | None:
    """The feedback folder when it holds at least one image (read it with layout "folders"), else None."""
    return feedback_dir(root).resolve() if feedback_counts(root) else None
