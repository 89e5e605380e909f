"""The Interpret page through Streamlit's AppTest, on a real run trained in-process on generated shapes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import failed_after, open_app_page, tiny_config, train_tiny_run
from streamlit.testing.v1 import AppTest

from core import interpret, runs
from core.demo import DemoSpec, make_demo_dataset
from core.env import runs_dir
from core.runlist import list_runs

APP = Path(__file__).resolve().parents[1] / "app.py"
PAGE = "app_pages/interpret.py"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A workspace with one finished run on shapes, some of them deliberately in the wrong folder."""
    home = tmp_path_factory.mktemp("interpret-home")
    data = make_demo_dataset(home / "shapes", DemoSpec(n_per_class=20, size=32, mislabel_frac=0.1, seed=3))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOUPE_HOME", str(home))
        train_tiny_run(tiny_config(data), runs_dir())
    return home


def open_page(home: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("LOUPE_HOME", str(home))
    return open_app_page(PAGE)


def heatmap(at: AppTest) -> dict:
    (chart,) = [c for c in at.get("plotly_chart") if "interpret_confusion" in c.proto.id]
    return json.loads(chart.proto.spec)["data"][0]


def valid_table(home: Path):
    (run,) = list_runs(home / "runs")
    return interpret.load_table(interpret.table_path(run.path, "valid"))


def count_caption(at: AppTest) -> str:
    return next(c.value for c in at.caption if "highest loss first" in c.value)


def test_no_run_says_so_and_links_to_train(tmp_path, monkeypatch):
    at = open_page(tmp_path / "empty", monkeypatch)
    assert any("No run yet" in i.value for i in at.info)
    assert not at.get("plotly_chart") and not at.image


def test_a_run_without_a_model_yet_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path))
    runs.create(tiny_config(tmp_path).to_dict(), root=runs_dir())
    at = open_page(tmp_path, monkeypatch)
    assert any("no model" in i.value for i in at.info)
    assert not at.get("plotly_chart")


def test_a_failed_newest_run_does_not_hide_the_model_before_it(home, tmp_path, monkeypatch):
    (good,) = list_runs(home / "runs")
    failed = failed_after(Path(good.path), tmp_path).name
    at = open_page(tmp_path, monkeypatch)
    assert at.session_state["run_id"] == failed  # the newest run stays the selected one
    assert heatmap(at)["type"] == "heatmap" and at.image  # yet the page shows the model before it
    (note,) = [w.value for w in at.warning]
    assert failed in note and "failed" in note and good.id in note
    assert any(good.id in c.value for c in at.caption)
    assert any("failed" in link.value and "train" in link.proto.page for link in at.get("page_link"))


def test_finished_run_shows_matrix_tables_and_gallery(home, monkeypatch):
    at = open_page(home, monkeypatch)
    trace = heatmap(at)
    assert trace["type"] == "heatmap" and trace["x"] == ["circle", "square", "triangle"]
    assert sum(map(sum, trace["z"])) == len(valid_table(home))  # every validation image, once
    (report,) = [d.value for d in at.dataframe if "precision" in d.value.columns]
    assert list(report.index) == ["circle", "square", "triangle", "macro avg", "weighted avg"]
    assert len(at.image) == min(12, len(valid_table(home)))  # the first page of the gallery
    assert all(img.value[0] for img in at.image)
    assert any("loss" in m.value and "prob" in m.value for m in at.markdown)


def test_normalised_toggle_turns_counts_into_row_shares(home, monkeypatch):
    at = open_page(home, monkeypatch)
    counts = heatmap(at)["z"]
    at.toggle(key="interpret_normalise").set_value(True).run()
    assert not at.exception
    shares = heatmap(at)["z"]
    for row_counts, row_shares in zip(counts, shares):
        if sum(row_counts):
            assert sum(row_shares) == pytest.approx(1.0)
            assert row_shares == pytest.approx([c / sum(row_counts) for c in row_counts])


def test_min_val_slider_filters_the_most_confused_pairs(home, monkeypatch):
    at = open_page(home, monkeypatch)
    slider = at.slider(key="interpret_min_val")
    low = slider.value
    pairs_at_low = _pairs(at)
    assert not pairs_at_low.empty  # a one-epoch model confuses something
    slider.set_value(slider.max).run()
    assert not at.exception
    pairs_at_max = _pairs(at)
    assert low == 1 and len(pairs_at_max) <= len(pairs_at_low)
    assert all(count >= slider.max for count in pairs_at_max["count"])
    if pairs_at_max.empty:
        assert any("No pair" in s.value for s in at.success)


def _pairs(at: AppTest):
    import pandas as pd

    found = [d.value for d in at.dataframe if list(d.value.columns) == ["actual", "predicted", "count"]]
    return found[0] if found else pd.DataFrame({"count": []})


