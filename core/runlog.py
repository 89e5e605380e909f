"""A run's event log (events.jsonl): written by the child, read whole by the CLI and Runs, followed live by Train.

`EventWriter` appends one JSON object per line; `read_events` reads complete lines from a byte offset;
`RunTail` follows one run's log from where it last stopped (the Train page's live view keeps one per run,
shared by every browser tab watching it) and keeps a bounded, decimated history, so memory stays flat however
long the run; `RunView` is its snapshot, with progress and ETA. Also what else a live run has to show: the
hardest training images of its latest epoch and the end of its log. Imports neither torch nor streamlit.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.config import TrainConfig, read_run_config
from core.fileio import jsonl_line, parse_jsonl, read_json, write_line
from core.rundir import EVENTS_FILE, RunDir

PathArg = str | os.PathLike
MAX_POINTS = 1000  # per-batch points a RunTail keeps; older ones are thinned evenly as the run grows


def _jsonable(value: Any) -> Any:
    """Plain JSON values; non-finite floats become null (see EventWriter)."""
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays, without importing either
        return _jsonable(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    try:
        return _jsonable(float(value))
    except (TypeError, ValueError):
        return str(value)


class EventWriter:
    """Appends events to run_dir/events.jsonl: one JSON object per line, `{"event": kind, "time": ..., **fields}`.

    Each line goes out in a single O_APPEND write, so a reader in another process sees either nothing or a
    whole line (`read_events` also ignores an unfinished last line). fsync per line makes the events survive
    a machine crash; pass fsync=False where that is not worth a disk flush per line.
    NaN and infinities are written as null: the file stays strict JSON that any reader parses, and
    pandas/charts read null as a missing point. Numpy and torch values are converted with .tolist().
    Under torchrun only rank 0 should write.
    """

    def __init__(self, run_dir: PathArg, fsync: bool = True) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self.fsync = fsync
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        """Append one event and return it exactly as written (non-finite floats already null)."""
        if self._fd is None:
            raise ValueError("EventWriter is closed.")
        if "event" in fields or "time" in fields:
            raise ValueError("'event' and 'time' are set by emit; use other field names.")
        record = _jsonable({"event": kind, "time": time.time(), **fields})
        write_line(self._fd, jsonl_line(record), fsync=self.fsync)
        return record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def read_events(run_dir: PathArg, since: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Events from byte offset `since` on, and the offset to pass next time.

    Only complete lines are returned: an unfinished last line is left for the next call (the returned offset
    points at its start). Corrupt lines are skipped. If the file became shorter than `since` (it was
    replaced), reading starts over from 0.
    """
    try:
        f = open(Path(run_dir) / EVENTS_FILE, "rb")
    except FileNotFoundError:
        return [], since
    with f:
        if since > os.fstat(f.fileno()).st_size:
            since = 0
        f.seek(since)
        data = f.read()
    end = data.rfind(b"\n") + 1
    return parse_jsonl(data[:end]), since + end


def load_events(run_dir: PathArg, kind: str | None = None) -> list[dict[str, Any]]:
    """All complete events of a run, or only those whose `event` is `kind`."""
    events, _ = read_events(run_dir)
    return events if kind is None else [e for e in events if e.get("event") == kind]



def epoch_number(epoch: Any) -> Any:
    """An epoch (or a pandas column of them) as people count it, from 1. Events, checkpoints and item_losses
    files count from 0, like the training loop; every page converts here, when it shows one."""
    return epoch + 1


def exported_epoch(events: list[dict[str, Any]]) -> tuple[int | None, str | None]:
    """Which finished epoch (0-based, as in the events) the run's exported model comes from, and why:

    "best": "Keep the best epoch" loaded that epoch's weights, the first with the lowest valid loss (as
    training keeps it); "last": the weights after the last finished epoch; "stopped": the weights at a stop,
    part way into the epoch after it (None: before any epoch finished). (None, None) when no model was exported.
    Told from the events alone, so runs made before this function existed are read the same way."""
    exports = [i for i, e in enumerate(events) if e.get("event") == "exported"]
    if not exports:
        return None, None
    export = exports[-1]
    epochs = {int(e["epoch"]): e for e in events[:export]
              if e.get("event") == "epoch" and isinstance(e.get("epoch"), (int, float))}
    session = max((i for i, e in enumerate(events[:export]) if e.get("event") == "start"), default=0)
    if epochs and any(e.get("event") == "best_weights" for e in events[session:export]):

        def loss(epoch: int) -> float:
            value = epochs[epoch].get("valid_loss")
            return value if isinstance(value, (int, float)) and math.isfinite(value) else math.inf

        return min(sorted(epochs), key=loss), "best"
    stopped = any(e.get("event") == "stopped" for e in events[export:])
    return (max(epochs) if epochs else None), ("stopped" if stopped else "last")


