"""Image grids for pages that show a run's images: uniform square thumbnails, captions, paging, run guards.

Every image goes through `square_thumb` (a cached, letterboxed thumbnail of `ui.cache.thumb`), so grids
line up whatever the photos' aspect ratios, and no full-size image ever reaches the browser.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st
from PIL import Image, ImageOps

from core import cleanrun, runs
from core.env import check_data_path
from core.images import jpeg_bytes
from core.rundir import RunDir, is_label_check
from ui.cache import run_table, thumb
from ui.state import current_run, latest_run_where

THUMB_SIZE = 192
PAD_COLOUR = (240, 242, 246)  # Streamlit's secondary background: the letterbox blends into the page


@st.cache_data(max_entries=4096, show_spinner=False)
def _square(data: bytes, size: int) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    # Fits the box both ways: small images (a 32 px dataset) are scaled up so every cell looks alike.
    return jpeg_bytes(ImageOps.pad(img, (size, size), Image.Resampling.LANCZOS, color=PAD_COLOUR))


def square_thumb(path: str | Path, size: int = THUMB_SIZE) -> bytes | None:
    """A size x size JPEG of the whole image, letterboxed; None for a file that is gone or unreadable."""
    data = thumb(path, size)
    return None if data is None else _square(data, size)


def paginate(n_items: int, per_page: int, key: str, scope: Sequence[Any] = ()) -> range:
    """A pager under the caller's grid; returns the row positions of the page shown.

    The pager is drawn only when there is more than one page. `scope` holds what the grid shows (the filters):
    each scope gets a pager of its own, so changing a filter starts on page 1. (Setting the page through
    st.session_state instead would make Streamlit warn that the widget also has a default value.)
    """
    n_pages = max(1, math.ceil(n_items / per_page))
    pager_key = ":".join([key, *map(str, scope)])
    page = st.pagination(n_pages, key=pager_key) if n_pages > 1 else 1
    start = (page - 1) * per_page
    return range(start, min(start + per_page, n_items))


def grid(rows: Sequence[Any], render: Callable[[Any], None], columns: int = 6) -> None:
    """One bordered cell per row, `columns` across (fewer on narrow screens); `render(row)` fills a cell."""
    cells = st.grid(columns, border=True, gap="small")
    for row in rows:
        with cells.cell():
            render(row)


@st.cache_data(max_entries=8, show_spinner=False)
def _blank(size: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), PAD_COLOUR).save(out, format="PNG")
    return out.getvalue()


def image_or_note(path: str | Path, note: str = "File moved or deleted", size: int = THUMB_SIZE) -> bool:
    """The square thumbnail of `path`, or an empty square of the same size captioned `note` (so the grid
    stays even); True when the image was shown."""
    data = square_thumb(path, size)
    if data is None:
        st.image(_blank(size), width="stretch")
        st.caption(f":material/hide_image: {note}")
        return False
    st.image(data, width="stretch")
    return True


def loss_caption(row: pd.Series) -> str:
    """fastai's top-losses caption, one fact per line: prediction / actual, loss, probability of the prediction."""
    colour = "green" if row["correct"] else "red"
    return (f":{colour}[**{row['predicted'] or '—'}**] / {row['actual'] or '—'}  \n"
            f"loss {row['loss']:.2f} · prob {row['prob_pred']:.2f}")


def run_state(run: Path) -> str | None:
    try:
        return runs.status(run).get("state")
    except (OSError, ValueError):
        return None


def passed_over(selected: Path, shown: Path) -> None:
    """Say why a page that needs a model shows `shown` instead of the selected run, with a link to the latter."""
    state = run_state(selected)
    if _is_label_check(selected):
        st.info(f"The selected run **{selected.name}** is a label check ({state or 'unknown state'}), which has no "
                f"model of its own: this page shows run **{shown.name}**. The check ranks the images on Clean.",
                icon=":material/fact_check:")
        st.page_link("app_pages/clean.py", label="Clean with the check", icon=":material/cleaning_services:")
        return
    if state == runs.FAILED:
        st.warning(f"The selected run **{selected.name}** failed and has no model: this page shows run "
                   f"**{shown.name}** instead.", icon=":material/error:")
    elif state in runs.ACTIVE_STATES:
        st.info(f"The selected run **{selected.name}** is still {state}: until it finishes, this page shows run "
                f"**{shown.name}**.", icon=":material/hourglass_top:")
    else:
        st.info(f"The selected run **{selected.name}** has no model ({state or 'unknown state'}): this page shows "
                f"run **{shown.name}** instead.", icon=":material/info:")
    verb = "See why it failed" if state == runs.FAILED else "Follow it"
    st.page_link("app_pages/train.py", label=f"{verb} on Train", icon=":material/model_training:")


def _is_label_check(run: Path) -> bool:
    try:
        return is_label_check(run, runs.read_status(run))
    except (OSError, ValueError):
        return False


def has_tables(run: Path) -> bool:
    return RunDir(run).table("valid").exists()


def refuse_outside_roots(run: Path, what: str) -> None:
    """Stop the page when `run` trained on a folder this server may not read (LOUPE_DATA_ROOTS). A run made
    from the command line may name any folder; `what` says what the page would do with its images."""
    try:
        folders = [dataset.root for dataset in cleanrun.run_datasets(run)]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no readable record of its folders: ui.cache.thumb still checks every image on its own
    for folder in folders:
        try:
            check_data_path(folder)
        except ValueError as e:
            st.error(f"Run **{run.name}** trained on a folder whose images cannot be {what} here: {e}",
                     icon=":material/block:")
            st.stop()


def require_run_tables() -> tuple[Path, pd.DataFrame]:
    """The run to look at and its valid-split item table: the selected run, or, when it has no model (failed,
    still training), the newest run that has one, saying so. Stops the page with a clear note when there is none."""
    run = current_run()
    if run is None:
        st.info("No run yet: train a model first, then come back to see where it goes wrong.")
        st.page_link("app_pages/train.py", label="Go to Train", icon=":material/model_training:")
        st.stop()
    table = run_table(run, "valid")
    if table is not None:
        return run, table
    shown = latest_run_where(has_tables)
    table = run_table(shown, "valid") if shown is not None else None
    if table is not None:
        passed_over(run, shown)
        return shown, table
    state = run_state(run)
    if state in runs.ACTIVE_STATES:
        st.info(f"Run **{run.name}** is still {state}. Its model and tables appear here when it finishes.")
    elif state == runs.FAILED:
        st.warning(f"Run **{run.name}** failed, so it has no model to look at, and no other run has one yet.")
    else:
        st.info(f"Run **{run.name}** has no model and interpretation tables yet ({state or 'unknown state'}). "
                "Pick a finished run in the sidebar, or train one.")
    st.page_link("app_pages/train.py", label="Go to Train", icon=":material/model_training:")
    st.stop()
    raise AssertionError("unreachable")  # st.stop() raises


def short_name(name: str, limit: int = 20) -> str:
    """Long names keep their start and end: the end usually tells similar files apart."""
    keep = max(limit - 1, 4)
    return name if len(name) <= limit else name[: keep - keep // 2] + "…" + name[-(keep // 2) :]
