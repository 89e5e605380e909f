"""CSV files for people: every table Loupe offers as a CSV download goes through `csv_for_people`.

A spreadsheet runs a cell that starts with `=`, `+`, `-` or `@` as a formula (and a leading tab or carriage
return can hide one), so a file named `=cmd|' -c calc'!A0.png` or a class folder named `=HYPERLINK(...)`
would run when the CSV is opened. Such text cells get a leading apostrophe, OWASP's advice against CSV
injection: the spreadsheet shows the text as it is and runs nothing. Numbers are left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import pandas as pd

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: object) -> object:
    """`value`, with a leading ' when it is text a spreadsheet would read as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_for_people(table: pd.DataFrame, float_format: str | None = None) -> bytes:
    """`table` as UTF-8 CSV bytes without its index, every text cell and column name spreadsheet-safe."""
    safe = table.rename(columns=spreadsheet_safe)
    for column in safe.columns:
        if not pd.api.types.is_numeric_dtype(safe[column]):
            safe[column] = safe[column].map(spreadsheet_safe)
    # CRLF line ends (RFC 4180, what spreadsheets expect) also make the writer quote a cell holding a lone \r.
    return safe.to_csv(index=False, float_format=float_format, lineterminator="\r\n").encode("utf-8")


def predictions_csv(vocab: Sequence[str], probs: Sequence[Sequence[float]], table: pd.DataFrame) -> bytes:
    """Predict's CSV: file, prediction, probability (from the page's `table`), then each class's probability."""
    csv = table[["file", "prediction", "probability"]].copy()
    for i, cls in enumerate(vocab):
        csv[f"prob_{cls}"] = [p[i] for p in probs]
    return csv_for_people(csv, float_format="%.6f")  # file and class names may start with "=": never a formula


def clean_log_table(log: list[dict]) -> pd.DataFrame:
    """The cleaner's change log (core.cleanrun.log_table) as the Clean page shows it and offers it as a CSV."""
    frame = pd.DataFrame(log)
    frame["time"] = [datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") for t in frame["time"]]
    cols = [c for c in ("time", "batch", "action", "source", "target", "new_label", "size", "sha256") if c in frame]
    return frame[cols]
