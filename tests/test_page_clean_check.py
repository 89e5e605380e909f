"""The Clean page with a label check: start it from the page, rank by it, accept its suggestions, apply."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import check_config, open_app_page, train_tiny_run, write_colours

from core import runs
from core.env import runs_dir
from core.labelcheck import read_issues
from core.runlist import label_checks
from ui.clean_view import accept_candidates

PAGE = "app_pages/clean.py"


@pytest.fixture
def home(tmp_path, monkeypatch) -> tuple[Path, list[str]]:
    """A workspace with one finished run on 3 colours x 48 images, 4 of them in the wrong folder."""
    home = tmp_path / "home"
    monkeypatch.setenv("LOUPE_HOME", str(home))
    flips = write_colours(tmp_path / "colours", 48)
    train_tiny_run(check_config(tmp_path / "colours"), runs_dir())
    return tmp_path / "colours", flips


def test_a_check_started_on_the_page_ranks_it_and_its_suggestions_are_staged_and_applied(home):
    data, flips = home
    at = open_app_page(PAGE)
    assert [b for b in at.button if b.key == "clean_check_start"]  # no check yet: the page offers one
    assert not [s for s in at.segmented_control if s.key == "clean_ranking"]
    at.number_input(key="clean_check_folds").set_value(3)
    at.button(key="clean_check_start").click().run()
    assert not at.exception, at.exception
    (check,) = label_checks(runs_dir())
    assert runs.wait(check.path, timeout=240)["state"] == runs.DONE, runs.log_tail(check.path)

    at.run()  # the check is done: the page ranks by it
    assert at.segmented_control(key="clean_ranking").value == "check"
    boxes = [s for s in at.selectbox if s.key and s.key.startswith("clean_mark:")]
    shown = [Path(s.key.removeprefix("clean_mark:")).relative_to(data).as_posix() for s in boxes]
    assert sorted(shown[: len(flips)]) == flips  # the planted flips come first, over all classes
    first = boxes[0]
    true_class = Path(first.key).name.split("_")[0]
    assert first.options[1] == f"Move to {true_class} (suggested)"
    assert any("suggested" in c.value and "loss by epoch" in c.value for c in at.caption)

    at.slider(key="clean_accept_threshold").set_value(0.8).run()
    issues = read_issues(check.path)
    sure = issues[(issues["score"] >= 0.8) & (issues["suggested"] != issues["label"])]
    assert set(flips) <= set(sure["file"])
    stage = at.button(key="clean_accept")
    assert stage.label == f"Stage {len(sure)} suggested relabels"
    stage.click().run()
    staged = next(m.value for m in at.markdown if "to delete" in m.value)
    assert staged == f"**0** to delete, **{len(sure)}** to relabel"
    assert at.selectbox(key=first.key).value == f"relabel:{true_class}"  # the staged mark shows in its control
    at.button(key="clean_apply").click().run()
    assert not at.exception, at.exception
    for flip in flips:  # each moved back to the class it really is
        name = Path(flip).name
        assert not (data / flip).exists() and (data / name.split("_")[0] / name).exists()

    at.segmented_control(key="clean_ranking").set_value("loss").run()  # the in-sample ranking stays available
    assert at.selectbox(key="clean_class") and not at.exception

    old_run = at.session_state["run_id"]
    at.button(key="clean_retrain").click().run()  # a new run on the cleaned folder, then compared with this one
    new_run = runs_dir() / at.session_state["run_id"]
    assert new_run.name != old_run
    assert runs.wait(new_run, timeout=240)["state"] == runs.DONE, runs.log_tail(new_run)
    at.switch_page(PAGE).run()
    assert not at.exception, at.exception
    assert any(m.value.startswith("**Before and after cleaning**") for m in at.markdown)
    before, after = at.metric
    assert old_run in before.label and new_run.name in after.label

    at.session_state["run_id"] = check.id  # a check picked in the sidebar: the model pages say what it is
    at.switch_page("app_pages/interpret.py").run()
    assert not at.exception and any("is a label check" in i.value for i in at.info)


def test_no_suggestion_above_the_threshold_stages_nothing(tmp_path):
    image = tmp_path / "a" / "x.png"
    image.parent.mkdir()
    image.write_bytes(b"")
    rows = pd.DataFrame({"file": [str(image), str(tmp_path / "b" / "y.png")], "label": ["a", "b"],
                         "suggested": ["b", "b"], "score": [0.4, 0.99]})
    assert accept_candidates(rows, 0.5, {}, {}) == []  # the one above agrees with its label
    assert accept_candidates(rows, 0.3, {}, {}) == [(str(image), "b")]
    assert accept_candidates(rows, 0.3, {}, {str(image): "delete"}) == []  # marked otherwise already
