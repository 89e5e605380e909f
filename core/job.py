"""A run from start to end, inside its own process: `python -m core train --run-dir DIR` lands here.

The run directory is the only channel to the outside: status.json says where the run stands,
events.jsonl streams what happens, STOP asks for a clean stop. Nothing here assumes a page is watching.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from core import distributed, interpret, runs
from core.bundle import load_bundle
from core.data import DataLoaders, ShardSampler, make_loader
from core.env import MIN_FREE_MB_ENV, min_free_mb, resolve_device
from core.fileio import atomic_write_json, parse_jsonl, read_json
from core.images import DataError
from core.layouts import DataSource
from core.listing import path_text
from core.lrfind import LRFindResult, estimate_seconds, lr_find, measured_speed, sweep_steps

# has_checkpoint, checkpoint_bytes and remove_checkpoints live with the run's paths; re-exported here
from core.rundir import (  # noqa: F401
    BUNDLE_FILE,
    DATASET_RECORD_FILE,
    LR_FIND,
    LR_FIND_FILE,
    checkpoint_bytes,
    has_checkpoint,
    remove_checkpoints,
)
from core.runlist import list_runs
from core.split import Split, source_from_record, source_record
from core.stamps import fmt_duration
from core.step import OnDevice, get_preds, make_loss
from core.train import (
    Learner,
    StopRequested,
    TrainConfig,
    load_best_weights,
    load_checkpoint,
    setup_training,
)

SKIPPED_LISTED = 20  # file names a "skipped" event lists; the count covers the rest


class RunDirError(DataError):
    """The run directory cannot hold a run (not a folder, not writable, too little free space)."""


def check_run_dir(run_dir: str | Path) -> None:
    """Refuse, with a message for the user, a run directory that is not a writable folder with room to spare.

    Called before the model is built: a full disk found by the first checkpoint would cost an epoch and
    could leave the run without any checkpoint at all.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a folder" if run_dir.exists() else "does not exist"
        raise RunDirError(f"The run directory {path_text(run_dir)} {what}.")
    probe = run_dir / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"loupe")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"Cannot write in the run directory {path_text(run_dir)}: {e.strerror or e}.") from None
    free, need = shutil.disk_usage(run_dir).free / 2**20, min_free_mb()
    if free < need:
        raise RunDirError(
            f"Only {free:,.0f} MB free on the disk of {path_text(run_dir)}; a run needs at least {need:,.0f} MB "
            f"(set by {MIN_FREE_MB_ENV}). Free some space or put the workspace (LOUPE_HOME) on another disk."
        )


class EpochTable:
    """fastai's epoch table on stdout: a header once, then one aligned row per epoch."""

    def __init__(self, out=sys.stdout):
        self.out, self.columns = out, None

    def __call__(self, row: dict) -> None:
        if self.columns is None:
            self.columns = list(row)
            print("  ".join(f"{c:>12}" for c in self.columns), file=self.out, flush=True)
        print("  ".join(self._cell(c, row.get(c)) for c in self.columns), file=self.out, flush=True)

    @staticmethod
    def _cell(name: str, value) -> str:
        if name == "epoch" and isinstance(value, int):
            value = runs.epoch_number(value)  # a person reads this table: epochs from 1, as on every page
        if name == "seconds" and isinstance(value, (int, float)):
            return f"{fmt_duration(value):>12}"
        if isinstance(value, float):
            return f"{value:>12.6f}" if math.isfinite(value) else f"{'nan':>12}"
        return f"{value!s:>12}"


class ProgressBar:
    """A one-line progress bar per epoch on stderr, only when a person is watching a terminal."""

    def __init__(self, out=sys.stderr):
        self.out, self.live = out, out.isatty()

    def __call__(self, batch: int, n_batches: int, loss: float) -> None:
        if not self.live:
            return
        done = int(30 * batch / max(n_batches, 1))
        end = "\n" if batch >= n_batches else ""
        bar = "#" * done + "." * (30 - done)
        print(f"\r[{bar}] {batch}/{n_batches} loss {loss:.4f}", end=end, file=self.out, flush=True)