@pytest.fixture
def widget_warnings(monkeypatch) -> list[str]:
    """What Streamlit logs about widget state misuse (once per process, so re-armed for the test)."""
    from streamlit.elements.lib import policies

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(record.getMessage())

    found: list[str] = []
    monkeypatch.setattr(policies, "_shown_default_value_warning", False)
    handler = Collect()
    policies._LOGGER.addHandler(handler)
    yield found
    policies._LOGGER.removeHandler(handler)


def test_filters_and_paging_change_the_gallery(home, monkeypatch, widget_warnings):
    at = open_page(home, monkeypatch)
    n_valid = len(valid_table(home))
    assert f"{n_valid} images" in count_caption(at)
    first_page = [img.value[0] for img in at.image]

    at.segmented_control(key="interpret_split").set_value("train").run()
    assert not at.exception and f"{60 - n_valid} images" in count_caption(at)
    (pager,) = at.pagination
    assert pager.num_pages == -(-(60 - n_valid) // 12)
    pager.set_value(2).run()
    page_two = [img.value[0] for img in at.image]
    assert len(page_two) == 12 and page_two != first_page

    # A filter sends the pager back to page 1 and keeps only what it says.
    at.selectbox(key="interpret_actual").set_value("square").run()
    assert not at.exception and all(p.value == 1 for p in at.pagination)
    n_square = int(count_caption(at).split()[0])
    assert 0 < n_square < 60 - n_valid
    captions = [m.value for m in at.markdown if "loss" in m.value and "prob" in m.value]
    assert captions and all("/ square" in m for m in captions)
    at.toggle(key="interpret_only_wrong").set_value(True).run()
    assert int(count_caption(at).split()[0]) <= n_square
    assert all(":red[" in m.value for m in at.markdown if "loss" in m.value and "prob" in m.value)
    at.selectbox(key="interpret_predicted").set_value("square").run()  # wrong yet predicted as itself: none
    assert any("No image matches" in i.value for i in at.info) and not at.image
    assert not widget_warnings  # the pager went back to page 1 without its value being set behind its back


@pytest.fixture(scope="module")
def multi_label_home(tmp_path_factory) -> Path:
    """A run on a tiny multi-label CSV dataset: red, blue, or both halves of an image."""
    import numpy as np
    from PIL import Image

    home = tmp_path_factory.mktemp("interpret-multi")
    data = home / "colours"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["file,labels"]
    for i in range(24):
        tags = ["red", "blue", "red blue"][i % 3]
        pixels = rng.integers(0, 40, size=(32, 32, 3), dtype=np.uint8)
        if "red" in tags:
            pixels[:, :16, 0] = 220
        if "blue" in tags:
            pixels[:, 16:, 2] = 220
        Image.fromarray(pixels).save(data / "images" / f"img_{i:02d}.png")
        lines.append(f"images/img_{i:02d}.png,{tags}")
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOUPE_HOME", str(home))
        train_tiny_run(tiny_config(data), runs_dir())
    return home


def test_multi_label_run_shows_per_label_counts_instead_of_the_matrix(multi_label_home, monkeypatch):
    at = open_page(multi_label_home, monkeypatch)
    charts = [c.proto.id for c in at.get("plotly_chart")]
    assert any("interpret_label_chart" in c for c in charts) and not any("interpret_confusion" in c for c in charts)
    tables = [d.value for d in at.dataframe]
    (counts,) = [t for t in tables if list(t.columns) == ["tp", "fp", "fn", "tn"]]
    assert list(counts.index) == ["blue", "red"] and (counts.sum(axis=1) == len(valid_table(multi_label_home))).all()
    assert any("precision" in t.columns for t in tables)
    assert not at.slider  # most-confused pairs mean nothing for multi-label
    assert at.image
    at.selectbox(key="interpret_actual").set_value("red").run()
    assert not at.exception
    assert all("red" in m.value.split("/")[1] for m in at.markdown if "loss" in m.value and "prob" in m.value)


def test_the_tta_toggle_shows_the_metrics_with_and_without(home, monkeypatch):
    from core.rundir import RunDir

    at = open_page(home, monkeypatch)
    assert not [m for m in at.metric if "TTA" in m.label]
    at.toggle(key="interpret_tta").set_value(True).run()
    assert not at.exception, at.exception
    labels = [m.label for m in at.metric]
    assert "Accuracy" in labels and "Accuracy with TTA" in labels and "Error rate with TTA" in labels
    (run,) = list_runs(home / "runs")
    tta = interpret.load_table(RunDir(run.path).table_tta("valid"))  # computed once, kept in the run
    (with_tta,) = [m for m in at.metric if m.label == "Wrong with TTA"]
    assert with_tta.value == str(int((~tta["correct"]).sum()))
    assert int(with_tta.delta) == int((~tta["correct"]).sum()) - int((~valid_table(home)["correct"]).sum())
    assert [c for c in at.get("plotly_chart") if "interpret_confusion_tta" in c.proto.id]
