"""The Train page through Streamlit's AppTest: real widgets, real background runs, real torch on tiny images."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import tiny_config
from streamlit.testing.v1 import AppTest
from torchvision.models import get_model

from core import runs
from core.data import DataConfig
from core.demo import DemoSpec, make_demo_dataset
from core.env import runs_dir
from core.fileio import read_json
from core.job import load_lr_find, run_training
from core.model import ModelConfig, pretrained_available, pretrained_cache_path
from core.rundir import DATASET_RECORD_FILE
from core.train import TrainConfig
from ui.train_form import FORM_FIELDS, build_config, form_values

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGE = "app_pages/train.py"
# Tiny models on a busy shared CPU: one intra-op thread is ~10x faster than several that wait on each other.
ONE_THREAD = ("OMP_NUM_THREADS", "1")
TINY = {"train_pretrained": False, "train_schedule": "one_cycle", "train_size": 32, "train_bs": 8, "train_epochs": 1,
        "train_workers": 0}


def train_in_process(cfg: TrainConfig) -> Path:
    """A run made the real way, trained in this process (restoring the signal handlers the run installs)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see ONE_THREAD
    try:
        run_dir = runs.create(cfg.to_dict(), root=runs_dir())
        run_training(run_dir)
    finally:
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return run_dir


