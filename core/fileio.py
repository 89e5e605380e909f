"""File plumbing, each piece written once: atomic writes (a reader sees the old file or the new one, never half
of either), file locks, JSON-lines logs (appended a whole line at a time, read skipping damaged lines), and
opening a file without following symbolic links."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any


def _written_temp(path: Path, write: Callable[[Path], None]) -> Path:
    """A temp file next to `path` (same directory, so a rename or link is atomic), filled by `write` and fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` on a temp file next to `path`, fsync it, then rename it over `path`.

    On any failure the temp file is removed and the old `path` is left untouched.
    """
    path = Path(path)
    tmp = _written_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def create_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Like `atomic_write`, but for a file that must not exist yet: FileExistsError when `path` exists, even
    when another process creates it meanwhile (the finished temp file is hard-linked, which never replaces)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists.")
    tmp = _written_temp(path, write)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def file_version_key(path: str | os.PathLike, variant: object = "") -> str:
    """A cache key that changes whenever the file does (path, size, mtime), so stale entries are never read."""
    path = Path(path)
    stat = path.stat()
    raw = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{variant}"
    return hashlib.sha1(raw.encode("utf-8", "surrogateescape")).hexdigest()


# ---------------------------------------------------------------- opening without following links


class LinkRefused(OSError):
    """A file opened with follow_symlinks=False, or the folder holding it, is a symbolic link."""

    def __init__(self, link: Path) -> None:
        super().__init__(errno.ELOOP, f"{link} is a symbolic link; refused rather than followed")
        self.link = link


def open_fd(path: str | os.PathLike, flags: int, *, follow_symlinks: bool = True) -> int:
    """`os.open(path, flags, 0o644)`. With follow_symlinks=False neither the file nor its folder may be a
    symbolic link (LinkRefused): a link there could make us write into any file this process may write.
    Folders further up are the caller's to trust (resolve them first)."""
    path = Path(path)
    if follow_symlinks:
        return os.open(path, flags, 0o644)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise _refused(e, path.parent) from None
    try:
        return os.open(path.name, flags | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
    except OSError as e:
        raise _refused(e, path) from None
    finally:
        os.close(dir_fd)


def _refused(error: OSError, path: Path) -> OSError:
    # O_NOFOLLOW fails with ELOOP on a linked file; O_DIRECTORY with ENOTDIR on a link to a folder.
    if error.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
        return LinkRefused(path)
    return error


# ---------------------------------------------------------------- locks


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, wait: bool = True, follow_symlinks: bool = True) -> Iterator[int]:
    """Hold an exclusive flock on `path` (created if missing) and yield its file descriptor.

    flock rather than a lock file with a pid in it: the kernel releases it when the fd closes or the holder
    dies, so a crash can never leave a stale lock. `wait=False` raises BlockingIOError instead of waiting.
    """
    fd = open_fd(path, os.O_RDWR | os.O_CREAT, follow_symlinks=follow_symlinks)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield fd
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------- JSON lines


def jsonl_line(record: Mapping[str, Any]) -> bytes:
    """One record as a compact line of strict JSON (NaN refused: every reader parses it). Non-ASCII is escaped,
    so file names that are not valid UTF-8 (surrogates) survive the round trip exactly."""
    return (json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n").encode()


def write_line(fd: int, line: bytes, *, fsync: bool = False) -> None:
    """Write `line` to `fd` (opened O_APPEND) in one write where the OS allows, so a concurrent reader or
    writer never sees half of it; fsync makes it survive a machine crash."""
    while line:
        line = line[os.write(fd, line):]
    if fsync:
        os.fsync(fd)


def append_jsonl(
    path: str | os.PathLike, record: Mapping[str, Any], *, fsync: bool = False, follow_symlinks: bool = True
) -> None:
    """Append `record` as one line to the JSON-lines file at `path` (created if missing, its folder not)."""
    fd = open_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, follow_symlinks=follow_symlinks)
    try:
        write_line(fd, jsonl_line(record), fsync=fsync)
    finally:
        os.close(fd)


def parse_jsonl(data: bytes) -> list[dict[str, Any]]:
    """The JSON objects of `data`, one a line; a damaged line (or bad UTF-8) costs that line, not the file."""
    records = []
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_jsonl(path: str | os.PathLike, *, follow_symlinks: bool = True) -> list[dict[str, Any]]:
    """Every object in the JSON-lines file at `path`, oldest first; [] when there is no file."""
    try:
        fd = open_fd(path, os.O_RDONLY, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        return []
    with open(fd, "rb") as f:
        return parse_jsonl(f.read())
