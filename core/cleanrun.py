"""Cleaning the datasets of a run: a run's items may come from its dataset folder and extra training folders,
and one apply (or undo) spans all of them as one batch, each change done in the folder holding its file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.clean import Change, CleanResult, PlannedMove, apply_changes, undo_last
from core.cleanlog import handled_files, read_log, undoable
from core.config import config_problem
from core.fileio import read_json
from core.rundir import CONFIG_FILE, RunDir
from core.stamps import stamped_id


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
        if real.is_relative_to(os.path.realpath(ds.root)):
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
