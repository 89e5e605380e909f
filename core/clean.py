"""Staged cleaning of a dataset folder: delete to a trash folder, relabel by moving, log every change, undo.

Nothing is ever removed from disk. A delete moves the file to `<dataset>/.trash/<batch>/<its relative path>`;
a relabel moves it to the new class folder. Every applied change is appended to
`<dataset>/.loupe/clean_log.jsonl` with its batch id, action, source and target (relative to the dataset
root), sha256 and size, so `undo_last` can put each file back exactly where it was and check it is the very
same file. Both folders are hidden, so `core.data` never counts them as images or classes.

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
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import config_problem
from core.data import LAYOUT_NAMES
from core.fileio import LinkRefused, append_jsonl, file_lock, open_fd, read_json, read_jsonl
from core.rundir import CONFIG_FILE, RunDir
from core.stamps import stamped_id

TRASH_DIR = ".trash"
STATE_DIR = ".loupe"
LOG_FILE = "clean_log.jsonl"
LOCK_FILE = "clean.lock"
DELETE, RELABEL, UNDO = "delete", "relabel", "undo"
UNDO_SKIPPED = "undo-skipped"  # logged for a change an undo could not reverse, so the next undo moves on
MAX_NAME_BYTES = 255  # the longest file or folder name ext4, APFS, NTFS and most others allow
ACTIONS = (DELETE, RELABEL)
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

    `layout` is the dataset's (as `core.data.detect_layout` names it); None detects it. Changes that cannot
    be done are skipped with their reasons and the rest still happen. A dry run returns what would happen
    and writes nothing at all (not even the log). Files are moved, never copied over or removed.
    """
    root = Path(os.path.realpath(dataset_root))
    if layout is None:
        from core.data import DataConfig, detect_layout

        layout = detect_layout(DataConfig(path=str(root)))
    batch = batch_id or stamped_id()
    if dry_run:
        planned = plan_changes(root, changes, layout, batch_id=batch)
        return CleanResult([m for m in planned if m.ok], [m for m in planned if not m.ok], None, dry_run=True)
    with _locked(root):
        planned = plan_changes(root, changes, layout, batch_id=batch, hash_files=True)
        applied, skipped = [], [m for m in planned if not m.ok]
        for move in (m for m in planned if m.ok):
            done = _move(root, move)
            if done is None:
                applied.append(move)
                _log(root, batch, move)
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
    with _locked(root):
        batch, entries = _last_undoable(read_log(root))
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
                _log(root, undo_batch, move)
                _remove_empty_dirs(root, [root / d for d in entry.get("made_dirs", [])])
            else:
                skipped.append(move)
                _log(root, undo_batch, move, action=UNDO_SKIPPED)
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


def _last_undoable(log: list[dict]) -> tuple[str | None, list[dict]]:
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
    batch, entries = _last_undoable(read_log(dataset_root))
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


# ---------------------------------------------------------------- the log


def _log(root: Path, batch: str, move: PlannedMove, action: str | None = None) -> None:
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
    with _own_files():  # flushed to disk: the log survives a crash right after a move
        append_jsonl(root / STATE_DIR / LOG_FILE, entry, fsync=True, follow_symlinks=False)


def read_log(dataset_root: str | os.PathLike) -> list[dict]:
    """Every logged change of a dataset, oldest first (an unreadable line is skipped, never fatal).
    OwnFileLinked when the log or its folder is a symbolic link."""
    with _own_files():
        entries = read_jsonl(Path(os.path.realpath(dataset_root)) / STATE_DIR / LOG_FILE, follow_symlinks=False)
    return [e for e in entries if {"batch", "action", "source", "target"} <= e.keys()]


class OwnFileLinked(OSError):
    """Loupe's own folder or file inside a dataset (.loupe/...) is a symbolic link: never followed, refused."""


