"""Every path of a run, and what kind of run it is, in one place.

A run lives in `runs/<id>/`. Each file name below is written here and nowhere else; modules that write or read
a run's files ask a `RunDir` for the path. This module imports neither torch nor streamlit, so pages can
look at a run without paying for PyTorch.

  config.json          the TrainConfig as a dict, written once when the run is created
  status.json          state, times, pid and the run's task ("train" or "lr-find"), recorded at creation
  events.jsonl         one JSON object per line, appended by the child
  train.log            the child's stdout and stderr
  STOP                 present when a cooperative stop was requested
  checkpoint.pt        resumable state (weights, optimizer, batch position); kept only while resumable
  best.pt              the weights of the best epoch so far (keep_best)
  model.safetensors    the exported model bundle
  model.onnx, model.onnx.json   the model as ONNX and its preprocessing (core.export; on request)
  lr_find.json         an LR-finder sweep's curve and suggestions
  dataset.json         every item, label and side of the split, as the run saw them
  item_losses/epoch_NNN.npz   each training item's loss per epoch (epochs from 0)
  interpret_<split>.parquet   the per-item interpretation table of one split
  interpret_<split>_tta.parquet   the same with test-time augmentation (core.tta), made when first asked for

A label check (task "check-labels") holds, besides config.json, status.json, events.jsonl and dataset.json:
  label_check.json     its settings (folds, epochs per fold) and, once started, the fold of every item
  folds/fold_K/        one fold's training (K from 1): checkpoint.pt while it trains, item_losses/, and
                       heldout.parquet, the held-out items' out-of-sample item table (the fold is done)
  label_issues.csv     one row per image, most likely mislabelled first (core.labelscore)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
STATUS_LOCK_FILE = ".status.lock"
EVENTS_FILE = "events.jsonl"
LOG_FILE = "train.log"
STOP_FILE = "STOP"
CHECKPOINT_FILE = "checkpoint.pt"
BEST_WEIGHTS_FILE = "best.pt"
BUNDLE_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"  # the model exported to ONNX (core.export), on request
ONNX_META_FILE = "model.onnx.json"  # its preprocessing, classes and parity figure
LR_FIND_FILE = "lr_find.json"
DATASET_RECORD_FILE = "dataset.json"
ITEM_LOSSES_DIR = "item_losses"
LABEL_CHECK_FILE = "label_check.json"
FOLDS_DIR = "folds"
HELDOUT_FILE = "heldout.parquet"
LABEL_ISSUES_FILE = "label_issues.csv"
COMPUTE_LOCK_FILE = ".compute.lock"  # in the runs root, shared by every run under it

TRAIN = "train"
LR_FIND = "lr-find"  # the same word as the command line's `python -m core lr-find`
CHECK_LABELS = "check-labels"  # K-fold out-of-sample predictions scored for label issues
TASKS = (TRAIN, LR_FIND, CHECK_LABELS)

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (nothing is read or created by building one)."""

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def status(self) -> Path:
        return self.path / STATUS_FILE

    @property
    def status_lock(self) -> Path:
        return self.path / STATUS_LOCK_FILE

    @property
    def events(self) -> Path:
        return self.path / EVENTS_FILE

    @property
    def log(self) -> Path:
        return self.path / LOG_FILE

    @property
    def stop(self) -> Path:
        return self.path / STOP_FILE

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def best_weights(self) -> Path:
        return self.path / BEST_WEIGHTS_FILE

    @property
    def bundle(self) -> Path:
        return self.path / BUNDLE_FILE

    @property
    def onnx(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def onnx_meta(self) -> Path:
        return self.path / ONNX_META_FILE

    @property
    def lr_find(self) -> Path:
        return self.path / LR_FIND_FILE

    @property
    def dataset_record(self) -> Path:
        return self.path / DATASET_RECORD_FILE

    @property
    def item_losses_dir(self) -> Path:
        return self.path / ITEM_LOSSES_DIR

    def item_losses(self, epoch: int) -> Path:
        """The per-item losses of `epoch` (counted from 0, as the training loop does)."""
        return self.item_losses_dir / f"epoch_{epoch:03d}.npz"

    def latest_item_losses(self) -> tuple[int, Path] | None:
        """(epoch, file) of the newest per-item losses, or None before the first epoch ended."""
        files = sorted(self.item_losses_dir.glob("epoch_*.npz"))
        return (int(files[-1].stem.split("_")[-1]), files[-1]) if files else None

    def table(self, split: str) -> Path:
        """Where the run keeps the item table of one split: `interpret_<split>.parquet`."""
        if not _SPLIT_NAME.match(split):
            raise ValueError(f"split must be a plain name (letters, digits, _ or -), not {split!r}.")
        return self.path / f"interpret_{split}.parquet"

    def table_tta(self, split: str) -> Path:
        """The same table with test-time augmentation's probabilities (core.tta): `interpret_<split>_tta.parquet`,
        made on demand (Interpret's switch, bench/tta.py), never by the run itself."""
        return self.table(split).with_name(f"interpret_{split}_tta.parquet")

    def has_model(self) -> bool:
        return self.bundle.is_file()

    @property
    def label_check(self) -> Path:
        return self.path / LABEL_CHECK_FILE

    @property
    def label_issues(self) -> Path:
        return self.path / LABEL_ISSUES_FILE

    def fold(self, k: int) -> RunDir:
        """Fold k's own directory (k from 1), laid out like a run: its checkpoint and item losses."""
        return RunDir(self.path / FOLDS_DIR / f"fold_{k}")

    @property
    def heldout(self) -> Path:
        """In a fold's directory: the held-out items' item table, written when the fold is done."""
        return self.path / HELDOUT_FILE

    def resume_files(self) -> list[Path]:
        """What only a resume needs and that is there: the checkpoint and best.pt (a label check's: those of its
        folds)."""
        folds = sorted((self.path / FOLDS_DIR).glob(f"fold_*/{CHECKPOINT_FILE}"))
        return [p for p in (self.checkpoint, self.best_weights, *folds) if p.is_file()]


def task_of(run: RunDir | str | os.PathLike, status: dict[str, Any]) -> str:
    """The run's task: as status.json records it (at creation, and again by every launch). Runs made before the
    task was recorded at creation are sweeps when they hold a sweep's curve, else training runs."""
    task = status.get("task")
    if task in TASKS:
        return task
    return LR_FIND if RunDir(run).lr_find.exists() else TRAIN


def is_lr_find(run: RunDir | str | os.PathLike, status: dict[str, Any]) -> bool:
    """Is this run an LR-finder sweep rather than a training run? Decided here only."""
    return task_of(run, status) == LR_FIND


def is_label_check(run: RunDir | str | os.PathLike, status: dict[str, Any]) -> bool:
    """Is this run a label check (K-fold out-of-sample predictions) rather than a training run?"""
    return task_of(run, status) == CHECK_LABELS


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    return RunDir(run_dir).checkpoint.exists()


def checkpoint_bytes(run_dir: str | os.PathLike) -> int:
    """Disk space held by what only a resume needs: the checkpoint (weights, optimizer state) and best.pt."""
    return sum(path.stat().st_size for path in RunDir(run_dir).resume_files())


def remove_checkpoints(run_dir: str | os.PathLike) -> int:
    """Delete what only a resume needs (see `checkpoint_bytes`); returns the bytes freed. The exported model,
    the tables and the events stay: the run can still be looked at, used and continued from (init_from),
    only no longer resumed. A finished run does this itself; a stopped or failed one on the user's word."""
    freed = 0
    for path in RunDir(run_dir).resume_files():
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        freed += size
    return freed
