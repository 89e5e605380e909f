"""The Data page's dataset chooser: a typed folder, a recent one, an uploaded zip or the demo, and the
per-dataset options that opening another folder forgets."""

from __future__ import annotations

import shutil
from pathlib import Path

import streamlit as st

from core import listing
from core.demo import DemoSpec, make_demo_dataset
from core.env import check_data_path, workspace_dir
from core.uploads import UploadError, extract_zip, remove_abandoned
from ui.state import demo_path, recent_datasets, set_dataset

OPTIONS_KEY = "data_options"  # DataConfig field overrides the Train page builds its config from
PER_DATASET = ("layout", "label_regex", "csv_file", "group_regex")  # options that mean nothing for another folder


def data_options() -> dict:
    return dict(st.session_state.get(OPTIONS_KEY) or {})


def open_dataset(folder: str | Path) -> None:
    """Make `folder` the dataset, forget the options that belonged to the previous one, and rerun."""
    try:
        set_dataset(folder)
    except ValueError as e:  # outside the allowed roots (LOUPE_DATA_ROOTS): nothing is opened
        st.error(f"{e}", icon=":material/block:")
        return
    options = data_options()
    for name in PER_DATASET:
        options.pop(name, None)
        st.session_state.pop(f"data_{name}", None)
    st.session_state[OPTIONS_KEY] = options
    st.rerun()


def folder_problem(folder: str | Path) -> str | None:
    """Why `folder` cannot be opened as a dataset, in words for the user; None when it holds images."""
    text = str(folder).strip()
    if not text:
        return "Type the path of a folder of images."
    try:
        check_data_path(text)  # before any look at the folder: say nothing about what lies outside the roots
    except ValueError as e:
        return f"{e}"
    path = Path(text).expanduser()
    if not path.exists():
        return f"There is no folder at `{path}`. Check the spelling; a relative path starts from where Loupe runs."
    if not path.is_dir():
        hint = " To use a zip, upload it under **Upload a zip**." if path.suffix.lower() == ".zip" else ""
        return f"`{path}` is a file, not a folder. Give the folder that holds the images.{hint}"
    try:
        if not any(True for _ in path.iterdir()):
            return f"`{path}` is empty. Put the images in it, one subfolder per class."
    except OSError as e:
        return f"Loupe cannot read `{path}`: {e.strerror or e}."
    if listing.list_images(path):  # the loader's own listing, so "has images" means the same thing to both
        return None
    kinds = ", ".join(sorted(listing.IMAGE_EXTENSIONS))
    return f"No images in `{path}` (looked for {kinds} in it and its subfolders)."


def _open_typed() -> None:
    with st.form("data_open_form", border=False, enter_to_submit=True):
        typed = st.text_input(
            "Folder path",
            key="data_path",
            placeholder="e.g. ~/data/bears",
            help="One subfolder per class (bears/grizzly/*.jpg), train/ and valid/ folders, "
            "labels in file names (great_pyrenees_173.jpg), or a CSV of file names and labels.",
        )
        if st.form_submit_button("Open", key="data_open", icon=":material/folder_open:"):
            problem = folder_problem(typed)
            if problem:
                st.error(problem, icon=":material/error:")
            else:
                open_dataset(Path(typed.strip()).expanduser())


def _open_recent() -> None:
    recent = recent_datasets()
    choice = st.selectbox(
        "Recent folders", recent, key="data_recent", format_func=lambda f: f"{Path(f).name}  ·  {Path(f).parent}"
    )
    if st.button("Open", key="data_open_recent", icon=":material/history:"):
        open_dataset(choice)


def _open_upload() -> None:
    remove_abandoned(workspace_dir() / "datasets")  # unpacking killed half-way (kill -9, a crash) left these
    limit_mb = int(st.get_option("server.maxUploadSize"))
    upload = st.file_uploader(
        "A zip of a dataset folder",
        type=["zip"],
        key="data_zip",
        help=f"Up to {limit_mb:,} MB. Unpacked into the workspace's datasets folder; your zip is not changed. "
        "A bigger dataset: copy its folder to this machine and type its path under **Folder**.",
    )
    if upload is None:
        return
    if upload.size > limit_mb * 2**20:  # Streamlit refuses bigger bodies on the way in; never rely on one check
        st.error(f"{upload.name} is {upload.size / 2**20:,.0f} MB, over the {limit_mb:,} MB this server accepts. "
                 "Copy the folder to this machine and type its path under **Folder** instead.", icon=":material/error:")
        return
    if st.button(f"Unpack {upload.name}", key="data_unpack", type="primary", icon=":material/unarchive:"):
        target = workspace_dir() / "datasets"
        try:
            with st.spinner(f"Unpacking {upload.name}…"):
                folder = extract_zip(upload, target, Path(upload.name).stem)
        except UploadError as e:
            st.error(f"{upload.name}: {e}", icon=":material/error:")
            return
        problem = folder_problem(folder)
        if problem:
            shutil.rmtree(folder, ignore_errors=True)
            st.error(f"{upload.name} unpacked, but it holds no dataset: {problem}", icon=":material/error:")
            return
        open_dataset(folder)


def _demo_size() -> int:
    spec = DemoSpec()
    return spec.n_per_class * len(spec.classes)


def _open_demo(primary: bool) -> None:
    folder = demo_path()
    exists = folder.is_dir() and any(folder.iterdir())
    label = "Open the demo dataset" if exists else "Create the demo dataset"
    if st.button(label, key="data_demo", type="primary" if primary else "secondary", icon=":material/auto_awesome:"):
        if not exists:
            try:
                with st.spinner(f"Drawing {_demo_size()} shapes…"):
                    make_demo_dataset(folder)
            except OSError as e:
                st.error(f"Could not create the demo dataset in `{folder}`: {e}", icon=":material/error:")
                return
        open_dataset(folder)


def render_chooser(dataset: str | None) -> None:
    """With no dataset: a call to create the demo, then the other ways in. Otherwise: all of them, folded away."""
    if dataset is None:
        with st.container(border=True):
            st.markdown("#### :material/rocket_launch: New here? Start with the demo dataset")
            st.markdown(
                f"{_demo_size()} small drawings of circles, squares and triangles, a few of them put in the wrong "
                "folder on purpose. "
                "It needs no internet and no GPU: a model trains on it in a minute, and Interpret and Clean "
                "have real mistakes to find."
            )
            _open_demo(primary=True)
        st.markdown("#### Or open your own images")
    ways = {"Folder": _open_typed}
    if recent_datasets():
        ways["Recent"] = _open_recent
    ways["Upload a zip"] = _open_upload
    if dataset:
        ways["Demo"] = lambda: _open_demo(primary=False)
    box = st.expander("Open another dataset", icon=":material/folder_open:") if dataset else st.container(border=True)
    with box:
        for tab, show in zip(st.tabs(list(ways)), ways.values()):
            with tab:
                show()
