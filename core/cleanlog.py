"""The change log of a cleaned dataset and the lock around changing it (see core.clean for the changes).

Every applied change is one JSON line in `<dataset>/.loupe/clean_log.jsonl`: its batch id, action, source and
target (relative to the dataset root), sha256 and size; an undo logs lines that name the batch they reverse.
What is left to undo and which files are moved away are both read from this log alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.fileio import LinkRefused, append_jsonl, file_lock, open_fd, read_jsonl

if TYPE_CHECKING:
    from core.clean import PlannedMove

STATE_DIR = ".loupe"
LOG_FILE = "clean_log.jsonl"
LOCK_FILE = "clean.lock"
DELETE, RELABEL, UNDO = "delete", "relabel", "undo"
UNDO_SKIPPED = "undo-skipped"  # logged for a change an undo could not reverse, so the next undo moves on
ACTIONS = (DELETE, RELABEL)


def log_move(root: Path, batch: str, move: PlannedMove, action: str | None = None) -> None:
    """Append one line for `move` (logged as `action`, else its own) to the dataset's change log."""
    assert move.target is not None
    entry: dict[str, Any] = {
        "batch": batch,
        "time": time.time(),
        "action": action or move.action,
        "source": move.source.relative_to(root).as_posix(),
        "target": move.target.relative_to(root).as_posix(),
        "new_label": move.new_label,
        "sha256": move.sha256,
        "size": move.size,
    }
    if move.undoes:
        entry["undoes"] = move.undoes
    if move.made_dirs:
        entry["made_dirs"] = [d.relative_to(root).as_posix() for d in move.made_dirs]
    if move.problems:
        entry["reason"] = move.reason
    with own_files():  # flushed to disk: the log survives a crash right after a move
        append_jsonl(root / STATE_DIR / LOG_FILE, entry, fsync=True, follow_symlinks=False)


def read_log(dataset_root: str | os.PathLike) -> list[dict]:
    """Every logged change of a dataset, oldest first (an unreadable line is skipped, never fatal).
    OwnFileLinked when the log or its folder is a symbolic link."""
    with own_files():
        entries = read_jsonl(Path(os.path.realpath(dataset_root)) / STATE_DIR / LOG_FILE, follow_symlinks=False)
    return [e for e in entries if {"batch", "action", "source", "target"} <= e.keys()]


class OwnFileLinked(OSError):
    """Loupe's own folder or file inside a dataset (.loupe/...) is a symbolic link: never followed, refused."""


@contextlib.contextmanager
def own_files() -> Iterator[None]:
    """Loupe's own files in a dataset are opened following no link, neither .loupe nor the file (a link there
    could make Loupe write into any file the server may write); this says so in the Clean page's words."""
    try:
        yield
    except LinkRefused as e:
        raise OwnFileLinked(errno.ELOOP, f"{e.link} is a symbolic link; Loupe never reads or writes its own files "
                                         "through a link. Remove the link (it holds none of your images)") from None


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """One apply or undo at a time per dataset (two browser tabs, two users). Refuses (OwnFileLinked) before
    anything moves when the lock, the log or their folder is a link, so every move can be logged."""
    folder = root / STATE_DIR
    with contextlib.suppress(FileExistsError):  # a folder, or a link that the opens below refuse
        os.mkdir(folder)
    with own_files(), file_lock(folder / LOCK_FILE, follow_symlinks=False):
        os.close(open_fd(folder / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, follow_symlinks=False))
        yield


def last_undoable(log: list[dict]) -> tuple[str | None, list[dict]]:
    """The newest batch with changes not yet undone (nor given up by an undo), in the order they were applied."""
    undone = {(e.get("undoes"), e.get("target")) for e in log if e.get("action") in (UNDO, UNDO_SKIPPED)}
    pending: dict[str, list[dict]] = {}
    for entry in log:
        if entry.get("action") in ACTIONS and (entry.get("batch"), entry.get("source")) not in undone:
            pending.setdefault(entry["batch"], []).append(entry)
    if not pending:
        return None, []
    last = max(pending, key=lambda b: max(e.get("time", 0) for e in pending[b]))
    return last, pending[last]


def undoable(dataset_root: str | os.PathLike) -> tuple[str | None, int, float | None]:
    """(batch, number of files, time) that `undo_last` would reverse; (None, 0, None) when nothing is left."""
    batch, entries = last_undoable(read_log(dataset_root))
    return batch, len(entries), max((e.get("time", 0) for e in entries), default=None)


def handled_files(dataset_root: str | os.PathLike) -> dict[Path, dict]:
    """Files that applied changes moved away and that are not back: original absolute path -> its log entry,
    plus "now", the absolute path the file is at."""
    root = Path(os.path.realpath(dataset_root))
    log = read_log(root)
    undone = {(e.get("undoes"), e.get("target")) for e in log if e.get("action") == UNDO}
    out: dict[Path, dict] = {}
    for entry in log:
        if entry.get("action") in ACTIONS and (entry.get("batch"), entry.get("source")) not in undone:
            out[root / entry["source"]] = {**entry, "now": root / entry["target"]}
    return out
