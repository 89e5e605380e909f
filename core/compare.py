"""Before and after cleaning: the run a retrain started from and the retrained run, on the same images.

Both runs' validation tables are matched by file (a file the cleaner moved is followed to where it is now,
one it deleted drops out), and both models are scored against the labels as they are now, the cleaned ones:
what the cleaning bought, on images neither model trained on. Single-label runs only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.cleanlog import DELETE
from core.interpret import confusion_matrix, is_multi_label


@dataclass(frozen=True)
class BeforeAfter:
    """Both models on the validation images the two runs share, against the cleaned labels."""

    n_images: int  # validation images of both runs
    n_valid_before: int  # the old run's validation images still in the dataset
    error_before: float
    error_after: float
    confusion_before: np.ndarray  # [C, C], rows = label now, columns = predicted
    confusion_after: np.ndarray
    vocab: list[str]


def before_after(before: pd.DataFrame, after: pd.DataFrame, moved: dict[Path, dict]) -> BeforeAfter | None:
    """Compare two runs' validation item tables (core.interpret.item_table) on the files both hold out.

    `moved` is the cleaner's map of original path -> log entry with "action" and "now" (core.cleanrun.handled_in).
    None when a table is multi-label, the classes differ, or the runs share no validation image."""
    if is_multi_label(before) or is_multi_label(after) or list(before.attrs["vocab"]) != list(after.attrs["vocab"]):
        return None
    vocab = list(after.attrs["vocab"])
    now = [_where_now(Path(f), moved) for f in before["file"]]
    old = before.assign(file=[str(p) if p else "" for p in now])
    old = old[old["file"] != ""]
    labels_now = after.set_index("file")["actual"]
    shared = old[old["file"].isin(labels_now.index)].copy()
    if shared.empty:
        return None
    shared["actual"] = labels_now.loc[shared["file"]].to_numpy()
    new = after[after["file"].isin(shared["file"])]
    shared.attrs, new.attrs = after.attrs, after.attrs
    return BeforeAfter(
        n_images=len(shared),
        n_valid_before=len(old),
        error_before=float((shared["predicted"] != shared["actual"]).mean()),
        error_after=float((new["predicted"] != new["actual"]).mean()),
        confusion_before=confusion_matrix(shared, vocab),
        confusion_after=confusion_matrix(new, vocab),
        vocab=vocab,
    )


def _where_now(file: Path, moved: dict[Path, dict]) -> Path | None:
    entry = moved.get(file)
    if entry is None:
        return file
    return None if entry.get("action") == DELETE else Path(entry["now"])
