"""Train: pick the model and schedule, find a learning rate, launch a run in the background and watch it live."""

import streamlit as st

from ui import train_form, train_run, train_sweep
from ui.state import current_dataset, current_run

st.title("Train")
dataset = current_dataset()
selected = current_run()
if dataset is None:  # no form without images, but a run (say, one started from the command line) is still followed
    train_form.dataset_needed(selected)
    if selected is not None:
        st.divider()
        train_run.run_panel(selected)
    st.stop()

data_options = st.session_state.get("data_options", {})
facts = train_form.dataset_facts(dataset, data_options)
st.caption(train_form.dataset_caption(dataset, data_options, facts))

form_col, finder_col = st.columns([5, 6], gap="large")
with form_col:
    values = train_form.config_form(selected, facts)
    try:
        cfg = train_form.build_config(dataset, data_options, values)
    except ValueError as exc:
        st.error(str(exc), icon=":material/error:")
        cfg = None
    if cfg is not None:
        train_form.config_hints(cfg, facts)
    find_col, train_col = st.columns(2)
    find = find_col.button("Find learning rate", key="train_find_lr", icon=":material/search:", width="stretch",
                           disabled=cfg is None)
    start = train_col.button("Train", key="train_start", type="primary", icon=":material/play_arrow:",
                             width="stretch", disabled=cfg is None)

if find and cfg is not None and train_sweep.launch_lr_find(cfg, facts):
    st.rerun()
if start and cfg is not None and train_form.launch_training(cfg):
    st.rerun()  # the sidebar and the run view below pick up the new run

with finder_col:
    train_sweep.lr_find_panel(train_sweep.lr_find_run(dataset, selected), cfg, facts)

st.divider()
train_run.run_panel(selected)