class Reporter:
    """The one on_event callback: every event to events.jsonl, epochs to the table, batches to the bar."""

    def __init__(self, writer: runs.EventWriter | None):
        self.writer, self.table, self.bar = writer, EpochTable(), ProgressBar()

    def __call__(self, kind: str, **fields) -> None:
        if self.writer:
            self.writer.emit(kind, **fields)
        if kind == "epoch":
            self.table(fields)
        elif kind == "batch":
            self.bar(fields["batch"], fields["n_batches"], fields["loss"])


class Signals:
    """SIGTERM (and SIGINT in a terminal) only set a flag; the loop stops at the next batch boundary."""

    def __init__(self):
        self.received = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True


def load_config(run_dir: str | Path) -> TrainConfig:
    return TrainConfig.from_dict(read_json(Path(run_dir) / runs.CONFIG_FILE))


def run_training(run_dir: str | Path, resume: bool = False) -> int:
    """Train the run in `run_dir` to the end; returns the process exit code (0 done or stopped, 1 failed).

    Under torchrun (several processes) every rank trains its shard; only rank 0 writes events, status,
    checkpoints, the bundle and the tables, and only local rank 0 takes the compute lock."""
    run_dir = Path(run_dir)
    info = distributed.DistInfo.from_env()
    if info.enabled:
        sys.stdout.write(f"rank {info.rank} pid {os.getpid()}\n")  # which process is which, for a person or a test
        sys.stdout.flush()
    writer = runs.EventWriter(run_dir) if info.main else None
    report = Reporter(writer) if info.main else (lambda kind, **fields: None)
    signals = Signals()
    try:
        check_run_dir(run_dir)  # before queueing for the compute: a full disk fails the run at once
        cfg = load_config(run_dir)
        # One rank takes the lock (the others would queue behind it). Rank 0 rather than each machine's local
        # rank 0: with the runs folder on a shared filesystem, a second machine would wait on the first forever.
        lock = runs.acquire_compute_lock(run_dir.parent) if info.main else contextlib.nullcontext()
        with lock:
            if info.main:
                runs.mark_running(run_dir)
                if resume:
                    runs.clear_stop(run_dir)
            if info.main:
                should_stop = lambda: signals.received or runs.stop_requested(run_dir)  # noqa: E731
            else:  # rank 0 reads the STOP file; the group agrees on every step (max over ranks)
                should_stop = lambda: signals.received  # noqa: E731
            learner = Learner(cfg, setup_training(cfg), on_event=report, should_stop=should_stop, run_dir=run_dir)
            if info.main:
                _announce(learner, report, run_dir, resume)
            _warm_cache(learner, report)
            state = load_checkpoint(run_dir) if resume else None
            try:
                learner.fit(state)
            except StopRequested as stop:
                _fingerprint(learner)
                if info.main:
                    _finish(learner, report, run_dir)
                    report("stopped", message=str(stop))
                    runs.mark_finished(run_dir, runs.STOPPED)
                return 0
            _fingerprint(learner)
            if info.main:
                _finish(learner, report, run_dir)
                report("done", epochs=len(learner.history), best_valid_loss=learner.best_valid)
                runs.mark_finished(run_dir, runs.DONE)
                freed = remove_checkpoints(run_dir)
                print(f"A finished run cannot be resumed: its checkpoints are removed ({freed / 2**20:.0f} MB).",
                      flush=True)
            return 0
    except Exception as e:  # every failure ends as a readable event and a failed status, never a silent exit
        return fail_run(e, info, report, run_dir)
    finally:
        if writer:
            writer.close()
        distributed.cleanup()


