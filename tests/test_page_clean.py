"""The Clean page through Streamlit's AppTest, on a real run: mark, switch class, apply, undo, retrain."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from conftest import failed_after, open_app_page, tiny_config, train_tiny_run
from streamlit.testing.v1 import AppTest

from core import clean, cleanlog, runs
from core.demo import DemoSpec, make_demo_dataset
from core.env import runs_dir
from core.runlist import list_runs

APP = Path(__file__).resolve().parents[1] / "app.py"
PAGE = "app_pages/clean.py"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A workspace with one finished run on shapes (some deliberately in the wrong folder)."""
    home = tmp_path_factory.mktemp("clean-home")
    data = make_demo_dataset(home / "shapes", DemoSpec(n_per_class=20, size=32, mislabel_frac=0.1, seed=4))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOUPE_HOME", str(home))
        train_tiny_run(tiny_config(data), runs_dir())
    return home


def dataset_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file in the dataset, Loupe's own log folder left out."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] != cleanlog.STATE_DIR
    }


def open_page(home: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("LOUPE_HOME", str(home))
    return open_app_page(PAGE)


def mark_boxes(at: AppTest) -> list:
    return [s for s in at.selectbox if s.key and s.key.startswith("clean_mark:")]


def class_counts(at: AppTest) -> dict[str, int]:
    """The class menu's "circle (7)" options as {"circle": 7}."""
    options = [o.rsplit(" (", 1) for o in at.selectbox(key="clean_class").options]
    return {name: int(count.rstrip(")")) for name, count in options}


def staged_line(at: AppTest) -> str:
    return next(m.value for m in at.markdown if "to delete" in m.value)


def test_no_run_says_so(tmp_path, monkeypatch):
    at = open_page(tmp_path / "empty", monkeypatch)
    assert any("No run yet" in i.value for i in at.info)
    assert not at.button


def test_a_failed_newest_run_does_not_hide_the_model_before_it(home, tmp_path, monkeypatch):
    (good,) = list_runs(home / "runs")
    failed = failed_after(Path(good.path), tmp_path).name
    at = open_page(tmp_path, monkeypatch)
    assert at.image and mark_boxes(at)  # the images of the run before, ready to mark
    (note,) = [w.value for w in at.warning]
    assert failed in note and "failed" in note and good.id in note
    assert any(f"run {good.id}" in c.value for c in at.caption)


def test_mark_switch_apply_undo(home, monkeypatch):
    root = (home / "shapes").resolve()
    before = dataset_hashes(root)
    at = open_page(home, monkeypatch)
    assert at.selectbox(key="clean_class").value == "circle"
    assert at.image and len(mark_boxes(at)) == len(at.image)
    assert at.button(key="clean_apply").disabled

    first, second = mark_boxes(at)[:2]
    doomed, moved = Path(first.key.split(":", 1)[1]), Path(second.key.split(":", 1)[1])
    before_counts = class_counts(at)
    first.set_value(cleanlog.DELETE).run()
    mark_boxes(at)[1].set_value("relabel:triangle").run()
    assert not at.exception and staged_line(at).startswith("**1** to delete, **1** to relabel")

    # Marks survive a change of class and of split, and show again on the way back.
    at.selectbox(key="clean_class").set_value("square").run()
    assert all(not b.key.endswith(str(doomed)) for b in mark_boxes(at))
    at.segmented_control(key="clean_split").set_value("train").run()
    assert not at.exception and staged_line(at).startswith("**1** to delete, **1** to relabel")
    at.segmented_control(key="clean_split").set_value("valid").run()
    at.selectbox(key="clean_class").set_value("circle").run()
    values = {b.key.split(":", 1)[1]: b.value for b in mark_boxes(at)}
    assert values[str(doomed)] == cleanlog.DELETE and values[str(moved)] == "relabel:triangle"
    assert any("Preview (dry run)" in e.label for e in at.expander)

    at.button(key="clean_apply").click().run()
    assert not at.exception
    assert not doomed.exists() and not moved.exists()
    assert (root / "triangle" / moved.name).exists()
    trashed = list((root / clean.TRASH_DIR).rglob(doomed.name))
    assert len(trashed) == 1
    log = cleanlog.read_log(root)
    assert sorted(e["action"] for e in log) == ["delete", "relabel"]
    assert any("Applied" in s.value for s in at.success)
    # The class menu counts what the folders hold now: one circle deleted, one moved to triangle.
    assert class_counts(at) == {**before_counts, "circle": before_counts["circle"] - 2,
                                "triangle": before_counts["triangle"] + 1}
    assert staged_line(at).startswith("**0** to delete, **0** to relabel")
    # The table still lists the old paths: they show as handled, without a mark to set.
    assert any("In the trash" in c.value for c in at.caption)
    assert any("Moved to triangle" in c.value for c in at.caption)
    assert all(not b.key.endswith(str(doomed)) for b in mark_boxes(at))

    at.button(key="clean_undo").click().run()
    assert not at.exception
    assert dataset_hashes(root) == before
    assert any("Restored" in s.value for s in at.success)
    assert class_counts(at) == before_counts
    assert at.button(key="clean_undo").disabled


def test_a_file_changed_or_gone_since_the_losses_is_skipped_not_lost(home, monkeypatch):
    root = (home / "shapes").resolve()
    at = open_page(home, monkeypatch)
    boxes = mark_boxes(at)
    changed, gone = Path(boxes[0].key.split(":", 1)[1]), Path(boxes[1].key.split(":", 1)[1])
    boxes[0].set_value(cleanlog.DELETE).run()
    mark_boxes(at)[1].set_value(cleanlog.DELETE).run()
    stat = changed.stat()
    os.utime(changed, (time.time(), time.time()))  # edited after the run computed its loss
    aside = gone.rename(gone.with_name(gone.name + ".away"))  # removed behind Loupe's back
    try:
        before = dataset_hashes(root)
        at.button(key="clean_apply").click().run()
        assert not at.exception
        assert dataset_hashes(root) == before and cleanlog.read_log(root)[-1]["action"] == "undo"
        warning = " ".join(w.value for w in at.warning)
        assert "skipped 2" in warning
        reasons = " ".join(c.value for c in at.caption)
        assert "since its loss was computed" in reasons and "not found" in reasons
        assert any("File is gone" in c.value for c in at.caption)
    finally:
        aside.rename(gone)
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    at.button(key="clean_clear").click().run()
    assert staged_line(at).startswith("**0** to delete")


def test_retrain_starts_a_new_run_from_the_same_config(home, monkeypatch):
    at = open_page(home, monkeypatch)
    (old,) = list_runs(runs_dir())
    at.button(key="clean_retrain").click().run()
    assert not at.exception
    listing = list_runs(runs_dir())
    new = next(r for r in listing if r.id != old.id)
    try:
        assert new.config == old.config
        assert at.session_state["run_id"] == new.id
        assert runs.status(new.path)["state"] in (runs.QUEUED, runs.RUNNING, runs.DONE)
    finally:
        runs.kill(new.path)
        final = runs.wait(new.path, timeout=60)
        assert final["state"] in runs.FINAL_STATES
        runs.delete_run(new.path, root=runs_dir())
