"""Check labels: K-fold cross-validation gives every image a prediction from a model that never saw it.

A label check is a run of its own (task "check-labels", core.rundir): the dataset's train and valid items
(not a test side) are dealt into K folds, stratified by label and kept whole by group when the config groups
items; fold k trains the run's config on the other folds and predicts fold k. The held-out predictions of all
folds together are out of sample for every image, which is what cleanlab's scores assume (core.labelscore).

The data is verified once and decoded once (the decode cache); each fold trains with core.train's Learner in
its own directory (folds/fold_K/), so a stop saves that fold's checkpoint and a resume skips the folds already
done and continues the interrupted one from its batch. Under torchrun every rank trains its shard of each
fold, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from core import distributed, interpret, runs
from core.augment import presize_side
from core.config import TrainConfig
from core.data import ShardSampler, loaders_for, prepare
from core.env import resolve_device
from core.fileio import atomic_write, atomic_write_json, read_json
from core.imagecache import DecodedImages
from core.layouts import DataSource
from core.listing import path_text
from core.rundir import CHECK_LABELS, RunDir, remove_checkpoints
from core.split import Split, fold_groups, source_record

DEFAULT_FOLDS, MIN_FOLDS, MAX_FOLDS = 5, 2, 10
TOP_PRINTED = 10  # rows of the ranking the command line prints


@dataclass
class CheckSettings:
    """What a label check needs besides the training config (label_check.json)."""

    folds: int = DEFAULT_FOLDS  # K: each fold trains on K-1 parts and predicts the one left out
    epochs: int | None = None  # epochs each fold trains (None: the config's own); the frozen epochs of
    # fine_tune come on top, as in a run

    def __post_init__(self) -> None:
        if not MIN_FOLDS <= self.folds <= MAX_FOLDS:
            raise ValueError(f"folds must be between {MIN_FOLDS} and {MAX_FOLDS}, not {self.folds}.")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs per fold must be at least 1, not {self.epochs}.")

    def fold_config(self, cfg: TrainConfig) -> TrainConfig:
        """The config each fold trains: its epochs; no best-epoch export and no early stopping, both of which
        would choose by the held-out fold's (possibly wrong) labels and so peek at what is being checked."""
        return replace(cfg, epochs=self.epochs or cfg.epochs, keep_best=False, early_stopping=0)


def create_check(cfg: TrainConfig, settings: CheckSettings, run_dir: str | os.PathLike | None = None,
                 root: str | os.PathLike | None = None) -> Path:
    """Make a label-check run (config.json, status.json, label_check.json); `start` or `run_label_check` runs it."""
    if run_dir is None:
        run_dir = runs.create(cfg.to_dict(), root=root, name_hint="check", task=CHECK_LABELS)
    else:
        run_dir = runs.create_in(run_dir, cfg.to_dict(), CHECK_LABELS)
    write_settings(run_dir, settings)
    return Path(run_dir)


def write_settings(run_dir: str | os.PathLike, settings: CheckSettings) -> None:
    atomic_write_json(RunDir(run_dir).label_check, asdict(settings))


def read_settings(run_dir: str | os.PathLike) -> CheckSettings:
    data = read_json(RunDir(run_dir).label_check)
    return CheckSettings(folds=int(data["folds"]), epochs=data.get("epochs"))


# ---------------------------------------------------------------- folds


def assign_folds(source: DataSource, split: Split, seed: int, folds: int,
                 groups: list[str] | None = None) -> np.ndarray:
    """The fold (0..folds-1) of every item of `source`, -1 for items left out (the test side).

    Stratified by label (a multi-label item by its label set) with scikit-learn's StratifiedKFold, or
    StratifiedGroupKFold when items have groups, so a group never straddles training and scoring; plain
    KFold when no label has as many items as there are folds."""
    from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold

    checked = np.concatenate([split.train, split.valid]).astype(int)
    checked.sort()
    if len(checked) < folds:
        raise ValueError(f"A {folds}-fold label check needs at least {folds} images; this dataset has {len(checked)}.")
    strata = np.array([" ".join(sorted(source.labels[i])) for i in checked])
    fold_of = np.full(len(source), -1, dtype=int)
    x = np.zeros((len(checked), 1))
    with warnings.catch_warnings():  # "the least populated class has fewer members than n_splits" is fine here
        warnings.simplefilter("ignore", UserWarning)
        try:
            if groups is not None:
                keys = np.array([groups[i] for i in checked])
                parts = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(x, strata, keys)
            else:
                parts = StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, strata)
            parts = list(parts)
        except ValueError:  # every label has fewer items than folds: stratifying is impossible
            parts = list(KFold(folds, shuffle=True, random_state=seed).split(x))
    for k, (_, held) in enumerate(parts):
        fold_of[checked[held]] = k
    return fold_of


