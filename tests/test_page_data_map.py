"""The Data page's map (ui.data_map) through AppTest on a hand-made health report: colourings, the caption, the
selection's images and the buttons that stage them on Clean. (Drawing a selection with the mouse: test_browser.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from core.data import DataConfig
from core.health import HealthReport
from ui import data_map
from ui.charts import data_map_figure
from ui.clean_view import DELETE, MARKS_KEY, RELABEL
from ui.state import RUN_KEY


def report_of(root: Path, run: str | None = "some-run", sampled: bool = False, predicted: bool = True) -> HealthReport:
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    rng = np.random.default_rng(0)
    items = pd.DataFrame({"file": files, "label": [f.split("/")[0] for f in files],
                          "side": ["valid" if i % 5 == 0 else "train" for i in range(len(files))],
                          "outlier": rng.random(len(files)), "x": rng.normal(size=len(files)),
                          "y": rng.normal(size=len(files))})
    if sampled:
        items.loc[items.index[::3], ["x", "y"]] = np.nan
    if predicted:
        items["predicted"] = "circle"
        items["max_prob"] = 0.9
    vocab = sorted(set(items["label"]))
    return HealthReport(str(root), "a perceptual hash of the pixels", items, [], pd.DataFrame(), vocab, run,
                        map_sampled=sampled)


def page(report, cfg) -> None:  # AppTest runs its source alone: no annotations that need imports
    from ui import data_map

    data_map.render_map(report, cfg)


def open_map(report: HealthReport, root: Path) -> AppTest:
    at = AppTest.from_function(page, kwargs={"report": report, "cfg": DataConfig(path=str(root), size=32)},
                               default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.fixture
def root(demo_dataset: Path, monkeypatch) -> Path:
    monkeypatch.setenv("LOUPE_HOME", str(demo_dataset.parent / "home"))
    return demo_dataset.resolve()


def test_the_figure_has_one_trace_per_class_and_row_labels_in_customdata(root):
    items = report_of(root, sampled=True).items
    fig = data_map_figure(items, "label")
    assert [t.name for t in fig.data] == ["circle", "square", "triangle"]
    shown = sorted(int(row[0]) for t in fig.data for row in t.customdata)
    assert shown == sorted(items.index[items["x"].notna()])  # only the points on the map, by row label
    assert fig.layout.dragmode == "lasso"
    scored = data_map_figure(items, "outlier")
    assert len(scored.data) == 1 and scored.data[0].marker.showscale
    assert "outlier score" in scored.data[0].hovertemplate


def test_selected_rows_maps_points_back_to_items(root):
    items = report_of(root).items
    event = {"selection": {"points": [{"customdata": [3, "x"]}, {"customdata": [1]}, {"customdata": [3]},
                                      {"customdata": [999]}, {"x": 1}]}}
    assert data_map.selected_rows(event, items).index.tolist() == [3, 1]
    assert data_map.selected_rows(None, items).empty


def test_the_map_says_what_it_is_and_offers_the_colourings(root):
    at = open_map(report_of(root, sampled=True), root)
    colour = at.selectbox(key=data_map.COLOUR_KEY)
    assert colour.options == ["Label", "Predicted class", "Split side", "Outlier score"]
    text = " ".join(c.value for c in at.caption)
    assert "t-SNE" in text and "a perceptual hash" in text and "select points" in text
    assert "a sample of 16 of 24 images" in text
    colour.set_value("outlier").run()
    assert not at.exception


def test_a_label_check_adds_its_score(root):
    items = report_of(root).items
    scores = pd.DataFrame({"file": items["file"][:4], "score": [0.9, 0.1, 0.5, 0.3]})
    merged = data_map.with_scores(items, scores)
    assert merged["score"][:4].tolist() == [0.9, 0.1, 0.5, 0.3] and merged["score"][4:].isna().all()
    assert "label check score" in data_map_figure(merged, "score").data[0].hovertemplate


def select(monkeypatch, n: int, run: str | None = "some-run") -> list:
    """Make the chart report its first n points as selected, Clean's run be `run` (no run has tables in this
    workspace), and record where the page switches to."""
    monkeypatch.setattr(data_map, "selected_rows", lambda event, items: items.head(n))
    if run is not None:
        monkeypatch.setattr(data_map, "clean_target", lambda report: run)
    switched: list = []
    monkeypatch.setattr(st, "switch_page", switched.append)
    return switched


def test_a_selection_shows_its_images_and_stages_them_on_clean(root, monkeypatch):
    report = report_of(root)
    switched = select(monkeypatch, 5)
    at = open_map(report, root)
    assert len(at.image) == 5  # the five thumbnails
    assert any("5 images selected" in m.value for m in at.markdown)
    at.button(key="data_map_delete").click().run()
    assert not at.exception, at.exception
    marks = at.session_state[MARKS_KEY]
    assert marks == {str(root / f): DELETE for f in report.items["file"][:5]}
    assert at.session_state[RUN_KEY] == "some-run" and switched == ["app_pages/clean.py"]

    at.selectbox(key=data_map.RELABEL_KEY).set_value("square").run()
    at.button(key="data_map_relabel").click().run()
    assert set(at.session_state[MARKS_KEY].values()) == {f"{RELABEL}square"}


def test_many_selected_are_counted_not_all_drawn(root, monkeypatch):
    select(monkeypatch, 24)
    monkeypatch.setattr(data_map, "MAX_SHOWN", 6)
    at = open_map(report_of(root), root)
    assert any("the first 6 shown, 18 more not shown" in m.value for m in at.markdown)
    assert len(at.image) == 6


def test_without_a_run_the_buttons_say_train_first(root, monkeypatch):
    select(monkeypatch, 3, run=None)  # the workspace has no run trained on the folder
    at = open_map(report_of(root, run=None, predicted=False), root)
    assert at.button(key="data_map_delete").disabled and at.button(key="data_map_relabel").disabled
    assert any("Train a model first" in c.value for c in at.caption)
    assert "Predicted class" not in at.selectbox(key=data_map.COLOUR_KEY).options
