"""The Data page's Health section through AppTest, on a real folder with planted problems: an exact copy, a
resized copy across the split (a leak) and an off-topic checkerboard; real health reports, a real run."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config, train_tiny_run
from PIL import Image
from streamlit.testing.v1 import AppTest

from core import healthjob, keeptogether
from core.config import DataConfig
from core.env import runs_dir
from core.health import check_health
from core.listing import path_text

APP = str(Path(__file__).resolve().parents[1] / "app.py")
TINTS = {"red": (1.0, 0.35, 0.3), "green": (0.3, 1.0, 0.4), "blue": (0.3, 0.4, 1.0)}
EXACT = ["train/red/red_train_0 copy.png", "train/red/red_train_0.png"]
LEAK = ["train/green/green_train_1.png", "valid/green/green_small.png"]
ODD = "train/blue/checkerboard.png"


def make_dataset(root: Path) -> Path:
    """train/ and valid/ folders (a split the test knows) of smooth random patterns tinted by class."""
    rng = np.random.default_rng(0)
    for name, tint in TINTS.items():
        for side, n in (("train", 10), ("valid", 4)):
            for i in range(n):
                low = Image.fromarray(rng.uniform(0, 255, (6, 6)).astype(np.uint8))
                grey = np.asarray(low.resize((48, 48), Image.Resampling.BICUBIC), float)
                path = root / side / name / f"{name}_{side}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(grey[:, :, None] * np.array(tint), 0, 255).astype(np.uint8)).save(path)
    shutil.copy(root / EXACT[1], root / EXACT[0])
    Image.open(root / LEAK[0]).resize((40, 40), Image.Resampling.LANCZOS).save(root / LEAK[1])
    board = (np.indices((48, 48)).sum(0) // 6 % 2 * 255).astype(np.uint8)
    Image.fromarray(board).convert("RGB").save(root / ODD)
    return root


def page_config(root: Path) -> DataConfig:
    """The DataConfig the Data page builds for the folder with its default options."""
    return DataConfig(path=str(root.resolve()), valid_pct=0.2, seed=42, stratify=True)


def save_check(root: Path, run: Path | None = None) -> Path:
    cfg = page_config(root)
    folder = healthjob.job_folder(cfg, run)
    healthjob.save_report(check_health(cfg, run), folder)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(workspace, dataset, run): a run trained on the dataset and its health report, made once."""
    home = tmp_path_factory.mktemp("health-home")
    data = make_dataset(home / "planted")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOUPE_HOME", str(home))
        run = train_tiny_run(tiny_config(data), runs_dir())
        save_check(data, run)
    return home, data, run


def open_data(folder: Path) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.text_input(key="data_path").input(str(folder))
    at.button(key="data_open").click()
    at.run()
    assert not at.exception, at.exception
    return at


def captions(at: AppTest) -> str:
    return "\n".join(c.value for c in at.caption)


def tab_labels(at: AppTest) -> list[str]:
    """The Health section's tabs (the dataset chooser has tabs of its own)."""
    return [t.label for t in at.tabs if t.label.split(" (")[0] in ("Duplicates", "Leaks", "Off-topic?", "Map")]


def test_without_a_report_the_page_says_which_embedding_and_offers_the_check(home: Path, tmp_path: Path):
    at = open_data(make_dataset(tmp_path / "planted"))
    assert at.button(key="data_health_start").label == "Check health"
    assert "a perceptual hash of the pixels (train a model on this folder to use its embedding)" in captions(at) or (
        "ImageNet-pretrained resnet18" in captions(at))
    assert not tab_labels(at)