def fail_run(error: Exception, info: distributed.DistInfo, report: Callable[..., Any], run_dir: Path) -> int:
    """A run process's end by an exception (training or a label check): an error event with the traceback, one
    line on stderr, the failed status (rank 0); returns the exit code 1. Under DDP the message names the rank and
    hints at a lost process group."""
    message = f"{type(error).__name__}: {error}"
    if info.enabled:
        lost = isinstance(error, RuntimeError) and any(w in str(error) for w in ("gloo", "NCCL", "Connection",
                                                                                  "timed out"))
        hint = " (another process of the group probably failed or was killed: see train.log)" if lost else ""
        message = f"rank {info.rank}: {message}{hint}"
    report("error", message=message, traceback=traceback.format_exc())
    print(f"error: {message}", file=sys.stderr, flush=True)
    if info.main:
        runs.mark_finished(run_dir, runs.FAILED, error=message)
    return 1


def _fingerprint(learner: Learner) -> None:
    """Under DDP each rank prints a hash of its final weights: equal lines mean the ranks stayed in step."""
    if learner.dist.enabled:
        sys.stdout.write(f"rank {learner.dist.rank} weights sha256={distributed.fingerprint(learner.model)}\n")
        sys.stdout.flush()


def _announce(learner: Learner, report: Reporter, run_dir: Path, resume: bool) -> None:
    dls = learner.dls
    atomic_write_json(run_dir / DATASET_RECORD_FILE, source_record(dls.source, dls.split))
    print(f"Loupe run {run_dir.name}: {dls.source.describe()} on {learner.device}", flush=True)
    for bad in dls.bad:
        print(f"skipped {path_text(bad.path)}: {bad.reason}", file=sys.stderr, flush=True)
    report(
        "start",
        resume=resume,
        device=str(learner.device),
        config=learner.cfg.to_dict(),
        vocab=dls.vocab,
        n_train=len(dls.split.train),
        n_valid=len(dls.split.valid),
        n_batches=len(dls.train),
        bad_files=[{"file": str(b.path), "reason": b.reason} for b in dls.bad],
    )


def _warm_cache(learner: Learner, report: Reporter) -> None:
    """Decode every image once, in parallel, before the first epoch; later epochs and runs read the cache."""
    train, valid = learner.dls.train.dataset.images, learner.dls.valid.dataset.images
    total, entry_mb = len(train) + len(valid), 3 * train.side**2 / 2**20  # one uint8 square per image

    def progress(offset: int):
        return lambda done, _: report("cache", done=offset + done, total=total, cache_mb=(offset + done) * entry_mb)

    train.warm(on_progress=progress(0))
    valid.warm(on_progress=progress(len(train)))


def _finish(learner: Learner, report: Reporter, run_dir: Path) -> None:
    """Export the model and the interpretation tables: what Interpret, Clean and Predict read."""
    if learner.cfg.keep_best and load_best_weights(learner.model, run_dir):
        report("best_weights", best_valid_loss=learner.best_valid)
    learner.export(run_dir / BUNDLE_FILE)
    report("exported", file=BUNDLE_FILE)
    dls = learner.dls
    for split in ("valid", "train"):
        # the valid loader's images are already decoded in memory (unless sharded): reused, one inference pass
        reuse = split == "valid" and not isinstance(dls.valid.sampler, ShardSampler)
        table = split_table(learner.model, dls.source, dls.split, split, learner.cfg, learner.on_device,
                            loader=dls.valid if reuse else None)
        interpret.save_table(table, interpret.table_path(run_dir, split))
        _report_missing(learner.dls, split, table["item"].tolist(), report)
    report("interpreted", splits=["valid", "train"])


