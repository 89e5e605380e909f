"""The items and labels of a dataset folder, in whichever of the four layouts it uses (see `detect_layout`):
  folders         root/<class>/*.jpg                     (Loupe makes the validation split)
  split_folders   root/train/<class>, root/valid|val/<class>, optional root/test/<class>
  filename_regex  root/great_pyrenees_173.jpg            (label = first group of `label_regex`)
  csv             root/labels.csv with filename,label(s) (space-separated labels mean multi-label)
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.config import DataConfig
from core.images import DataError
from core.listing import is_image_file, iter_images, list_images

LAYOUT_NAMES = {
    "folders": "one folder per class",
    "split_folders": "train/valid folders, one subfolder per class",
    "filename_regex": "labels in file names",
    "csv": "labels in a CSV file",
}
VALID_DIR_NAMES = ("valid", "val", "validation")
MAX_LISTED = 1000  # CSV rows naming files that are not there: this many are listed, the rest only counted


@dataclass
class DataSource:
    """The items of a dataset: one file and its label(s) each, before any split."""

    root: Path
    layout: str
    files: list[Path]  # absolute paths
    labels: list[tuple[str, ...]]  # one label each, or several for multi-label
    vocab: list[str]  # sorted class names
    multi_label: bool
    fixed_split: list[str] | None = None  # "train" / "valid" / "test" per item when the layout says
    groups: list[str] | None = None  # group key per item (CSV group column)
    unlabelled: list[tuple[Path, str]] = field(default_factory=list)  # (file, why it has no label)
    unlisted: int = 0  # more files without a label than `unlabelled` lists: counted only (a CSV can name millions)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def n_unlabelled(self) -> int:
        return len(self.unlabelled) + self.unlisted

    def describe(self) -> str:
        kind = "multi-label, " if self.multi_label else ""
        return f"{LAYOUT_NAMES[self.layout]} ({kind}{len(self.vocab)} classes, {len(self)} images)"

    def class_counts(self) -> dict[str, int]:
        counts = Counter(label for labels in self.labels for label in labels)
        return {c: counts.get(c, 0) for c in self.vocab}

    def without(self, drop: set[Path]) -> DataSource:
        """The same source minus the files in `drop` (e.g. those `verify_images` found broken)."""
        keep = [i for i, f in enumerate(self.files) if f not in drop]

        def pick(xs: list | None) -> list | None:
            return None if xs is None else [xs[i] for i in keep]

        labels = pick(self.labels)
        present = {label for ls in labels for label in ls}
        return replace(
            self,
            files=pick(self.files),
            labels=labels,
            vocab=[c for c in self.vocab if c in present],
            fixed_split=pick(self.fixed_split),
            groups=pick(self.groups),
        )

    def targets(self) -> torch.Tensor:
        """Class indices (single-label) or a multi-hot float matrix (multi-label)."""
        index = {c: i for i, c in enumerate(self.vocab)}
        if not self.multi_label:
            return torch.tensor([index[ls[0]] for ls in self.labels], dtype=torch.long)
        hot = torch.zeros(len(self), len(self.vocab))
        for row, labels in enumerate(self.labels):
            hot[row, [index[c] for c in labels]] = 1.0
        return hot


# ---------------------------------------------------------------- finding the layout


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, symlinks resolved, lies in `root` (resolved): a link leaving the dataset is skipped."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def _subdirs(folder: Path, root: Path) -> list[Path]:
    """The visible subfolders of `folder`, leaving out symlinks to folders outside `root`."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and _inside(p, root))


def _find_csv(root: Path) -> Path | None:
    csvs = [p for p in root.glob("*.csv") if not p.name.startswith(".") and _inside(p, root)]
    return csvs[0] if len(csvs) == 1 else None


def dataset_root(cfg: DataConfig) -> Path:
    """`cfg.path` with `~` expanded; DataError when it names no folder (a `~user` this machine lacks included)."""
    try:
        root = Path(cfg.path).expanduser()
    except RuntimeError:  # "Could not determine home directory."
        raise DataError(f"Dataset folder {cfg.path!r} starts with a home folder this machine does not have.") from None
    if not root.is_dir():
        raise DataError(f"Dataset folder {str(root)!r} does not exist or is not a folder.")
    return root


def detect_layout(cfg: DataConfig) -> str:
    """Which of the four layouts `cfg.path` uses (or `cfg.layout` when it is not "auto")."""
    root = dataset_root(cfg)
    if cfg.layout != "auto":
        return cfg.layout
    try:
        if cfg.csv_file or _find_csv(root):
            return "csv"
        names = {d.name.lower() for d in _subdirs(root, root)}
        if "train" in names and names & set(VALID_DIR_NAMES):
            return "split_folders"
        # The loader's own walk, so symlinked folders that leave the dataset are skipped here too.
        resolved = root.resolve()
        if any(f.parent != resolved for f in iter_images(root)):
            return "folders"
        if any(is_image_file(p) for p in root.iterdir()):
            return "filename_regex"
    except OSError as e:
        raise DataError(f"Cannot read the dataset folder {str(root)!r}: {e.strerror or e}.") from None
    raise DataError(f"No images found in {str(root)!r}: expected image files or one folder of images per class.")


