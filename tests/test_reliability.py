"""Hardening (issue 6): odd file names, HEIC, empty classes, big folders, and runs that are signalled, killed,
starved of disk, started twice, or whose dataset changes under them. Real files, real child processes, real
torch on 32 px images; docs/reliability.md maps every row of the issue to its test."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_config, train_tiny_run
from PIL import Image
from streamlit.testing.v1 import AppTest

from core import interpret, runs
from core.bundle import BundleMeta
from core.clean import Change, apply_changes
from core.csvfile import FORMULA_STARTS, csv_for_people
from core.data import DataConfig, make_dataloaders, prepare
from core.demo import DemoSpec, make_demo_dataset
from core.fileio import atomic_write, atomic_write_json, read_json
from core.images import HEIF_REASON, DataError, check_image, open_image, verify_images
from core.layouts import detect_layout, load_source
from core.listing import list_images, path_text
from core.rundir import CHECKPOINT_FILE, DATASET_RECORD_FILE
from core.runlist import list_runs
from core.thumbs import thumbnail
from core.train import Learner, load_checkpoint, setup_training

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "app.py")
TRAIN_PAGE = "app_pages/train.py"
BAD_UTF8 = os.fsdecode(b"bad\xff.png")  # what Python makes of a name that is not valid UTF-8
UNICODE = "ours_ß_熊.jpg"
TINY_CLI = ["--no-pretrained", "--schedule", "one_cycle", "--size", "32", "--bs", "8", "--lr", "1e-2", "--workers", "0"]


# ---------------------------------------------------------------- helpers


def until(predicate: Callable[[], object], timeout: float = 120, run: Path | None = None, poll: float = 0.02):
    """Poll until `predicate()` is truthy and return it; a run that fails meanwhile fails the test with its log."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if run is not None and runs.read_status(run).get("state") == runs.FAILED:
            raise AssertionError(f"run failed: {(run / runs.LOG_FILE).read_text()}")
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(poll)


def core_cli(*args, home: Path, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "LOUPE_HOME": str(home), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "core", *map(str, args)], cwd=REPO, env=full_env, check=False,
                          capture_output=True, text=True, timeout=timeout)


def write_png(path: Path, colour: tuple[int, int, int], size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format="PNG")
    return path


def heic_bytes() -> bytes:
    """The start of an iPhone photo and no more: an ISO-BMFF 'ftyp' box with the heic brand, then an empty meta box
    (a file pillow-heif cannot decode; real HEIC photos are read, tests/test_heic.py)."""
    ftyp = b"ftypheic" + b"\x00\x00\x00\x00" + b"mif1heic"
    return len(ftyp).to_bytes(4, "big") + ftyp + b"\x00\x00\x00\x10meta" + bytes(64)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace of the test's own; background runs inherit it and one intra-op thread (shared machine)."""
    workspace = tmp_path / "home"
    monkeypatch.setenv("LOUPE_HOME", str(workspace))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return workspace


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """48 drawn shapes at 32 px: 39 training images, 4 batches of 8 an epoch."""
    return make_demo_dataset(tmp_path / "demo", DemoSpec(n_per_class=16, size=32, seed=0))


@pytest.fixture
def background():
    """Run dirs a test launched; any still active at the end is killed, so no child outlives the test."""
    launched: list[Path] = []
    yield launched
    for run in launched:
        if runs.status(run).get("state") in runs.ACTIVE_STATES:
            runs.kill(run, signal.SIGKILL)
            runs.wait(run, timeout=20)


def launch(run: Path, background: list[Path], **kwargs) -> int:
    background.append(run)
    return runs.start(run, **kwargs)


# ---------------------------------------------------------------- file names


def names_dataset(root: Path) -> Path:
    """Two classes of 10 with one file named in bytes that are not UTF-8 and one in non-Latin Unicode."""
    for k, cls in enumerate(("cat", "dog")):
        for i in range(10):
            write_png(root / cls / f"{cls}_{i}.png", (200 * (1 - k), 40, 200 * k))
    write_png(root / "cat" / BAD_UTF8, (200, 40, 0))
    Image.new("RGB", (32, 32), (0, 40, 200)).save(root / "dog" / UNICODE, format="JPEG")
    return root


