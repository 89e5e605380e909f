"""Cached loaders keyed by file path and modification time: nothing slow runs on every rerun."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from core import interpret
from core.env import check_data_path
from core.model import Bundle, load_bundle
from core.thumbs import thumbnail
from core.train import BUNDLE


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def _bundle(path: str, mtime: float) -> Bundle:
    return load_bundle(path)


def run_bundle(run_dir: Path) -> Bundle:
    """The exported model of a run, loaded once per file version."""
    path = Path(run_dir) / BUNDLE
    return _bundle(str(path), _mtime(path))


@st.cache_data(max_entries=16, show_spinner=False)
def _table(path: str, mtime: float) -> pd.DataFrame:
    return interpret.load_table(path)


def run_table(run_dir: Path, split: str = "valid") -> pd.DataFrame | None:
    """The per-item interpretation table a run wrote when it finished (None if it has none)."""
    path = interpret.table_path(run_dir, split)
    return _table(str(path), _mtime(path)) if path.exists() else None


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
