"""What the user has selected, kept as plain ids in st.session_state; the workspace on disk is the truth."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import streamlit as st

from core import runlist
from core.env import check_data_path, runs_dir, workspace_dir
from core.fileio import atomic_write_json
from core.runlist import RunInfo

DATASET_KEY = "dataset"
RUN_KEY = "run_id"
RECENT_FILE = "recent.json"
MAX_RECENT = 8


def demo_path() -> Path:
    return workspace_dir() / "demo"


def allowed(folder: str | Path) -> bool:
    """Whether this server may read `folder` (see core.env.check_data_path)."""
    try:
        check_data_path(folder)
    except ValueError:
        return False
    return True


def recent_datasets() -> list[str]:
    """Dataset folders opened before, newest first, that still exist and this server may still read."""
    path = workspace_dir() / RECENT_FILE
    try:
        folders = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    # The allowed roots may have changed since a folder was remembered (LOUPE_DATA_ROOTS is read per call).
    return [f for f in folders if isinstance(f, str) and allowed(f) and Path(f).is_dir()]


def current_dataset() -> str | None:
    """The dataset folder in use: this session's choice, else the most recent one; never one outside the roots."""
    folder = st.session_state.get(DATASET_KEY)
    if folder is not None and not allowed(folder):
        del st.session_state[DATASET_KEY]
    if DATASET_KEY not in st.session_state:
        recent = recent_datasets()
        st.session_state[DATASET_KEY] = recent[0] if recent else None
    return st.session_state[DATASET_KEY]


def set_dataset(folder: str | Path) -> None:
    """Make `folder` this session's dataset and the newest recent folder; ValueError when it is outside the roots."""
    folder = str(check_data_path(folder))
    st.session_state[DATASET_KEY] = folder
    recent = [folder] + [f for f in recent_datasets() if f != folder]
    atomic_write_json(workspace_dir() / RECENT_FILE, recent[:MAX_RECENT])


def run_path(run_id: str) -> Path:
    return runs_dir() / run_id


def training_runs() -> list[RunInfo]:
    """Every training run, no sweeps or label checks (see core.runlist.training_runs), newest first."""
    return runlist.training_runs(runs_dir())


def current_run() -> Path | None:
    """The run selected in this session, if it still exists; else the newest run."""
    run_id = st.session_state.get(RUN_KEY)
    if run_id and run_path(run_id).is_dir():
        return run_path(run_id)
    trainings = training_runs()
    if not trainings:
        return None
    st.session_state[RUN_KEY] = trainings[0].id
    return trainings[0].path


def latest_run_where(ready: Callable[[Path], bool]) -> Path | None:
    """The newest training run for which `ready(run_dir)` holds, e.g. the newest with a model."""
    return next((info.path for info in training_runs() if ready(info.path)), None)


def set_run(run_id: str | None) -> None:
    st.session_state[RUN_KEY] = run_id
