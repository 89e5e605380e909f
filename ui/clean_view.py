"""The Clean page's pieces: marks kept across class and split changes, apply / undo, image cells."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import streamlit as st

from core import clean, cleanlog, cleanrun

PER_PAGE = 24  # fills 4, 6 or 8 columns evenly
PAGE_KEY = "clean_page"
MARKS_KEY = "clean_marks"  # {file path: "delete" | "relabel:<class>"}: kept across class, split and page changes
MARK_WIDGET = "clean_mark:"  # + file path: the key of each image's selectbox
RESULT_KEY = "clean_result"  # the last apply/undo outcome, shown until the next one
KEEP, DELETE, RELABEL = "keep", "delete", "relabel:"


def mark_label(option: str) -> str:
    if option == KEEP:
        return "Keep"
    if option == DELETE:
        return "Delete"
    return f"Move to {option.removeprefix(RELABEL)}"


def set_mark(file: str) -> None:
    """Selectbox callback: record the mark before the script runs, so the staged counts above are current."""
    choice = st.session_state[MARK_WIDGET + file]
    if choice == KEEP:
        st.session_state[MARKS_KEY].pop(file, None)
    else:
        st.session_state[MARKS_KEY][file] = choice


def clear_marks() -> None:
    st.session_state[MARKS_KEY].clear()
    for key in [k for k in st.session_state if str(k).startswith(MARK_WIDGET)]:
        del st.session_state[key]  # the selectboxes on screen go back to Keep too


def current_counts(table: pd.DataFrame, handled: dict[Path, dict]) -> Counter:
    """Images per class as the dataset is now, not as the run's table saw it: an image applied to the trash no
    longer counts, a moved one counts for its new class (`handled` is core.cleanrun.handled_in's answer)."""
    counts: Counter = Counter()
    for file, actual in zip(table["file"], table["actual"]):
        done = handled.get(Path(file))
        if done is None:
            counts[actual] += 1
        elif done["action"] == cleanlog.RELABEL:
            counts[done.get("new_label")] += 1
    return counts


def to_change(file: str, mark: str, computed_at: float) -> clean.Change:
    if mark == DELETE:
        return clean.Change(Path(file), cleanlog.DELETE, computed_at=computed_at)
    return clean.Change(Path(file), cleanlog.RELABEL, mark.removeprefix(RELABEL), computed_at=computed_at)


def report(result: clean.CleanResult) -> None:
    """Keep the outcome for the next rerun: a summary line and every skipped file with its reason."""
    st.session_state[RESULT_KEY] = {
        "summary": result.summary() if (result.applied or result.skipped) else "Nothing to undo.",
        "skipped": [f"{m.source.name}: {m.reason}" for m in result.skipped],
    }


def failed(what: str, error: OSError) -> None:
    st.session_state[RESULT_KEY] = {"error": f"Could not {what}: {error}. Nothing was lost; files already moved "
                                             "are in the change log and can be undone."}


def apply_marks(datasets: list[cleanrun.Dataset], changes: list[clean.Change]) -> None:
    try:
        result = cleanrun.apply_to(datasets, changes)
    except OSError as e:  # e.g. a read-only dataset folder: no log, no trash can be made
        failed("apply the changes", e)
        return
    marks = st.session_state[MARKS_KEY]
    for change in changes:  # moved now, or gone before: either way nothing is left to mark
        if not Path(change.file).exists():
            marks.pop(str(change.file), None)
    report(result)


def undo(datasets: list[cleanrun.Dataset]) -> None:
    try:
        report(cleanrun.undo_last_of(datasets))
    except OSError as e:
        failed("undo", e)
