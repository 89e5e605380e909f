"""Unpack an uploaded zip of images into the workspace, safely.

An uploaded archive is untrusted input: its entry names may point outside the destination
(`../x`, `/etc/x`: "zip slip"), an entry may be a symlink to anywhere, and its sizes may be
made up (a small zip that inflates to terabytes). So the central directory is checked before
anything is written, the bytes actually written are counted while streaming, and everything
is unpacked into a hidden temporary folder that is renamed into place only once complete:
a refused or failed upload leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import struct
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from core.env import MIN_FREE_MB_ENV, min_free_mb

DEFAULT_MAX_TOTAL_BYTES = 8 * 2**30  # uncompressed; photos barely compress, so ~8x the 1 GB upload limit
DEFAULT_MAX_FILES = 200_000  # a 1 GB zip of 200,000 photos would average 5 KB a photo
MAX_DIRECTORY_BYTES_PER_FILE = 512  # a zip's directory spends 46 bytes + name + extras (about 150) on each entry
MAX_RATIO = 100  # photos barely compress: a zip that unpacks to 100 times its size is a bomb...
RATIO_FLOOR = 100 * 2**20  # ...once it unpacks to more than this (small zips of text or BMPs may compress well)
ABANDONED_AFTER = 3600  # seconds: a staging folder without an owner's pid (older Loupe) is left alone until then
CHUNK = 1 << 20
SKIPPED_DIRS = frozenset({"__MACOSX"})
STAGING = re.compile(r"^\..+\.unpacking-(?:(\d+)-)?")
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory: signature, disks, entries, size, offset, comment
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # ..., entries on this disk, entries, directory size, offset
_ENTRY = struct.Struct("<4s24xHHH12x")  # a central directory entry: signature, name, extra and comment lengths


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


def _count_files(zip_file: BinaryIO, max_files: int) -> None:
    """Refuse a zip of more than `max_files` files from its directory's raw bytes, before zipfile builds an
    object per entry (two million entries cost zipfile 15 s and 1 GB before their number could be checked)."""
    zip_file.seek(0, os.SEEK_END)
    end = zip_file.tell()
    zip_file.seek(max(0, end - _EOCD.size - 0xFFFF))  # the end record sits within the last 64 KB (its comment)
    tail = zip_file.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0:
        return  # zipfile reports the damage
    _, _, _, _, _, size, _, _ = _EOCD.unpack_from(tail, at)
    directory_end = end - len(tail) + at
    locator = at - _ZIP64_LOCATOR.size
    if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":  # zip64: the sizes are in another record
        zip_file.seek(_ZIP64_LOCATOR.unpack_from(tail, locator)[2])
        record = zip_file.read(_ZIP64_EOCD.size)
        if record[:4] == b"PK\x06\x06":
            size = _ZIP64_EOCD.unpack(record)[8]
            directory_end -= _ZIP64_LOCATOR.size + _ZIP64_EOCD.size
    if size > max_files * MAX_DIRECTORY_BYTES_PER_FILE:
        raise UploadError(f"The zip's list of files alone is {size / 2**20:,.0f} MB: far more than the "
                          f"{max_files:,} files allowed.")
    zip_file.seek(max(0, directory_end - size))
    directory, pos, files = zip_file.read(size), 0, 0
    while pos + _ENTRY.size <= len(directory) and directory[pos : pos + 4] == b"PK\x01\x02":
        _, name, extra, comment = _ENTRY.unpack_from(directory, pos)
        files += directory[pos + _ENTRY.size + name - 1] != ord("/")  # folders end with "/"
        pos += _ENTRY.size + name + extra + comment
    if files > max_files:
        raise UploadError(f"The zip holds {files:,} files, more than the {max_files:,} allowed.")


def _plan(archive: zipfile.ZipFile, dest_root: Path, max_total_bytes: int, max_files: int) -> Plan:
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
    _check_free_space(dest_root, declared)
    _check_ratio(files, declared)
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


def _check_free_space(dest_root: Path, declared: int) -> None:
    """Refuse a zip that would leave the workspace's disk with less free space than a run needs to start."""
    free, keep = shutil.disk_usage(dest_root).free, min_free_mb() * 2**20
    if declared > free - keep:
        raise UploadError(
            f"The zip would unpack to {declared / 2**20:,.0f} MB, but the workspace's disk has {free / 2**20:,.0f} MB "
            f"free and keeps {keep / 2**20:,.0f} MB for runs ({MIN_FREE_MB_ENV}). Free some space first."
        )


def _check_ratio(files: list[zipfile.ZipInfo], declared: int) -> None:
    """Refuse a zip bomb by its declared sizes: the whole archive, or one entry, unpacking to over MAX_RATIO
    times its compressed size (declared sizes are binding: `_stream` stops any entry that writes more)."""
    packed = sum(info.compress_size for info in files)
    worst = max(files, key=lambda info: info.file_size / max(info.compress_size, 1), default=None)
    for size, compressed, what in ((declared, packed, "The zip"), (worst.file_size, worst.compress_size,
                                                                      f"{worst.filename!r} in the zip")):
        if size > RATIO_FLOOR and size > MAX_RATIO * max(compressed, 1):
            raise UploadError(
                f"{what} would unpack to {size / 2**20:,.0f} MB from {compressed / 2**20:,.1f} MB, "
                f"{size / max(compressed, 1):,.0f} times its size; photos barely compress, so this looks like a "
                "zip bomb and is refused."
            )


def remove_abandoned(dest_root: Path) -> list[Path]:
    """Delete staging folders of extractions whose process is gone (killed mid-unpack); return them.

    A staging folder's name holds its process id, so a running extraction (this server's or another's)
    is never touched. Folders from before pids were recorded go once they are ABANDONED_AFTER seconds old.
    """
    removed = []
    try:
        entries = list(os.scandir(dest_root))
    except OSError:
        return removed
    for entry in entries:
        match = STAGING.match(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False):
            continue
        pid = match.group(1)
        if (_alive(int(pid)) if pid else time.time() - entry.stat().st_mtime < ABANDONED_AFTER):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
    with contextlib.ExitStack() as closing:
        if not hasattr(zip_file, "seek"):
            zip_file = closing.enter_context(open(zip_file, "rb"))
        _count_files(zip_file, max_files)
        zip_file.seek(0)
        return _extract(zip_file, Path(dest_root), name, max_total_bytes, max_files)


def _extract(zip_file: BinaryIO, dest_root: Path, name: str, max_total_bytes: int, max_files: int) -> Path:
    dest_root.mkdir(parents=True, exist_ok=True)
    remove_abandoned(dest_root)
    base = folder_name(name)
    # The pid in the name tells remove_abandoned whether this extraction's process is still alive.
    staging = Path(tempfile.mkdtemp(dir=dest_root, prefix=f".{base}.unpacking-{os.getpid()}-"))
    try:
        with zipfile.ZipFile(zip_file) as archive:
            plan = _plan(archive, dest_root, max_total_bytes, max_files)
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