def test_odd_file_names_are_listed_verified_and_thumbnailed(tmp_path: Path, home: Path):
    root = names_dataset(tmp_path / "names")
    assert os.fsencode(root / "cat" / BAD_UTF8).endswith(b"/bad\xff.png")  # really the raw byte on disk
    files = list_images(root)
    names = {f.name for f in files}
    assert {BAD_UTF8, UNICODE} <= names and len(files) == 22
    assert verify_images(files) == []
    source = load_source(DataConfig(path=str(root)))
    labels = {f.name: ls[0] for f, ls in zip(source.files, source.labels)}
    assert labels[BAD_UTF8] == "cat" and labels[UNICODE] == "dog"
    for name in (BAD_UTF8, UNICODE):
        path = next(f for f in files if f.name == name)
        with Image.open(io.BytesIO(thumbnail(path, 64))) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) == 32  # never upscaled past the original
    assert path_text(root / "cat" / BAD_UTF8).endswith("bad\\xff.png")  # valid UTF-8 for tables and pages
    assert path_text(root / "dog" / UNICODE) == str(root / "dog" / UNICODE)  # real Unicode is kept as it is


def test_json_and_events_keep_a_non_utf8_name_exactly(tmp_path: Path):
    atomic_write_json(tmp_path / "record.json", {"file": BAD_UTF8, "other": UNICODE})
    assert read_json(tmp_path / "record.json") == {"file": BAD_UTF8, "other": UNICODE}  # \udcff escape round-trips
    with runs.EventWriter(tmp_path) as events:
        events.emit("skipped", files=[BAD_UTF8, UNICODE])
    assert runs.load_events(tmp_path, "skipped")[0]["files"] == [BAD_UTF8, UNICODE]


def test_odd_file_names_train_and_every_run_file_is_written(tmp_path: Path, home: Path):
    root = names_dataset(tmp_path / "names")
    run = tmp_path / "run"
    result = core_cli("train", root, "--run-dir", run, "--epochs", "1", *TINY_CLI, home=home)
    assert result.returncode == 0, result.stderr
    assert runs.status(run)["state"] == runs.DONE
    record = read_json(run / DATASET_RECORD_FILE)
    assert {"cat/" + BAD_UTF8, "dog/" + UNICODE} <= {item["file"] for item in record["items"]}  # exact names
    tables = [interpret.load_table(interpret.table_path(run, split)) for split in ("train", "valid")]
    shown = {Path(f).name for table in tables for f in table["file"]}
    assert {"bad\\xff.png", UNICODE} <= shown and len(shown) == 22  # every item, none lost to its name


# ---------------------------------------------------------------- HEIC, empty classes


def test_an_undecodable_heic_is_named_by_its_content_with_a_clear_reason(tmp_path: Path):
    for name in ("IMG_0001.heic", "IMG_0002.jpg"):  # the extension does not matter, the content does
        (tmp_path / name).write_bytes(heic_bytes())
        assert check_image(tmp_path / name) == HEIF_REASON
        with pytest.raises(DataError, match="HEIC/HEIF image that cannot be decoded"):
            open_image(tmp_path / name)
    (tmp_path / "page.jpg").write_text("<html>not a picture</html>")
    assert "not an image" in check_image(tmp_path / "page.jpg")  # other non-images keep their own reason
    assert [f.name for f in list_images(tmp_path)] == ["IMG_0001.heic", "IMG_0002.jpg", "page.jpg"]


def test_an_empty_class_folder_is_no_class(tmp_path: Path):
    for k, cls in enumerate(("cat", "dog")):
        for i in range(6):
            write_png(tmp_path / cls / f"{i}.png", (200 * k, 90, 40))
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_notes").mkdir()
    (tmp_path / "only_notes" / "readme.txt").write_text("no images here")
    (tmp_path / "dog" / "IMG_9.heic").write_bytes(heic_bytes())
    source, bad, _ = prepare(DataConfig(path=str(tmp_path)))
    assert source.vocab == ["cat", "dog"] and len(source) == 12
    assert [(b.path.name, b.reason) for b in bad] == [("IMG_9.heic", HEIF_REASON)]
    dls = make_dataloaders(DataConfig(path=str(tmp_path), size=16, batch_size=4, num_workers=0))
    assert dls.n_classes == 2


