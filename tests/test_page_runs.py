"""The Runs page through AppTest: real runs trained at 32 px, real run folders deleted (or refused) on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import one_torch_thread, open_app_page
from streamlit.testing.v1 import AppTest

from core import job, rundir, runs
from core.data import DataConfig, prepare
from core.demo import DemoSpec, make_demo_dataset
from core.fileio import atomic_write_json
from core.model import ModelConfig
from core.rundir import CHECKPOINT_FILE
from core.split import source_record
from core.train import TrainConfig

APP = str(Path(__file__).resolve().parents[1] / "app.py")
TABLE_KEY = "runs_table"


def config(dataset: Path, lr: float = 2e-3) -> dict:
    return TrainConfig(
        data=DataConfig(path=str(dataset), size=32, batch_size=4, num_workers=0),
        model=ModelConfig(pretrained=False),
        schedule="one_cycle",
        epochs=2,
        lr=lr,
        mixed_precision=False,
    ).to_dict()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two finished runs (different learning rates) sharing one runs folder, trained once for the module."""
    home = tmp_path_factory.mktemp("runs_home")
    with pytest.MonkeyPatch.context() as mp, one_torch_thread():
        mp.setenv("LOUPE_HOME", str(home))
        dataset = make_demo_dataset(home / "demo", DemoSpec(n_per_class=10, size=32, seed=2))
        made = []
        for lr in (2e-3, 1e-2):
            run_dir = runs.create(config(dataset, lr), root=home / "runs", name_hint=f"lr{lr:g}")
            assert job.run_training(run_dir) == 0
            made.append(run_dir)
    return made


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test's own folder as the workspace (tests link runs into it, so it exists from the start)."""
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path))
    return tmp_path


def fake_run(home: Path, state: str = runs.DONE) -> Path:
    """A run folder as the protocol writes it, without training (for deleting)."""
    run_dir = runs.create(config(home / "nowhere"), root=home / "runs")
    if state in runs.FINAL_STATES:
        runs.mark_finished(run_dir, state)
    return run_dir


def open_runs() -> AppTest:
    return open_app_page("app_pages/runs.py")


def table_ids(at: AppTest) -> list[str]:
    return at.dataframe[0].value["id"].tolist()


def select(at: AppTest, *run_ids: str) -> AppTest:
    ids = table_ids(at)
    at.session_state[TABLE_KEY] = {"selection": {"rows": [ids.index(r) for r in run_ids], "columns": [], "cells": []}}
    at.run()
    assert not at.exception, at.exception
    return at


def test_no_runs_says_so(home: Path):
    at = open_runs()
    assert "No runs yet" in at.info[0].value
    assert not at.dataframe


def test_table_lists_runs_and_selected_runs_are_compared(home: Path, two_runs: list[Path]):
    (home / "runs").symlink_to(two_runs[0].parent, target_is_directory=True)
    at = open_runs()
    table = at.dataframe[0].value
    assert sorted(table["id"]) == sorted(r.name for r in two_runs)
    assert set(table["state"]) == {"done"} and "task" not in table  # the task column only appears with LR-finder runs
    assert set(table["epochs"]) == {"2/2"} and set(table["network"]) == {"resnet18 · 32 px"}
    for run_dir in two_runs:  # the exported model is the last epoch's: its numbers, not the best ones seen
        row = table.set_index("id").loc[run_dir.name]
        last = runs.load_events(run_dir, "epoch")[-1]
        assert row["model"] == "2 · last"  # epochs counted from 1
        assert row["valid loss"] == pytest.approx(last["valid_loss"]) and row["error rate"] == last["error_rate"]
    assert not at.get("plotly_chart")  # nothing selected yet

    select(at, *(r.name for r in two_runs))
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    traces = json.loads(charts[0].proto.spec)["data"]
    assert {t["legendgroup"] for t in traces} == {r.name for r in two_runs}
    assert any("single run" in c.value for c in at.caption)
    assert not at.button  # open/download/delete only for a single run


def test_one_selected_run_can_be_made_current_and_downloaded(home: Path, two_runs: list[Path]):
    (home / "runs").symlink_to(two_runs[0].parent, target_is_directory=True)
    at = open_runs()
    target = two_runs[0].name  # the older run: the newest is current by default
    select(at, target)
    assert any(s.value == f"Run {target}" for s in at.subheader)
    assert any("model from epoch 2 of 2" in m.value for m in at.markdown)
    download = at.download_button(key="runs_download")
    assert download.label.startswith("Download model (")
    assert not at.button(key="runs_make_current").disabled
    at.button(key="runs_make_current").click().run()
    assert not at.exception, at.exception
    assert at.session_state["run_id"] == target
    assert at.button(key="runs_make_current").disabled


