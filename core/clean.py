"""Staged cleaning of a dataset folder: delete to a trash folder, relabel by moving, log every change, undo.

Nothing is ever removed from disk. A delete moves the file to `<dataset>/.trash/<batch>/<its relative path>`;
a relabel moves it to the new class folder. Every applied change is appended to the dataset's change log
(core.cleanlog, `<dataset>/.loupe/clean_log.jsonl`), so `undo_last` can put each file back exactly where it was
and check it is the very same file. Both folders are hidden, so `core.data` never counts them as images or
classes. Cleaning a run's several dataset folders as one batch is core.cleanrun.

Safety rules, applied to every change before anything moves:
  * the source must still exist, be a regular file (not a symlink) and, where the change recorded its size,
    mtime or sha256 (or the time its loss was computed), be unchanged since: otherwise it is skipped;
  * the resolved source and target must both lie inside the resolved dataset root (`..` and symlinked
    folders pointing elsewhere are refused);
  * a target that exists gets a new name (`name (1).jpg`) and is never overwritten;
  * relabelling needs the label to be a folder name: layouts "folders" and "split_folders" only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.cleanlog import ACTIONS, DELETE, RELABEL, UNDO, UNDO_SKIPPED, last_undoable, locked, log_move, read_log
from core.layouts import LAYOUT_NAMES
from core.stamps import stamped_id

TRASH_DIR = ".trash"
MAX_NAME_BYTES = 255  # the longest file or folder name ext4, APFS, NTFS and most others allow
RELABEL_LAYOUTS = ("folders", "split_folders")
MTIME_TOLERANCE = 1e-6  # seconds; mtimes written as floats lose a little precision in JSON
_COPY_NUMBER = re.compile(r"^(.*) \((\d+)\)$")


@dataclass(frozen=True)
class Change:
    """One staged change to one file of a dataset."""

    file: Path  # the item's path (absolute, or relative to the dataset root)
    action: str  # "delete" (to the trash) or "relabel" (to another class folder)
    new_label: str | None = None  # relabel: the class folder to move to
    size: int | None = None  # size in bytes when the change was staged; a different size means the file changed
    mtime: float | None = None  # modification time when staged; a different one means the file changed
    sha256: str | None = None  # content hash when staged; a different one means the file changed
    computed_at: float | None = None  # when its loss was computed: a file modified after that is skipped


@dataclass
class PlannedMove:
    """What one change does (or would do): move `source` to `target`, unless `problems` says why not."""

    action: str
    source: Path  # absolute, resolved
    target: Path | None  # absolute; None when no target could be worked out
    new_label: str | None = None
    problems: list[str] = field(default_factory=list)
    sha256: str | None = None  # of the source, once hashed (apply and undo hash; plan does only when asked)
    size: int | None = None
    undoes: str | None = None  # undo: the batch this move reverses
    made_dirs: list[Path] = field(default_factory=list)  # folders the move had to create (undo removes them)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def reason(self) -> str:
        return "; ".join(self.problems)


@dataclass
class CleanResult:
    """The outcome of `apply_changes` or `undo_last`."""

    applied: list[PlannedMove]  # done (or, for a dry run, what would be done)
    skipped: list[PlannedMove]  # not done, each with its reasons in `problems`
    batch_id: str | None  # the id the applied moves were logged under; None for a dry run or when nothing moved
    dry_run: bool = False
    undone: str | None = None  # undo: the batch that was reversed

    def summary(self) -> str:
        """One line for a person: what happened and how much was skipped."""
        verb = "would move" if self.dry_run else ("restored" if self.undone else "applied")
        counts = {a: sum(m.action == a for m in self.applied) for a in (DELETE, RELABEL, UNDO)}
        parts = [f"{n} {a}{'s' if n != 1 else ''}" for a, n in counts.items() if n and a != UNDO]
        what = ", ".join(parts) if parts else f"{len(self.applied)} file{'s' if len(self.applied) != 1 else ''}"
        line = f"{verb.capitalize()} {what}"
        if self.skipped:
            line += f"; skipped {len(self.skipped)}"
        return line + "."


# ---------------------------------------------------------------- paths


def trash_dir(root: str | os.PathLike) -> Path:
    return Path(root) / TRASH_DIR


def relabel_supported(layout: str) -> bool:
    """Whether relabelling can be done by moving files (the label is a folder name)."""
    return layout in RELABEL_LAYOUTS


def label_problem(label: str | None) -> str | None:
    """Why `label` cannot be a class folder name, or None when it can."""
    if not label or not label.strip():
        return "no class given to relabel to"
    if label != label.strip() or "/" in label or "\\" in label or "\0" in label:
        return f"class {label!r} cannot be a folder name (slashes, surrounding spaces)"
    if label in (".", "..") or label.startswith("."):
        return f"class {label!r} cannot be a folder name (hidden folders are not classes)"
    size = len(label.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        return f"class name is {size} bytes long, more than the {MAX_NAME_BYTES} a folder name may have"
    return None


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _resolve_source(root: Path, file: str | os.PathLike) -> tuple[Path, list[str]]:
    """The real path of `file` and what is wrong with using it as a source."""
    given = Path(file)
    given = given if given.is_absolute() else root / given
    real = Path(os.path.realpath(given))
    if not _inside(real, root) or real == root:
        return real, [f"{given} resolves outside the dataset folder {root}; refused"]
    if os.path.islink(given):
        return real, [f"{given.name} is a symbolic link; only regular files are moved"]
    rel = real.relative_to(root)
    if any(part.startswith(".") for part in rel.parts[:-1]):
        return real, [f"{rel.as_posix()} is in a hidden folder (trash or Loupe's own files), not a dataset item"]
    return real, []


def _target_for(
    root: Path, rel: Path, action: str, new_label: str | None, layout: str, batch: str
) -> tuple[Path | None, list[str]]:
    """Where a change moves the file at `root/rel` (before collision renaming), or the problems."""
    if action == DELETE:
        return root / TRASH_DIR / batch / rel, []
    problem = label_problem(new_label)
    if problem:
        return None, [problem]
    if not relabel_supported(layout):
        name = LAYOUT_NAMES.get(layout, layout)
        why = f"relabelling is not supported yet for datasets with {name}: change the label there (deleting works)"
        return None, [why]
    class_level = 0 if layout == "folders" else 1  # split_folders: root/<split>/<class>/...
    if len(rel.parts) < class_level + 2:
        return None, [f"{rel.as_posix()} is not inside a class folder, so it cannot be moved to another one"]
    if rel.parts[class_level] == new_label:
        return None, [f"already in class {new_label!r}"]
    return root.joinpath(*rel.parts[:class_level], new_label, *rel.parts[class_level + 1 :]), []


def _free_name(target: Path, taken: set[Path]) -> Path:
    """`target`, or `name (1).ext`, `name (2).ext`... : the first that neither exists nor is taken in this batch."""
    candidate, n = target, 0
    stem, suffix = target.stem, target.suffix
    match = _COPY_NUMBER.match(stem)
    if match:  # "x (1).jpg" colliding becomes "x (2).jpg", not "x (1) (1).jpg"
        stem, n = match.group(1), int(match.group(2))
    while os.path.lexists(candidate) or candidate in taken:
        n += 1
        candidate = target.with_name(f"{stem} ({n}){suffix}")
    return candidate


def _changed_since(change: Change, stat: os.stat_result, sha: str | None) -> str | None:
    if change.size is not None and stat.st_size != change.size:
        return f"changed on disk since it was staged (size {stat.st_size} bytes, was {change.size})"
    if change.mtime is not None and abs(stat.st_mtime - change.mtime) > MTIME_TOLERANCE:
        return "changed on disk since it was staged (modification time differs)"
    if change.computed_at is not None and stat.st_mtime > change.computed_at:
        return "changed on disk since its loss was computed; look at it again before changing it"
    if change.sha256 is not None and sha is not None and sha != change.sha256:
        return "changed on disk since it was staged (content differs)"
    return None


# ---------------------------------------------------------------- planning


def plan_changes(
    dataset_root: str | os.PathLike,
    changes: Sequence[Change],
    layout: str,
    *,
    batch_id: str = "BATCH",
    hash_files: bool = False,
) -> list[PlannedMove]:
    """What each change would do, in order, with the reasons any of them cannot be done. Touches nothing.

    Targets account for collisions with existing files and with earlier changes of the same list, so the
    plan is exactly what `apply_changes` will do. `hash_files` also computes each source's sha256 (needed
    to check a recorded hash, and for the log); a preview can leave it off to stay cheap.
    """
    root = Path(os.path.realpath(dataset_root))
    planned: list[PlannedMove] = []
    seen: set[Path] = set()
    taken: set[Path] = set()
    for change in changes:
        move = _plan_one(root, change, layout, batch_id, hash_files, seen, taken)
        planned.append(move)
        if move.ok and move.target is not None:
            taken.add(move.target)
    return planned


def _plan_one(root: Path, change: Change, layout: str, batch: str, hash_files: bool, seen: set[Path],
              taken: set[Path]) -> PlannedMove:
    source, problems = _resolve_source(root, change.file)
    move = PlannedMove(change.action, source, None, change.new_label, problems)
    if change.action not in ACTIONS:
        move.problems.append(f"unknown action {change.action!r}; use one of {', '.join(ACTIONS)}")
    if source in seen:
        move.problems.append("listed more than once; only the first change is used")
    if move.problems:
        return move
    seen.add(source)
    try:
        stat = os.stat(source, follow_symlinks=False)
    except FileNotFoundError:
        move.problems.append("file not found: it was moved or deleted since the losses were computed")
        return move
    if not os.path.isfile(source):
        move.problems.append("not a regular file")
        return move
    move.size = stat.st_size
    if hash_files or change.sha256 is not None:
        move.sha256 = file_sha256(source)
    changed = _changed_since(change, stat, move.sha256)
    if changed:
        move.problems.append(changed)
        return move
    target, problems = _target_for(root, source.relative_to(root), change.action, change.new_label, layout, batch)
    move.problems += problems
    if target is None:
        return move
    # The folder the target lands in must really be inside the dataset (a class folder may be a symlink).
    if not _inside(Path(os.path.realpath(target.parent)), root):
        move.problems.append(f"target folder {target.parent} resolves outside the dataset folder {root}; refused")
        return move
    move.target = _free_name(target, taken)
    return move


# ---------------------------------------------------------------- applying and undoing


def apply_changes(
    dataset_root: str | os.PathLike,
    changes: Sequence[Change],
    layout: str | None = None,
    *,
    dry_run: bool = False,
    batch_id: str | None = None,
) -> CleanResult:
    """Carry out `changes` as one batch: deletes to the trash, relabels to their class folder, each logged.

    `layout` is the dataset's (as `core.layouts.detect_layout` names it); None detects it. Changes that cannot
    be done are skipped with their reasons and the rest still happen. A dry run returns what would happen
    and writes nothing at all (not even the log). Files are moved, never copied over or removed.
    """
    root = Path(os.path.realpath(dataset_root))
    if layout is None:
        from core.data import DataConfig
        from core.layouts import detect_layout

        layout = detect_layout(DataConfig(path=str(root)))
    batch = batch_id or stamped_id()
    if dry_run:
        planned = plan_changes(root, changes, layout, batch_id=batch)
        return CleanResult([m for m in planned if m.ok], [m for m in planned if not m.ok], None, dry_run=True)
    with locked(root):
        planned = plan_changes(root, changes, layout, batch_id=batch, hash_files=True)
        applied, skipped = [], [m for m in planned if not m.ok]
        for move in (m for m in planned if m.ok):
            done = _move(root, move)
            if done is None:
                applied.append(move)
                log_move(root, batch, move)
            else:
                move.problems.append(done)
                skipped.append(move)
    return CleanResult(applied, skipped, batch if applied else None)


def undo_last(dataset_root: str | os.PathLike) -> CleanResult:
    """Put back every file of the most recent batch that is not undone yet, each to its exact former path.

    A file is restored only if it is still where the batch put it with the same sha256, and nothing now
    occupies its old path; otherwise it is skipped with the reason (and a later undo can try again).
    The restores are logged as one batch of "undo" lines. A file that cannot be put back (its trash folder
    was removed by hand, say) is reported and logged as "undo-skipped", and stays where it is: the batch
    counts as undone, so the next undo moves on to the batch before instead of retrying this one for ever.
    Folders the batch created are removed once empty.
    """
    root = Path(os.path.realpath(dataset_root))
    with locked(root):
        batch, entries = last_undoable(read_log(root))
        if batch is None:
            return CleanResult([], [], None, undone=None)
        undo_batch = stamped_id()
        applied, skipped = [], []
        for entry in reversed(entries):
            move = _plan_undo(root, entry)
            move.undoes = batch
            if move.ok:
                failure = _move(root, move)
                if failure:
                    move.problems.append(failure)
            if move.ok:
                applied.append(move)
                log_move(root, undo_batch, move)
                _remove_empty_dirs(root, [root / d for d in entry.get("made_dirs", [])])
            else:
                skipped.append(move)
                log_move(root, undo_batch, move, action=UNDO_SKIPPED)
    return CleanResult(applied, skipped, undo_batch if applied else None, undone=batch)


def _plan_undo(root: Path, entry: dict) -> PlannedMove:
    current, original = root / entry["target"], root / entry["source"]
    move = PlannedMove(UNDO, current, original, entry.get("new_label"), [], entry.get("sha256"), entry.get("size"))
    for path in (current, original):
        if not _inside(Path(os.path.realpath(path)), root):
            move.problems.append(f"{path} resolves outside the dataset folder {root}; refused")
            return move
    if os.path.islink(current) or not os.path.isfile(current):
        move.problems.append(f"{entry['target']} is no longer there, so it cannot be put back")
    elif entry.get("sha256") and file_sha256(current) != entry["sha256"]:
        move.problems.append(f"{entry['target']} was changed after it was moved; left where it is")
    elif os.path.lexists(original):
        move.problems.append(f"a file now exists at {entry['source']}; it is not overwritten")
    return move


def _move(root: Path, move: PlannedMove) -> str | None:
    """Move move.source to move.target without ever overwriting; None on success, else why it failed."""
    assert move.target is not None
    made = move.made_dirs = _make_dirs(root, move.target.parent)
    try:
        try:
            _move_no_replace(move.source, move.target)
        except FileExistsError:
            # Someone created the target between the plan and now: take the next free name instead.
            move.target = _free_name(move.target, set())
            _move_no_replace(move.source, move.target)
    except OSError as e:
        _remove_empty_dirs(root, made)
        move.made_dirs = []
        return f"could not move: {e}"
    return None


def _move_no_replace(source: Path, target: Path) -> None:
    """Rename without replacing an existing target: a hard link then an unlink, so it fails if `target`
    exists; where hard links are not available (some filesystems), a checked rename or a copy."""
    try:
        os.link(source, target, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "target exists", str(target)) from None
        shutil.move(source, target)  # a rename, or copy2 (keeping times) and unlink across filesystems
        return
    os.unlink(source)


def _make_dirs(root: Path, folder: Path) -> list[Path]:
    """mkdir -p inside root, returning the folders it created (outermost first)."""
    missing = []
    current = folder
    while not current.exists() and current != root:
        missing.append(current)
        current = current.parent
    made = []
    for path in reversed(missing):
        try:
            path.mkdir()
            made.append(path)
        except FileExistsError:
            pass
    return made


def _remove_empty_dirs(root: Path, folders: Sequence[Path]) -> None:
    """rmdir the given folders, innermost first, where they are empty; anything else stays."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if folder != root and _inside(folder, root):
            with contextlib.suppress(OSError):
                folder.rmdir()


