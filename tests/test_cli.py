"""The command line and the background run, as real subprocesses: what a terminal or a page launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import runs
from core.demo import DemoSpec, make_demo_dataset
from core.rundir import BUNDLE_FILE, CHECKPOINT_FILE

REPO = Path(__file__).resolve().parents[1]
TINY = ["--no-pretrained", "--schedule", "one_cycle", "--size", "32", "--bs", "8", "--lr", "1e-2", "--workers", "0"]


def core_cli(*args: str, home: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOUPE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "core", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def demo(home) -> Path:
    return make_demo_dataset(home / "demo", DemoSpec(n_per_class=20, size=32, seed=3))


@pytest.fixture(scope="module")
def trained(home, demo) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = home / "cli-run"
    result = core_cli("train", demo, "--run-dir", run_dir, "--epochs", "2", *TINY, home=home)
    return run_dir, result


@pytest.mark.parametrize("command", [[], ["train"]])
def test_help(command, home):
    result = core_cli(*command, "--help", home=home)
    assert result.returncode == 0 and "usage:" in result.stdout


def test_train_prints_the_epoch_table_and_leaves_a_complete_run(trained):
    run_dir, result = trained
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    top = next(i for i, line in enumerate(lines) if "train_loss" in line)
    assert lines[top].split() == ["epoch", "train_loss", "valid_loss", "error_rate", "accuracy", "seconds"]
    rows = [line.split() for line in lines[top + 1:] if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["1", "2"]  # counted from 1, as on every page
    assert runs.status(run_dir)["state"] == runs.DONE
    for name in (BUNDLE_FILE, "interpret_valid.parquet", "events.jsonl"):
        assert (run_dir / name).exists()
    assert not (run_dir / CHECKPOINT_FILE).exists() and "checkpoints are removed" in result.stdout


def test_interpret_prints_top_losses_and_confusions(trained, home):
    run_dir, _ = trained
    result = core_cli("interpret", "--run-dir", run_dir, "--top", "3", home=home)
    assert result.returncode == 0, result.stderr
    assert "Top 3 losses" in result.stdout and "Most confused" in result.stdout


def test_predict_prints_one_json_object_per_image(trained, demo, home, tmp_path):
    run_dir, _ = trained
    images = sorted((demo / "circle").glob("*.png"))[:2]
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("<html>not a picture</html>")
    result = core_cli("predict", run_dir, *images, not_an_image, "--top-k", "2", home=home)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(o["file"]).name for o in lines] == [images[0].name, images[1].name, "notes.jpg"]
    assert all(len(o["top"]) == 2 and o["top"][0]["prob"] >= o["top"][1]["prob"] for o in lines[:2])
    assert "error" in lines[2]
    assert result.returncode == 2  # one input was bad


def test_lr_find_prints_suggestions(demo, home):
    result = core_cli("lr-find", demo, *TINY, "--num-it", "30", home=home)
    assert result.returncode == 0, result.stderr
    assert "valley" in result.stdout
    curve = json.loads(next((home / "runs").glob("*/lr_find.json")).read_text())
    assert len(curve["lrs"]) == len(curve["losses"]) > 5


def test_bad_input_exits_2_with_one_line_and_no_run(home, tmp_path):
    result = core_cli("train", tmp_path / "missing", *TINY, home=home)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    result = core_cli("train", tmp_path, "--arch", "resnet9000", home=home)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_background_run_stops_on_request_and_resumes_to_the_end(demo, tmp_path):
    """The path a page takes: create, start in its own session, ask it to stop, resume it."""
    from core.data import DataConfig
    from core.model import ModelConfig
    from core.train import TrainConfig

    cfg = TrainConfig(
        data=DataConfig(path=str(demo), size=32, batch_size=8, num_workers=0),
        model=ModelConfig(pretrained=False),
        schedule="one_cycle",
        epochs=3,
        lr=1e-2,
    )
    run_dir = runs.create(cfg.to_dict(), root=tmp_path)
    pid = runs.start(run_dir)
    assert os.getsid(pid) != os.getsid(0)  # its own session: a Streamlit rerun or Ctrl-C never reaches it
    _wait_for_event(run_dir, "epoch")
    runs.request_stop(run_dir)
    final = runs.wait(run_dir, timeout=120)
    assert final["state"] == runs.STOPPED
    assert (run_dir / CHECKPOINT_FILE).exists() and (run_dir / BUNDLE_FILE).exists()
    done_before = len(runs.load_events(run_dir, "epoch"))
    assert done_before < 3

    runs.start(run_dir, extra_args=["--resume"])
    final = runs.wait(run_dir, timeout=120)
    assert final["state"] == runs.DONE, (run_dir / runs.LOG_FILE).read_text()
    epochs = [e["epoch"] for e in runs.load_events(run_dir, "epoch")]
    assert epochs[-1] == 2 and sorted(set(epochs)) == [0, 1, 2]
    assert not (run_dir / CHECKPOINT_FILE).exists()  # done: nothing left to resume, so no checkpoint kept

    again = core_cli("train", "--run-dir", run_dir, "--resume", home=tmp_path)
    assert again.returncode == 2 and "no checkpoint to resume from" in again.stderr
    assert runs.status(run_dir)["state"] == runs.DONE  # refused without touching the finished run


def _wait_for_event(run_dir: Path, kind: str, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runs.load_events(run_dir, kind):
            return
        assert runs.status(run_dir)["state"] != runs.FAILED, (run_dir / runs.LOG_FILE).read_text()
        time.sleep(0.1)
    raise AssertionError(f"no {kind} event within {timeout} s")


def test_predict_reads_folders_recursively_and_tta_changes_the_numbers(trained, demo, home, tmp_path):
    run_dir, _ = trained
    folder = tmp_path / "photos"
    for i, image in enumerate(sorted((demo / "circle").glob("*.png"))[:2]):
        (folder / f"sub{i}").mkdir(parents=True)
        (folder / f"sub{i}" / image.name).write_bytes(image.read_bytes())
    (folder / ".hidden.png").write_bytes(image.read_bytes())  # skipped, as in every dataset walk
    plain = core_cli("predict", run_dir, folder, "--top-k", "3", home=home)
    assert plain.returncode == 0, plain.stderr
    lines = [json.loads(line) for line in plain.stdout.splitlines()]
    assert [Path(o["file"]).parent.name for o in lines] == ["sub0", "sub1"]
    tta = core_cli("predict", run_dir, folder, "--top-k", "3", "--tta", home=home)
    assert tta.returncode == 0, tta.stderr
    with_tta = [json.loads(line) for line in tta.stdout.splitlines()]
    assert [o["file"] for o in with_tta] == [o["file"] for o in lines]
    assert all(abs(sum(t["prob"] for t in o["top"]) - 1) < 1e-4 for o in with_tta)  # all 3 classes shown
    assert [o["top"] for o in with_tta] != [o["top"] for o in lines]
