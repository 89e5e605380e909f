"""Runs: every run side by side; compare loss curves; open, download or delete one run."""

import json
from functools import partial
from pathlib import Path

import streamlit as st

from core import runs
from core.env import runs_dir
from core.rundir import RunDir, checkpoint_bytes, remove_checkpoints
from core.runlist import list_runs
from ui.cache import split_line
from ui.runs_view import (
    TABLE_COLUMNS,
    compare_figure,
    epoch_history,
    history_of,
    model_origin,
    runs_table,
)
from ui.state import current_run, set_run

TABLE_KEY = "runs_table"
CONFIRM_KEY = "runs_delete_confirm"
NOTICE_KEY = "runs_notice"


def clear_selection() -> None:
    """Selections are row positions: after a delete they would point at other runs, so start afresh."""
    st.session_state[TABLE_KEY] = {"selection": {"rows": [], "columns": [], "cells": []}}
    st.session_state[CONFIRM_KEY] = ""


def delete(run_dir: Path) -> None:
    """Button callback: runs before the page script, so the table drawn next already lacks the run."""
    try:
        runs.delete_run(run_dir, root=runs_dir())
    except (ValueError, OSError) as e:
        st.session_state[NOTICE_KEY] = ("error", f"Not deleted: {e}")
        return
    if st.session_state.get("run_id") == run_dir.name:
        set_run(None)
    clear_selection()
    st.session_state[NOTICE_KEY] = ("success", f"Deleted run {run_dir.name}.")


def drop_checkpoint(run_dir: Path) -> None:
    """Button callback: free the space only a resume needs."""
    try:
        freed = remove_checkpoints(run_dir)
    except OSError as e:
        st.session_state[NOTICE_KEY] = ("error", f"The checkpoint was not deleted: {e}")
        return
    message = f"Deleted the checkpoint of run {run_dir.name}: {freed / 2**20:.0f} MB freed."
    st.session_state[NOTICE_KEY] = ("success", message)


def read_bundle(path: Path) -> bytes:
    return path.read_bytes()


def onnx_parity(run_dir: Path) -> dict | None:
    """The parity record of the run's ONNX file when it is there and newer than the model, else None."""
    files = RunDir(run_dir)
    try:
        if files.onnx.is_file() and files.onnx_meta.stat().st_mtime >= files.bundle.stat().st_mtime:
            return json.loads(files.onnx_meta.read_text())["parity"]
    except (OSError, ValueError, KeyError):
        pass
    return None


@st.cache_data(max_entries=64, show_spinner=False)
def export_onnx_once(run_dir: str, bundle_mtime: float) -> dict:
    """Export the run's model into its folder (replacing an older export of its own); once per model version."""
    from core.export import export_onnx  # PyTorch and ONNX only when asked

    files = RunDir(run_dir)
    report = export_onnx(files.path, files.onnx, force=True)
    return {"max_abs_diff": report.parity.max_abs_diff, "images": report.parity.images, "on": report.parity.on}


st.title("Runs")
notice = st.session_state.pop(NOTICE_KEY, None)
if notice:
    getattr(st, notice[0])(notice[1])

listing = list_runs(runs_dir())
if not listing:
    st.info("No runs yet: train a model on **Train**, and every run will be listed here.")
    st.stop()

st.caption(f"{len(listing)} runs in `{runs_dir()}`. Select rows to compare their curves; "
           "select one to open, download or delete it.")
table = runs_table(listing)
event = st.dataframe(
    table,
    key=TABLE_KEY,
    on_select="rerun",
    selection_mode="multi-row",
    hide_index=True,
    column_config=TABLE_COLUMNS,
    placeholder="",  # an empty cell says "nothing here", not "None"
)
rows = [i for i in event.selection.rows if i < len(listing)]
selected = [listing[i] for i in rows]
if not selected:
    st.stop()

st.subheader("Compare" if len(selected) > 1 else "Curves")
histories = {info.id: epoch_history(info.path) for info in selected}
if any(not h.empty for h in histories.values()):
    st.plotly_chart(compare_figure(histories), key="runs_compare_chart", config={"displaylogo": False})
missing = [run_id for run_id, h in histories.items() if h.empty]
if missing:
    st.caption(f"No finished epochs yet in {', '.join(missing)} "
               "(an LR finder, or a run that has not finished an epoch).")

if len(selected) > 1:
    st.caption("Select a single run to open, download or delete it.")
    st.stop()