def test_data_page_shows_the_classes_that_have_images_and_says_why_bad_heic_is_left_out(tmp_path: Path, home: Path):
    root = tmp_path / "pets"
    for k, cls in enumerate(("cat", "dog")):
        for i in range(12):
            write_png(root / cls / f"{cls}_{i}.png", (200 * k, 90, 40), size=16)
    (root / "empty").mkdir()
    (root / "cat" / "IMG_0001.heic").write_bytes(heic_bytes())
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["dataset"] = str(root)
    at.run()
    assert not at.exception, at.exception
    assert {m.label: m.value for m in at.metric}["Classes"] == "2"
    assert at.segmented_control(key="data_gallery_class").options == ["cat (12)", "dog (12)"]
    problems = at.dataframe[0].value
    assert list(problems["file"]) == ["cat/IMG_0001.heic"] and "HEIC" in problems["reason"].iloc[0]


# ---------------------------------------------------------------- big folders


def test_listing_twenty_thousand_nested_files_finds_them_all_in_order(tmp_path: Path):
    expected = []
    for i in range(20_000):
        folder = tmp_path / f"class_{i % 4}" / f"part_{i % 40:02d}" / f"sub_{i % 3}"
        if i < 120:
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.jpg"
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
        expected.append(path)
    files = list_images(tmp_path)
    assert files == sorted(expected)
    assert load_source(DataConfig(path=str(tmp_path))).class_counts() == {f"class_{k}": 5000 for k in range(4)}


def test_data_page_pages_a_twenty_thousand_image_class_and_makes_only_the_thumbnails_shown(
    tmp_path: Path, home: Path
):
    # Hard links of two real images: 20,000 decodable files in a second (verification still opens each one).
    root = tmp_path / "big"
    colours = (("a", (220, 0, 0)), ("b", (0, 0, 220)))
    originals = [write_png(tmp_path / f"{c}.png", colour, size=8) for c, colour in colours]
    for i in range(20_000):
        folder = root / ("a", "b")[i % 2] / f"part_{i % 20:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        os.link(originals[i % 2], folder / f"{i:05d}.jpg")
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["dataset"] = str(root)
    at.run()
    assert not at.exception, at.exception
    assert {m.label: m.value for m in at.metric}["Images"] == "20,000"
    thumbs = home / "cache" / "thumbs"

    def gallery() -> tuple[list[str], int]:
        [grid] = at.get("grid")
        return [c.value for c in grid.caption], len(grid.get("image"))

    first, images = gallery()
    assert len(first) == images == 24
    assert len(list(thumbs.glob("*.jpg"))) == 24  # one page of thumbnails made, not ten thousand
    at.pagination(key="data_gallery_page_0_all").set_value(300)
    at.run()
    assert not at.exception, at.exception
    later, images = gallery()
    assert len(later) == images == 24 and not set(later) & set(first)
    assert len(list(thumbs.glob("*.jpg"))) == 48


# ---------------------------------------------------------------- stop, kill, resume


