"""Unpack an uploaded zip of images into the workspace, safely.

An uploaded archive is untrusted input: its entry names may point outside the destination
(`../x`, `/etc/x`: "zip slip"), an entry may be a symlink to anywhere, and its sizes may be
made up (a small zip that inflates to terabytes). So the central directory is checked before
anything is written, the bytes actually written are counted while streaming, and everything
is unpacked into a hidden temporary folder that is renamed into place only once complete:
a refused or failed upload leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

DEFAULT_MAX_TOTAL_BYTES = 8 * 2**30  # uncompressed; photos barely compress, so ~4x the 2 GB upload limit
DEFAULT_MAX_FILES = 500_000
CHUNK = 1 << 20
SKIPPED_DIRS = frozenset({"__MACOSX"})


class UploadError(ValueError):
    """An archive that cannot or must not be unpacked, with a message meant for the user."""


def folder_name(name: str) -> str:
    """A safe folder name from a user-supplied name: letters, digits, '.', '_' and '-' only, no leading dot."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return cleaned[:80] or "dataset"


def unused_folder(dest_root: Path, name: str) -> Path:
    """dest_root/name, or name-2, name-3, ... when that is taken."""
    candidate, n = dest_root / name, 1
    while candidate.exists():
        n += 1
        candidate = dest_root / f"{name}-{n}"
    return candidate


def _entry_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    """The path parts of an entry, refusing names that could land outside the destination."""
    raw = info.filename
    name = raw.replace("\\", "/")  # zips made on Windows sometimes use backslashes
    if "\x00" in name:
        raise UploadError(f"The zip has an entry with a NUL byte in its name ({raw!r}); refused.")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UploadError(f"The zip has an entry with an absolute path ({raw!r}); refused for safety.")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise UploadError(f"The zip has an entry that points outside its folder ({raw!r}); refused for safety.")
    return tuple(p for p in parts if p not in ("", "."))


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    # Unix tools store the file mode in the high 16 bits of external_attr.
    return stat.S_ISLNK(info.external_attr >> 16)


def _skipped(parts: tuple[str, ...]) -> bool:
    """macOS resource forks and hidden files: never dataset items."""
    return any(p in SKIPPED_DIRS or p.startswith(".") for p in parts)


Plan = list[tuple[zipfile.ZipInfo, tuple[str, ...]]]


def _plan(archive: zipfile.ZipFile, max_total_bytes: int, max_files: int) -> Plan:
    """Check the whole central directory before anything is written; return the entries to extract."""
    entries = archive.infolist()
    files = [info for info in entries if not info.is_dir()]
    if len(files) > max_files:
        raise UploadError(f"The zip holds {len(files):,} files, more than the {max_files:,} allowed.")
    declared = sum(info.file_size for info in files)
    if declared > max_total_bytes:
        raise UploadError(
            f"The zip would unpack to {declared / 2**20:,.0f} MB, "
            f"more than the {max_total_bytes / 2**20:,.0f} MB allowed."
        )
    plan, seen = [], set()
    for info in entries:
        parts = _entry_parts(info)  # every entry, even skipped ones: a malicious name refuses the whole zip
        if _is_symlink(info):
            raise UploadError(f"The zip has a symbolic link ({info.filename!r}); links are refused for safety.")
        if info.flag_bits & 0x1:
            raise UploadError(f"The zip is password-protected ({info.filename!r}); upload an unencrypted zip.")
        if info.is_dir() or not parts or _skipped(parts):
            continue
        if parts in seen:
            raise UploadError(f"The zip lists {info.filename!r} twice; refused rather than guess which one to keep.")
        seen.add(parts)
        plan.append((info, parts))
    if not plan:
        raise UploadError("The zip has no files in it (hidden files and __MACOSX folders are ignored).")
    return plan


def _stream(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: int) -> int:
    """Write one entry to `target`, refusing it as soon as it outgrows its declared size or the budget left."""
    written = 0
    with archive.open(info) as src, open(target, "xb") as dst:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if written > info.file_size or written > budget:
                raise UploadError(
                    f"{info.filename!r} unpacks to more bytes than the zip declares; the archive is corrupt or hostile."
                )
            dst.write(chunk)
    return written


def _single_top_folder(staging: Path) -> Path:
    """A zip of `bears/` holds bears/grizzly/...: the dataset is that one folder, not the staging folder."""
    children = list(staging.iterdir())
    if len(children) == 1 and children[0].is_dir():
        return children[0]
    return staging


def extract_zip(
    zip_file: str | os.PathLike | BinaryIO,
    dest_root: Path,
    name: str,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
) -> Path:
    """Unpack `zip_file` (a path or a binary file object) into a new folder dest_root/<name> and return it.

    Refuses (with UploadError, leaving nothing behind) non-zip content, entries with `..` or absolute
    paths, symlinks, encrypted entries, and archives over `max_files` files or `max_total_bytes`
    uncompressed. Hidden files and __MACOSX are skipped. A zip whose content sits in one top folder
    is unpacked as that folder. When dest_root/<name> exists, name-2, name-3... is used instead.
    """
    if not zipfile.is_zipfile(zip_file):
        raise UploadError("This file is not a zip archive (its content is not zip data, whatever its name says).")
    if hasattr(zip_file, "seek"):
        zip_file.seek(0)
    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    base = folder_name(name)
    staging = Path(tempfile.mkdtemp(dir=dest_root, prefix=f".{base}.unpacking-"))
    try:
        with zipfile.ZipFile(zip_file) as archive:
            plan = _plan(archive, max_total_bytes, max_files)
            budget = max_total_bytes
            for info, parts in plan:
                target = staging.joinpath(*parts)
                # Belt and braces: the resolved target must still be inside the staging folder.
                if not target.resolve().is_relative_to(staging.resolve()):
                    raise UploadError(f"The zip has an entry that points outside its folder ({info.filename!r}).")
                target.parent.mkdir(parents=True, exist_ok=True)
                budget -= _stream(archive, info, target, budget)
        content = _single_top_folder(staging)
        while True:
            final = unused_folder(dest_root, base)
            try:
                os.rename(content, final)  # fails rather than merges if another upload took the name meanwhile
                break
            except OSError:
                if not final.exists():
                    raise
        return final
    except UploadError:
        raise
    except zipfile.BadZipFile as e:
        raise UploadError(f"The zip is damaged and cannot be unpacked ({e}).") from None
    except NotImplementedError as e:  # e.g. a compression method Python does not support
        raise UploadError(f"The zip uses a format Python cannot unpack ({e}).") from None
    except RuntimeError as e:  # zipfile's "File is encrypted" and similar
        raise UploadError(f"The zip cannot be unpacked ({e}).") from None
    except OSError as e:
        raise UploadError(f"Unpacking failed: {e.strerror or e} ({Path(e.filename or '').name}).") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
