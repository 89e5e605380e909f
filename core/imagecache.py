"""Decode once: every image becomes a presized uint8 square the first time it is used, then is read back.

Entries live on disk under <workspace>/cache/decoded/<side>/ (one small .npy per image, keyed by the
file's path, size and modification time, so an edited or replaced file gets a fresh entry and a deleted
one is simply never read) and, within a process, in memory up to a budget. Later epochs, later runs, the
LR finder and interpretation skip JPEG decoding; the warm-up decodes in parallel threads.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from core.augment import PRESIZE_VERSION, presize
from core.env import workspace_dir
from core.fileio import atomic_write, file_version_key
from core.images import DEFAULT_MAX_PIXELS, open_image

MEMORY_BUDGET = 2 * 2**30  # bytes of decoded images kept in this process's memory


def cache_root() -> Path:
    return workspace_dir() / "cache" / "decoded"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


class DecodedImages:
    """Presized uint8 [3, side, side] arrays for a list of files, decoded at most once per file version."""

    def __init__(
        self, files: Sequence[Path], side: int, root: Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
    ):
        self.files, self.side, self.max_pixels = list(files), side, max_pixels
        self.folder = (root or cache_root()) / str(side)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.memory: dict[int, np.ndarray] = {}
        self.budget = MEMORY_BUDGET // (3 * side * side)  # how many entries fit in memory

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        """The decoded image i; raises OSError/ValueError when the file is gone or cannot be decoded."""
        if i in self.memory:
            return self.memory[i]
        path = self.files[i]
        entry = self.folder / f"{file_version_key(path, (self.side, PRESIZE_VERSION))}.npy"
        try:
            array = np.load(entry, allow_pickle=False)
        except (FileNotFoundError, ValueError, EOFError):
            array = presize(open_image(path, self.max_pixels, draft=self.side), self.side)
            atomic_write(entry, lambda tmp: _save_npy(tmp, array))
        if len(self.memory) < self.budget:
            self.memory[i] = array
        return array

    def warm(self, workers: int | None = None, on_progress: Callable[[int, int], None] | None = None) -> list[int]:
        """Decode every file not cached yet, in parallel; returns the indices that failed to decode."""
        failed, done = [], 0
        workers = workers or min(8, (os.cpu_count() or 1) * 2)

        def load(i: int) -> int | None:
            try:
                self[i]
            except (OSError, ValueError):
                return i
            return None

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(load, range(len(self))):
                done += 1
                if result is not None:
                    failed.append(result)
                if on_progress and (done % 64 == 0 or done == len(self)):
                    on_progress(done, len(self))
        return failed


def cache_size_bytes(root: Path | None = None) -> int:
    """Disk space the decoded-image cache uses, for the app to show."""
    base = root or cache_root()
    return sum(f.stat().st_size for f in base.rglob("*.npy")) if base.exists() else 0


def clear_cache(root: Path | None = None) -> None:
    shutil.rmtree(root or cache_root(), ignore_errors=True)
