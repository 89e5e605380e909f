"""The Data page's galleries: the images of each side of the split, the files that failed, and augmentation
previews (cached by paths and mtimes)."""

from __future__ import annotations

import io
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
import torch
from PIL import Image

from core import layouts
from core.augment import BatchAugment, presize, presize_side, resize_batch
from core.data import DataConfig
from core.images import BadImage, open_image
from core.layouts import DataSource
from core.listing import path_text
from core.split import SIDES, Split
from ui import gallery

PAGE_SIZE = 24
PREVIEW_SIZE = 160
PREVIEW_COPIES = 6
SIDE_NAMES = {"train": "training", "valid": "validation", "test": "test"}


def render_gallery(source: DataSource, split: Split) -> None:
    st.subheader("Gallery", anchor=False)
    vocab = source.vocab
    counts = source.class_counts()
    sides = split.sides(len(source))
    present = [s for s in SIDES if (sides == s).any()]
    with st.container(horizontal=True, gap="medium", vertical_alignment="bottom"):

        def label(c: str) -> str:
            return f"{c} ({counts[c]})"

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
                name = path_text(source.files[i].name)
                st.caption(gallery.short_name(path_text(source.files[i].stem), 16), help=name)


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