info = selected[0]
run_dir = info.path
st.subheader(f"Run {info.id}")
current = current_run()
is_current = current is not None and current.name == info.id
exported = model_origin(history_of(run_dir)) if info.has_model() else ""
st.markdown(f"State **{info.state}**" + (f" · {exported}" if exported else "")
            + (" · the current run" if is_current else ""))
if info.error:
    st.error(info.error)
if info.config is not None:
    split = split_line(run_dir, info.config) or "split not known yet: the run has not read its data"
    st.markdown(f"**Settings** {info.config.summary(split)}")
    with st.expander("Full config"):
        st.json(info.config.to_dict(), expanded=2)

open_col, train_col, interpret_col, download_col, onnx_col = st.columns(5)
if open_col.button("Make it the current run", key="runs_make_current", icon=":material/check_circle:", width="stretch",
                   disabled=is_current, help="It is the current run already." if is_current else None):
    set_run(info.id)
    st.rerun()
if train_col.button("Open in Train", key="runs_open_train", icon=":material/model_training:", width="stretch"):
    set_run(info.id)
    st.switch_page("app_pages/train.py")
no_model = not info.has_model()
if interpret_col.button("Open in Interpret", key="runs_open_interpret", icon=":material/insights:", width="stretch",
                        disabled=no_model, help="This run has no model yet." if no_model else None):
    set_run(info.id)
    st.switch_page("app_pages/interpret.py")
bundle = info.run.bundle
if bundle.is_file():
    download_col.download_button(
        f"Download model ({bundle.stat().st_size / 2**20:.0f} MB)",
        data=partial(read_bundle, bundle),  # read only when clicked: a model is tens of MB
        file_name=f"{info.id}.safetensors",
        mime="application/octet-stream",
        key="runs_download",
        icon=":material/download:",
        on_click="ignore",
        width="stretch",
    )
else:
    download_col.button("No model to download", key="runs_download_none", disabled=True, width="stretch")
if bundle.is_file():
    parity = onnx_parity(run_dir)
    if parity is None and onnx_col.button("Download ONNX", key="runs_export_onnx", icon=":material/output:",
                                          width="stretch", help="Export the model to ONNX (probabilities out), "
                                          "checked against PyTorch, then download it"):
        with st.spinner("Exporting to ONNX and checking it against PyTorch..."):
            try:
                parity = export_onnx_once(str(run_dir), bundle.stat().st_mtime)
            except (OSError, ValueError, RuntimeError) as e:
                onnx_col.error(f"Not exported: {e}")
    if parity is not None:
        onnx_file = RunDir(run_dir).onnx
        onnx_col.download_button(
            f"Download ONNX ({onnx_file.stat().st_size / 2**20:.0f} MB)", data=partial(read_bundle, onnx_file),
            file_name=f"{info.id}.onnx", mime="application/octet-stream", key="runs_download_onnx",
            icon=":material/download:", on_click="ignore", width="stretch",
        )
        onnx_col.download_button(
            "Its preprocessing (JSON)", data=partial(read_bundle, RunDir(run_dir).onnx_meta),
            file_name=f"{info.id}.onnx.json", mime="application/json", key="runs_download_onnx_meta",
            on_click="ignore", width="stretch",
        )
        onnx_col.caption(f"ONNX Runtime and PyTorch agree within {parity['max_abs_diff']:.1e} "
                         f"(max probability difference on {parity['images']} {parity['on']}).")

held = checkpoint_bytes(run_dir)
if held and not info.active:
    resumable = info.state in (runs.STOPPED, runs.FAILED)
    st.button(f"Delete its checkpoint ({held / 2**20:.0f} MB)", key="runs_drop_checkpoint",
              icon=":material/cleaning_services:", on_click=drop_checkpoint, args=(run_dir,),
              help="The checkpoint is only needed to resume the run; its model stays. "
              + ("After this, **Resume** is no longer possible." if resumable else "A finished run cannot be resumed."))

with st.expander("Delete this run", icon=":material/delete:"):
    if info.active:
        st.warning(f"This run is {info.state}: stop it on **Train** before deleting it.")
    st.text_input(f"Type the run id **{info.id}** to confirm", key=CONFIRM_KEY, placeholder=info.id)
    confirmed = st.session_state.get(CONFIRM_KEY, "").strip() == info.id
    st.button(
        "Delete run",
        key="runs_delete",
        type="primary",
        icon=":material/delete_forever:",
        disabled=not confirmed,
        on_click=delete,
        args=(run_dir,),
        help="Removes the run folder: config, events, checkpoints and model. This cannot be undone.",
    )