def test_sigterm_ends_the_run_within_one_batch_with_a_checkpoint(tmp_path: Path, home: Path, demo: Path, background):
    run = runs.create(tiny_config(demo, epochs=3).to_dict(), root=tmp_path / "runs")
    launch(run, background)
    until(lambda: runs.load_events(run, "batch"), run=run)
    sent = time.time()
    assert runs.kill(run, signal.SIGTERM)
    final = runs.wait(run, timeout=60)
    assert final["state"] == runs.STOPPED, (run / runs.LOG_FILE).read_text()
    batches = runs.load_events(run, "batch")
    assert len([b for b in batches if b["time"] >= sent]) <= 1  # the flag is seen at the next batch boundary
    state = torch.load(run / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert (state["epoch"], state["batch"]) == (batches[-1]["epoch"], batches[-1]["batch"])
    assert runs.load_events(run)[-1]["event"] == "stopped" and len(runs.load_events(run, "epoch")) < 3


def test_kill_9_mid_epoch_is_failed_and_resume_finishes_every_epoch(tmp_path: Path, home: Path, demo: Path,
                                                                    background):
    run = runs.create(tiny_config(demo, epochs=3).to_dict(), root=tmp_path / "runs")
    pid = launch(run, background)
    until(lambda: any(b["epoch"] >= 1 for b in runs.load_events(run, "batch")), run=run)  # epoch 0 checkpointed
    os.killpg(os.getpgid(pid), signal.SIGKILL)  # a crash, not runs.kill (which records a deliberate stop)
    final = runs.wait(run, timeout=30)
    assert final["state"] == runs.FAILED and final["error"] == runs.DIED_MESSAGE
    assert final["returncode"] == -signal.SIGKILL
    state = load_checkpoint(run)  # torch.load(weights_only=True): intact and safe to read
    assert state["epoch"] >= 1 and state["batch"] == 0
    assert len(runs.load_events(run, "epoch")) < 3

    launch(run, background, extra_args=["--resume"])
    final = runs.wait(run, timeout=180)
    assert final["state"] == runs.DONE, (run / runs.LOG_FILE).read_text()
    epochs = [e["epoch"] for e in runs.load_events(run, "epoch")]
    assert epochs[-1] == 2 and sorted(set(epochs)) == [0, 1, 2]
    assert runs.load_events(run, "start")[-1]["resume"] is True


# ---------------------------------------------------------------- disk


def test_too_little_free_space_fails_the_run_before_any_training(tmp_path: Path, home: Path, demo: Path,
                                                                 monkeypatch, background):
    monkeypatch.setenv("LOUPE_MIN_FREE_MB", str(10**12))  # more than any disk: the child sees a full one
    root = tmp_path / "runs"
    train = runs.create(tiny_config(demo, epochs=3).to_dict(), root=root)
    sweep = runs.create(tiny_config(demo, epochs=3).to_dict(), root=root)
    launch(train, background)
    launch(sweep, background, task="lr-find")
    for run in (train, sweep):
        final = runs.wait(run, timeout=60)
        assert final["state"] == runs.FAILED, final
        assert "MB free" in final["error"] and "LOUPE_MIN_FREE_MB" in final["error"]
        [error] = runs.load_events(run, "error")
        assert "MB free" in error["message"]
        assert not runs.load_events(run, "start") and not runs.load_events(run, "lr_find")
        assert not (run / CHECKPOINT_FILE).exists()


def test_cli_refuses_a_run_dir_it_cannot_use_with_one_line(tmp_path: Path, home: Path, demo: Path):
    taken = tmp_path / "taken"
    taken.write_text("my notes")
    for run_dir, message in ((taken, "is a file, not a folder"), (taken / "run", "Cannot create the run directory")):
        result = core_cli("train", demo, "--run-dir", run_dir, *TINY_CLI, home=home)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert result.stderr.strip().count("\n") == 0  # one line, no traceback
    assert taken.read_text() == "my notes"
    result = core_cli("train", demo, "--run-dir", tmp_path / "new", *TINY_CLI, home=home, LOUPE_MIN_FREE_MB="1e12")
    assert result.returncode == 2 and "MB free" in result.stderr and "Traceback" not in result.stderr


def test_a_crash_while_writing_a_checkpoint_keeps_the_old_one_and_no_temp_file(tmp_path: Path):
    target = tmp_path / CHECKPOINT_FILE
    torch.save({"weights": torch.arange(1000.0)}, target)
    good = target.read_bytes()

    def half_then_disk_full(tmp: Path) -> None:
        torch.save({"weights": torch.zeros(1000)}, tmp)
        with open(tmp, "r+b") as f:
            f.truncate(len(good) // 2)  # half a file on disk, as when the disk fills mid-write
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, half_then_disk_full)
    assert target.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]
    assert torch.equal(torch.load(target, weights_only=True)["weights"], torch.arange(1000.0))


# ---------------------------------------------------------------- two runs at once


def test_two_runs_started_at_once_one_trains_while_the_other_queues(tmp_path: Path, home: Path, demo: Path,
                                                                     background):
    root = tmp_path / "runs"
    configs = [tiny_config(demo, epochs=2, lr=1e-2).to_dict(), tiny_config(demo, epochs=1, lr=5e-3).to_dict()]
    made = [runs.create(cfg, root=root) for cfg in configs]  # "Train" clicked twice, or two tabs
    assert len({p.name for p in made}) == 2 and sorted(p for p in root.iterdir() if p.is_dir()) == sorted(made)
    for run in made:
        launch(run, background)
    pairs = set()

    def both_final() -> bool:
        states = tuple(runs.status(run)["state"] for run in made)
        pairs.add(states)
        return all(s in runs.FINAL_STATES for s in states)

    until(both_final, timeout=240)
    assert any(set(p) == {runs.RUNNING, runs.QUEUED} for p in pairs), pairs
    assert (runs.RUNNING, runs.RUNNING) not in pairs
    statuses = sorted((runs.status(run) for run in made), key=lambda s: s["running_at"])
    assert statuses[0]["finished_at"] <= statuses[1]["running_at"]  # the compute lock: one after the other
    for run, cfg in zip(made, configs):
        assert runs.status(run)["state"] == runs.DONE, (run / runs.LOG_FILE).read_text()
        assert read_json(run / runs.CONFIG_FILE) == cfg
        [start] = runs.load_events(run, "start")
        assert start["config"] == cfg  # its own events only, from its own process
        assert [e["epoch"] for e in runs.load_events(run, "epoch")] == list(range(cfg["epochs"]))