def _report_missing(dls: DataLoaders, split: str, seen: list[int], report: Reporter) -> None:
    """Items of `split` that could not be read any more (moved by the cleaner, deleted, changed since the
    check): the run still finishes, and says which files its tables leave out."""
    missing = sorted(set(getattr(dls.split, split).tolist()) - set(seen))
    if not missing:
        return
    files = [path_text(dls.source.files[i]) for i in missing]
    report("skipped", split=split, count=len(missing), files=files[:SKIPPED_LISTED],
           reason="moved, deleted or unreadable since the dataset was checked")
    print(f"skipped {len(missing)} {split} file(s) no longer readable: {', '.join(files[:SKIPPED_LISTED])}",
          file=sys.stderr, flush=True)


def split_table(model: nn.Module, source: DataSource, item_split: Split, split: str, cfg: TrainConfig,
                on_device: OnDevice, loader: DataLoader | None = None):
    """The per-item table (core.interpret.item_table) of one side of the split: one inference pass, over
    `loader` when one is given, else over a loader made for that side."""
    if loader is None:
        loader = make_loader(source, getattr(item_split, split), cfg.data, train=False, device=on_device.device)
    preds = get_preds(model, loader, on_device, make_loss(cfg, source.multi_label))
    probs = torch.sigmoid(preds.logits) if source.multi_label else torch.softmax(preds.logits, dim=1)
    return interpret.item_table(
        probs,
        preds.targets,
        [path_text(source.files[i]) for i in preds.ids.tolist()],  # Arrow strings refuse bad UTF-8
        source.vocab,
        multi_label=source.multi_label,
        split=split,
        item_ids=preds.ids.numpy(),
        threshold=cfg.threshold,
        losses=preds.losses.numpy(),
    )


def interpret_run(run_dir: str | Path, split: str = "valid"):
    """The per-item table of a finished run, from its model and the items it was trained on; cached on disk."""
    run_dir = Path(run_dir)
    path = interpret.table_path(run_dir, split)
    bundle_path = run_dir / BUNDLE_FILE
    if path.exists() and path.stat().st_mtime >= bundle_path.stat().st_mtime:
        return interpret.load_table(path)
    cfg, source, item_split, on_device, model = run_model(run_dir)
    table = split_table(model, source, item_split, split, cfg, on_device)
    interpret.save_table(table, path)
    return table


