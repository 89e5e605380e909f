"""Data: the map of the dataset (a health report's t-SNE), a selection's images, and sending them to Clean.

Plotly shows no pictures on hover, so the map is for finding regions: a lasso or box selection shows its
images below, with buttons that stage them on the Clean page (ui.clean_queue) to delete or relabel.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pandas as pd
import streamlit as st

from core import clean, runs
from core.config import DataConfig
from core.env import runs_dir
from core.health import HealthReport
from core.labelcheck import latest_check, read_issues
from ui import clean_queue
from ui.charts import data_map_figure
from ui.gallery import grid, has_tables, image_or_note
from ui.state import set_run

MAX_SHOWN = 48  # thumbnails of a selection; the rest are counted
COLOUR_KEY = "data_map_colour"
RELABEL_KEY = "data_map_relabel_to"
COLOURS = {"label": "Label", "predicted": "Predicted class", "side": "Split side", "outlier": "Outlier score",
           "score": "Label check score"}


@st.cache_data(max_entries=8, show_spinner=False)
def _check_scores(path: str, mtime: float) -> pd.DataFrame:
    """label_issues.csv's score by file (relative to the dataset folder, as the report's items are)."""
    return read_issues(Path(path).parent)[["file", "score"]].drop_duplicates("file")


def check_scores(cfg: DataConfig) -> tuple[pd.DataFrame | None, str]:
    """The newest finished label check of this dataset: its scores by file and its id; (None, "") when none."""
    try:
        info = latest_check(cfg.path, runs_dir())
    except (OSError, ValueError):
        return None, ""
    if info is None or info.state != runs.DONE or not info.run.label_issues.exists():
        return None, ""
    path = info.run.label_issues
    try:
        return _check_scores(str(path), path.stat().st_mtime), info.id
    except (OSError, ValueError, KeyError):
        return None, ""


def with_scores(items: pd.DataFrame, scores: pd.DataFrame | None) -> pd.DataFrame:
    """The report's items with the label check's `score` by file (NaN for files the check did not see)."""
    if scores is None:
        return items
    by_file = dict(zip(scores["file"], scores["score"]))
    return items.assign(score=[by_file.get(f, float("nan")) for f in items["file"]])


def selected_rows(event, items: pd.DataFrame) -> pd.DataFrame:
    """The items a chart selection holds: each point's customdata starts with its row label in `items`."""
    points = (event or {}).get("selection", {}).get("points", []) if event is not None else []
    labels = []
    for point in points:
        custom = point.get("customdata")
        value = custom[0] if isinstance(custom, (list, tuple)) and custom else custom
        try:
            labels.append(int(value))
        except (TypeError, ValueError):
            continue
    labels = [i for i in dict.fromkeys(labels) if i in items.index]  # in order, once, and still in the table
    return items.loc[labels]


def _layout(cfg: DataConfig) -> tuple[str, bool]:
    """The dataset's layout and whether it is multi-label (from the Data page's cached reading)."""
    from ui.data_view import prepare

    try:
        source = prepare(cfg)[0]
    except Exception:  # noqa: BLE001 - the page has shown why the data cannot be read; no relabelling then
        return "", False
    return source.layout, source.multi_label


def _cell(root: Path, row: pd.Series) -> None:
    image_or_note(root / row["file"])
    guess = row.get("predicted")
    verdict = f" · predicted **{guess}**" if isinstance(guess, str) and guess and guess != row["label"] else ""
    st.caption(f"{row['label'] or '—'} · {row['side'] or 'no side'}{verdict}", help=row["file"])


def clean_target(report: HealthReport) -> str | None:
    """The run Clean will open for these images: the report's run, else (a report made without a model) the
    newest run trained on this folder, as the Health section's other buttons choose (ui.data_health.clean_run)."""
    picked = runs_dir() / report.run if report.run else None
    try:
        from ui.data_health import clean_run  # the section that calls this module: imported late, no cycle
    except ImportError:
        return report.run if picked is not None and has_tables(picked) else None
    target = clean_run(report.root, picked)
    return target.name if target is not None else None