# ---------------------------------------------------------------- the dataset changes during a run


def test_files_cleaned_away_during_a_run_are_skipped_and_reported(tmp_path: Path, home: Path, background):
    data = make_demo_dataset(tmp_path / "demo", DemoSpec(n_per_class=30, size=32, seed=2))
    run = runs.create(tiny_config(data, epochs=3).to_dict(), root=tmp_path / "runs")
    launch(run, background)
    until(lambda: runs.load_events(run, "epoch"), run=run)
    items = read_json(run / DATASET_RECORD_FILE)["items"]
    moved = [item["file"] for item in items if item["split"] == "train"][:3]
    result = apply_changes(data, [Change(data / f, "delete") for f in moved], layout="folders")
    assert len(result.applied) == 3 and not any((data / f).exists() for f in moved)
    assert runs.status(run)["state"] == runs.RUNNING and not runs.load_events(run, "exported")  # really mid-run
    final = runs.wait(run, timeout=180)
    assert final["state"] == runs.DONE, (run / runs.LOG_FILE).read_text()
    [report] = [e for e in runs.load_events(run, "skipped") if "epoch" not in e]
    assert report["split"] == "train" and report["count"] == 3
    assert sorted(Path(f).name for f in report["files"]) == sorted(Path(f).name for f in moved)
    table = interpret.load_table(interpret.table_path(run, "train"))
    assert len(table) == sum(item["split"] == "train" for item in items) - 3
    assert "skipped 3 train file(s)" in (run / runs.LOG_FILE).read_text()


def test_an_epoch_reports_the_files_it_could_not_read(tmp_path: Path, home: Path):
    data = make_demo_dataset(tmp_path / "demo", DemoSpec(n_per_class=8, size=32, seed=0, mislabel_frac=0.0))
    cfg = tiny_config(data, epochs=1)
    cfg.data.batch_size = 6  # 18 training images: three full batches, so drop_last leaves none out
    events: list[tuple[str, dict]] = []
    learner = Learner(cfg, setup_training(cfg), on_event=lambda kind, **f: events.append((kind, f)))
    assert len(learner.dls.split.train) == 18
    gone = [learner.dls.source.files[i] for i in learner.dls.split.train[:2]]
    for f in gone:
        f.unlink()  # gone between the check and the epoch (no warm decode cache in this process)
    learner.fit()
    [skipped] = [f for kind, f in events if kind == "skipped"]
    assert skipped["epoch"] == 0 and skipped["count"] == 2
    assert sorted(skipped["files"]) == sorted(str(f) for f in gone)
    assert len(learner.history) == 1


# ---------------------------------------------------------------- the page, a reload, a server restart


def test_a_new_session_shows_the_live_run_and_the_run_goes_on(tmp_path: Path, home: Path, background):
    from ui.state import RECENT_FILE

    data = make_demo_dataset(home / "demo", DemoSpec(n_per_class=16, size=32, seed=0))
    atomic_write_json(home / RECENT_FILE, [str(data)])  # what the Data page leaves when a folder is opened
    run = runs.create(tiny_config(data, epochs=500).to_dict(), root=home / "runs")
    launch(run, background)
    until(lambda: runs.load_events(run, "batch"), run=run)

    def train_page(at: AppTest) -> AppTest:
        at.switch_page(TRAIN_PAGE).run()
        assert not at.exception, at.exception
        markdown = "\n".join(str(m.value) for m in at.markdown)
        assert run.name in markdown and ("running" in markdown or "queued" in markdown)
        assert at.button(key="train_stop")
        return at

    first = AppTest.from_file(APP, default_timeout=120)
    first.run()
    train_page(first)
    first.switch_page("app_pages/runs.py").run()  # a page switch and back
    assert not first.exception, first.exception
    train_page(first)
    seen = len(runs.load_events(run, "batch"))

    # A server restart or a reload: a brand-new session that was never told about the run finds it live.
    second = train_page(AppTest.from_file(APP, default_timeout=120))
    until(lambda: len(runs.load_events(run, "batch")) > seen + 2, run=run)  # nobody watching, it goes on
    second.button(key="train_stop").click().run()
    assert not second.exception, second.exception
    assert runs.wait(run, timeout=60)["state"] == runs.STOPPED