def test_a_saved_report_shows_the_copy_the_leak_and_the_checkerboard(home: Path, tmp_path: Path):
    data = make_dataset(tmp_path / "planted")
    save_check(data)
    at = open_data(data)
    assert at.button(key="data_health_start").label == "Check again"
    labels = tab_labels(at)
    assert labels[0] == "Duplicates (2)" and labels[1] == "Leaks (1)" and labels[3] == "Map"
    text = captions(at)
    assert "1 group of identical images and 1 near-duplicate pair" in text
    assert "identical pixels" in text and "across the split" in text
    helps = {c.help for c in at.caption}
    assert {*EXACT, *LEAK, ODD} <= helps  # every planted file is shown, its path as the caption's tooltip
    # no run trained here: Clean has nothing to open, so the buttons say why instead
    assert at.button(key="data_health_send_dups").disabled
    assert "train a model on this folder first" in text
    # a looser match finds more pairs; the tab counts follow the slider
    at.slider(key="data_health_match").set_value(0.5).run()
    assert not at.exception
    assert int(tab_labels(at)[0].split("(")[1].rstrip(")")) >= 2


def test_keep_together_writes_the_groups_and_the_leak_is_gone_from_the_split(home: Path, tmp_path: Path):
    data = make_dataset(tmp_path / "planted")
    save_check(data)
    at = open_data(data)
    at.button(key="data_health_keep").click().run()
    assert not at.exception, at.exception
    saved = json.loads((data / ".loupe" / "keep_together.json").read_text())
    assert saved["groups"] == [LEAK]
    assert keeptogether.read_groups(data) == [LEAK]
    assert any("the next training run puts each group on one side" in s.value for s in at.success)
    # the page's split is read again (the groups' version is in its cache key): no leak is left in it
    assert tab_labels(at)[1] == "Leaks (0)"
    sizes = {m.label: m.value for m in at.metric}
    assert (sizes["Training"], sizes["Validation"]) == ("33", "12")  # the copy moved over from validation


def test_with_a_run_the_leak_shows_the_error_with_and_without_and_copies_go_to_clean(trained, monkeypatch):
    home, data, run = trained
    monkeypatch.setenv("LOUPE_HOME", str(home))
    at = open_data(data)
    assert f"run {run.name}" in captions(at)
    metrics = {m.label: m.value for m in at.metric}
    assert f"Validation error of run {run.name}" in metrics
    assert "Without the 1 leaked validation image" in metrics
    send = at.button(key="data_health_send_dups")
    assert send.label == "Send the 2 copies to Clean (delete)" and not send.disabled
    send.click().run()
    assert not at.exception, at.exception
    root = data.resolve()
    # each group keeps its training copy with the shorter name; the others are staged to delete on Clean
    staged = {path_text(root / EXACT[0]): "delete", path_text(root / LEAK[1]): "delete"}
    assert at.session_state["clean_marks"] == staged
    assert at.session_state["run_id"] == run.name
    assert any("**2** to delete" in m.value for m in at.markdown)  # Clean's staged line: the page switched


def test_checked_outliers_go_to_the_delete_queue(trained, monkeypatch):
    home, data, _ = trained
    monkeypatch.setenv("LOUPE_HOME", str(home))
    at = open_data(data)
    box = at.checkbox(key=f"data_health_out:{ODD}")
    box.check().run()
    assert at.button(key="data_health_send_outliers").label == "Send the 1 checked to Clean's delete queue"
    at.button(key="data_health_send_outliers").click().run()
    assert not at.exception, at.exception
    assert at.session_state["clean_marks"] == {path_text(data.resolve() / ODD): "delete"}


def test_check_health_runs_the_real_background_job(home: Path, tmp_path: Path):
    data = make_dataset(tmp_path / "planted")
    at = open_data(data)
    at.button(key="data_health_start").click().run()
    assert not at.exception, at.exception
    folder = healthjob.job_folder(page_config(data), None)
    assert (folder / healthjob.JOB_FILE).exists()
    deadline = time.monotonic() + 180
    while not any(b.key == "data_health_start" and b.label == "Check again" for b in at.button):
        assert time.monotonic() < deadline, healthjob.job_state(folder)
        assert not at.error, [e.value for e in at.error]
        time.sleep(1)
        at.run()
    assert not at.exception, at.exception
    assert tab_labels(at)[:2] == ["Duplicates (2)", "Leaks (1)"]

