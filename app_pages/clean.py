"""Clean: review each class by loss, mark images to delete or relabel, apply in one step (with undo), retrain."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from core import clean, cleanlog, cleanrun, interpret, runs
from core.config import read_run_config
from core.csvfile import clean_log_table, csv_for_people
from core.env import check_data_path
from core.fileio import read_json
from core.layouts import LAYOUT_NAMES
from core.rundir import RunDir
from ui.cache import run_table
from ui.clean_check import CHECK, LOSS, check_panel, evidence, suggestion_of
from ui.clean_view import (
    DELETE,
    KEEP,
    MARK_WIDGET,
    MARKS_KEY,
    PAGE_KEY,
    PER_PAGE,
    RELABEL,
    RESULT_KEY,
    accept_candidates,
    apply_marks,
    before_after_panel,
    clear_marks,
    current_counts,
    mark_label,
    mark_options,
    set_mark,
    stage_relabels,
    to_change,
    undo,
)
from ui.gallery import grid, image_or_note, paginate, require_run_tables
from ui.state import set_run

st.title("Clean")
run, valid = require_run_tables()
try:
    datasets = cleanrun.run_datasets(run)
except (OSError, ValueError, KeyError) as e:
    st.error(f"Run **{run.name}** does not say which dataset it was trained on ({e}); it cannot be cleaned here.")
    st.stop()
try:  # a run made from the command line may have trained on a folder this server must not change
    for dataset in datasets:
        check_data_path(dataset.root)
except ValueError as e:
    st.error(f"Run **{run.name}** trained on a folder that cannot be cleaned here: {e}", icon=":material/block:")
    st.stop()
root, layout = datasets[0].root, datasets[0].layout
if not root.is_dir():
    st.error(f"The dataset folder of this run, `{root}`, is gone: nothing to clean.")
    st.stop()
vocab: list[str] = list(valid.attrs["vocab"])
tables = {s: t for s, t in (("valid", valid), ("train", run_table(run, "train"))) if t is not None}
# When the losses were computed: a file modified after that is skipped rather than changed blind.
computed_at = min(RunDir(run).table(s).stat().st_mtime for s in tables)
marks: dict[str, str] = st.session_state.setdefault(MARKS_KEY, {})
try:  # the change log is read first: one that is a symbolic link is refused here, never followed
    handled = cleanrun.handled_in(datasets)
except OSError as e:
    st.error(f"The cleaner's change log of this dataset cannot be used: {e}.", icon=":material/block:")
    st.stop()
relabel_ok = clean.relabel_supported(layout) and not interpret.is_multi_label(valid)

st.caption(f"Dataset `{root}` · run {run.name}. Images are ordered by how likely their label is wrong, worst first. "
           "Mark what to change; nothing moves until you apply. Deletes go to a `.trash` folder inside the dataset "
           "and can be undone.")
if not relabel_ok:
    st.caption(f"Relabelling is not available for this dataset ({LAYOUT_NAMES.get(layout, layout)}"
               f"{', multi-label' if interpret.is_multi_label(valid) else ''}): you can keep or delete.")

# ---------------------------------------------------------------- staged changes: one apply, one undo
changes = [to_change(f, m, computed_at) for f, m in sorted(marks.items())]
n_delete = sum(c.action == cleanlog.DELETE for c in changes)
undo_batch, n_undo, _ = cleanrun.undoable_in(datasets)
with st.container(horizontal=True, gap="small", vertical_alignment="center", border=True):
    st.markdown(f"**{n_delete}** to delete, **{len(changes) - n_delete}** to relabel")
    st.space("stretch")
    st.button("Apply changes", type="primary", key="clean_apply", disabled=not changes,
              on_click=apply_marks, args=(datasets, changes), icon=":material/done_all:")
    st.button("Clear marks", key="clean_clear", disabled=not changes, on_click=clear_marks)
    undo_label = f"Undo last apply ({n_undo} file{'s' if n_undo != 1 else ''})" if n_undo else "Undo last apply"
    st.button(undo_label, key="clean_undo", disabled=undo_batch is None, on_click=undo, args=(datasets,),
              icon=":material/undo:")

outcome = st.session_state.get(RESULT_KEY)
if outcome and "error" in outcome:
    st.error(outcome["error"])
elif outcome:
    (st.warning if outcome["skipped"] else st.success)(outcome["summary"])
    for line in outcome["skipped"]:
        st.caption(f":material/block: {line}")
if changes:
    preview = cleanrun.apply_to(datasets, changes, dry_run=True)  # stats only, no hashing: cheap on every rerun
    rows_preview = [{"action": m.action, "file": str(m.source), "to": str(m.target or ""), "problem": m.reason}
                    for m in preview.applied + preview.skipped]
    with st.expander(f"Preview (dry run): {preview.summary()}", expanded=bool(preview.skipped)):
        st.dataframe(pd.DataFrame(rows_preview), hide_index=True)

# ---------------------------------------------------------------- the ranking: the label check, or the losses
multi_label = interpret.is_multi_label(valid)
checked, check_line = check_panel(run, read_run_config(run)[0], root, handled)
if st.session_state.get("clean_check_error"):
    st.error(st.session_state.pop("clean_check_error"))
ranking = LOSS
if checked is not None:
    ranking = st.segmented_control(
        "Ranking", [CHECK, LOSS], default=CHECK, required=True, key="clean_ranking",
        format_func={CHECK: "Label check (out of sample)", LOSS: "Training loss (in sample)"}.get)


def mark_control(file: str, actual: str, suggested: str | None) -> None:
    options = mark_options(actual, vocab if relabel_ok else [], suggested if relabel_ok else None)
    current = marks.get(file, KEEP)
    st.selectbox("Mark", options, index=options.index(current) if current in options else 0,
                 format_func=lambda o: mark_label(o, suggested), key=MARK_WIDGET + file,
                 label_visibility="collapsed", on_change=set_mark, args=(file,))
    if current == DELETE:
        st.badge("Will be deleted", icon=":material/delete:", color="red")
    elif current != KEEP:
        st.badge(f"Will move to {current.removeprefix(RELABEL)}", icon=":material/drive_file_move:", color="blue")


def shown_now(file: str) -> bool:
    """Draw the image where it is now; False when there is nothing left to mark (applied, or gone)."""
    done = handled.get(Path(file))
    if done:  # applied: the table still has the old path, so show the file where it is now
        note = "In the trash" if done["action"] == cleanlog.DELETE else f"Moved to {done.get('new_label')}"
        if image_or_note(done["now"], note):
            st.caption(f":material/check_circle: {note}")
        return False
    # a mark it had stays staged, so applying reports it as skipped
    return image_or_note(file, "File is gone (moved or deleted outside Loupe)")


def loss_cell(row: pd.Series) -> None:
    if not shown_now(row["file"]):
        return
    mark_control(row["file"], row["actual"], None)
    verdict = "" if row["correct"] else f" · predicted **{row['predicted']}**"
    st.caption(f"loss {max(0.0, row['loss']):.2f}{verdict}", help=Path(row["file"]).name)  # never "-0.00"


def check_cell(row: pd.Series) -> None:
    if not shown_now(row["file"]):
        return
    mark_control(row["file"], row["label"], suggestion_of(row, multi_label))
    flag = ":material/flag: " if row["issue"] else ""
    st.caption(flag + evidence(row, vocab, multi_label), help=Path(row["file"]).name)


if ranking == CHECK:
    st.caption(check_line + " Flagged (:material/flag:) = counted as mislabelled by confident learning.")
    counts = current_counts(checked.rename(columns={"label": "actual"}), handled)
    label = st.selectbox("Class (given label)", [None, *vocab], key="clean_check_class", width=260,
                         format_func=lambda c: f"All classes ({sum(counts.values())})" if c is None
                         else f"{c} ({counts.get(c, 0)})")
    rows = checked if label is None else checked[[label in interpret.split_labels(t, vocab) for t in checked["label"]]]
    if relabel_ok:
        with st.container(horizontal=True, vertical_alignment="bottom", gap="small"):
            threshold = st.slider("Accept the suggestions scoring at least", 0.5, 1.0, 0.9, 0.01,
                                  key="clean_accept_threshold", width=360)
            pending = accept_candidates(rows, threshold, handled, marks)
            st.button(f"Stage {len(pending)} suggested relabel{'s' if len(pending) != 1 else ''}",
                      key="clean_accept", disabled=not pending, on_click=stage_relabels, args=(pending,),
                      icon=":material/playlist_add_check:",
                      help="Marks each to move to its suggested class; the preview above shows them before you apply.")
    scope: tuple = (run.name, CHECK, label)
    render = check_cell
else:
    with st.container(horizontal=True, gap="medium", vertical_alignment="bottom"):
        split = st.segmented_control("Split", list(tables), default="valid", required=True, key="clean_split")
        counts = current_counts(tables[split], handled)
        label = st.selectbox("Class (actual label)", vocab, key="clean_class", width=260,
                             format_func=lambda c: f"{c} ({counts.get(c, 0)})")
    rows = interpret.top_losses(tables[split], split=split, actual=label)
    scope, render = (run.name, split, label), loss_cell

if rows.empty:
    st.info(f"No images of class {label} here.")
else:
    gallery_slot = st.container()
    shown = paginate(len(rows), PER_PAGE, PAGE_KEY, scope=scope)
    with gallery_slot:
        grid([rows.iloc[i] for i in shown], render)

# ---------------------------------------------------------------- history and retrain
log = cleanrun.log_table(datasets)
with st.expander(f"Change log ({len(log)} entries)"):
    if log:
        frame = clean_log_table(log)
        st.dataframe(frame, hide_index=True)
        st.download_button("Download the log (CSV)", csv_for_people(frame), file_name=f"clean-log-{run.name}.csv",
                           mime="text/csv", key="clean_log_csv", icon=":material/download:", on_click="ignore")
    else:
        st.caption("No changes applied to this dataset yet.")

st.subheader("Retrain")
before_after_panel(run, valid, handled)
st.caption("A new run with this run's exact configuration, on the cleaned folder; you follow it on Train."
           + (" Apply or clear the staged changes first." if changes else ""))
if st.button("Retrain with the cleaned data", key="clean_retrain", icon=":material/replay:",
             disabled=bool(changes), help="Apply or clear the staged changes first." if changes else None):
    new_run = runs.create(read_json(run / runs.CONFIG_FILE), name_hint="cleaned")
    runs.write_status(new_run, retrained_from=run.name)  # its Clean page then compares it with this run
    try:
        runs.start(new_run)
    except (OSError, ValueError) as e:
        st.error(f"Could not start the new run {new_run.name}: {e}")
        st.stop()
    set_run(new_run.name)
    st.switch_page("app_pages/train.py")