def fold_split(fold_of: np.ndarray, k: int) -> Split:
    """Fold k's split: train on every other checked item, predict (the "valid" side) the items of fold k."""
    return Split(np.flatnonzero((fold_of >= 0) & (fold_of != k)), np.flatnonzero(fold_of == k))


# ---------------------------------------------------------------- the process


def run_label_check(run_dir: str | os.PathLike, resume: bool = False) -> int:
    """Run the check in `run_dir` to the end: every fold, then the scores; returns the exit code (0 done or
    stopped, 1 failed). Mirrors core.job.run_training: events, status, the compute lock, STOP and SIGTERM."""
    from core.job import Reporter, Signals, check_run_dir, fail_run, load_config

    run_dir = Path(run_dir)
    info = distributed.DistInfo.from_env()
    writer = runs.EventWriter(run_dir) if info.main else None
    report = Reporter(writer) if info.main else (lambda kind, **fields: None)
    signals = Signals()
    try:
        check_run_dir(run_dir)
        cfg, settings = load_config(run_dir), read_settings(run_dir)
        lock = runs.acquire_compute_lock(run_dir.parent) if info.main else contextlib.nullcontext()
        with lock:
            if info.main:
                runs.mark_running(run_dir)
                if resume:
                    runs.clear_stop(run_dir)
            stop = (lambda: signals.received or runs.stop_requested(run_dir)) if info.main else \
                (lambda: signals.received)
            finished = _check(run_dir, cfg, settings, report, stop, info, resume)
            if info.main:
                if finished:
                    runs.mark_finished(run_dir, runs.DONE)
                else:
                    runs.mark_finished(run_dir, runs.STOPPED)
            return 0
    except Exception as e:  # every failure ends as a readable event and a failed status, never a silent exit
        return fail_run(e, info, report, run_dir)
    finally:
        if writer:
            writer.close()
        distributed.cleanup()


