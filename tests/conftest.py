"""Fixtures shared by the test files: real image files written to tmp_path, never mocks."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from core import runs
from core.data import DataConfig
from core.demo import DemoSpec, make_demo_dataset
from core.job import run_training
from core.model import ModelConfig
from core.train import TrainConfig

WriteImage = Callable[..., Path]

# Tests never write into the repository's ./workspace: every test process gets a workspace of its own
# (tests that need a specific one still set LOUPE_HOME themselves).
os.environ.setdefault("LOUPE_HOME", tempfile.mkdtemp(prefix="loupe-tests-"))


def write_solid_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> Path:
    """A `size`x`size` image of one colour at `path`; the format follows the extension (.JPG works)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models train as fast on one thread, and far faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty workspace (LOUPE_HOME) for the test; files whose tests need more in it define their own."""
    workspace = tmp_path / "workspace"
    monkeypatch.setenv("LOUPE_HOME", str(workspace))
    return workspace


@pytest.fixture
def write_image() -> WriteImage:
    """The solid-colour image writer, as a fixture so test files need not import conftest."""
    return write_solid_image


@pytest.fixture
def demo_dataset(tmp_path: Path) -> Path:
    """A small demo dataset (3 shape classes x 8 images of 16 px, one folder per class) in tmp_path."""
    return make_demo_dataset(tmp_path / "demo", DemoSpec(n_per_class=8, size=16, seed=0))


def tiny_config(dataset: Path, data: dict | None = None, **train) -> TrainConfig:
    """resnet18 from scratch at 32 px, one one-cycle epoch: a real run that takes seconds on a CPU."""
    data_options = {"size": 32, "batch_size": 8, "num_workers": 0, "max_rotate": 0, "min_scale": 0.75} | (data or {})
    settings = {"schedule": "one_cycle", "epochs": 1, "lr": 1e-2} | train
    return TrainConfig(
        data=DataConfig(path=str(dataset), **data_options),
        model=ModelConfig(arch="resnet18", pretrained=False),
        **settings,
    )


def train_tiny_run(cfg: TrainConfig, runs_root: Path) -> Path:
    """Create a run for `cfg` under `runs_root` and train it in this process, as the background job would."""
    run_dir = runs.create(cfg.to_dict(), root=runs_root)
    assert run_training(run_dir) == 0
    return run_dir


def open_app_page(page: str, timeout: float = 120) -> AppTest:
    """The real app (app.py and its navigation) switched to `page`, rendered without an exception."""
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=timeout)
    at.run()
    at.switch_page(page)
    at.run()
    assert not at.exception, at.exception
    return at


def failed_after(good_run: Path, workspace: Path) -> Path:
    """A workspace whose runs are `good_run` (linked, not copied) and, newer, a run that failed; returns the latter."""
    (workspace / "runs").mkdir(parents=True)
    (workspace / "runs" / good_run.name).symlink_to(good_run, target_is_directory=True)
    failed = runs.create(tiny_config(workspace).to_dict(), root=workspace / "runs", name_hint="broken")
    runs.mark_finished(failed, runs.FAILED, error="RuntimeError: out of luck")
    return failed


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}
# (true class, index) -> the wrong class folder the image is planted in
FLIPS = {("red", 0): "green", ("green", 1): "blue", ("blue", 2): "red", ("red", 3): "blue"}


def write_colours(root: Path, n: int, size: int = 16, flips: dict | None = None, seed: int = 0) -> list[str]:
    """n noisy solid-colour images per class in root/<class>/, named <true class>_<i>.png; returns the planted
    flips (relative paths): only the colour decides the class, so a model that never saw a flip calls it out."""
    rng = np.random.default_rng(seed)
    flips = FLIPS if flips is None else flips
    planted = []
    for name, rgb in COLOURS.items():
        for i in range(n):
            label = flips.get((name, i), name)
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            path = root / label / f"{name}_{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            if label != name:
                planted.append(path.relative_to(root).as_posix())
    return sorted(planted)


def check_config(data: Path, **train) -> TrainConfig:
    """resnet18 from scratch at 16 px, no augmentation: colour alone decides, learnt in a few epochs."""
    settings = {"schedule": "one_cycle", "epochs": 4, "lr": 3e-3} | train
    return TrainConfig(
        data=DataConfig(path=str(data), size=16, batch_size=16, num_workers=0, min_scale=1.0, flip=False,
                        max_rotate=0.0, max_lighting=0.0),
        model=ModelConfig(arch="resnet18", pretrained=False),
        **settings,
    )
