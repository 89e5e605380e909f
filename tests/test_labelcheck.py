"""The label check: K-fold out-of-sample predictions scored by cleanlab, on generated images with planted flips."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import check_config, one_torch_thread, write_colours
from PIL import Image

from core import runs
from core.__main__ import main as cli
from core.config import DataConfig
from core.labelcheck import (
    CheckSettings,
    assign_folds,
    check_progress,
    create_check,
    fold_split,
    latest_check,
    out_of_sample_table,
    read_issues,
    run_label_check,
)
from core.labelscore import sparkline
from core.layouts import load_source
from core.rundir import RunDir
from core.runlist import label_checks, training_runs
from core.split import group_keys, split_items

REPO = Path(__file__).resolve().parents[1]
# ---------------------------------------------------------------- folds


def _blank(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def test_folds_are_stratified_cover_every_item_once_and_never_score_what_they_trained_on(tmp_path):
    for name, count in (("a", 13), ("b", 7), ("c", 10)):
        for i in range(count):
            _blank(tmp_path / "train" / name / f"{i}.png")
        for i in range(3):
            _blank(tmp_path / "test" / name / f"{i}.png")
        _blank(tmp_path / "valid" / name / "v.png")
    cfg = DataConfig(path=str(tmp_path))
    source = load_source(cfg)
    split = split_items(source, cfg)
    fold_of = assign_folds(source, split, seed=0, folds=5)

    checked = np.sort(np.concatenate([split.train, split.valid]))
    assert (fold_of[split.test] == -1).all()  # a test side is never checked
    assert sorted(set(fold_of[checked])) == [0, 1, 2, 3, 4]
    for label in source.vocab:  # stratified: each class spread over the folds as evenly as it divides
        per_fold = Counter(fold_of[i] for i in checked if source.labels[i] == (label,))
        assert max(per_fold.values()) - min(per_fold.values()) <= 1
    scored = Counter()
    for k in range(5):
        part = fold_split(fold_of, k)
        assert not set(part.train) & set(part.valid)  # never trained on what it scores
        assert sorted([*part.train, *part.valid]) == checked.tolist()
        scored.update(part.valid.tolist())
    assert set(scored) == set(checked.tolist()) and set(scored.values()) == {1}  # every image scored exactly once
    with pytest.raises(ValueError, match="needs at least 40 images"):
        assign_folds(source, split, seed=0, folds=40)


def test_grouped_items_stay_in_one_fold(tmp_path):
    for name in ("cat", "dog"):
        for owner in range(6):
            for shot in range(3):
                _blank(tmp_path / name / f"owner{name}{owner}_{shot}.png")
    cfg = DataConfig(path=str(tmp_path), group_regex=r"^(owner\w+?)_")
    source = load_source(cfg)
    groups = group_keys(source, cfg)
    fold_of = assign_folds(source, split_items(source, cfg), seed=1, folds=3, groups=groups)
    folds_of_group: dict[str, set] = {}
    for group, fold in zip(groups, fold_of):
        folds_of_group.setdefault(group, set()).add(int(fold))
    assert len(folds_of_group) == 12 and all(len(f) == 1 for f in folds_of_group.values())


def test_settings_refuse_a_fold_count_out_of_range(tmp_path, capsys):
    for folds in (1, 11):
        with pytest.raises(ValueError, match="folds must be between 2 and 10"):
            CheckSettings(folds=folds)
    write_colours(tmp_path / "data", 2)
    assert cli(["check-labels", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"), "--folds", "11"]) == 2
    assert "folds must be between 2 and 10" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ---------------------------------------------------------------- a whole check


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, list[str], Path]:
    """(dataset, planted flips, finished check): 3 colours x 48 images, 4 flipped, a 3-fold check (batch 16:
    BatchNorm's running statistics settle; at batch 8 a fold from scratch now and then predicts one class badly)."""
    root = tmp_path_factory.mktemp("labelcheck")
    flips = write_colours(root / "data", 48)
    check = create_check(check_config(root / "data"), CheckSettings(folds=3), run_dir=root / "runs" / "check")
    with one_torch_thread():
        assert run_label_check(check) == 0
    return root / "data", flips, check


def test_planted_flips_rank_first_with_the_true_class_suggested(planted):
    data, flips, check = planted
    issues = read_issues(check)
    assert len(issues) == 3 * 48 and issues["score"].is_monotonic_decreasing
    top = issues.head(len(flips))
    assert sorted(top["file"]) == flips
    for _, row in top.iterrows():
        assert row["suggested"] == row["file"].split("/")[1].split("_")[0]  # the colour it really is
        assert row["issue"] and row["prob_suggested"] > row["prob_given"]
    assert all((data / f).is_file() for f in issues["file"])  # relative to the dataset folder, as on disk
    history = top["loss_history"].iloc[0].split()
    assert len(history) == 4 and len(sparkline(top["loss_history"].iloc[0])) == 4  # one value per epoch


def test_every_image_is_predicted_once_by_the_fold_that_never_trained_on_it(planted):
    _, _, check = planted
    record = json.loads(RunDir(check).label_check.read_text())
    fold_of = np.array(record["fold_of"])
    table = out_of_sample_table(check)
    assert sorted(table["item"]) == list(range(3 * 48))
    assert (table["fold"].to_numpy() == fold_of[table["item"]] + 1).all()
    for k in (1, 2, 3):  # the fold's training losses cover exactly the items of the other folds
        with np.load(RunDir(check).fold(k).item_losses(0)) as losses:
            trained = set(losses["item"].tolist())
        assert trained == set(np.flatnonzero(fold_of != k - 1).tolist())
        assert not RunDir(check).fold(k).checkpoint.exists()  # a finished fold keeps no checkpoint
    assert check_progress(check).fraction == 1.0


def test_a_check_is_listed_apart_from_training_runs(planted):
    data, _, check = planted
    root = check.parent
    assert [info.id for info in label_checks(root)] == [check.name]
    assert training_runs(root) == []
    assert latest_check(str(data), root).id == check.name
    assert latest_check(str(data.parent), root) is None


def test_a_stopped_check_resumes_and_keeps_the_folds_it_finished(tmp_path, monkeypatch):
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path / "home"))
    write_colours(tmp_path / "data", 8, flips={})
    check = create_check(check_config(tmp_path / "data", epochs=2), CheckSettings(folds=3),
                         run_dir=tmp_path / "runs" / "check")
    runs.start(check)
    deadline = time.time() + 120
    while not RunDir(check).fold(1).heldout.exists():
        assert time.time() < deadline and runs.status(check)["state"] in runs.ACTIVE_STATES, runs.log_tail(check)
        time.sleep(0.05)
    runs.request_stop(check)
    assert runs.wait(check, timeout=120)["state"] == runs.STOPPED
    first = RunDir(check).fold(1).heldout.stat().st_mtime_ns
    assert not RunDir(check).label_issues.exists()

    runs.start(check, ["--resume"])
    assert runs.wait(check, timeout=180)["state"] == runs.DONE, runs.log_tail(check)
    assert RunDir(check).fold(1).heldout.stat().st_mtime_ns == first  # the finished fold was not trained again
    starts = [e["fold"] for e in runs.load_events(check, "fold_start")]
    assert starts.count(1) == 1 and starts[-1] == 3
    assert sorted(out_of_sample_table(check)["item"]) == list(range(3 * 8))
    assert len(read_issues(check)) == 3 * 8