def test_data_page_shows_a_dataset_with_a_non_utf8_file_name(tmp_path: Path, home: Path):
    root = names_dataset(tmp_path / "names")
    (root / "dog" / os.fsdecode(b"broken\xfe.jpg")).write_bytes(b"")
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["dataset"] = str(root)
    at.run()
    assert not at.exception, at.exception
    assert {m.label: m.value for m in at.metric}["Images"] == "22"
    assert list(at.dataframe[0].value["file"]) == ["dog/broken\\xfe.jpg"]


# ---------------------------------------------------------------- issue 16: malformed and huge labels CSVs


def csv_dataset(root: Path, csv_bytes: bytes, images: int = 4) -> Path:
    """root/images/img_N.png (N < images, two colours) and root/labels.csv holding `csv_bytes` as they are."""
    for i in range(images):
        write_png(root / "images" / f"img_{i}.png", (200 * (i % 2), 40, 200 * (1 - i % 2)), size=16)
    (root / "labels.csv").write_bytes(csv_bytes)
    return root


GOOD_ROWS = b"images/img_0.png,red\nimages/img_1.png,blue\n"
BROKEN_CSVS = {
    "ragged": (b"fname,label\n" + GOOD_ROWS + b"images/img_2.png,red,extra\n", "line 4 has 3 fields"),
    "short": (b"fname,label\n" + GOOD_ROWS + b"images/img_3.png\n", "line 4 has 1 fields"),
    "latin-1": (b"fname,label\n" + GOOD_ROWS + "images/img_2.png,café\n".encode("latin-1"), "line 4 is not UTF-8"),
    "latin-1-header": ("fname,étiquette\n".encode("latin-1") + GOOD_ROWS, "line 1 is not UTF-8"),
    "empty": (b"", "is empty"),
}


@pytest.mark.parametrize("case", BROKEN_CSVS)
def test_a_malformed_labels_csv_is_a_data_error_naming_the_line(tmp_path: Path, case: str):
    content, message = BROKEN_CSVS[case]
    root = csv_dataset(tmp_path / case, content)
    with pytest.raises(DataError, match=message) as refused:
        load_source(DataConfig(path=str(root)))
    assert "labels.csv" in str(refused.value)


def test_a_remembered_folder_with_a_broken_csv_never_breaks_a_fresh_session(tmp_path: Path, home: Path):
    """The broken CSV came in a zip, so the folder is in the recent list: every new session opens it."""
    root = csv_dataset(tmp_path / "upload", BROKEN_CSVS["ragged"][0])
    home.mkdir(parents=True)
    atomic_write_json(home / "recent.json", [str(root)])
    for _ in range(2):  # two fresh sessions, one after the other
        at = AppTest.from_file(APP, default_timeout=120).run()
        assert not at.exception, at.exception
        assert at.session_state["dataset"] == str(root)
        assert any("line 4 has 3 fields" in e.value for e in at.error)
        assert at.text_input(key="data_path")  # another folder can still be opened