# ---------------------------------------------------------------- labelling


def load_source(cfg: DataConfig) -> DataSource:
    """Find every item of the dataset at `cfg.path` with its label(s)."""
    layout = detect_layout(cfg)
    root = dataset_root(cfg).resolve()
    loader = {
        "folders": _load_folders,
        "split_folders": _load_split_folders,
        "filename_regex": _load_filename_regex,
        "csv": _load_csv,
    }[layout]
    source = loader(root, cfg)
    if not source.files:
        raise DataError(f"No labelled images found in {str(root)!r} ({LAYOUT_NAMES[layout]}).")
    return source


def _make_source(root: Path, layout: str, rows: list[tuple], **extra) -> DataSource:
    files = [r[0] for r in rows]
    labels = [r[1] for r in rows]
    vocab = sorted({label for ls in labels for label in ls})
    multi = any(len(ls) != 1 for ls in labels)
    return DataSource(root, layout, files, labels, vocab, multi, **extra)


def _load_folders(root: Path, cfg: DataConfig) -> DataSource:
    # The first folder level names the class, so root/<class>/<any subfolders>/x.jpg all count.
    rows = [(f, (f.relative_to(root).parts[0],)) for f in list_images(root) if len(f.relative_to(root).parts) > 1]
    return _make_source(root, "folders", rows)


def _load_split_folders(root: Path, cfg: DataConfig) -> DataSource:
    split_of = {"train": "train", "test": "test", **{v: "valid" for v in VALID_DIR_NAMES}}
    rows, splits = [], []
    for folder in _subdirs(root, root):
        split = split_of.get(folder.name.lower())
        if split is None:
            continue
        for f in list_images(folder):
            parts = f.relative_to(folder).parts
            if len(parts) > 1:
                rows.append((f, (parts[0],)))
                splits.append(split)
    return _make_source(root, "split_folders", rows, fixed_split=splits)


def _load_filename_regex(root: Path, cfg: DataConfig) -> DataSource:
    pattern = re.compile(cfg.label_regex)
    rows, unlabelled = [], []
    for f in list_images(root):
        match = pattern.search(f.name)
        if match:
            rows.append((f, (match.group(1) if pattern.groups else match.group(0),)))
        else:
            unlabelled.append((f, f"file name does not match {cfg.label_regex!r}"))
    return _make_source(root, "filename_regex", rows, unlabelled=unlabelled)


def _load_csv(root: Path, cfg: DataConfig) -> DataSource:
    csv_path = root / cfg.csv_file if cfg.csv_file else _find_csv(root)
    if csv_path is None or not csv_path.is_file():
        raise DataError(f"CSV file {str(csv_path)!r} not found.")
    if not _inside(csv_path, root):
        raise DataError(f"CSV file {cfg.csv_file!r} lies outside the dataset folder {str(root)!r}.")
    table = read_labels_csv(csv_path, cfg)
    paths = _csv_paths(table["file"].str.strip(), _index_files(csv_path.parent))
    missing = np.flatnonzero(paths.isna())
    unlabelled = [(csv_path.parent / table["file"].iat[i].strip(), "listed in the CSV but not found")
                  for i in missing[:MAX_LISTED]]
    rows, groups, splits = [], [], []
    found = table[paths.notna()]  # the loop below runs once per file on disk, not once per row of the CSV
    for path, text, group, valid in zip(paths[paths.notna()], found["labels"], found["group"], found["is_valid"]):
        labels = tuple(x for x in text.split(cfg.label_delim or None) if x)
        if not labels:
            unlabelled.append((path, "no label in the CSV"))
            continue
        rows.append((path, labels))
        groups.append(group)
        splits.append("valid" if valid.strip().lower() in ("1", "true", "yes") else "train")
    return _make_source(
        root,
        "csv",
        rows,
        groups=groups if cfg.group_col else None,
        fixed_split=splits if "is_valid" in table.attrs["columns"] else None,  # fastai's convention
        unlabelled=unlabelled,
        unlisted=max(0, len(missing) - MAX_LISTED),
    )


