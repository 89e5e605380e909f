"""Cached loaders keyed by file path and modification time: nothing slow runs on every rerun.

Shared by the pages: the model bundle and interpretation tables of a run, thumbnails, the split a run used."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import streamlit as st

from core.config import TrainConfig
from core.env import check_data_path
from core.fileio import read_json
from core.rundir import RunDir
from core.thumbs import thumbnail

if TYPE_CHECKING:
    from core.bundle import Bundle


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def _bundle(path: str, mtime: float) -> Bundle:
    # core.bundle imports torchvision and with it every model definition (seconds): only pages that load a model
    # pay for it, not the galleries of the Data page, which share this module for thumbnails.
    from core.bundle import load_bundle

    return load_bundle(path)


def run_bundle(run_dir: Path) -> Bundle:
    """The exported model of a run, loaded once per file version."""
    path = RunDir(run_dir).bundle
    return _bundle(str(path), _mtime(path))


@st.cache_data(max_entries=16, show_spinner=False)
def _table(path: str, mtime: float) -> pd.DataFrame:
    from core.interpret import load_table  # see _bundle: core.interpret imports torch

    return load_table(path)


def run_table(run_dir: Path, split: str = "valid") -> pd.DataFrame | None:
    """The per-item interpretation table a run wrote when it finished (None if it has none)."""
    path = RunDir(run_dir).table(split)
    return _table(str(path), _mtime(path)) if path.exists() else None


@st.cache_data(max_entries=8, show_spinner="Predicting with test-time augmentation (5 passes)…")
def _tta_table(run_dir: str, split: str, bundle_mtime: float) -> pd.DataFrame:
    from core.tta import interpret_run_tta  # see _bundle

    return interpret_run_tta(run_dir, split)


def run_tta_table(run_dir: Path, split: str = "valid") -> pd.DataFrame:
    """A run's item table with test-time augmentation (core.tta): computed here once, then kept on disk in the run
    directory and in memory per model version."""
    return _tta_table(str(run_dir), split, _mtime(RunDir(run_dir).bundle))


@st.cache_data(max_entries=4096, show_spinner=False)
def _thumb(path: bytes, mtime: float, size: int) -> bytes | None:
    try:
        return thumbnail(os.fsdecode(path), size)
    except (OSError, ValueError):
        return None


def thumb(path: str | Path, size: int = 192) -> bytes | None:
    """JPEG thumbnail bytes for a gallery, or None for a file that is gone, unreadable, or outside the folders
    this server may read (LOUPE_DATA_ROOTS: every page's images pass here, whatever run names them)."""
    path = Path(path)
    try:
        check_data_path(path)
    except ValueError:
        return None
    # bytes as the cache key: a file name that is not valid UTF-8 cannot be hashed as text
    return _thumb(os.fsencode(path), _mtime(path), size)


@st.cache_data(max_entries=256, show_spinner=False)
def _split_line(record: str, mtime: float, _config: TrainConfig) -> str:
    # keyed by the record's path and version only: a run's config never changes
    from core.split import describe_split  # see _bundle: core.split imports torch (through core.layouts)

    return describe_split(read_json(record), _config.data)


def split_line(run_dir: str | Path, config: TrainConfig) -> str | None:
    """The split the run used, in words, from its dataset record; None before the run has read its data."""
    record = RunDir(run_dir).dataset_record
    if not record.exists() or not record.stat().st_size:
        return None
    try:
        return _split_line(str(record), _mtime(record), config)
    except (OSError, ValueError, KeyError, TypeError):  # a damaged record
        return None