def test_a_two_hundred_thousand_row_csv_loads_bounded_and_the_page_counts_what_is_missing(tmp_path: Path, home: Path):
    """A CSV naming far more files than the folder holds: the missing rows are counted, not all kept in memory.
    (bench/labels_csv.py measures two million rows; docs/reliability.md has the figures.)"""
    rows = 200_000
    lines = "".join(f"images/img_{i}.png,{'red' if i % 2 else 'blue'}\n" for i in range(rows))
    root = csv_dataset(tmp_path / "big", b"fname,label\n" + lines.encode(), images=6)
    start = time.perf_counter()
    source = load_source(DataConfig(path=str(root)))
    seconds = time.perf_counter() - start
    assert len(source) == 6 and source.vocab == ["blue", "red"]
    assert source.n_unlabelled == rows - 6
    assert len(source.unlabelled) == 1000 and source.unlisted == rows - 6 - 1000
    assert seconds < 20, f"{seconds:.1f} s for {rows:,} rows"  # about 1 s here; the old row loop took 15 s

    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["dataset"] = str(root)
    at.run()
    assert not at.exception, at.exception
    assert {m.label: m.value for m in at.metric}["Left out"] == f"{rows - 6:,}"
    assert len(at.dataframe[0].value) == 1000
    assert any(f"{rows - 6 - 1000:,} more rows of the CSV" in c.value for c in at.caption)


# ---------------------------------------------------------------- issue 16: odd paths on the Data page