def _csv_paths(names: pd.Series, by_name: dict[str, Path]) -> pd.Series:
    """The file each CSV name stands for (None where there is none), found without a Python loop over the rows."""
    paths = pd.Series(None, index=names.index, dtype=object)
    # Arrow strings cannot hold a non-UTF-8 file name, and no name read from a UTF-8 CSV can match one anyway.
    hit = names.isin([name for name in by_name if _is_utf8(name)])
    paths[hit] = names[hit].map(by_name)
    # Path spells "./a.jpg" and "a//b.jpg" as the index does; only such names need it.
    for i in np.flatnonzero(~hit & names.str.contains(r"\./|//")):
        paths.iat[i] = by_name.get(Path(names.iat[i]).as_posix())
    return paths


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: a file name that was not UTF-8 on disk
        return False
    return True


def read_labels_csv(csv_path: Path, cfg: DataConfig) -> pd.DataFrame:
    """The columns Loupe uses from a labels CSV, as text: file, labels, group and is_valid ("" where the CSV has
    no such column); `attrs["columns"]` holds the CSV's own column names. DataError, naming the line, for a file
    that cannot be read as CSV (uneven rows, bytes that are not UTF-8, no header).

    Only the needed columns are read, by pyarrow's multithreaded parser: two million rows take seconds, not minutes.
    """
    columns = _csv_header(csv_path)
    if len(columns) < 2:
        raise DataError(f"{csv_path.name} needs at least two columns: file name and label(s).")
    wanted = {"file": cfg.csv_fname_col or columns[0], "labels": cfg.csv_label_col or columns[1],
              "group": cfg.group_col, "is_valid": "is_valid" if "is_valid" in columns else None}
    for col in wanted.values():
        if col and col not in columns:
            raise DataError(f"{csv_path.name} has no column {col!r}; its columns are {columns}.")
    used = sorted({col for col in wanted.values() if col})
    try:
        read = pd.read_csv(csv_path, usecols=used, dtype=str, keep_default_na=False, engine="pyarrow")
    except (ValueError, OSError) as e:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise DataError(f"{csv_path.name} cannot be read: {_csv_problem(csv_path, len(columns), e)}") from None
    table = pd.DataFrame({key: read[col] if col else "" for key, col in wanted.items()}, index=range(len(read)))
    table.attrs["columns"] = columns
    return table


def _csv_header(csv_path: Path) -> list[str]:
    """The column names on the CSV's first line (a UTF-8 byte-order mark, as Excel writes, is allowed)."""
    try:
        with open(csv_path, "rb") as f:
            first = f.readline().decode("utf-8-sig")  # bytes first: a text reader decodes far beyond line 1
        header = next(csv.reader([first]), None)
    except UnicodeDecodeError:
        raise DataError(f"{csv_path.name} cannot be read: line 1 is not UTF-8 text. Save the file as UTF-8 "
                        "(in Excel: CSV UTF-8).") from None
    except (OSError, csv.Error) as e:
        raise DataError(f"{csv_path.name} cannot be read: {e}.") from None
    if not header:
        raise DataError(f"{csv_path.name} is empty: it needs a header line (file name, label) and one line per image.")
    return header


def _csv_problem(csv_path: Path, width: int, error: Exception) -> str:
    """Where the CSV goes wrong, for someone fixing it in an editor: the first line that is not UTF-8 or
    that has the wrong number of fields. Read line by line, only once a parse has failed."""
    with open(csv_path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return f"line {number} is not UTF-8 text. Save the file as UTF-8 (in Excel: CSV UTF-8)."
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, strict=True)
        try:
            for row in reader:
                if row and len(row) != width:
                    return f"line {reader.line_num} has {len(row)} fields, but the header line has {width}."
        except csv.Error as e:
            return f"line {reader.line_num}: {e}."
    return f"{error}."


def _index_files(base: Path) -> dict[str, Path]:
    """Map relative paths, with and without extension, to files; CSVs often omit the extension (Planet)."""
    index: dict[str, Path] = {}
    for f in list_images(base):
        rel = f.relative_to(base).as_posix()
        index[rel] = f
        index.setdefault(rel.rsplit(".", 1)[0], f)
        index.setdefault(f.name, f)
        index.setdefault(f.stem, f)
    return index


def split_fixed_by(cfg: DataConfig) -> str | None:
    """Why the dataset at `cfg.path` fixes its own split (so valid_pct, seed, stratify and group_regex do not
    apply), in words for the user; None when Loupe makes the split. Reads folder names and a CSV header only."""
    try:
        layout = detect_layout(cfg)
    except DataError:
        return None
    if layout == "split_folders":
        return "its train/ and valid/ folders fix the split"
    if layout == "csv":
        root = dataset_root(cfg)
        csv_path = root / cfg.csv_file if cfg.csv_file else _find_csv(root)
        try:
            columns = _csv_header(csv_path) if csv_path else []
        except DataError:  # loading the dataset says what is wrong with the CSV
            return None
        if "is_valid" in columns:
            return "the is_valid column of its CSV fixes the split"
    return None