def last_event(run_dir: PathArg, kind: str, window: int = 64 * 1024, cap: int = 4 * 1024 * 1024) -> dict | None:
    """The last `kind` event, reading from the end of the file: 64 KB first, growing only when needed."""
    try:
        f = open(Path(run_dir) / EVENTS_FILE, "rb")
    except FileNotFoundError:
        return None
    marker = f'"event":"{kind}"'.encode()
    with f:
        size = os.fstat(f.fileno()).st_size
        while True:
            begin = max(0, size - window)
            f.seek(begin)
            lines = f.read(size - begin).split(b"\n")
            if begin > 0:
                lines = lines[1:]  # probably cut in the middle
            for line in reversed(lines):
                found = parse_jsonl(line) if marker in line else []
                if found and found[0].get("event") == kind:
                    return found[0]
            if begin == 0 or window >= cap:
                return None
            window *= 4


# ---------------------------------------------------------------- following a run live


def read_config(run_dir: PathArg) -> TrainConfig | None:
    """The run's config.json as a TrainConfig; None when it is missing or cannot be read as one (the run listing
    shows such a run as unreadable, with the reason: core.config.read_run_config)."""
    return read_run_config(run_dir)[0]


def _config_of(data: object) -> TrainConfig | None:
    """The TrainConfig a start event carries, None when it carries none this version reads."""
    try:
        return TrainConfig.from_dict(data) if isinstance(data, dict) else None
    except (TypeError, ValueError, AttributeError):
        return None


def log_tail(run_dir: PathArg, n_bytes: int = 6000) -> str:
    """The end of the run's train.log (its child's output), for a failure without a traceback event."""
    path = RunDir(run_dir).log
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - n_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def hardest_items(losses_file: PathArg, record_file: PathArg, k: int) -> list[dict[str, Any]]:
    """The `k` training items with the highest loss in one item_losses file: file, label(s) and loss each.

    Item ids index the dataset record exactly as the run saw it (not a rebuilt source, which drops files
    deleted since, and would shift every index after them)."""
    with np.load(losses_file) as arrays:
        items, losses = arrays["item"], arrays["loss"]
    data = read_json(record_file)
    entries, root = data["items"], Path(data["root"])
    out, seen = [], set()
    for i in np.argsort(-losses, kind="stable"):
        item = int(items[i])
        if item in seen or not 0 <= item < len(entries):
            continue
        seen.add(item)
        entry = entries[item]
        out.append({"file": str(root / entry["file"]), "label": ", ".join(entry["labels"]), "loss": float(losses[i])})
        if len(out) == k:
            break
    return out