def test_a_typed_home_folder_of_an_unknown_user_gets_a_message(home: Path):
    from core.env import check_data_path

    with pytest.raises(ValueError, match="~nosuchuser"):
        check_data_path("~nosuchuser/x")
    with pytest.raises(DataError, match="home folder"):
        load_source(DataConfig(path="~nosuchuser/x"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.text_input(key="data_path").input("~nosuchuser/x")
    at.button(key="data_open").click().run()
    assert not at.exception, at.exception
    assert any("~nosuchuser" in e.value for e in at.error)


def test_symlinked_folders_that_leave_the_dataset_are_skipped_everywhere(tmp_path: Path, home: Path):
    outside = tmp_path / "outside"
    for i in range(3):
        write_png(outside / "train" / "cat" / f"far_{i}.png", (9, 9, 9), size=16)
    # Labels in file names, plus a "class folder" that is a link out: still labels in file names.
    names = tmp_path / "names"
    for i in range(4):
        write_png(names / f"{'cat' if i % 2 else 'dog'}_{i}.png", (200 * (i % 2), 40, 90), size=16)
    (names / "far").symlink_to(outside / "train", target_is_directory=True)
    (names / "root").symlink_to("/", target_is_directory=True)
    assert detect_layout(DataConfig(path=str(names))) == "filename_regex"
    # train/ and valid/ folders where train/ is a link out: its images are not the dataset's.
    split = tmp_path / "split"
    for i in range(2):
        write_png(split / "valid" / "cat" / f"near_{i}.png", (200, 40, 90), size=16)
    (split / "train").symlink_to(outside / "train", target_is_directory=True)
    (split / "valid" / "dog").symlink_to("/", target_is_directory=True)
    source = load_source(DataConfig(path=str(split)))
    assert sorted(f.name for f in source.files) == ["near_0.png", "near_1.png"]
    # One folder per class with a class folder linked to /: layout detection does not walk the machine.
    folders = tmp_path / "folders"
    for cls in ("cat", "dog"):
        write_png(folders / cls / f"{cls}.png", (40, 40, 40), size=16)
    (folders / "everything").symlink_to("/", target_is_directory=True)
    assert load_source(DataConfig(path=str(folders))).vocab == ["cat", "dog"]
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["dataset"] = str(folders)
    at.run()
    assert not at.exception, at.exception
    assert {m.label: m.value for m in at.metric}["Classes"] == "2"
    done = core_cli("train", folders, "--create-only", *TINY_CLI, home=home)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


# ---------------------------------------------------------------- issue 16: CSVs a spreadsheet opens


def test_csv_cells_a_spreadsheet_would_run_are_escaped():
    table = pd.DataFrame({
        "file": ["=cmd|' -c calc'!A0.png", "+1.png", "-2.png", "@SUM(A1).png", "\tx.png", "\rx.png", "plain.png"],
        "prediction": ['=HYPERLINK("http://evil.example","click")', "ok", "ok", "ok", "ok", "ok", "ok"],
        "probability": [0.5, -0.25, 1.0, 0.0, 0.1, 0.2, 0.3],
    }).rename(columns={"prediction": "=prediction"})
    back = pd.read_csv(io.BytesIO(csv_for_people(table)), dtype=str, keep_default_na=False)
    assert list(back.columns) == ["file", "'=prediction", "probability"]
    assert list(back["file"]) == ["'=cmd|' -c calc'!A0.png", "'+1.png", "'-2.png", "'@SUM(A1).png", "'\tx.png",
                                  "'\rx.png", "plain.png"]
    assert back["'=prediction"][0] == "'=HYPERLINK(\"http://evil.example\",\"click\")"
    assert list(back["probability"]) == ["0.5", "-0.25", "1.0", "0.0", "0.1", "0.2", "0.3"]  # numbers as they are


def test_predict_and_cleaner_csvs_escape_formulas_and_streamlit_table_export_is_off():
    from core.csvfile import clean_log_table, predictions_csv

    meta = BundleMeta(arch="resnet18", vocab=["=HYPERLINK(\"http://evil.example\")", "cat"], size=32)
    results = [{"name": "=cmd|' -c calc'!A0.png", "probs": [0.9, 0.1]}]
    table = pd.DataFrame({"file": [r["name"] for r in results], "prediction": [meta.vocab[0]], "probability": [0.9]})
    csv = predictions_csv(meta.vocab, [r["probs"] for r in results], table)
    back = pd.read_csv(io.BytesIO(csv), dtype=str, keep_default_na=False)
    assert back["file"][0] == "'=cmd|' -c calc'!A0.png" and back["prediction"][0] == "'" + meta.vocab[0]
    assert not any(cell.startswith(FORMULA_STARTS) for cell in [*back.columns, *back.to_numpy().ravel()])

    log = [{"time": 0.0, "batch": "b", "action": "relabel", "source": "=x/1.png", "target": "@y/1.png",
            "new_label": "-y", "size": 3, "sha256": "ab"}]
    text = csv_for_people(clean_log_table(log)).decode()
    assert ",'=x/1.png,'@y/1.png,'-y,3," in text

    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["client"]["disableDataExport"] is True  # Streamlit's table download cannot escape cells


# ---------------------------------------------------------------- issue 16: odd runs and odd logs on the pages


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A workspace with one finished tiny run (demo shapes, 32 px, one epoch), trained once for these tests."""
    base = tmp_path_factory.mktemp("issue16")
    dataset = make_demo_dataset(base / "shapes", DemoSpec(n_per_class=6, size=32, seed=2))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOUPE_HOME", str(base / "home"))
        run = train_tiny_run(tiny_config(dataset), base / "home" / "runs")
    return {"home": base / "home", "dataset": dataset, "run": run}


@pytest.fixture
def odd_run(finished: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    """The finished run plus, newer, a run folder whose config.json holds "data": "oops" (a valid status.json)."""
    monkeypatch.setenv("LOUPE_HOME", str(finished["home"]))
    odd = runs.create({"data": "oops", "model": {"arch": 5}, "epochs": 1}, root=finished["home"] / "runs")
    yield odd
    shutil.rmtree(odd)


@pytest.mark.parametrize("page", ["app_pages/runs.py", "app_pages/predict.py", "app_pages/train.py",
                                  "app_pages/interpret.py", "app_pages/clean.py", "app_pages/data.py"])
def test_one_odd_run_breaks_no_page(odd_run: Path, finished: dict[str, Path], page: str):
    listing = {info.id: info for info in list_runs(finished["home"] / "runs")}
    assert listing[odd_run.name].state == runs.UNREADABLE
    assert "'data' should be a JSON object" in listing[odd_run.name].error
    assert listing[finished["run"].name].state == runs.DONE
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    if page == "app_pages/runs.py":
        table = at.dataframe[0].value
        assert dict(zip(table["run"] if "run" in table else table["id"], table["state"]))[odd_run.name] == "unreadable"
    if page == "app_pages/predict.py":
        assert at.selectbox(key="predict_model").value == finished["run"].name


def test_clean_refuses_a_symlinked_change_log_with_a_message(finished: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LOUPE_HOME", str(finished["home"]))
    outside = tmp_path / "notes.txt"
    outside.write_text("mine\n")
    state = finished["dataset"] / ".loupe"
    state.mkdir(exist_ok=True)
    (state / "clean_log.jsonl").symlink_to(outside)
    try:
        at = AppTest.from_file(APP, default_timeout=120).run()
        at.switch_page("app_pages/clean.py").run()
        assert not at.exception, at.exception
        assert any("symbolic link" in e.value for e in at.error)
    finally:
        (state / "clean_log.jsonl").unlink()
    assert outside.read_text() == "mine\n"
