"""The Data page's analysis: how to read and split the dataset, the cached result, its summary, warnings and
charts (choosing a dataset: ui.data_chooser; galleries and augmentations: ui.data_gallery).

Everything slow is cached: the labelled, verified split by (folder, options, a cheap listing signature, the
keep-together groups' version),
image sizes by the sampled paths, thumbnails by ui.gallery/ui.cache, augmentation previews by paths and mtimes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st
from PIL import Image

from core import data, keeptogether, layouts, listing
from core.data import DataConfig
from core.images import BadImage, DataError
from core.layouts import DataSource
from core.split import Split, split_counts
from ui.data_chooser import OPTIONS_KEY, data_options

TINY_CLASS = 10  # fewer images than this: too few to learn or to measure
SIZE_SAMPLE = 2000
SPLIT_COLOURS = {"train": "#3b5bdb", "valid": "#f08c00", "test": "#868e96"}


# ---------------------------------------------------------------- how to read and split it


def render_options(dataset: str) -> DataConfig:
    """Labelling and split options, kept in st.session_state[OPTIONS_KEY]; stops the page on invalid ones."""
    saved = data_options()
    root = Path(dataset)
    try:
        detected = layouts.detect_layout(DataConfig(path=dataset))
    except DataError:
        detected = None
    layout_now = saved.get("layout", "auto")
    with st.expander("Labels and split", icon=":material/tune:", key="data_options_box"):
        layout = st.selectbox(
            "Layout",
            data.LAYOUTS,
            index=data.LAYOUTS.index(layout_now),
            key="data_layout",
            format_func=lambda v: f"Detect: {layouts.LAYOUT_NAMES.get(detected, 'nothing found')}"
            if v == "auto"
            else layouts.LAYOUT_NAMES[v].capitalize(),
        )
        effective = detected if layout == "auto" else layout
        options = {"layout": layout}
        if effective == "filename_regex":
            options["label_regex"] = st.text_input(
                "Label from the file name (regex)",
                value=saved.get("label_regex", data.PETS_REGEX),
                key="data_label_regex",
                help="The first group is the label: `^(.+)_\\d+\\.\\w+$` reads `great_pyrenees` "
                "from great_pyrenees_173.jpg.",
            )
        if effective == "csv":
            csvs = sorted(p.name for p in root.glob("*.csv") if not p.name.startswith("."))
            if not csvs:
                st.error(f"There is no CSV file in `{root}`.", icon=":material/error:")
                st.stop()
            current = saved.get("csv_file")
            options["csv_file"] = st.selectbox(
                "Labels CSV", csvs, index=csvs.index(current) if current in csvs else 0, key="data_csv_file"
            )
        fixed_by = layouts.split_fixed_by(DataConfig(path=dataset, **options))
        fixed = fixed_by is not None
        unused = f"Not used: {fixed_by}." if fixed else ""
        if fixed:
            st.caption(f":material/lock: The split is the dataset's own: {fixed_by}. The settings below apply only "
                       "to a split Loupe makes.")
        share, seed = st.columns([3, 2], vertical_alignment="bottom")
        options["valid_pct"] = share.slider(
            "Validation share",
            0.0,
            0.5,
            value=float(saved.get("valid_pct", 0.2)),
            step=0.05,
            format="%.2f",
            key="data_valid_pct",
            disabled=fixed,
            help=unused or "Held out to measure the model.",
        )
        options["seed"] = int(
            seed.number_input("Split seed", 0, 2**31 - 1, value=int(saved.get("seed", 42)), step=1, key="data_seed",
                              disabled=fixed, help=unused or "Another seed, another random split (and training order).")
        )
        options["stratify"] = st.toggle(
            "Stratify by class",
            value=bool(saved.get("stratify", True)),
            key="data_stratify",
            disabled=fixed,
            help=unused or "Every class keeps the same share of its images in validation, so small classes are "
            "validated too.",
        )
        options["group_regex"] = (
            st.text_input(
                "Keep groups together (regex, optional)",
                value=saved.get("group_regex") or "",
                key="data_group_regex",
                placeholder="e.g. ^([a-z]+)_ keeps alice_1.jpg and alice_2.jpg on one side",
                disabled=fixed,
                help=unused or "Items whose path gives the same match (or first group) all go to the same side, "
                "so near-duplicates never straddle train and valid.",
            ).strip()
            or None
        )
    options["valid_pct"] = round(float(options["valid_pct"]), 2)
    try:
        cfg = DataConfig(path=dataset, **options)
    except ValueError as e:
        st.error(f"{e} Fix it under **Labels and split**.", icon=":material/error:")
        st.stop()
    st.session_state[OPTIONS_KEY] = options
    return cfg


# ---------------------------------------------------------------- the analysis (cached)


@st.cache_data(max_entries=8, show_spinner="Reading the labels and checking every image…")
def _prepare(config_json: str, signature: tuple[int, int], groups: tuple[int, int, int]
             ) -> tuple[DataSource, list[BadImage], Split]:
    return data.prepare(DataConfig(**json.loads(config_json)))


def prepare(cfg: DataConfig) -> tuple[DataSource, list[BadImage], Split]:
    """core.data.prepare, computed once per folder state, keep-together groups (the listing skips .loupe, where
    they live) and options."""
    return _prepare(json.dumps(asdict(cfg), sort_keys=True), listing.listing_signature(cfg.path),
                    keeptogether.groups_version(cfg.path))


# ---------------------------------------------------------------- summary and warnings


def render_summary(source: DataSource, bad: list[BadImage], split: Split) -> None:
    with st.container(horizontal=True):
        st.metric("Images", f"{len(source):,}", border=True)
        st.metric("Classes", len(source.vocab), border=True)
        st.metric("Training", f"{len(split.train):,}", border=True)
        st.metric("Validation", f"{len(split.valid):,}", border=True)
        if len(split.test):
            st.metric("Test", f"{len(split.test):,}", border=True)
        left_out = len(bad) + source.n_unlabelled
        st.metric("Left out", f"{left_out:,}", border=True, help="Files that failed to decode or have no label")


def render_warnings(source: DataSource, bad: list[BadImage], split: Split) -> None:
    counts = source.class_counts()
    if len(source.vocab) < 2 and not source.multi_label:
        st.warning(
            f"Only one class found (**{source.vocab[0]}**): a classifier needs at least two. "
            "Put each class's images in a subfolder of its own (bears/grizzly, bears/black, ...).",
            icon=":material/warning:",
        )
    tiny = {c: n for c, n in counts.items() if n < TINY_CLASS}
    if tiny:
        names = ", ".join(f"**{c}** ({n})" for c, n in sorted(tiny.items(), key=lambda kv: kv[1]))
        st.warning(
            f"{len(tiny)} tiny class{'es' if len(tiny) > 1 else ''} with fewer than {TINY_CLASS} images: {names}. "
            "The model sees too few to learn them, and their validation results are noise. "
            "Add images, or merge or drop these classes.",
            icon=":material/warning:",
        )
    if len(split.valid) and len(source.vocab) > 1:
        validated = {label for i in split.valid for label in source.labels[i]}
        missing = [c for c in source.vocab if c not in validated and c not in tiny]
        if missing:
            st.warning(
                f"No validation images for {', '.join(missing)}: their accuracy cannot be measured.",
                icon=":material/warning:",
            )
    if not len(split.valid):
        st.info(
            "The validation share is 0: training will report no validation loss or accuracy.", icon=":material/info:"
        )
    if bad or source.n_unlabelled:
        st.warning(
            f"{len(bad) + source.n_unlabelled:,} file(s) will be left out of training: see **Problems** below.",
            icon=":material/report:",
        )
    if not bad and not source.n_unlabelled:
        st.caption(f":material/check_circle: Every one of the {len(source):,} images has a label and decodes.")
    if source.fixed_split is not None:
        st.caption(":material/lock: The dataset fixes the split itself (train/valid folders or an is_valid column).")
    if len(source.vocab) > 1 or source.multi_label:
        st.page_link("app_pages/train.py", label="Next: train a model on it", icon=":material/arrow_forward:")


# ---------------------------------------------------------------- charts


def counts_figure(source: DataSource, split: Split):
    table = split_counts(source, split)
    many = len(source.vocab) > 15
    axis = {"x": "images", "y": "class", "orientation": "h"} if many else {"x": "class", "y": "images"}
    fig = px.bar(
        table,
        **axis,
        color="split",
        color_discrete_map=SPLIT_COLOURS,
        category_orders={"split": ["train", "valid", "test"], "class": source.vocab},
        title="Images per class",
        height=max(320, 18 * len(source.vocab)) if many else 320,
    )
    legend = {"title": None, "orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"}
    fig.update_layout(margin={"l": 10, "r": 10, "t": 40, "b": 10}, legend=legend)
    fig.update_xaxes(title=None)
    return fig


def _header_size(path: bytes) -> tuple[int, int] | None:
    """Width and height from the header only (no decode), as displayed: EXIF turns of 90 degrees swap them."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(0x0112) in (5, 6, 7, 8):
                width, height = height, width
            return width, height
    except (OSError, ValueError, SyntaxError):
        return None