# ---------------------------------------------------------------- the command line, on every layout


def test_cli_writes_the_ranking_and_prints_its_top_rows(tmp_path):
    write_colours(tmp_path / "data", 6)
    done = subprocess.run(
        [sys.executable, "-m", "core", "check-labels", str(tmp_path / "data"), "--run-dir", str(tmp_path / "check"),
         "--folds", "2", "--epochs", "1", "--no-pretrained", "--schedule", "one_cycle", "--size", "16", "--bs", "8",
         "--workers", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
        env={"PATH": "/usr/bin:/bin", "LOUPE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    issues = read_issues(tmp_path / "check")
    assert list(issues.columns[:4]) == ["file", "label", "suggested", "score"]
    assert issues["file"].iloc[0] in done.stdout and "suggested" in done.stdout  # the top rows, printed


def _split_folders(root: Path) -> None:
    for side in ("train", "valid"):
        write_colours(root / side, 4, flips={}, seed=len(side))


def _filename_regex(root: Path) -> None:
    write_colours(root / "tmp", 4, flips={})
    root.mkdir(exist_ok=True)
    for f in (root / "tmp").rglob("*.png"):
        f.rename(root / f.name)


def _multi_label_csv(root: Path) -> None:
    write_colours(root / "images", 4, flips={})
    rows = [(f.relative_to(root).as_posix(), f.parent.name + (" bright" if i % 2 else ""))
            for i, f in enumerate(sorted((root / "images").rglob("*.png")))]
    pd.DataFrame(rows, columns=["fname", "labels"]).to_csv(root / "labels.csv", index=False)


@pytest.mark.parametrize("make", [_split_folders, _filename_regex, _multi_label_csv])
def test_cli_checks_every_layout(tmp_path, monkeypatch, make):
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path / "home"))
    make(tmp_path / "data")
    args = ["check-labels", str(tmp_path / "data"), "--run-dir", str(tmp_path / "check"), "--folds", "2",
            "--epochs", "1", "--no-pretrained", "--schedule", "one_cycle", "--size", "16", "--bs", "4",
            "--workers", "0"]
    with one_torch_thread():
        assert cli(args) == 0
    issues = read_issues(tmp_path / "check")
    files = sorted(f.relative_to(tmp_path / "data").as_posix() for f in (tmp_path / "data").rglob("*.png"))
    assert sorted(issues["file"]) == files  # every image once, named as on disk
    assert issues["score"].between(0, 1).all()
    if make is _multi_label_csv:
        assert issues["label"].str.contains("bright").any()  # label sets, scored per image
