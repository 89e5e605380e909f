"""Train: pick the model and schedule, find a learning rate, launch a run in the background and watch it live."""

from pathlib import Path

import streamlit as st

from ui import train_view
from ui.state import current_dataset, current_run

st.title("Train")
dataset = current_dataset()
if dataset is None:
    st.info("Open or create a dataset first: training needs images to learn from.", icon=":material/photo_library:")
    st.page_link("app_pages/data.py", label="Go to Data", icon=":material/photo_library:")
    st.stop()

data_options = st.session_state.get("data_options", {})
options_line = train_view.data_options_line(data_options)
st.caption(f"Dataset `{Path(dataset).name}` · " + (options_line or "default labels and validation split"))

selected = current_run()
form_col, finder_col = st.columns([5, 6], gap="large")
with form_col:
    values = train_view.config_form()
    try:
        cfg = train_view.build_config(dataset, data_options, values)
    except ValueError as exc:
        st.error(str(exc), icon=":material/error:")
        cfg = None
    if cfg is not None:
        train_view.config_hints(cfg)
    find_col, train_col = st.columns(2)
    find = find_col.button("Find learning rate", key="train_find_lr", icon=":material/search:", width="stretch",
                           disabled=cfg is None)
    start = train_col.button("Train", key="train_start", type="primary", icon=":material/play_arrow:",
                             width="stretch", disabled=cfg is None)

if find and cfg is not None and train_view.launch_lr_find(cfg):
    st.rerun()
if start and cfg is not None and train_view.launch_training(cfg):
    st.rerun()  # the sidebar and the run view below pick up the new run

with finder_col:
    train_view.lr_find_panel(train_view.lr_find_run(dataset, selected))

st.divider()
train_view.run_panel(selected)
