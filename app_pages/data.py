"""Data: choose a dataset, see how Loupe reads and splits it, look at its images and its problems."""

from pathlib import Path

import streamlit as st

from core.images import DataError
from core.layouts import LAYOUT_NAMES
from ui import data_chooser, data_gallery, data_health, data_view
from ui.state import current_dataset

st.title("Data")
dataset = current_dataset()
if dataset is None:
    data_chooser.render_chooser(None)
    st.info(
        "Loupe reads one subfolder per class (bears/grizzly/*.jpg), train/ and valid/ folders, "
        "labels in file names (great_pyrenees_173.jpg) or a CSV of file names and labels.",
        icon=":material/info:",
    )
    st.stop()

st.markdown(f"### :material/folder: {Path(dataset).name}")
header = st.container()  # the path and layout, once the dataset has been read
choose, options = st.columns(2)
with choose:
    data_chooser.render_chooser(dataset)
with options:
    cfg = data_view.render_options(dataset)
try:
    source, bad, split = data_view.prepare(cfg)
except DataError as e:
    header.caption(f"`{dataset}`")
    st.error(f"{e}", icon=":material/error:")
    st.caption("Open another folder, or change how this one is read under **Labels and split**.")
    st.stop()

header.caption(f"`{dataset}` · {LAYOUT_NAMES[source.layout]}{' · multi-label' if source.multi_label else ''}")
data_view.render_summary(source, bad, split)
data_view.render_warnings(source, bad, split)
data_health.render_health(source, split, cfg)
data_view.render_charts(source, split)
data_gallery.render_problems(source, bad)
data_gallery.render_gallery(source, split)
data_gallery.render_augmentations(source, split, cfg)