@dataclass(frozen=True)
class RunView:
    """A consistent snapshot of what a run has reported so far, safe to render while the reader moves on."""

    batches: pd.DataFrame  # step, epoch, smooth_loss, lr, mom (decimated)
    epochs: pd.DataFrame  # one row per epoch: epoch, step, train_loss, valid_loss, metrics..., seconds
    start: dict | None  # the latest start event (n_train, n_valid, n_batches, vocab, bad_files, config)
    last_batch: dict | None  # the latest batch event
    error: dict | None  # the latest error event (message, traceback)
    lr_points: tuple[tuple[float, float | None], ...]  # an LR sweep's (lr, loss) so far
    seen: frozenset[str]  # event kinds seen since the latest start
    total_epochs: int
    config: TrainConfig | None  # as the latest start event carries it, else as config.json holds it
    session_start: float | None  # time of the latest start event (a resume starts a new session)
    session_progress: float  # share of the run done when that session started
    cache: dict | None = None  # the latest decode-cache progress event (done, total, cache_mb)

    def progress(self) -> float:
        """Share of all batches of all epochs done, from the latest batch and epoch events."""
        done = 0.0
        if self.last_batch:
            b = self.last_batch
            done = (b.get("epoch", 0) + b.get("batch", 0) / max(b.get("n_batches") or 1, 1)) / self.total_epochs
        if len(self.epochs):
            done = max(done, (int(self.epochs["epoch"].max()) + 1) / self.total_epochs)
        return min(done, 1.0)

    def frozen(self, epoch: int) -> bool:
        """Whether `epoch` (from 0) trains with the body frozen: fine_tune's first epochs."""
        return bool(self.config and self.config.schedule == "fine_tune" and epoch < self.config.freeze_epochs)

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the pace of the current session, or None before there is a pace to go by."""
        if self.session_start is None:
            return None
        done = self.progress() - self.session_progress
        elapsed = (now or time.time()) - self.session_start
        if done <= 0.005 or elapsed <= 0:
            return None
        return max(0.0, elapsed / done * (1.0 - self.progress()))


class RunTail:
    """Follows one run's events.jsonl from a byte offset; keeps derived data small."""

    def __init__(self, run_dir: PathArg, max_points: int = MAX_POINTS) -> None:
        self.run_dir = Path(run_dir)
        self.max_points = max_points
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.offset = 0
        self.stride = 1
        self.batches: list[tuple[int, int, float | None, float | None, float | None]] = []
        self.last_batch: dict | None = None
        self.epochs: dict[int, dict] = {}
        self.start: dict | None = None
        self.error: dict | None = None
        self.lr_points: list[tuple[float, float | None]] = []
        self.seen: set[str] = set()
        self.session_start: float | None = None
        self.session_progress = 0.0
        self.cache: dict | None = None
        self.config = read_config(self.run_dir)

    def update(self) -> RunView:
        """Read what was appended since the last call (nothing at all when the file did not grow)."""
        with self._lock:
            path = RunDir(self.run_dir).events
            size = path.stat().st_size if path.exists() else 0
            if size < self.offset:  # replaced or truncated: start over
                self._reset()
            if size > self.offset:
                events, self.offset = read_events(self.run_dir, since=self.offset)
                for event in events:
                    self._add(event)
            return self._view()

    def _add(self, e: dict[str, Any]) -> None:
        kind = e.get("event")
        self.seen.add(kind)
        if kind == "batch":
            self._add_batch(e)
        elif kind == "epoch":
            row = {k: v for k, v in e.items() if k not in ("event", "time")}
            row["step"] = self.last_batch.get("step") if self.last_batch else None
            self.epochs[int(e.get("epoch", len(self.epochs)))] = row
        elif kind == "start":
            self.start = e
            self.seen = {"start"}
            self.error = None
            self.config = _config_of(e.get("config")) or self.config
            self.session_start = e.get("time")
            self.session_progress = self._view().progress()
        elif kind == "error":
            self.error = e
        elif kind == "lr_find":
            self.lr_points.append((e.get("lr"), e.get("loss")))
        elif kind == "cache":
            self.cache = e

    def _add_batch(self, e: dict[str, Any]) -> None:
        self.last_batch = e
        step = int(e.get("step", 0))
        if step % self.stride:
            return
        self.batches.append((step, e.get("epoch"), e.get("smooth_loss"), e.get("lr"), e.get("mom")))
        if len(self.batches) > self.max_points:  # thin evenly: keep every other kept point, sample half as often
            self.stride *= 2
            self.batches = [b for b in self.batches if b[0] % self.stride == 0]

    def _view(self) -> RunView:
        batches = list(self.batches)
        if self.last_batch and (not batches or batches[-1][0] != self.last_batch.get("step")):
            b = self.last_batch  # the curve always reaches the latest step, whatever the thinning
            batches.append((b.get("step"), b.get("epoch"), b.get("smooth_loss"), b.get("lr"), b.get("mom")))
        frame = pd.DataFrame(batches, columns=["step", "epoch", "smooth_loss", "lr", "mom"])
        epochs = pd.DataFrame([self.epochs[k] for k in sorted(self.epochs)])
        return RunView(frame, epochs, self.start, self.last_batch, self.error, tuple(self.lr_points),
                       frozenset(self.seen), self.config.total_epochs if self.config else 1, self.config,
                       self.session_start, self.session_progress, self.cache)