def _check(run_dir: Path, cfg: TrainConfig, settings: CheckSettings, report, should_stop, info, resume: bool) -> bool:
    """Every fold not done yet, then the scores; False when a stop came first."""
    from core.job import split_table
    from core.train import Learner, StopRequested, load_checkpoint, setup_training

    run = RunDir(run_dir)
    device = distributed.setup(resolve_device(cfg.device))
    source, bad, split = prepare(cfg.data)
    groups = fold_groups(source, cfg.data)  # duplicates (core.keeptogether) share a fold too
    fold_of = assign_folds(source, split, cfg.data.seed, settings.folds, groups)
    checked = np.flatnonzero(fold_of >= 0)
    fold_cfg = settings.fold_config(cfg)
    if info.main:
        sides = np.where(fold_of >= 0, "train", split.sides(len(source)))  # checked items, and a test side as it was
        atomic_write_json(run.dataset_record, source_record(source, Split.from_sides(sides)))
        atomic_write_json(run.label_check, {**asdict(settings), "fold_of": fold_of.tolist()})
        print(f"Loupe label check {run_dir.name}: {source.describe()}, {settings.folds} folds of "
              f"{fold_cfg.total_epochs} epochs on {device}", flush=True)
        for b in bad:
            print(f"skipped {path_text(b.path)}: {b.reason}", file=sys.stderr, flush=True)
        report("check_start", resume=resume, device=str(device), config=cfg.to_dict(), vocab=source.vocab,
               folds=settings.folds, epochs_per_fold=fold_cfg.total_epochs, n_items=len(checked),
               bad_files=[{"file": str(b.path), "reason": b.reason} for b in bad])
    _warm(source, checked, cfg, report)
    for k in range(1, settings.folds + 1):
        fold = run.fold(k)
        if fold.heldout.exists():
            continue
        fold.path.mkdir(parents=True, exist_ok=True)
        part = fold_split(fold_of, k - 1)
        dls = loaders_for(source, part, [], fold_cfg.data, device, info.rank, info.world_size)
        on_event = _tagged(report, k)
        learner = Learner(fold_cfg, setup_training(fold_cfg, dls), on_event=on_event, should_stop=should_stop,
                          run_dir=fold.path)
        report("fold_start", fold=k, folds=settings.folds, n_train=len(part.train), n_heldout=len(part.valid))
        started = time.perf_counter()
        try:
            learner.fit(load_checkpoint(fold.path) if fold.checkpoint.exists() else None)
        except StopRequested as stop:
            report("stopped", fold=k, message=f"{stop} (fold {k} of {settings.folds}); Resume continues from there.")
            return False
        sharded = isinstance(dls.valid.sampler, ShardSampler)  # every rank then predicts the whole fold
        table = split_table(learner.model, source, part, "valid", fold_cfg, learner.on_device,
                            loader=None if sharded else dls.valid)
        if info.main:
            interpret.save_table(table, fold.heldout)
            remove_checkpoints(fold.path)
            report("fold_done", fold=k, folds=settings.folds, error_rate=float(1 - table["correct"].mean()),
                   seconds=round(time.perf_counter() - started, 3))
    if info.main:
        issues = write_issues(run_dir)
        flagged = int(issues["issue"].sum())
        report("done", folds=settings.folds, n_items=len(issues), flagged=flagged)
        print(f"{flagged} of {len(issues)} images flagged as likely mislabelled; ranking in {run.label_issues}")
    return True


def _tagged(report, fold: int):
    """The fold's own events (batch, epoch, checkpoint...) carry the fold they belong to."""
    return lambda kind, **fields: report(kind, fold=fold, **fields)


def _warm(source: DataSource, items: np.ndarray, cfg: TrainConfig, report) -> None:
    """Decode every checked image once before the first fold; every fold then reads the cache."""
    files = [source.files[i] for i in items]
    images = DecodedImages(files, presize_side(cfg.data.size), max_pixels=cfg.data.max_pixels)
    entry_mb = 3 * images.side**2 / 2**20
    images.warm(on_progress=lambda done, total: report("cache", done=done, total=total, cache_mb=done * entry_mb))


# ---------------------------------------------------------------- results


