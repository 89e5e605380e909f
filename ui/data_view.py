"""The Data page's parts: choosing a dataset, the cached analysis, and the charts and galleries it shows.

Everything slow is cached: the labelled, verified split by (folder, options, a cheap listing signature),
image sizes by the sampled paths, thumbnails by ui.gallery/ui.cache, augmentation previews by paths and mtimes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st
import torch
from PIL import Image

from core import data, layouts, listing
from core.augment import BatchAugment, presize, presize_side, resize_batch
from core.data import DataConfig
from core.demo import DemoSpec, make_demo_dataset
from core.env import check_data_path, workspace_dir
from core.images import BadImage, DataError, open_image
from core.layouts import DataSource
from core.listing import path_text
from core.split import SIDES, Split, split_counts
from core.uploads import UploadError, extract_zip, remove_abandoned
from ui import gallery
from ui.state import demo_path, recent_datasets, set_dataset

OPTIONS_KEY = "data_options"  # DataConfig field overrides the Train page builds its config from
PER_DATASET = ("layout", "label_regex", "csv_file", "group_regex")  # options that mean nothing for another folder
TINY_CLASS = 10  # fewer images than this: too few to learn or to measure
PAGE_SIZE = 24
SIZE_SAMPLE = 2000
PREVIEW_SIZE = 160
PREVIEW_COPIES = 6
SPLIT_COLOURS = {"train": "#3b5bdb", "valid": "#f08c00", "test": "#868e96"}
SIDE_NAMES = {"train": "training", "valid": "validation", "test": "test"}


# ---------------------------------------------------------------- choosing a dataset


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
def _prepare(config_json: str, signature: tuple[int, int]) -> tuple[DataSource, list[BadImage], Split]:
    return data.prepare(DataConfig(**json.loads(config_json)))


def prepare(cfg: DataConfig) -> tuple[DataSource, list[BadImage], Split]:
    """core.data.prepare, computed once per folder state and options."""
    return _prepare(json.dumps(asdict(cfg), sort_keys=True), listing.listing_signature(cfg.path))


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


# ---------------------------------------------------------------- gallery, problems, augmentations


def _short(name: str, limit: int = 20) -> str:
    """Long names keep their start and end: the end usually tells similar files apart."""
    keep = max(limit - 1, 4)
    return name if len(name) <= limit else name[: keep - keep // 2] + "…" + name[-(keep // 2) :]


def render_gallery(source: DataSource, split: Split) -> None:
    st.subheader("Gallery", anchor=False)
    vocab = source.vocab
    counts = source.class_counts()
    sides = split.sides(len(source))
    present = [s for s in SIDES if (sides == s).any()]
    with st.container(horizontal=True, gap="medium", vertical_alignment="bottom"):
        label = lambda c: f"{c} ({counts[c]})"
        if len(vocab) <= 6:
            chosen = st.segmented_control(
                "Class", vocab, default=vocab[0], key="data_gallery_class", format_func=label, required=True
            )
        else:
            chosen = st.selectbox("Class", vocab, key="data_gallery_class", format_func=label, width=320)
        side = st.segmented_control(
            "Images", ["all"] + present, default="all", key="data_gallery_side", required=True,
            format_func=lambda s: {"all": "all", "train": "training", "valid": "validation", "test": "test"}[s],
        )
    chosen = chosen if chosen in vocab else vocab[0]
    side = side or "all"
    members = [i for i, labels in enumerate(source.labels) if chosen in labels and side in ("all", sides[i])]
    slot = st.container()
    pager = f"data_gallery_page_{vocab.index(chosen)}_{side}"
    shown = [members[k] for k in gallery.paginate(len(members), PAGE_SIZE, key=pager)]
    with slot:
        which = "" if side == "all" else " " + SIDE_NAMES[side]
        if not members:
            st.caption(f"**{chosen}** has no{which} images.")
            return
        first = members.index(shown[0]) + 1
        st.caption(f"**{chosen}**:{which} images {first}–{first + len(shown) - 1} of {len(members)}.")

        # ui.gallery's cells (letterboxed squares), denser than its grid(): a dataset is for skimming.
        cells = st.grid(6, min_column_width=120, border=True, gap="small", key="data_gallery_grid")
        for i in shown:
            with cells.cell():
                gallery.image_or_note(source.files[i], note="Moved or changed since the check")
                st.caption(_short(path_text(source.files[i].stem), 16), help=path_text(source.files[i].name))


def render_problems(source: DataSource, bad: list[BadImage]) -> None:
    if not bad and not source.unlabelled:
        return
    st.subheader("Problems", anchor=False)
    st.caption("These files are left out of training. Fix or delete them: the page checks again on its own.")

    def rel(path: Path) -> str:
        try:
            return path_text(path.resolve().relative_to(source.root).as_posix())
        except ValueError:
            return path_text(path)

    rows = [(rel(b.path), "cannot be used", b.reason) for b in bad]
    rows += [(rel(path), "no label", why) for path, why in source.unlabelled]
    table = pd.DataFrame(rows, columns=["file", "problem", "reason"])
    st.dataframe(table, hide_index=True, key="data_problems", height=min(400, 38 + 35 * len(table)))
    if source.unlisted:
        st.caption(f"… and {source.unlisted:,} more rows of the CSV name files that are not in the folder "
                   f"(only the first {layouts.MAX_LISTED:,} are listed).")


def _jpeg(pixels: torch.Tensor) -> bytes:
    """A float [3, H, W] image in [0, 1] as JPEG bytes."""
    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@st.cache_data(max_entries=16, show_spinner="Augmenting a few images…")
def _augmented(
    paths: tuple[str, ...], mtimes: tuple[float, ...], augment: BatchAugment, seed: int
) -> list[list[bytes]]:
    generator = torch.Generator().manual_seed(seed)
    side = presize_side(augment.size)
    rows = []
    for path in paths:
        img = open_image(path, draft=side * 2)
        square = torch.from_numpy(presize(img, side)).unsqueeze(0)  # what training stores for this image
        batch = square.expand(PREVIEW_COPIES, -1, -1, -1)
        rows.append([_jpeg(resize_batch(square, augment.size)[0])] + [_jpeg(x) for x in augment(batch, generator)])
    return rows


def describe_augment(augment: BatchAugment) -> str:
    parts = [f"a random crop keeping {augment.min_scale:.0%}–100% of it" if augment.min_scale < 1 else "no cropping"]
    if augment.flip:
        parts.append("a mirror image half the time")
    if augment.flip_vert:
        parts.append("upside-down flips and quarter turns")
    if augment.max_rotate > 0:
        parts.append(f"a tilt of up to {augment.max_rotate:g}°")
    if augment.max_lighting > 0:
        parts.append(f"brightness and contrast within ±{augment.max_lighting:.0%}")
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def render_augmentations(source: DataSource, split: Split, cfg: DataConfig) -> None:
    st.subheader("Training augmentations", anchor=False)
    augment = BatchAugment.from_config(DataConfig(**{**asdict(cfg), "size": PREVIEW_SIZE}))
    st.caption(f"Each epoch, every training image is seen differently: {describe_augment(augment)}. "
               "The first image of each row is how validation sees it.")
    draw = st.session_state.get("data_aug_draw", 0)
    rng = np.random.default_rng(draw)
    train = [int(i) for i in split.train] or list(range(len(source)))
    classes = list(dict.fromkeys(source.labels[i][0] for i in rng.permutation(train)))[:2]
    picks = [next(i for i in rng.permutation(train) if source.labels[i][0] == c) for c in classes]
    paths = tuple(str(source.files[i]) for i in picks)
    mtimes = tuple(os.path.getmtime(p) if os.path.exists(p) else 0.0 for p in paths)
    try:
        rows = _augmented(paths, mtimes, augment, draw)
    except (OSError, ValueError) as e:
        st.warning(f"Could not preview augmentations: {e}")
        return
    captions = ["as validated"] + [f"training {k}" for k in range(1, PREVIEW_COPIES + 1)]
    for i, row in zip(picks, rows):
        st.caption(f"**{source.labels[i][0]}** · {path_text(source.files[i].name)}")
        with st.container(horizontal=True, gap="small"):
            for image, caption in zip(row, captions):
                st.image(image, caption=caption, width=120)
    if st.button("Other images", key="data_aug_shuffle", icon=":material/shuffle:", type="tertiary"):
        st.session_state["data_aug_draw"] = draw + 1
        st.rerun()
