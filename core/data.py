"""From a folder on disk to DataLoaders: find items and labels, verify images, split, transform, load.

Four layouts are detected (see `detect_layout`):
  folders         root/<class>/*.jpg                     (Loupe makes the validation split)
  split_folders   root/train/<class>, root/valid|val/<class>, optional root/test/<class>
  filename_regex  root/great_pyrenees_173.jpg            (label = first group of `label_regex`)
  csv             root/labels.csv with filename,label(s) (space-separated labels mean multi-label)
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from core.augment import presize_side
from core.config import (  # defined there, torch-free; re-exported here
    LAYOUTS as LAYOUTS,
)
from core.config import (
    MAX_SIZE as MAX_SIZE,
)
from core.config import (
    MIN_SIZE as MIN_SIZE,
)
from core.config import (
    PETS_REGEX as PETS_REGEX,
)
from core.config import (
    DataConfig as DataConfig,
)
from core.env import default_num_workers
from core.imagecache import DecodedImages
from core.images import DEFAULT_MAX_PIXELS, BadImage, DataError, verify_images

# .heic/.heif are listed although Pillow cannot read them, so they are reported with the reason
# (core.images.HEIF_REASON) instead of vanishing from the dataset without a word.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic", ".heif"})
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
        pick = lambda xs: None if xs is None else [xs[i] for i in keep]
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


# ---------------------------------------------------------------- finding files


def path_text(path: str | os.PathLike) -> str:
    """`path` as text that is valid UTF-8, for tables, logs and pages.

    A file name that is not valid UTF-8 (from an old zip or another OS) reaches Python with its bad bytes
    as lone surrogates; Arrow strings (pandas' default), protobuf and a UTF-8 stdout all refuse those, so
    they are shown as backslash escapes (`bad\\xff.png`). Every other path comes back unchanged.
    JSON needs no such care: json.dumps escapes surrogates and json.loads restores them exactly.
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under `root`, sorted; hidden files and folders skipped.

    Symlinks are followed only where they resolve inside `root`, so a dataset cannot
    pull in files from elsewhere on the machine, and link cycles are visited once.
    """
    return sorted(iter_images(root))


def iter_images(root: str | os.PathLike) -> Iterator[Path]:
    """The image files of `list_images`, unsorted and one at a time: asking whether there is any stops early."""
    for _, files in _walk(root):
        yield from (path for path in files if is_image_file(path))


def listing_signature(root: str | os.PathLike) -> tuple[int, int]:
    """(entries, newest mtime in ns) over the folders `list_images` walks and the files at the top: a key that
    changes whenever the listing may have (adding, removing or renaming a file changes its folder's mtime; a CSV
    edited in place changes its own). Only directory entries are read: a few ms for thousands of images."""
    count, newest = 0, 0
    for folder, files in _walk(root):
        with contextlib.suppress(OSError):
            newest = max(newest, folder.stat().st_mtime_ns)
        count += len(files)
        if folder == Path(root).resolve():
            for path in files:
                with contextlib.suppress(OSError):
                    newest = max(newest, path.stat().st_mtime_ns)
    return count, newest


def _walk(root: str | os.PathLike) -> Iterator[tuple[Path, list[Path]]]:
    """(folder, its visible files) for every folder under `root`, hidden ones skipped. Symlinks are followed only
    where they resolve inside `root` (a dataset cannot pull in files from elsewhere), link cycles once."""
    root = Path(root).resolve()
    seen_dirs: set[Path] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        if folder in seen_dirs:
            continue
        seen_dirs.add(folder)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        files = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(folder, entry.name)
            if entry.is_symlink():
                try:
                    target = path.resolve()
                except (OSError, RuntimeError):  # a link loop (a -> b -> a): Python 3.11 raises RuntimeError
                    continue
                if not target.is_relative_to(root) or not target.exists():
                    continue
                if target.is_dir():
                    stack.append(target)
                else:
                    files.append(path)
            elif entry.is_dir(follow_symlinks=False):
                stack.append(path)
            else:
                files.append(path)
        yield folder, files


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


# ---------------------------------------------------------------- splitting


SIDES = ("train", "valid", "test")


@dataclass
class Split:
    """Item indices of each side of a split."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray = field(default_factory=lambda: np.array([], dtype=int))

    def to_dict(self) -> dict[str, list[int]]:
        return {k: v.tolist() for k, v in asdict(self).items()}

    @classmethod
    def from_sides(cls, sides: Sequence[str]) -> Split:
        """The split that puts item i on side `sides[i]` ("train", "valid" or "test")."""
        array = np.asarray(sides, dtype=object)
        return cls(*(np.flatnonzero(array == side) for side in SIDES))

    def sides(self, n_items: int) -> np.ndarray:
        """The side of each of `n_items` items, the inverse of `from_sides` ("" for an item on none)."""
        array = np.full(n_items, "", dtype=object)
        for side in SIDES:
            array[getattr(self, side)] = side
        return array


def split_items(source: DataSource, cfg: DataConfig) -> Split:
    """Split items into train and valid.

    A split fixed by the layout wins. Otherwise `valid_pct` of the items go to valid, per class when
    `stratify` is on (so small classes are still validated), and whole groups at a time when a group
    key is set (so one photographer's photos never straddle train and valid).
    """
    if source.fixed_split is not None:
        return Split.from_sides(source.fixed_split)
    rng = np.random.default_rng(cfg.seed)
    strata = [ls[0] if len(ls) == 1 else " ".join(sorted(ls)) for ls in source.labels]
    groups = _group_keys(source, cfg)
    if groups is not None:
        valid = _group_split(groups, strata if cfg.stratify else None, cfg.valid_pct, rng)
    elif cfg.stratify:
        valid = _stratified_split(strata, cfg.valid_pct, rng)
    else:
        order = rng.permutation(len(source))
        valid = order[: round(len(source) * cfg.valid_pct)]
    is_valid = np.zeros(len(source), dtype=bool)
    is_valid[valid] = True
    return Split(np.flatnonzero(~is_valid), np.flatnonzero(is_valid))


def _group_keys(source: DataSource, cfg: DataConfig) -> list[str] | None:
    if source.groups is not None:
        return source.groups
    if not cfg.group_regex:
        return None
    pattern = re.compile(cfg.group_regex)
    keys = []
    for f in source.files:
        rel = f.relative_to(source.root).as_posix()
        # The file name too: in root/<class>/alice_1.jpg a regex like ^([a-z]+)_ is meant for "alice_1.jpg".
        match = pattern.search(rel) or pattern.search(f.name)
        # An item the regex does not match is its own group.
        keys.append((match.group(1) if pattern.groups else match.group(0)) if match else rel)
    return keys


def _stratified_split(strata: list[str], valid_pct: float, rng: np.random.Generator) -> np.ndarray:
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(strata):
        by_class[s].append(i)
    valid = []
    for s in sorted(by_class):
        idx = rng.permutation(by_class[s])
        n = round(len(idx) * valid_pct)
        if valid_pct > 0 and len(idx) >= 2:
            n = min(max(n, 1), len(idx) - 1)  # every class on both sides when it has two items
        valid.extend(idx[:n].tolist())
    return np.array(sorted(valid), dtype=int)


def _group_split(groups: list[str], strata: list[str] | None, valid_pct: float, rng: np.random.Generator) -> np.ndarray:
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    keys = list(members)
    keys = [keys[i] for i in rng.permutation(len(keys))]
    # Greedy: a group goes to valid while its majority class is short of its valid quota.
    strata = strata or ["all"] * len(groups)
    quota = {s: n * valid_pct for s, n in Counter(strata).items()}
    taken: Counter = Counter()
    valid: list[int] = []
    for key in keys:
        items = members[key]
        major = Counter(strata[i] for i in items).most_common(1)[0][0]
        if taken[major] + len(items) / 2 < quota[major]:
            valid.extend(items)
            taken.update(strata[i] for i in items)
    if not valid and valid_pct > 0 and len(keys) > 1:
        # Every group is bigger than its quota allows: the smallest one is still better than no validation.
        valid = list(members[min(keys, key=lambda k: len(members[k]))])
    return np.array(sorted(valid), dtype=int)


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


# ---------------------------------------------------------------- defaults that fit the data

SIDE_SAMPLE = 200  # image headers read to judge a dataset's typical image size
MIN_BATCHES_PER_EPOCH = 8  # a small dataset gets a batch size that still gives each epoch this many steps
MIN_SUGGESTED_BATCH = 16  # ...but no smaller: BatchNorm's batch statistics get noisy below about 16 images


@dataclass(frozen=True)
class DataFacts:
    """What a training form needs to know about a dataset to suggest settings; read without decoding images."""

    n_train: int  # items on the training side of the split (files that fail to decode not yet dropped)
    vocab: tuple[str, ...]  # class names
    typical_side: int | None  # median shorter side, in pixels, of a sample of the images (None: none readable)
    split_fixed: str | None  # why the dataset fixes its own split (see `split_fixed_by`), None when Loupe splits


def data_facts(cfg: DataConfig) -> DataFacts:
    """Count, classes, typical image size and split of the dataset `cfg` describes (DataError when unreadable)."""
    source = load_source(cfg)
    n_train = len(split_items(source, cfg).train)
    files = source.files
    if len(files) > SIDE_SAMPLE:  # the same sample every time, spread over all classes
        files = [files[i] for i in sorted(np.random.default_rng(0).choice(len(files), SIDE_SAMPLE, replace=False))]
    sides = [side for side in map(_shorter_side, files) if side]
    typical = int(np.median(sides)) if sides else None
    return DataFacts(n_train, tuple(source.vocab), typical, split_fixed_by(cfg))


def _shorter_side(path: Path) -> int | None:
    """From the file header only (no decode); an EXIF quarter turn swaps the sides, never the shorter one."""
    try:
        with Image.open(path) as img:
            return min(img.size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def suggested_size(typical_side: int | None, default: int = DataConfig.size) -> int:
    """The training size for images of `typical_side` pixels: `default`, or the images' own size when they are
    smaller (upscaling 64-pixel images to 224 adds no detail, only 12 times the compute), in steps of 16."""
    if typical_side is None or typical_side >= default:
        return default
    return max(32, typical_side // 16 * 16)


def suggested_batch_size(n_train: int, default: int = DataConfig.batch_size) -> int:
    """`default`, or, for a small training set, the power of two that still gives an epoch MIN_BATCHES_PER_EPOCH
    steps (96 images at 64 would be 2 steps an epoch, too few for a schedule to warm up and anneal), not below
    MIN_SUGGESTED_BATCH."""
    fit = 1 << max(0, (n_train // MIN_BATCHES_PER_EPOCH).bit_length() - 1)
    return max(MIN_SUGGESTED_BATCH, min(default, fit))


# ---------------------------------------------------------------- datasets and loaders


class ImageDataset(Dataset):
    """Some items of a source; yields (presized uint8 image [3, S, S], target, item index in the source),
    or None for a file that fails to load. Augmentation happens later, on whole batches (core.augment)."""

    def __init__(self, source: DataSource, ids: np.ndarray, side: int, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.images = DecodedImages([source.files[i] for i in ids], side, max_pixels=max_pixels)
        self.targets = source.targets()[torch.as_tensor(ids, dtype=torch.long)]
        self.ids = [int(i) for i in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        try:
            image = self.images[i]
        except (OSError, ValueError, SyntaxError):
            return None  # vanished or changed since it was verified: skipped, and visible as a missing index
        return torch.from_numpy(image), self.targets[i], self.ids[i]


def collate_skipping_failed(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Stack a batch, leaving out items that failed to load; None when all of them failed."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    xs, ys, idx = zip(*batch)
    return torch.stack(xs), torch.stack(ys), torch.tensor(idx)


def shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of `order`: padded by wrapping around to a multiple of world_size, then every
    world_size-th item from `rank`, so every rank gets the same count (DDP hangs when ranks take different
    numbers of steps). The order itself when alone."""
    if world_size == 1:
        return order
    total = -(-len(order) // world_size) * world_size
    padded = order[torch.arange(total) % max(len(order), 1)] if len(order) else order
    return padded[rank::world_size]


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order is a pure function of (seed, epoch), so a resumed run sees the
    same order, and which can skip the batches an interrupted epoch already trained on. Under DDP each rank
    draws its shard (see `shard`) of that same order."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int, skip_batches: int = 0, batch_size: int = 1) -> None:
        self.epoch, self.start = epoch, skip_batches * batch_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        return iter(shard(order, self.rank, self.world_size)[self.start :].tolist())

    def __len__(self) -> int:
        return -(-self.n // self.world_size) - self.start


class ShardSampler(Sampler[int]):
    """Evaluation under DDP: this rank's shard of the items in order, never shuffled (padding repeats a few
    items; gathering drops them again by id)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(shard(torch.arange(self.n), self.rank, self.world_size).tolist())

    def __len__(self) -> int:
        return -(-self.n // self.world_size) if self.n else 0


@dataclass
class DataLoaders:
    """The train and valid loaders of one dataset and split, with what a model needs to know about them."""

    train: DataLoader
    valid: DataLoader
    source: DataSource
    split: Split
    bad: list[BadImage]

    @property
    def vocab(self) -> list[str]:
        return self.source.vocab

    @property
    def n_classes(self) -> int:
        return len(self.source.vocab)

    @property
    def multi_label(self) -> bool:
        return self.source.multi_label


def prepare(cfg: DataConfig) -> tuple[DataSource, list[BadImage], Split]:
    """Label, verify and split the dataset: broken files are dropped and returned with their reasons."""
    source = load_source(cfg)
    bad = verify_images(source.files, cfg.max_pixels)
    source = source.without({b.path for b in bad})
    if not source.files:
        raise DataError(f"Every image in {str(source.root)!r} failed to load; first reason: {bad[0].reason}.")
    split = split_items(source, cfg)
    for folder in cfg.extra_train:
        extra = load_source(DataConfig(path=folder, layout="folders"))
        extra_bad = verify_images(extra.files, cfg.max_pixels)
        source, split = _add_to_train(source, split, extra.without({b.path for b in extra_bad}))
        bad += extra_bad
    return source, bad, split


def _add_to_train(source: DataSource, split: Split, extra: DataSource) -> tuple[DataSource, Split]:
    n = len(source)
    added = np.arange(n, n + len(extra))
    merged = replace(
        source,
        files=source.files + extra.files,
        labels=source.labels + extra.labels,
        vocab=sorted(set(source.vocab) | set(extra.vocab)),
        fixed_split=None if source.fixed_split is None else source.fixed_split + ["train"] * len(extra),
        groups=None if source.groups is None else source.groups + [str(f) for f in extra.files],
    )
    return merged, replace(split, train=np.concatenate([split.train, added]))


def drops_last(n_items: int, batch_size: int) -> bool:
    """Whether an epoch over `n_items` training items leaves out its last, incomplete batch.

    Only when that batch would hold a single image: BatchNorm cannot train on one item (it has no batch
    statistics), while a last batch of two or more is a smaller but sound step. Dropping every incomplete
    batch instead (PyTorch's drop_last) leaves out up to batch_size - 1 images an epoch: a third of a
    96-image dataset at batch 64. This way an epoch leaves out at most one image, a different one each epoch.
    """
    return n_items > 1 and n_items % batch_size == 1


def make_loader(
    source: DataSource,
    ids: np.ndarray,
    cfg: DataConfig,
    train: bool,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader of presized uint8 batches over some items of `source`: shuffled per epoch when `train`.
    With world_size > 1 (DDP) it yields only this rank's shard, the same number of batches on every rank."""
    workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    if train:
        sampler = EpochSampler(len(ids), cfg.seed, rank, world_size)
    else:
        sampler = ShardSampler(len(ids), rank, world_size) if world_size > 1 else None
    per_rank = -(-len(ids) // world_size)
    return DataLoader(
        ImageDataset(source, ids, presize_side(cfg.size), cfg.max_pixels),
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=train and drops_last(per_rank, cfg.batch_size),
        num_workers=workers,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
        collate_fn=collate_skipping_failed,
    )


def make_dataloaders(cfg: DataConfig, device: torch.device | None = None, rank: int = 0, world_size: int = 1) -> DataLoaders:
    """DataLoaders over the verified, split dataset at `cfg.path` (this rank's shards under DDP)."""
    source, bad, split = prepare(cfg)
    if len(source.vocab) < 2 and not source.multi_label:
        raise DataError(f"Found only one class ({source.vocab[0]!r}); a classifier needs at least two.")
    if len(split.train) == 0:
        raise DataError("The split left no training images; lower valid_pct or add images.")
    train = make_loader(source, split.train, cfg, train=True, device=device, rank=rank, world_size=world_size)
    valid = make_loader(source, split.valid, cfg, train=False, device=device, rank=rank, world_size=world_size)
    return DataLoaders(train, valid, source, split, bad)


def split_counts(source: DataSource, split: Split) -> pd.DataFrame:
    """One row per (class, side) with its number of images; multi-label items count once per label."""
    sides = split.sides(len(source))
    rows = [(label, side) for labels, side in zip(source.labels, sides) for label in labels]
    table = pd.DataFrame(rows, columns=["class", "split"]).value_counts().rename("images").reset_index()
    return table


def source_record(source: DataSource, split: Split) -> dict:
    """The items, labels and split of a run as plain JSON, so a run can be interpreted later exactly as it
    was trained even after the dataset folder has been cleaned."""
    return {
        "root": str(source.root),
        "layout": source.layout,
        "vocab": source.vocab,
        "multi_label": source.multi_label,
        "fixed_split": source.fixed_split is not None,  # by the layout (folders, an is_valid column), not Loupe
        "items": [
            {"file": _relative_if_inside(f, source.root), "labels": list(ls), "split": str(sd)}
            for f, ls, sd in zip(source.files, source.labels, split.sides(len(source)))
        ],
    }


def describe_split(record: dict, cfg: DataConfig) -> str:
    """The split a run used, in words, from its dataset record (see `source_record`), e.g. "train/ and val/
    folders: 245 train · 153 valid (38%)". The record is the truth: where the layout fixed the split, the
    config's valid_pct, seed and grouping were never used and must not be reported."""
    items = record["items"]
    counts = Counter(item["split"] for item in items)
    n_train, n_valid, n_test = counts["train"], counts["valid"], counts["test"]
    sizes = f"{n_train} train · {n_valid} valid ({n_valid / max(n_train + n_valid, 1):.0%})"
    sizes += f" · {n_test} test" if n_test else ""
    extra = sum(item["split"] == "train" and Path(item["file"]).is_absolute() for item in items)
    sizes += f", {extra} of the train images from extra folders" if extra else ""
    # Records written before "fixed_split" existed: only the train/valid folder layout could be told apart.
    if not record.get("fixed_split", record.get("layout") == "split_folders"):
        how = f"random {cfg.valid_pct:.0%} split{' per class' if cfg.stratify else ''}, seed {cfg.seed}"
        group = cfg.group_col or cfg.group_regex
        how += f", grouped by `{group}`" if group else ""
        return f"{how}: {sizes}"
    if record.get("layout") != "split_folders":
        return f"the CSV's is_valid column: {sizes}"
    folders = []  # each side's top folder (record paths are POSIX), train first: "train/ and val/ folders"
    for side in SIDES:
        for item in items:
            top = item["file"].split("/")[0]
            if item["split"] == side and not Path(item["file"]).is_absolute() and top not in folders:
                folders.append(top)
    names = [f"{name}/" for name in folders]
    listed = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    return f"{listed} folders: {sizes}"


def _relative_if_inside(path: Path, root: Path) -> str:
    """Relative to the dataset root when inside it (extra training folders are kept absolute)."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def source_from_record(record: dict) -> tuple[DataSource, Split]:
    """Rebuild the DataSource and Split that `source_record` saved. Item indices stay exactly as they were
    (per-item losses refer to them); a file deleted since is kept in the list and skipped when loaded."""
    root = Path(record["root"])
    items = record["items"]
    source = DataSource(
        root=root,
        layout=record["layout"],
        files=[root / it["file"] for it in items],
        labels=[tuple(it["labels"]) for it in items],
        vocab=list(record["vocab"]),
        multi_label=bool(record["multi_label"]),
        fixed_split=[it["split"] for it in items],
    )
    return source, Split.from_sides(source.fixed_split)