@contextlib.contextmanager
def _own_files() -> Iterator[None]:
    """Loupe's own files in a dataset are opened following no link, neither .loupe nor the file (a link there
    could make Loupe write into any file the server may write); this says so in the Clean page's words."""
    try:
        yield
    except LinkRefused as e:
        raise OwnFileLinked(errno.ELOOP, f"{e.link} is a symbolic link; Loupe never reads or writes its own files "
                                         "through a link. Remove the link (it holds none of your images)") from None


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One apply or undo at a time per dataset (two browser tabs, two users). Refuses (OwnFileLinked) before
    anything moves when the lock, the log or their folder is a link, so every move can be logged."""
    folder = root / STATE_DIR
    with contextlib.suppress(FileExistsError):  # a folder, or a link that the opens below refuse
        os.mkdir(folder)
    with _own_files(), file_lock(folder / LOCK_FILE, follow_symlinks=False):
        os.close(open_fd(folder / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, follow_symlinks=False))
        yield


# ---------------------------------------------------------------- the datasets of a run


@dataclass(frozen=True)
class Dataset:
    """A folder a run's items come from, with its layout (what relabelling means there)."""

    root: Path
    layout: str


def run_datasets(run_dir: str | os.PathLike) -> list[Dataset]:
    """The dataset folder a run trained on (as recorded when it started), then its extra training folders."""
    record = read_json(RunDir(run_dir).dataset_record)
    config = read_json(RunDir(run_dir).config)
    problem = config_problem(config) if isinstance(config, dict) else f"{CONFIG_FILE} does not hold a JSON object"
    if problem:
        raise ValueError(problem)
    extra = (config.get("data") or {}).get("extra_train") or []
    return [Dataset(Path(record["root"]), record["layout"])] + [
        Dataset(Path(p).expanduser().resolve(), "folders") for p in extra
    ]


def _owner(datasets: Sequence[Dataset], file: str | os.PathLike) -> Dataset | None:
    real = Path(os.path.realpath(file))
    # The deepest root wins: an extra folder could sit inside the main one.
    for ds in sorted(datasets, key=lambda d: len(Path(os.path.realpath(d.root)).parts), reverse=True):
        if _inside(real, Path(os.path.realpath(ds.root))):
            return ds
    return None


def apply_to(datasets: Sequence[Dataset], changes: Sequence[Change], *, dry_run: bool = False) -> CleanResult:
    """`apply_changes` over several dataset folders as one batch: each change goes to the folder holding its
    file; a file in none of them is skipped."""
    batch = stamped_id()
    outside = [PlannedMove(c.action, Path(c.file), None, c.new_label,
                           ["not inside the run's dataset folders; refused"])
               for c in changes if _owner(datasets, c.file) is None]
    result = CleanResult([], outside, None, dry_run=dry_run)
    for ds in datasets:
        mine = [c for c in changes if _owner(datasets, c.file) == ds]
        if mine:
            part = apply_changes(ds.root, mine, ds.layout, dry_run=dry_run, batch_id=batch)
            result.applied += part.applied
            result.skipped += part.skipped
            result.batch_id = result.batch_id or part.batch_id
    return result


def undo_last_of(datasets: Sequence[Dataset]) -> CleanResult:
    """Undo the newest not-yet-undone batch among the folders (one apply = one batch, in one or more folders)."""
    batch = undoable_in(datasets)[0]
    if batch is None:
        return CleanResult([], [], None)
    result = CleanResult([], [], None, undone=batch)
    for ds in datasets:
        if undoable(ds.root)[0] == batch:
            part = undo_last(ds.root)
            result.applied += part.applied
            result.skipped += part.skipped
            result.batch_id = result.batch_id or part.batch_id
    return result


def undoable_in(datasets: Sequence[Dataset]) -> tuple[str | None, int, float | None]:
    """What `undo_last_of` would reverse: (batch, number of files, time), or (None, 0, None)."""
    pending = [undoable(ds.root) for ds in datasets]
    pending = [p for p in pending if p[0] is not None]
    if not pending:
        return None, 0, None
    batch, _, when = max(pending, key=lambda p: p[2])
    return batch, sum(n for b, n, _ in pending if b == batch), when


def handled_in(datasets: Sequence[Dataset]) -> dict[Path, dict]:
    """`handled_files` of every folder, merged."""
    out: dict[Path, dict] = {}
    for ds in datasets:
        out.update(handled_files(ds.root))
    return out


def log_table(datasets: Sequence[Dataset]) -> list[dict]:
    """Every folder's log, newest first, each entry with its `dataset` folder."""
    rows = [{**e, "dataset": str(ds.root)} for ds in datasets for e in read_log(ds.root)]
    return sorted(rows, key=lambda e: e.get("time", 0), reverse=True)
