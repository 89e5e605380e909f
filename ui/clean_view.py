"""The Clean page's pieces: marks kept across class and split changes, apply / undo, image cells."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import streamlit as st

from core import clean, cleanlog, cleanrun, runs
from core.labelcheck import suggestions_above

PER_PAGE = 24  # fills 4, 6 or 8 columns evenly
PAGE_KEY = "clean_page"
MARKS_KEY = "clean_marks"  # {file path: "delete" | "relabel:<class>"}: kept across class, split and page changes
MARK_WIDGET = "clean_mark:"  # + file path: the key of each image's selectbox
RESULT_KEY = "clean_result"  # the last apply/undo outcome, shown until the next one
KEEP, DELETE, RELABEL = "keep", "delete", "relabel:"


def mark_label(option: str, suggested: str | None = None) -> str:
    if option == KEEP:
        return "Keep"
    if option == DELETE:
        return "Delete"
    target = option.removeprefix(RELABEL)
    return f"Move to {target}" + (" (suggested)" if target == suggested else "")


def mark_options(actual: str, classes: list[str], suggested: str | None = None) -> list[str]:
    """Keep, then the suggested class (a label check's), Delete, and every other class to move to."""
    first = [f"{RELABEL}{suggested}"] if suggested and suggested != actual and suggested in classes else []
    rest = [f"{RELABEL}{c}" for c in classes if c not in (actual, suggested)]
    return [KEEP, *first, DELETE, *rest]


def accept_candidates(rows: pd.DataFrame, threshold: float, handled: dict[Path, dict],
                      marks: dict[str, str]) -> list[tuple[str, str]]:
    """(file, suggested class) of the label check's rows at or above `threshold` whose suggestion differs
    from their label and that are neither applied already nor marked otherwise."""
    chosen = suggestions_above(rows, threshold)
    keep = [f not in marks and Path(f) not in handled and Path(f).exists() for f in chosen["file"]]
    chosen = chosen[pd.Series(keep, index=chosen.index, dtype=bool)]  # a plain empty list would select columns
    return list(zip(chosen["file"], chosen["suggested"]))


def stage_relabels(pending: list[tuple[str, str]]) -> None:
    """Button callback: mark each file to move to its suggested class, and show it so in its selectbox."""
    for file, suggested in pending:
        st.session_state[MARKS_KEY][file] = f"{RELABEL}{suggested}"
        st.session_state[MARK_WIDGET + file] = f"{RELABEL}{suggested}"


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


def before_after_panel(run: Path, valid: pd.DataFrame, handled: dict[Path, dict]) -> None:
    """When `run` is a retrain from the Clean page: both models on the validation images the two runs share."""
    from core.compare import before_after
    from core.env import runs_dir
    from ui.cache import run_table
    from ui.charts import confusion_figure

    origin = runs.read_status(run).get("retrained_from")
    before = run_table(runs_dir() / origin, "valid") if isinstance(origin, str) else None
    result = before_after(before, valid, handled) if before is not None else None
    if result is None:
        return
    st.markdown(f"**Before and after cleaning**: run {origin} and this run on the {result.n_images} validation "
                f"images both held out (of {result.n_valid_before}), scored against the labels as they are now.")
    left, right = st.columns(2)
    left.metric(f"Error rate before ({origin})", f"{result.error_before:.1%}")
    right.metric(f"Error rate after ({run.name})", f"{result.error_after:.1%}",
                 delta=f"{result.error_after - result.error_before:+.1%}", delta_color="inverse")
    left.plotly_chart(confusion_figure(result.confusion_before, result.vocab, False), key="clean_cm_before")
    right.plotly_chart(confusion_figure(result.confusion_after, result.vocab, False), key="clean_cm_after")
