"""Sending images from another page (Data's health check, its map) to the Clean page's staged changes.

The Clean page keeps its marks in session state ({file path: "delete" | "relabel:<class>"}, see ui.clean_view);
a page that finds images to delete or relabel adds marks there and opens Clean, where the user sees them
staged, previews and applies them (to the trash, with undo) as any other mark. Nothing moves from here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import streamlit as st

from core.listing import path_text
from ui.clean_view import DELETE, MARK_WIDGET, MARKS_KEY, RELABEL

CLEAN_PAGE = "app_pages/clean.py"


def stage(files: Iterable[str | os.PathLike], relabel_to: str | None = None) -> int:
    """Mark each file (an absolute path) to delete, or to move to class `relabel_to`; returns how many."""
    mark = f"{RELABEL}{relabel_to}" if relabel_to else DELETE
    marks = st.session_state.setdefault(MARKS_KEY, {})
    n = 0
    for file in files:
        key = path_text(file)  # the form of the Clean page's table's `file` column
        marks[key] = mark
        st.session_state[MARK_WIDGET + key] = mark  # its selectbox on Clean shows the mark too
        n += 1
    return n


def staged_count() -> int:
    return len(st.session_state.get(MARKS_KEY, {}))