def open_page(dataset: Path | None = None, run_id: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    if dataset is not None:
        at.session_state["dataset"] = str(dataset)
    if run_id is not None:
        at.session_state["run_id"] = run_id
    at.run()
    at.switch_page(PAGE)
    at.run()
    assert not at.exception, at.exception
    return at


def set_form(at: AppTest, **values) -> None:
    for key, value in values.items():
        _widget(at, key).set_value(value)
    at.run()
    assert not at.exception, at.exception


def _widget(at: AppTest, key: str):
    for kind in ("selectbox", "checkbox", "number_input", "text_input"):
        found = [w for w in getattr(at, kind) if w.key == key]
        if found:
            return found[0]
    raise KeyError(key)


def texts(at: AppTest, kind: str) -> str:
    return "\n".join(str(e.value) for e in getattr(at, kind))


def run_dirs() -> list[Path]:
    return sorted(p for p in runs_dir().iterdir() if p.is_dir())


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(*ONE_THREAD)  # inherited by the background runs the page launches
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # a fresh machine: no weights in the hub cache
    return tmp_path / "home"


@pytest.fixture
def background():
    """Run dirs a test launched; every one is finished or killed at the end."""
    launched: list[Path] = []
    yield launched
    for run_dir in launched:
        for ask in (runs.request_stop, runs.kill, lambda d: runs.kill(d, signal.SIGKILL)):
            if runs.status(run_dir).get("state") not in runs.ACTIVE_STATES:
                break
            ask(run_dir)  # a training run stops at the next batch; an LR sweep only ends by signal
            runs.wait(run_dir, timeout=20)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(home, dataset, run dir) of a finished two-epoch run at 32 px."""
    home = tmp_path_factory.mktemp("trained") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOUPE_HOME", str(home))
        # 12 per class: 3 batches of 8 a epoch. (2 batches x 2 epochs = 4 one-cycle steps trips a
        # ZeroDivisionError inside torch's OneCycleLR at pct_start 0.25: reported, not this page's to fix.)
        dataset = make_demo_dataset(home / "demo", DemoSpec(n_per_class=12, size=32, seed=0))
        run_dir = train_in_process(tiny_config(dataset, epochs=2))
    assert runs.status(run_dir)["state"] == runs.DONE
    return home, dataset, run_dir


def test_without_a_dataset_the_page_says_where_to_get_one(home: Path) -> None:
    at = open_page()
    assert "dataset" in texts(at, "info").lower()
    assert not any(b.key == "train_start" for b in at.button)


def test_offline_the_defaults_train_from_scratch_at_the_images_own_size(home: Path) -> None:
    demo = make_demo_dataset(home / "demo")  # as the Data page makes it: 3 x 40 images of 64 px, 96 for training
    at = open_page(demo)
    assert at.selectbox(key="train_arch").value == "resnet18"
    assert at.checkbox(key="train_pretrained").value is False  # no weights on this machine: nothing to download
    assert at.selectbox(key="train_schedule").value == "one_cycle"
    assert at.number_input(key="train_epochs").value == 4
    assert at.number_input(key="train_size").value == 64  # the images' size, not 224
    batch = at.number_input(key="train_bs").value
    assert batch < 64 and -(-96 // batch) >= 4  # steps enough for a schedule, not 2 batches an epoch
    assert float(at.text_input(key="train_lr").value) == pytest.approx(2e-3)
    assert "not on this machine, so the defaults train from scratch" in texts(at, "caption")
    assert not at.warning and "No run yet" in texts(at, "info")
    set_form(at, train_pretrained=True)  # ticking Pretrained goes back to fine_tune, and warns about the download
    assert at.selectbox(key="train_schedule").value == "fine_tune"
    assert "fails if this machine is offline" in texts(at, "warning") and "weights file" in texts(at, "warning")
    set_form(at, train_pretrained=False)
    assert at.selectbox(key="train_schedule").value == "one_cycle" and not at.warning
    set_form(at, train_size=224)
    assert "about 64 px" in texts(at, "info")  # upscaling the demo's images is pointed out
    set_form(at, train_lr="fast please")
    assert "not a number" in texts(at, "error")
    assert at.button(key="train_start").disabled


def test_with_the_weights_on_this_machine_the_defaults_fine_tune(home: Path, demo_dataset: Path) -> None:
    pretrained_cache_path("resnet18").parent.mkdir(parents=True)
    torch.save(get_model("resnet18", weights=None).state_dict(), pretrained_cache_path("resnet18"))
    at = open_page(demo_dataset)
    assert at.checkbox(key="train_pretrained").value is True
    assert at.selectbox(key="train_schedule").value == "fine_tune"
    assert "are on this machine" in texts(at, "caption") and not at.warning
    set_form(at, train_arch="resnet34")  # whose weights are not here
    assert at.checkbox(key="train_pretrained").value is False
    assert at.selectbox(key="train_schedule").value == "one_cycle"


def test_a_weights_file_is_checked_placed_and_turns_on_fine_tuning(home: Path, demo_dataset: Path,
                                                                   tmp_path: Path) -> None:
    at = open_page(demo_dataset)
    notes = tmp_path / "notes.pth"
    notes.write_text("not weights")
    at.text_input(key="train_weights_path").set_value(str(notes))
    at.button(key="train_weights_use").click().run()
    error = texts(at, "error")
    assert f"`{notes}` cannot be used as the resnet18 weights" in error
    assert "weights_only" not in error and "pretrained=" not in error
    assert at.checkbox(key="train_pretrained").value is False and not pretrained_available("resnet18")

    weights = get_model("resnet18", weights=None).state_dict()
    data = safetensors.torch.save({k: v.contiguous() for k, v in weights.items()})
    at.file_uploader(key="train_weights_upload").set_value(("resnet18.safetensors", data, "application/octet-stream"))
    at.run()
    assert not at.exception, at.exception
    assert "weights are in place" in texts(at, "success")
    assert at.checkbox(key="train_pretrained").value is True
    assert at.selectbox(key="train_schedule").value == "fine_tune"
    assert pretrained_available("resnet18") and "are on this machine" in texts(at, "caption")

    other = tmp_path / "other.pth"
    torch.save(get_model("resnet18", weights=None).state_dict(), other)  # different weights: refused, not swapped
    before = pretrained_cache_path("resnet18").read_bytes()
    at.text_input(key="train_weights_path").set_value(str(other))
    at.button(key="train_weights_use").click().run()
    assert "already other resnet18 weights" in texts(at, "error")
    assert pretrained_cache_path("resnet18").read_bytes() == before


def test_the_demo_trains_to_done_with_the_defaults_offline(home: Path, background) -> None:
    demo = make_demo_dataset(home / "demo")
    at = open_page(demo)
    at.button(key="train_start").click().run()
    assert not at.exception, at.exception
    [run_dir] = run_dirs()
    background.append(run_dir)
    final = runs.wait(run_dir, timeout=600)
    assert final["state"] == runs.DONE, (final, (run_dir / runs.LOG_FILE).read_text()[-3000:])
    config = read_json(run_dir / runs.CONFIG_FILE)
    assert config["model"]["pretrained"] is False and config["schedule"] == "one_cycle"
    n_train = runs.load_events(run_dir, "start")[0]["n_train"]
    for losses in sorted((run_dir / "item_losses").glob("epoch_*.npz")):  # each epoch trained on all but <= 1
        assert len(np.load(losses)["item"]) >= n_train - 1
    at.run()
    assert "Done" in texts(at, "success")


def test_a_new_session_starts_the_form_from_the_selected_run(trained, monkeypatch: pytest.MonkeyPatch) -> None:
    home, dataset, run_dir = trained
    monkeypatch.setenv("LOUPE_HOME", str(home))
    at = open_page(dataset)  # a new browser session (a reload): the newest run is selected
    assert at.session_state["run_id"] == run_dir.name
    expected = form_values(TrainConfig.from_dict(read_json(run_dir / runs.CONFIG_FILE)))
    shown = {w.key: w.value for kind in ("selectbox", "checkbox", "number_input", "text_input")
             for w in getattr(at, kind) if w.key in expected}
    assert shown == {key: expected[key] for key in shown}
    assert (shown["train_size"], shown["train_bs"], shown["train_epochs"]) == (32, 8, 2)  # the run's, not defaults


def test_the_form_and_the_config_are_each_others_inverse() -> None:
    """The form's widgets follow TrainConfig's fields (FORM_FIELDS): a config with every form field changed
    comes back whole from its own widget values."""
    cfg = TrainConfig(
        data=DataConfig(path="/data/set", size=96, batch_size=12, num_workers=2),
        model=ModelConfig(arch="resnet34", pretrained=False, head="linear", dropout=0.25),
        schedule="plateau", epochs=7, freeze_epochs=2, lr=3e-4, pct_start=0.4, optimizer="sgd", weight_decay=0.05,
        label_smoothing=0.1, early_stopping=3, keep_best=True, mixed_precision=False,
    )
    values = form_values(cfg)
    assert set(FORM_FIELDS) <= set(values) and values["train_lr"] == "0.0003" and values["train_workers"] == 2
    assert build_config("/data/set", {}, values | {"init_from": None, "extra_train": []}) == cfg
    auto = build_config("/data/set", {}, form_values(TrainConfig()) | {"train_workers": "auto"})
    assert auto.data.num_workers is None
    with pytest.raises(ValueError, match="Learning rate"):
        build_config("/data/set", {}, values | {"train_lr": "fast"})


def test_the_caption_tells_a_split_the_folders_fix(home: Path, write_image) -> None:
    for side, n in (("train", 6), ("val", 3)):
        for i in range(n):
            for k, label in enumerate(("cat", "dog")):
                write_image(home / "split" / side / label / f"{i}.png", colour=(200 * k, 90, 40), size=32)
    at = open_page(home / "split")
    caption = next(c.value for c in at.caption if c.value.startswith("Dataset"))
    assert "train/ and valid/ folders fix the split" in caption and "seed" not in caption


def test_train_launches_a_background_run_and_the_page_follows_it(home: Path, demo_dataset: Path, background) -> None:
    at = open_page(demo_dataset)
    set_form(at, **TINY)
    at.button(key="train_start").click().run()
    assert not at.exception, at.exception
    [run_dir] = run_dirs()
    background.append(run_dir)
    assert runs.status(run_dir)["state"] in (runs.QUEUED, runs.RUNNING, runs.DONE)
    assert at.session_state["run_id"] == run_dir.name
    assert run_dir.name in texts(at, "markdown")
    final = runs.wait(run_dir, timeout=120)
    assert final["state"] == runs.DONE, final
    at.run()
    assert not at.exception, at.exception
    assert "Done" in texts(at, "success")


def test_stop_ends_a_running_run_and_resume_is_offered(home: Path, demo_dataset: Path, background) -> None:
    at = open_page(demo_dataset)
    set_form(at, **{**TINY, "train_epochs": 500})
    at.button(key="train_start").click().run()
    [run_dir] = run_dirs()
    background.append(run_dir)
    deadline = time.monotonic() + 120
    while not runs.load_events(run_dir, "batch") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert runs.status(run_dir)["state"] == runs.RUNNING
    at.run()
    assert at.button(key="train_stop")
    assert "running" in texts(at, "markdown")
    at.button(key="train_stop").click().run()
    assert not at.exception, at.exception
    assert (run_dir / runs.STOP_FILE).exists() or runs.status(run_dir)["state"] == runs.STOPPED
    final = runs.wait(run_dir, timeout=60)
    assert final["state"] == runs.STOPPED, final
    at.run()
    assert "Stopped" in texts(at, "warning")
    assert at.button(key="train_resume")


def test_a_finished_run_shows_its_curves_table_and_hardest_images(trained, monkeypatch: pytest.MonkeyPatch) -> None:
    home, dataset, run_dir = trained
    monkeypatch.setenv("LOUPE_HOME", str(home))
    at = open_page(dataset, run_dir.name)
    assert len(at.get("plotly_chart")) >= 2  # loss curves and the schedule
    assert len(at.dataframe) >= 1
    assert list(at.dataframe[0].value["epoch"]) == [1, 2]  # counted from 1 for people (from 0 in the events)
    assert "**Hardest training images** · epoch 2" in texts(at, "markdown")
    traces = [t for c in at.get("plotly_chart") for t in json.loads(c.proto.spec)["data"]]
    assert next(t["text"] for t in traces if t.get("name") == "valid (epoch)") == ["epoch 1", "epoch 2"]
    assert "Done" in texts(at, "success")
    sides = Counter(item["split"] for item in read_json(run_dir / DATASET_RECORD_FILE)["items"])
    split = f"random 20% split per class, seed 42: {sides['train']} train · {sides['valid']} valid"
    assert split in texts(at, "caption")  # the split the run used, from its dataset record
    assert len(at.get("image")) >= 1  # hardest training images of the last epoch
    assert not any(b.key == "train_stop" for b in at.button)


def test_a_failed_run_shows_its_error(home: Path, demo_dataset: Path, tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    run_dir = train_in_process(tiny_config(gone))
    assert runs.status(run_dir)["state"] == runs.FAILED
    at = open_page(demo_dataset, run_dir.name)
    assert "No images found" in texts(at, "error")
    assert any(e.label == "Traceback" for e in at.expander)


def test_lr_finder_says_how_long_it_takes_runs_in_the_background_and_its_suggestion_sets_the_rate(
        home: Path, tmp_path: Path, background) -> None:
    shapes = make_demo_dataset(tmp_path / "shapes", DemoSpec(n_per_class=30, size=16, seed=1))  # a curve that falls
    at = open_page(shapes)
    set_form(at, **{**TINY, "train_size": 16})
    assert "a sweep takes about" in texts(at, "caption")  # said before it starts
    at.button(key="train_find_lr").click().run()
    assert not at.exception, at.exception
    [run_dir] = run_dirs()
    background.append(run_dir)
    assert at.session_state["train_lr_find_run"] == run_dir.name
    final = runs.wait(run_dir, timeout=120)
    assert final["state"] == runs.DONE, final
    at.run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) >= 1
    result = load_lr_find(run_dir)
    assert len(result.lrs) < result.planned and "Stopped after" in texts(at, "caption")
    name, lr = next(iter(result.suggestions.items()))
    at.button(key=f"train_use_{name}").click().run()
    assert not at.exception, at.exception
    assert at.text_input(key="train_lr").value == f"{lr:.2e}"
    # the lr-find sweep is not mistaken for a training run
    assert "learning-rate sweep" in texts(at, "info")


def test_without_a_dataset_a_live_run_is_still_followed_and_its_dataset_offered(home: Path, demo_dataset: Path,
                                                                                 background) -> None:
    run_dir = runs.create(tiny_config(demo_dataset, epochs=500).to_dict(), root=runs_dir())  # as the CLI makes it
    runs.start(run_dir)
    background.append(run_dir)
    deadline = time.monotonic() + 120
    while not runs.load_events(run_dir, "batch") and time.monotonic() < deadline:
        time.sleep(0.5)
    at = open_page()  # a fresh server and browser: no dataset open, the live run selected
    assert at.session_state["dataset"] is None
    assert run_dir.name in texts(at, "markdown") and "running" in texts(at, "markdown")
    assert at.button(key="train_stop") and not any(b.key == "train_start" for b in at.button)
    at.button(key="train_open_run_dataset").click().run()  # "Open `demo`, the dataset of run ..."
    assert not at.exception, at.exception
    assert Path(at.session_state["dataset"]) == demo_dataset.resolve()
    assert at.button(key="train_start") and run_dir.name in texts(at, "markdown")


def test_feedback_images_and_continuing_from_a_finished_run(trained, tmp_path: Path, monkeypatch, background,
                                                            write_image) -> None:
    _, dataset, finished = trained
    home = tmp_path / "home"  # a workspace of its own, holding the finished run, so new runs stay out of `trained`
    (home / "runs").mkdir(parents=True)
    (home / "runs" / finished.name).symlink_to(finished, target_is_directory=True)
    monkeypatch.setenv("LOUPE_HOME", str(home))
    monkeypatch.setenv(*ONE_THREAD)
    for i in range(3):
        write_image(home / "feedback" / "circle" / f"fb{i}.png", colour=(230, 80 + i, 60), size=32)
    write_image(home / "feedback" / "hexagon" / "fb.png", colour=(90, 90, 90), size=32)
    at = open_page(dataset, finished.name)
    assert "4 feedback images: circle 3, hexagon 1" in texts(at, "caption")
    set_form(at, train_feedback=True, train_continue=True, train_size=48, train_epochs=1)
    assert "hexagon" in texts(at, "caption")  # a class the dataset lacks is pointed out
    assert at.selectbox(key="train_arch").disabled and at.checkbox(key="train_pretrained").disabled
    assert f"Starts from the model of run `{finished.name}`" in texts(at, "caption")
    at.button(key="train_start").click().run()
    assert not at.exception, at.exception
    [run_dir] = [p for p in run_dirs() if p.name != finished.name]
    background.append(run_dir)
    config = read_json(run_dir / runs.CONFIG_FILE)
    assert Path(config["init_from"]).name == finished.name and config["data"]["size"] == 48
    assert config["data"]["extra_train"] == [str((home / "feedback").resolve())]
    final = runs.wait(run_dir, timeout=300)
    assert final["state"] == runs.DONE, final
    before = runs.load_events(finished, "start")[0]["n_train"]
    assert runs.load_events(run_dir, "start")[0]["n_train"] == before + 4


def test_an_offline_weights_failure_is_told_in_the_pages_words(home: Path, demo_dataset: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("https_proxy", "HTTPS_PROXY"):  # every download fails fast, even on a machine with internet
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    cfg = tiny_config(demo_dataset)
    cfg.model.pretrained = True
    run_dir = train_in_process(cfg)
    assert runs.status(run_dir)["state"] == runs.FAILED
    at = open_page(demo_dataset, run_dir.name)
    error = texts(at, "error")
    assert "**Weights file**" in error and "**Pretrained**" in error
    assert "WeightsUnavailableError" not in error and "weights_path" not in error
