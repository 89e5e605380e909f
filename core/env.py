"""Where things run and where things live: the one place that resolves device, seed and workspace paths."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
MIN_FREE_MB_ENV = "LOUPE_MIN_FREE_MB"
DEFAULT_MIN_FREE_MB = 500  # checkpoints, the bundle and the tables of a resnet34 run stay well below this


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a device name into a torch.device; "auto" prefers CUDA, then Apple's MPS, then the CPU."""
    import torch  # here, not at the top: paths and limits (uploads, the Data page's checks) need no torch

    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise ValueError(f"Unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}.")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA was asked for but no CUDA GPU is visible to PyTorch.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("MPS was asked for but this machine has no Apple GPU available to PyTorch.")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """A one-line human description, e.g. 'NVIDIA H100 (79 GB)' or 'CPU (2 threads)'."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GB)"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU ({torch.get_num_threads()} threads)"


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch.Generator seeded the same for samplers and splits."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def workspace_dir() -> Path:
    """Root for runs, caches, uploads and the demo dataset: $LOUPE_HOME, else ./workspace."""
    root = Path(os.environ.get("LOUPE_HOME", "workspace")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def allowed_data_roots() -> list[Path] | None:
    """The folders a served Loupe may read datasets from: $LOUPE_DATA_ROOTS (os.pathsep-separated), resolved.

    Unset means no restriction (one person running Loupe on their own machine). Set, even to an empty
    string, it restricts: an empty list leaves only the workspace (see check_data_path).
    """
    raw = os.environ.get("LOUPE_DATA_ROOTS")
    if raw is None:
        return None
    return [Path(part.strip()).expanduser().resolve() for part in raw.split(os.pathsep) if part.strip()]


def check_data_path(path: str | os.PathLike) -> Path:
    """`path` resolved (symlinks followed), or ValueError when it lies outside every allowed root.

    The workspace (uploads, the demo, feedback) is always allowed. Resolving first means neither `..`
    nor a symlink inside an allowed root can lead out of it.
    """
    try:
        resolved = Path(path).expanduser().resolve()
    except RuntimeError:  # "Could not determine home directory." (~nosuchuser), or a symlink loop
        raise ValueError(f"`{path}` cannot be opened: it starts with a home folder this machine does not have, "
                         "or it goes round a loop of symbolic links.") from None
    roots = allowed_data_roots()
    if roots is None:
        return resolved
    roots = [*roots, workspace_dir()]
    if any(resolved.is_relative_to(root) for root in roots):
        return resolved
    allowed = ", ".join(f"`{root}`" for root in roots)
    raise ValueError(f"`{path}` is outside the folders this server may read: {allowed}.")


def min_free_mb() -> float:
    """Free space, in MB, the workspace's disk must keep: a run needs it to start, and an unpacked upload may
    not eat into it ($LOUPE_MIN_FREE_MB, else 500)."""
    value = os.environ.get(MIN_FREE_MB_ENV, "")
    try:
        return float(value) if value.strip() else DEFAULT_MIN_FREE_MB
    except ValueError:
        raise ValueError(f"{MIN_FREE_MB_ENV} must be a number of megabytes, not {value!r}.") from None


def runs_dir() -> Path:
    """Where run directories are created: <workspace>/runs."""
    path = workspace_dir() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_num_workers() -> int:
    """DataLoader workers: leave one core for the main process, at most 8; 0 on a single-core machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))
