"""Grad-CAM overlays for the pages that show a run's images (Interpret's top losses, Predict), cached per
(run, model file version, image file and version, class): a heatmap takes a backward pass, a rerun none."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from core.env import check_data_path
from core.images import jpeg_bytes, open_image
from core.rundir import RunDir
from ui.cache import run_bundle

TOGGLE_HELP = ("Grad-CAM: colour over the part of the centre square that made the model give the predicted "
               "class (red: most). A backward pass per image, so the first view of a page takes a moment.")


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


@st.cache_data(max_entries=512, show_spinner=False)
def _file_overlay(run_dir: str, bundle_mtime: float, path: bytes, mtime: float, label: str | None) -> bytes | None:
    from core.explain import gradcam, overlay  # imports captum and torch: only once a heatmap is asked for

    bundle = run_bundle(Path(run_dir))
    try:
        image = open_image(os.fsdecode(path))
    except (OSError, ValueError):
        return None
    vocab = bundle.meta.vocab
    index = vocab.index(label) if label in vocab else None  # else (multi-label, no label) the top class
    return jpeg_bytes(overlay(image, gradcam(bundle, image, index)))


def file_overlay(run_dir: Path, path: str | Path, label: str | None = None) -> bytes | None:
    """JPEG of `path`'s heatmap for class `label` (default: the predicted one) over its centre square; None for a
    file that is gone, unreadable or outside the folders this server may read."""
    path = Path(path)
    try:
        check_data_path(path)
    except ValueError:
        return None
    bundle = RunDir(run_dir).bundle
    return _file_overlay(str(run_dir), _mtime(bundle), os.fsencode(path), _mtime(path), label)


@st.cache_data(max_entries=256, show_spinner=False)
def upload_overlay(run_dir: str, bundle_mtime: float, digest: str, _data: bytes) -> bytes | None:
    """The predicted class's heatmap over an upload (Predict), keyed by the model's version and the image's digest."""
    from core.explain import gradcam, overlay
    from core.feedback import BadUpload, read_image

    bundle = run_bundle(Path(run_dir))
    try:
        image = read_image(_data, min_side=max(2 * bundle.meta.size, 256)).image
    except BadUpload:
        return None
    return jpeg_bytes(overlay(image, gradcam(bundle, image)))
