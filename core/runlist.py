"""The run listing: every run under the runs root as one typed `RunInfo`, newest first.

Cheap enough for every page's sidebar: status.json and config.json per run, and events.jsonl read from its end
only. Imports neither torch nor streamlit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import TrainConfig, read_run_config
from core.rundir import CHECK_LABELS, LR_FIND, STATUS_FILE, TRAIN, RunDir, task_of
from core.runlog import last_event
from core.runs import ACTIVE_STATES, FINAL_STATES, UNREADABLE, PathArg, runs_root, status


@dataclass(frozen=True)
class RunInfo:
    """One run as the listing sees it; a run whose files cannot be read has state "unreadable" and no config."""

    run: RunDir
    state: str  # a core.runs state, or "unreadable"
    status: dict[str, Any]  # status.json, reconciled with the process (see core.runs.status)
    config: TrainConfig | None  # None when config.json cannot be read as a TrainConfig (see `error`)
    created_at: float  # from status.json, else the folder's mtime
    task: str  # core.rundir.TRAIN, LR_FIND or CHECK_LABELS, as recorded when the run was created
    last_epoch: dict[str, Any] = field(default_factory=dict)  # epoch, train_loss, valid_loss, seconds, metrics
    duration: float | None = None  # seconds from running to the end, once final
    error: str | None = None

    @property
    def id(self) -> str:
        return self.run.name

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def is_lr_find(self) -> bool:
        return self.task == LR_FIND

    @property
    def is_label_check(self) -> bool:
        return self.task == CHECK_LABELS

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def has_model(self) -> bool:
        return self.run.has_model()


def list_runs(root: PathArg | None = None) -> list[RunInfo]:
    """Every run under `root` (default: the workspace's runs folder), newest first.

    `status` is reconciled (see core.runs.status). A run whose files cannot be read is listed with state
    "unreadable" and the reason in `error`; this never raises for one bad run. Cheap: events.jsonl is read
    from its end only. `created_at` falls back to the directory's mtime when status.json is unreadable.
    """
    base = runs_root(root)
    if not base.is_dir():
        return []
    listed = [describe(p) for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
    listed.sort(key=lambda info: (info.created_at, info.id), reverse=True)
    return listed


def training_runs(root: PathArg | None = None) -> list[RunInfo]:
    """Every training run: not LR-finder sweeps nor label checks (run directories too, but "a run" means a
    training run)."""
    return [info for info in list_runs(root) if info.task == TRAIN]


def label_checks(root: PathArg | None = None) -> list[RunInfo]:
    """Every label check (core.labelcheck), newest first."""
    return [info for info in list_runs(root) if info.is_label_check]


def describe(run_dir: Path) -> RunInfo:
    """One run's RunInfo (see `list_runs`)."""
    run = RunDir(run_dir)
    config, problem = read_run_config(run_dir)
    problems = [problem] if problem else []
    current: dict[str, Any] = {}
    try:
        current = status(run_dir)
    except (OSError, ValueError) as exc:
        problems.append(f"{STATUS_FILE}: {exc}")
    if problems:
        current = {**current, "state": UNREADABLE, "error": "; ".join(problems)}
    try:
        last = _last_epoch(run_dir)
    except OSError:
        last = {}
    created = current.get("created_at")
    return RunInfo(
        run=run,
        state=current.get("state", UNREADABLE),
        status=current,
        config=config,
        created_at=created if isinstance(created, (int, float)) else run_dir.stat().st_mtime,
        task=task_of(run, current),
        last_epoch=last,
        duration=_duration(current),
        error=current.get("error"),
    )


_EPOCH_FIELDS = ("epoch", "train_loss", "valid_loss", "seconds")


def _last_epoch(run_dir: Path) -> dict[str, Any]:
    epoch = last_event(run_dir, "epoch")
    if not epoch:
        return {}
    metrics = {k: v for k, v in epoch.items() if k not in ("event", "time", "fold", *_EPOCH_FIELDS)}
    nested = metrics.pop("metrics", None)  # accept a nested dict too, though the schema is flat
    if isinstance(nested, dict):
        metrics = {**nested, **metrics}
    return {**{k: epoch.get(k) for k in _EPOCH_FIELDS}, "metrics": metrics}


def _duration(current: dict[str, Any]) -> float | None:
    begin = current.get("running_at") or current.get("started_at")
    end = current.get("finished_at") or current.get("updated_at")
    if current.get("state") in FINAL_STATES and isinstance(begin, (int, float)) and isinstance(end, (int, float)):
        return max(0.0, end - begin)
    return None