def _to_clean(run: str, files: list[Path], relabel_to: str | None = None) -> None:
    clean_queue.stage(files, relabel_to=relabel_to)
    set_run(run)  # Clean opens the selected run
    st.switch_page(clean_queue.CLEAN_PAGE)


def render_map(report: HealthReport, cfg: DataConfig) -> None:
    """The map, the colour control, the selected images and the buttons that send them to Clean."""
    scores, check_id = check_scores(cfg)
    items = with_scores(report.items, scores)
    on_map = int(items["x"].notna().sum()) if "x" in items else 0
    if not on_map:
        st.info("This report has no map (too few images to place).", icon=":material/scatter_plot:")
        return
    options = [c for c in COLOURS if c in items and (c != "predicted" or items[c].astype(bool).any())]
    colour = st.selectbox("Colour by", options, format_func=COLOURS.get, key=COLOUR_KEY, width=260,
                          help=f"Label check score: from check {check_id}, higher = more likely mislabelled."
                          if check_id else "Run a label check on Clean to colour by its score.")
    sample = (f"a sample of {on_map:,} of {len(items):,} images" if report.map_sampled
              else f"all {on_map:,} images")
    st.caption(f"Each dot is an image ({sample}), placed by t-SNE of its embedding from {report.how}: images "
               "that look alike to it sit close together; clusters far from their class, or classes mixed, are "
               "worth a look. The map shows no pictures on hover, only names and scores: **select points** "
               "(drag a lasso, or choose box select in the chart's toolbar) to see them below.")
    fig = data_map_figure(items, colour)
    key = f"data_map_{colour}_{zlib.crc32(f'{report.root}|{report.run}|{len(items)}'.encode()):08x}"
    event = st.plotly_chart(fig, on_select="rerun", selection_mode=("box", "lasso"), key=key,
                            config={"displaylogo": False})
    chosen = selected_rows(event, items)
    if chosen.empty:
        st.caption(":material/gesture_select: No points selected.")
        return
    n = len(chosen)
    root = Path(report.root)
    files = [root / f for f in chosen["file"]]
    st.markdown(f"**{n} image{'s' if n != 1 else ''} selected**"
                + (f": the first {MAX_SHOWN} shown, {n - MAX_SHOWN} more not shown" if n > MAX_SHOWN else ""))
    grid([row for _, row in chosen.head(MAX_SHOWN).iterrows()], lambda row: _cell(root, row), columns=8)
    _actions(report, cfg, files)


def _actions(report: HealthReport, cfg: DataConfig, files: list[Path]) -> None:
    n = len(files)
    these = f"these {n}" if n != 1 else "this one"
    run = clean_target(report)
    no_run = run is None
    layout, multi_label = _layout(cfg)
    relabel_ok = clean.relabel_supported(layout) and not multi_label
    with st.container(horizontal=True, vertical_alignment="bottom", gap="small"):
        if st.button(f"Delete {these} in Clean", key="data_map_delete", icon=":material/delete:", disabled=no_run,
                     help="Stages them on the Clean page; nothing moves until you apply there (with undo)."):
            _to_clean(run, files)
        if relabel_ok:
            target = st.selectbox("Relabel as", report.vocab, key=RELABEL_KEY, width=220, disabled=no_run)
            if st.button(f"Relabel {these} as {target} in Clean", key="data_map_relabel", disabled=no_run or not target,
                         icon=":material/drive_file_move:",
                         help="Stages the moves on the Clean page; nothing moves until you apply there."):
                _to_clean(run, files, relabel_to=target)
    if no_run:
        st.caption(":material/info: Train a model first: Clean works on a run's images.")
    elif not relabel_ok:
        st.caption("Relabelling is not available for this dataset"
                   + (" (multi-label)" if multi_label else " (its labels are not folder names)") + ": delete only.")