def run_model(run_dir: str | Path) -> tuple[TrainConfig, DataSource, Split, OnDevice, nn.Module]:
    """What predicting a finished run's own items needs: its config, the items and split it recorded, where to
    compute (OnDevice) and its exported model placed there (interpret_run, core.tta)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    source, item_split = source_from_record(read_json(run_dir / DATASET_RECORD_FILE))
    on_device = OnDevice.for_config(cfg, resolve_device(cfg.device))
    model = on_device.place(load_bundle(run_dir / BUNDLE_FILE, device=on_device.device).model)
    return cfg, source, item_split, on_device, model


def run_lr_find(run_dir: str | Path, num_it: int | None = None, start_lr: float = 1e-7,
                end_lr: float = 10.0) -> LRFindResult:
    """Sweep learning rates for the config in `run_dir`; the curve goes to events.jsonl and lr_find.json,
    and status.json follows it (running, then done or failed) so a page can watch it like a training run.
    `num_it` None sizes the sweep to the data (`sweep_steps`)."""
    run_dir = Path(run_dir)
    with runs.EventWriter(run_dir) as writer:
        try:
            check_run_dir(run_dir)
            with runs.acquire_compute_lock(run_dir.parent):
                runs.mark_running(run_dir)
                cfg = load_config(run_dir)
                learner = Learner(cfg, setup_training(cfg), run_dir=run_dir)
                steps = num_it or sweep_steps(len(learner.dls.train))
                writer.emit("lr_find_start", steps=steps, n_batches=len(learner.dls.train), device=str(learner.device))
                _warm_cache(learner, writer.emit)  # the training run after the sweep reads the same cache
                result = lr_find(learner, steps, start_lr, end_lr,
                                 on_step=lambda lr, loss: writer.emit("lr_find", lr=lr, loss=loss))
            atomic_write_json(run_dir / LR_FIND_FILE, result.to_dict())
            writer.emit("lr_find_done", suggestions=result.suggestions, steps=len(result.lrs), planned=steps)
            runs.mark_finished(run_dir, runs.DONE, task=LR_FIND)
            return result
        except Exception as e:
            message = f"{type(e).__name__}: {e}"
            writer.emit("error", message=message, traceback=traceback.format_exc())
            runs.mark_finished(run_dir, runs.FAILED, error=message, task=LR_FIND)
            raise


@dataclass
class SweepEstimate:
    """How long an LR-finder sweep will take, said before it starts."""

    steps: int  # steps the sweep is sized for (it stops sooner once the loss diverges)
    seconds: float  # start-up plus every step
    measured_on: str | None  # the run whose step times the speed comes from; None: a rough guess for the device


DEFAULT_SPEED = {"cuda": 5000.0, "mps": 1000.0}  # GFLOP/s guessed when no run has been timed on this machine
CPU_SPEED_PER_THREAD = 10.0  # GFLOP/s per intra-op thread, the rough guess for a CPU
DEFAULT_STARTUP = 15.0  # seconds: a process, PyTorch, the model and a check of the dataset
RECENT_RUNS = 10  # runs looked at for a measured speed, newest first


def estimate_sweep(cfg: TrainConfig, n_train: int, runs_root: str | Path, device: str = "cpu") -> SweepEstimate:
    """The steps and seconds of a sweep for `cfg` on `n_train` training images: timed at the speed of the
    newest run of this machine (preferring one of the same architecture), else at a rough guess for `device`."""
    config = cfg.to_dict()
    steps = sweep_steps(max(1, n_train // cfg.data.batch_size))
    timed = _timed_runs(Path(runs_root))
    same_arch = [t for t in timed if t[0].get("model", {}).get("arch") == cfg.model.arch]
    measured = (same_arch or timed)[:1]
    if measured:
        _, speed, startup, run_id = measured[0]
        return SweepEstimate(steps, estimate_seconds(config, steps, speed, startup or DEFAULT_STARTUP), run_id)
    kind = resolve_device(device).type
    speed = DEFAULT_SPEED.get(kind, CPU_SPEED_PER_THREAD * torch.get_num_threads())
    return SweepEstimate(steps, estimate_seconds(config, steps, speed, DEFAULT_STARTUP), None)


def _timed_runs(root: Path) -> list[tuple[dict, float, float | None, str]]:
    """(config, GFLOP/s, start-up seconds of a sweep or None, run id) of the newest runs that timed steps."""
    found = []
    for info in list_runs(root)[:RECENT_RUNS]:
        config = info.config.to_dict() if info.config else None
        events = _head_events(info.path)
        speed = measured_speed(config, events) if config else None
        if speed:
            found.append((config, speed, _sweep_startup(info.status, events), info.id))
    return found


def _sweep_startup(status: dict, events: list[dict]) -> float | None:
    """Seconds from a sweep's start to its first step: the process, PyTorch, the model, the data."""
    began = status.get("started_at")
    first = next((e.get("time") for e in events if e.get("event") == "lr_find"), None)
    if isinstance(began, (int, float)) and isinstance(first, (int, float)) and first > began:
        return first - began
    return None


def _head_events(run_dir: Path, limit: int = 64 * 1024) -> list[dict]:
    """The events in the first `limit` bytes of a run's events.jsonl: enough steps to time, however long the run."""
    try:
        with open(run_dir / runs.EVENTS_FILE, "rb") as f:
            head = f.read(limit)
    except OSError:
        return []
    return parse_jsonl(head[: head.rfind(b"\n") + 1])  # the last line may be cut short


def load_lr_find(run_dir: str | Path) -> LRFindResult | None:
    """The saved LR-finder curve of a run, or None when it has none yet."""
    path = Path(run_dir) / LR_FIND_FILE
    return LRFindResult(**read_json(path)) if path.exists() else None
