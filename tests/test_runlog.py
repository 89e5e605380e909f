"""core.runlog: the event log a run writes, and how the Train page follows it (no Streamlit needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core import runs
from core.config import TrainConfig
from core.fileio import atomic_write_json
from core.rundir import RunDir
from core.runlog import MAX_POINTS, RunTail, hardest_items, log_tail


def test_total_epochs_and_the_one_line_summary() -> None:
    assert TrainConfig(schedule="one_cycle", epochs=3, freeze_epochs=1).total_epochs == 3
    assert TrainConfig(schedule="fine_tune", epochs=3, freeze_epochs=2).total_epochs == 5
    cfg = TrainConfig.from_dict({"data": {"path": "/data/bears", "size": 128}, "schedule": "fine_tune"})
    line = cfg.summary("random 20% split per class")
    assert line.startswith("resnet18 (pretrained) · fine_tune · 1+4 epochs · lr 2.0e-03 · 128 px · batch 64")
    assert "data `bears`" in line and line.endswith(" · random 20% split per class")
    assert "split" not in TrainConfig().summary()


def test_run_tail_reads_incrementally_and_keeps_a_bounded_history(tmp_path: Path) -> None:
    run_dir = runs.create(TrainConfig(schedule="fine_tune", epochs=3, freeze_epochs=1), root=tmp_path)
    tail = RunTail(run_dir)
    with runs.EventWriter(run_dir, fsync=False) as w:
        w.emit("start", config={"schedule": "fine_tune", "epochs": 3, "freeze_epochs": 1}, n_batches=2000)
        for step in range(1, 3001):
            w.emit("batch", step=step, epoch=(step - 1) // 2000, batch=(step - 1) % 2000 + 1, n_batches=2000,
                   loss=1.0, smooth_loss=1.0, lr=1e-3, mom=0.9)
    view = tail.update()
    assert view.total_epochs == 4 and view.frozen(0) and not view.frozen(1)
    assert len(view.batches) <= MAX_POINTS + 1 and view.batches["step"].iloc[-1] == 3000
    assert view.progress() == pytest.approx((1 + 1000 / 2000) / 4)
    offset = tail.offset
    assert tail.update() is not None and tail.offset == offset  # nothing new: nothing read
    with runs.EventWriter(run_dir, fsync=False) as w:
        w.emit("epoch", epoch=1, train_loss=0.5, valid_loss=0.6, error_rate=0.1, accuracy=0.9, seconds=3.0)
    view = tail.update()
    assert tail.offset > offset
    assert list(view.epochs["epoch"]) == [1] and view.epochs["step"].iloc[0] == 3000


def test_the_hardest_items_come_from_the_dataset_record_the_run_saw(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    items = [{"file": f"{label}/{i}.png", "labels": [label], "split": "train"} for i, label in enumerate("abcd")]
    atomic_write_json(run.dataset_record, {"root": "/data/set", "items": items})
    run.item_losses_dir.mkdir()
    # item 2 appears twice (a resumed epoch): listed once; item 9 is not in the record: left out
    np.savez(run.item_losses(1), item=np.array([0, 2, 1, 2, 9]), loss=np.array([0.1, 2.0, 0.5, 1.0, 5.0]))
    assert run.latest_item_losses() == (1, run.item_losses(1))
    rows = hardest_items(run.item_losses(1), run.dataset_record, k=2)
    assert rows == [{"file": "/data/set/c/2.png", "label": "c", "loss": pytest.approx(2.0)},
                    {"file": "/data/set/b/1.png", "label": "b", "loss": pytest.approx(0.5)}]


def test_log_tail_reads_the_end_of_the_log(tmp_path: Path) -> None:
    assert log_tail(tmp_path) == ""
    RunDir(tmp_path).log.write_text("x" * 10_000 + "the end\n")
    assert log_tail(tmp_path, n_bytes=100).endswith("the end\n") and len(log_tail(tmp_path, n_bytes=100)) == 100