def out_of_sample_table(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every fold's held-out item table in one (sorted by item), with each item's fold (from 1)."""
    run = RunDir(run_dir)
    settings = read_settings(run_dir)
    parts = []
    for k in range(1, settings.folds + 1):
        path = run.fold(k).heldout
        if not path.exists():
            raise FileNotFoundError(f"Fold {k} of the label check {run.name} has not finished.")
        parts.append(interpret.load_table(path).assign(fold=k))
    attrs = parts[0].attrs
    table = pd.concat(parts, ignore_index=True).sort_values("item", kind="stable").reset_index(drop=True)
    table.attrs = attrs
    return table


def loss_histories(run_dir: str | os.PathLike, n_items: int) -> np.ndarray:
    """[n_items, epochs]: each item's training loss per epoch, averaged over the folds that trained on it
    (NaN where none did). The training dynamics every fold records anyway (item_losses/)."""
    run = RunDir(run_dir)
    cfg, settings = read_check(run_dir)
    epochs = settings.fold_config(cfg).total_epochs
    sums, counts = np.zeros((n_items, epochs)), np.zeros((n_items, epochs))
    for k in range(1, settings.folds + 1):
        for epoch in range(epochs):
            path = run.fold(k).item_losses(epoch)
            if not path.exists():  # the epoch early-stopped runs would skip; folds train every epoch
                continue
            with np.load(path) as data:
                np.add.at(sums[:, epoch], data["item"], data["loss"])
                np.add.at(counts[:, epoch], data["item"], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def write_issues(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Score the out-of-sample predictions (core.labelscore) and write label_issues.csv atomically."""
    from core.labelscore import score_labels

    run = RunDir(run_dir)
    table = out_of_sample_table(run_dir)
    root = Path(read_json(run.dataset_record)["root"])
    history = loss_histories(run_dir, int(table["item"].max()) + 1)[table["item"].to_numpy()]
    issues = score_labels(table, root, history)
    atomic_write(run.label_issues, lambda tmp: issues.to_csv(tmp, index=False))
    return issues


def read_issues(run_dir: str | os.PathLike) -> pd.DataFrame:
    """label_issues.csv as written (file names as text, never parsed as numbers)."""
    text = {"file": str, "label": str, "suggested": str, "loss_history": str}
    return pd.read_csv(RunDir(run_dir).label_issues, dtype=text,
                       keep_default_na=False, na_values={"score": [""]})


def print_top(issues: pd.DataFrame, n: int = TOP_PRINTED) -> None:
    columns = [c for c in ("file", "label", "suggested", "score", "issue") if c in issues]
    print(issues.head(n)[columns].to_string(index=False))


# ---------------------------------------------------------------- for the pages


def latest_check(data_path: str, root: str | os.PathLike | None = None):
    """The newest label check (a core.runlist.RunInfo) of the dataset at `data_path`, or None."""
    from core.runlist import label_checks

    wanted = Path(data_path).resolve()
    return next((info for info in label_checks(root)
                 if info.config is not None and Path(info.config.data.path).resolve() == wanted), None)


@dataclass(frozen=True)
class CheckProgress:
    """Where a label check stands, from its last events (cheap: read from the end of events.jsonl)."""

    folds: int
    folds_done: int
    fold: int | None  # the fold training now (from 1), None before the first
    epoch: int | None  # its epoch (from 1)
    epochs: int  # epochs each fold trains
    fraction: float  # of the whole check, 0-1
    seconds_left: float | None  # at the pace so far; None until a batch has trained

    def line(self) -> str:
        from core.stamps import fmt_duration

        if self.fold is None:
            return f"{self.folds} folds: checking and decoding the images…"
        left = f" · about {fmt_duration(self.seconds_left)} left" if self.seconds_left is not None else ""
        return (f"Fold {self.fold} of {self.folds}, epoch {self.epoch or 1} of {self.epochs} · "
                f"{self.folds_done} done{left}")


def check_progress(run_dir: str | os.PathLike) -> CheckProgress:
    from core.runlog import last_event

    cfg, settings = read_check(run_dir)
    epochs = settings.fold_config(cfg).total_epochs
    folds_done = sum(RunDir(run_dir).fold(k).heldout.exists() for k in range(1, settings.folds + 1))
    batch = last_event(run_dir, "batch")
    if not batch or batch.get("fold") is None:
        return CheckProgress(settings.folds, folds_done, None, None, epochs, folds_done / settings.folds, None)
    fold, epoch = int(batch["fold"]), int(batch["epoch"])
    within = (epoch + batch["batch"] / max(batch["n_batches"], 1)) / epochs
    fraction = min(1.0, (fold - 1 + within) / settings.folds)
    began = runs.read_status(run_dir).get("running_at")
    left = None
    if isinstance(began, (int, float)) and fraction > 0 and isinstance(batch.get("time"), (int, float)):
        left = (batch["time"] - began) / fraction * (1 - fraction)
    return CheckProgress(settings.folds, folds_done, fold, epoch + 1, epochs, fraction, left)


def read_check(run_dir: str | os.PathLike) -> tuple[TrainConfig, CheckSettings]:
    from core.job import load_config

    return load_config(run_dir), read_settings(run_dir)


def issue_rows(issues: pd.DataFrame, root: Path) -> pd.DataFrame:
    """label_issues.csv with each `file` as the full path (how the cleaner and the gallery name files)."""
    full = [str(root / f) if not Path(f).is_absolute() else f for f in issues["file"]]
    return issues.assign(file=full)


def suggestions_above(rows: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The rows whose score reaches `threshold` and whose suggested label differs from the given one."""
    return rows[(rows["score"] >= threshold) & (rows["suggested"] != rows["label"]) & (rows["suggested"] != "")]