@st.cache_data(max_entries=8, show_spinner="Reading image sizes…")
def _sizes(paths: tuple[bytes, ...]) -> pd.DataFrame:
    found = [s for s in map(_header_size, paths) if s is not None]
    return pd.DataFrame(found, columns=["width", "height"])


def image_sizes(source: DataSource) -> pd.DataFrame:
    """Sizes of at most SIZE_SAMPLE images, sampled the same way every time."""
    files = [os.fsencode(f) for f in source.files]  # bytes: a name that is not UTF-8 hashes and opens fine
    if len(files) > SIZE_SAMPLE:
        pick = np.random.default_rng(0).choice(len(files), SIZE_SAMPLE, replace=False)
        files = [files[i] for i in sorted(pick)]
    return _sizes(tuple(files))


def sizes_figure(sizes: pd.DataFrame):
    table = sizes.value_counts().rename("images").reset_index()
    fig = px.scatter(
        table,
        x="width",
        y="height",
        size="images",
        size_max=28,
        title="Image sizes (pixels)",
        height=320,
        hover_data={"images": True},
    )
    fig.update_traces(marker={"color": SPLIT_COLOURS["train"], "opacity": 0.55, "line": {"width": 0}})
    fig.update_layout(margin={"l": 10, "r": 10, "t": 40, "b": 10})
    fig.update_yaxes(scaleanchor="x", scaleratio=1, rangemode="tozero")
    fig.update_xaxes(rangemode="tozero")
    return fig