def test_the_data_line_tells_the_split_the_run_used(home: Path, write_image):
    """train/ and val/ folders fix the split: the run's 20% and seed 42 were never used and must not be shown."""
    for side, n in (("train", 6), ("val", 4)):
        for i in range(n):
            write_image(home / "bears" / side / "grizzly" / f"{i}.png", (i * 20, 90, 40))
    settings = config(home / "bears")
    run_dir = runs.create(settings, root=home / "runs")
    runs.mark_finished(run_dir, runs.DONE)
    source, _, split = prepare(DataConfig(**settings["data"]))  # the record a run writes when it reads its data
    atomic_write_json(run_dir / rundir.DATASET_RECORD_FILE, source_record(source, split))
    at = select(open_runs(), run_dir.name)
    (line,) = [m.value for m in at.markdown if m.value.startswith("**Settings**")]  # TrainConfig.summary
    assert line.endswith("train/ and val/ folders: 6 train · 4 valid (40%)")
    assert "seed" not in line and "20%" not in line


def run_with_epochs(home: Path, losses: list[float], keep_best: bool) -> Path:
    """A finished run's folder whose events are those a run with these valid losses writes."""
    run_dir = fake_run(home)
    with runs.EventWriter(run_dir) as events:
        events.emit("start", resume=False)
        for epoch, loss in enumerate(losses):
            events.emit("epoch", epoch=epoch, train_loss=1.0, valid_loss=loss, error_rate=loss / 4, seconds=1.0)
        if keep_best:
            events.emit("best_weights", best_valid_loss=min(losses))
        events.emit("exported", file="model.safetensors")
        events.emit("done", epochs=len(losses), best_valid_loss=min(losses))
    return run_dir


def test_the_table_shows_the_exported_epoch_not_the_best_one_seen(home: Path):
    last = run_with_epochs(home, [0.9, 0.7858, 0.8896], keep_best=False)
    best = run_with_epochs(home, [0.9, 0.7858, 0.8896], keep_best=True)
    at = open_runs()
    table = at.dataframe[0].value.set_index("id")
    assert table.loc[last.name, "valid loss"] == 0.8896 and table.loc[best.name, "valid loss"] == 0.7858
    assert at.dataframe[0].proto.placeholder == ""  # empty cells stay empty rather than read "None"


def test_disk_use_is_shown_and_a_checkpoint_can_be_deleted(home: Path):
    stopped = fake_run(home, state=runs.STOPPED)
    torch.save({"model": torch.nn.Linear(256, 256).state_dict()}, stopped / CHECKPOINT_FILE)  # what Resume would load
    at = open_runs()
    disk = at.dataframe[0].value.set_index("id")["disk"]
    assert disk[stopped.name] == pytest.approx(runs.disk_usage(stopped) / 2**20) and disk[stopped.name] > 0.2
    select(at, stopped.name)
    button = at.button(key="runs_drop_checkpoint")
    assert "Resume** is no longer possible" in button.help
    button.click().run()
    assert not at.exception, at.exception
    assert not (stopped / CHECKPOINT_FILE).exists() and (stopped / runs.CONFIG_FILE).exists()
    assert any("MB freed" in s.value for s in at.success)
    assert not any(b.key == "runs_drop_checkpoint" for b in at.button)


def test_delete_needs_the_run_id_typed_and_removes_the_folder(home: Path):
    keep, doomed = fake_run(home), fake_run(home)
    at = open_runs()
    select(at, doomed.name)
    assert at.button(key="runs_delete").disabled
    at.text_input(key="runs_delete_confirm").input("not the id").run()
    assert at.button(key="runs_delete").disabled
    at.text_input(key="runs_delete_confirm").input(doomed.name).run()
    assert not at.button(key="runs_delete").disabled
    at.button(key="runs_delete").click().run()
    assert not at.exception, at.exception
    assert not doomed.exists() and keep.exists()
    assert any(f"Deleted run {doomed.name}" in s.value for s in at.success)
    assert table_ids(at) == [keep.name]
    assert not at.get("plotly_chart") and not at.subheader  # the selection was cleared, not moved to another run


def test_an_active_run_is_not_deleted(home: Path):
    run_dir = fake_run(home, state=runs.CREATED)
    # A live process whose command line names the run, as a real training child's does.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", run_dir.name])
    try:
        started = runs.read_status(run_dir)["created_at"]
        runs.write_status(run_dir, state=runs.RUNNING, pid=sleeper.pid, running_at=started)
        at = open_runs()
        select(at, run_dir.name)
        assert any("stop it on **Train**" in w.value for w in at.warning)
        at.text_input(key="runs_delete_confirm").input(run_dir.name).run()
        at.button(key="runs_delete").click().run()
        assert not at.exception, at.exception
        assert any("Not deleted" in e.value and "running" in e.value for e in at.error)
        assert run_dir.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
