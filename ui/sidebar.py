"""The sidebar every page shares: compute device, current dataset, selected run."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.env import describe_device, resolve_device, runs_dir
from core.runlist import RunInfo, list_runs
from ui.state import current_dataset, current_run, set_run


@st.cache_resource
def device_line() -> str:
    """The device training will use; cached because CUDA queries are slow and never change while serving."""
    device = resolve_device("auto")
    return describe_device(device)


def _run_label(info: RunInfo) -> str:
    return f"{info.id} · {info.state}"


def render_sidebar() -> None:
    with st.sidebar:
        st.caption("Compute")
        st.markdown(f":material/memory: {device_line()}")
        st.caption("Dataset")
        dataset = current_dataset()
        st.markdown(f":material/folder: `{Path(dataset).name}`" if dataset else "No dataset yet: open one on **Data**.")
        st.caption("Run")
        listing = list_runs(runs_dir())
        if not listing:
            st.markdown("No runs yet: start one on **Train**.")
            return
        selected = current_run()
        ids = [info.id for info in listing]
        labels = {info.id: _run_label(info) for info in listing}
        index = ids.index(selected.name) if selected and selected.name in ids else 0
        choice = st.selectbox("Run", ids, index=index, format_func=labels.get, label_visibility="collapsed")
        set_run(choice)