def sizes_caption(sizes: pd.DataFrame, total: int, train_size: int = DataConfig.size) -> str:
    shorter = sizes.min(axis=1)
    small = int((shorter < train_size).sum())
    sampled = f"a sample of {len(sizes):,} of {total:,} images" if len(sizes) < total else f"all {total:,} images"
    line = (
        f"From the file headers of {sampled}. Median {int(sizes.width.median())}×{int(sizes.height.median())}, "
        f"smallest {int(sizes.width.min())}×{int(sizes.height.min())}, "
        f"largest {int(sizes.width.max())}×{int(sizes.height.max())}."
    )
    if small:
        line += (
            f" {small / len(sizes):.0%} have a side shorter than {train_size} px"
            " (the default training size) and get upscaled."
        )
    return line


def render_charts(source: DataSource, split: Split) -> None:
    left, right = st.columns([3, 2], gap="medium")
    with left:
        st.plotly_chart(counts_figure(source, split), key="data_counts_chart", config={"displayModeBar": False})
    with right:
        sizes = image_sizes(source)
        if sizes.empty:
            st.caption("No image size could be read.")
            return
        st.plotly_chart(sizes_figure(sizes), key="data_sizes_chart", config={"displayModeBar": False})
        st.caption(sizes_caption(sizes, len(source)))
