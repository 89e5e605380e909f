"""Groups of a dataset's files that must stay on one side of the split (duplicates found by the health check).

A duplicate in train and its copy in valid make the validation error flatter the model: valid then scores images
the model has seen. The fix lives in the dataset folder, not in a run, so every run from the next one on is split
with it: `<dataset>/.loupe/keep_together.json` holds

    {"version": 1, "groups": [["cats/a.jpg", "cats/a copy.jpg"], ...]}

paths relative to the dataset root in POSIX form, as core.split.source_record writes them. core.split.split_items
moves each group wholly to one side after the split is drawn. The file is one of Loupe's own files in the dataset
(core.cleanlog): opened following no symbolic link, written atomically, changed under the dataset's lock.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from core.cleanlog import LOCK_FILE, STATE_DIR, own_files
from core.fileio import LinkRefused, atomic_write_json, file_lock, open_fd

GROUPS_FILE = "keep_together.json"
VERSION = 1


def groups_path(root: str | os.PathLike) -> Path:
    return Path(os.path.realpath(root)) / STATE_DIR / GROUPS_FILE


def read_groups(root: str | os.PathLike) -> list[list[str]]:
    """The dataset's groups, each of two or more distinct paths; [] when there is no file or it cannot be read
    (a damaged file must never stop a run). OwnFileLinked when the file or .loupe is a symbolic link."""
    with own_files():
        try:
            fd = open_fd(groups_path(root), os.O_RDONLY, follow_symlinks=False)
        except FileNotFoundError:
            return []
        except LinkRefused:
            raise  # refused, in own_files' words: a link is never taken for a missing file
        except OSError:  # unreadable (permissions, a folder in its place): as if there were no groups
            return []
    with open(fd, "rb") as f:
        try:
            data = json.loads(f.read())
        except (ValueError, OSError):
            return []
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("groups"), list):
        return []
    groups = []
    for group in data["groups"]:  # a damaged entry costs that entry, not the file
        if isinstance(group, list):
            members = sorted({p for p in group if isinstance(p, str) and _is_relative(p)})
            if len(members) > 1:
                groups.append(members)
    return groups


def groups_version(root: str | os.PathLike) -> tuple[int, int, int]:
    """(inode, mtime in ns, size) of the file, zeros when there is none: for a page's cache key next to
    core.listing's signature, which skips hidden folders such as .loupe and so never sees the groups change
    (each write is a new file, so the inode tells two writes within one clock tick apart)."""
    try:
        st = os.lstat(groups_path(root))
    except OSError:
        return 0, 0, 0
    return st.st_ino, st.st_mtime_ns, st.st_size


def add_groups(root: str | os.PathLike, groups: Iterable[Iterable[str]]) -> int:
    """Merge `groups` (relative POSIX paths) into the dataset's file and return how many groups it now holds.

    Groups that share a path become one (a = b and b = c keep a, b and c together). Under the lock core.cleanlog
    holds while it changes the dataset, so two tabs adding groups at once cannot lose each other's."""
    new = [list(g) for g in groups]
    bad = [p for g in new for p in g if not isinstance(p, str) or not _is_relative(p)]
    if bad:
        raise ValueError(f"Keep-together paths must be relative to the dataset root, inside it: {bad[:3]}")
    path = groups_path(root)
    with contextlib.suppress(FileExistsError):  # a folder, or a link that the lock's open refuses
        os.mkdir(path.parent)
    with own_files(), file_lock(path.parent / LOCK_FILE, follow_symlinks=False):
        merged = merge_groups(read_groups(root) + new)
        atomic_write_json(path, {"version": VERSION, "groups": merged})
    return len(merged)


def merge_groups(groups: Iterable[Iterable[str]]) -> list[list[str]]:
    """Overlapping groups joined (union-find on paths), each sorted, singletons dropped, in a stable order."""
    parent: dict[str, str] = {}

    def find(p: str) -> str:
        parent.setdefault(p, p)
        while parent[p] != p:
            parent[p] = parent[parent[p]]  # path halving keeps chains short
            p = parent[p]
        return p

    for group in groups:
        members = list(group)
        for p in members:
            find(p)
        for p in members[1:]:
            parent[find(p)] = find(members[0])
    joined: dict[str, list[str]] = {}
    for p in parent:
        joined.setdefault(find(p), []).append(p)
    return sorted(sorted(g) for g in joined.values() if len(g) > 1)


def _is_relative(path: str) -> bool:
    # Only paths inside the dataset can name its items; an absolute one or one climbing out names none.
    pure = PurePosixPath(path)
    return bool(path) and not pure.is_absolute() and ".." not in pure.parts
