"""Fixtures shared by the test files: real image files written to tmp_path, never mocks."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from core.demo import DemoSpec, make_demo_dataset

WriteImage = Callable[..., Path]

# Tests never write into the repository's ./workspace: every test process gets a workspace of its own
# (tests that need a specific one still set LOUPE_HOME themselves).
os.environ.setdefault("LOUPE_HOME", tempfile.mkdtemp(prefix="loupe-tests-"))


def write_solid_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> Path:
    """A `size`x`size` image of one colour at `path`; the format follows the extension (.JPG works)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


@pytest.fixture
def write_image() -> WriteImage:
    """The solid-colour image writer, as a fixture so test files need not import conftest."""
    return write_solid_image


@pytest.fixture
def demo_dataset(tmp_path: Path) -> Path:
    """A small demo dataset (3 shape classes x 8 images of 16 px, one folder per class) in tmp_path."""
    return make_demo_dataset(tmp_path / "demo", DemoSpec(n_per_class=8, size=16, seed=0))
