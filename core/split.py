"""Splitting a dataset's items into train, valid (and test), and the run's record of items, labels and split."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from core.cleanlog import OwnFileLinked
from core.config import DataConfig
from core.images import DataError
from core.keeptogether import read_groups
from core.layouts import DataSource

SIDES = ("train", "valid", "test")


@dataclass
class Split:
    """Item indices of each side of a split."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray = field(default_factory=lambda: np.array([], dtype=int))
    kept_together: int = 0  # items moved after the draw to keep duplicates on one side (core.keeptogether)

    def to_dict(self) -> dict[str, list[int]]:
        return {side: getattr(self, side).tolist() for side in SIDES}

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
    key is set (so one photographer's photos never straddle train and valid). Either way the dataset's
    keep-together groups (duplicates, core.keeptogether) are then moved onto one side each.
    """
    return keep_together(source, _drawn_split(source, cfg))


def _drawn_split(source: DataSource, cfg: DataConfig) -> Split:
    if source.fixed_split is not None:
        return Split.from_sides(source.fixed_split)
    rng = np.random.default_rng(cfg.seed)
    strata = [ls[0] if len(ls) == 1 else " ".join(sorted(ls)) for ls in source.labels]
    groups = group_keys(source, cfg)
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


def keep_together(source: DataSource, split: Split) -> Split:
    """`split` with each keep-together group whose items span several sides moved wholly to the first side, in
    the order train, valid, test, that holds one of them: a leaked copy leaves valid for train. Nothing is
    redrawn, so every other item keeps its side; group members no longer in `source` are ignored."""
    groups = _present_groups(source)
    if not groups:
        return split
    sides = split.sides(len(source))
    moved = 0
    for items in groups:
        held = {sides[i] for i in items} - {""}  # "": an item on no side stays on none
        if len(held) > 1:
            to = next(side for side in SIDES if side in held)
            moved += sum(sides[i] not in ("", to) for i in items)
            sides[[i for i in items if sides[i]]] = to
    if not moved:
        return split
    return replace(Split.from_sides(sides), kept_together=split.kept_together + moved)


def fold_groups(source: DataSource, cfg: DataConfig) -> list[str] | None:
    """Group keys for K folds (core.labelcheck): the config's groups (`group_keys`), with the items of each
    keep-together group sharing one key, so a duplicate is never scored by a model trained on its copy.
    None when there are neither."""
    keys = group_keys(source, cfg)
    groups = _present_groups(source)
    if not groups:
        return keys
    keys = keys or [_relative_if_inside(f, source.root) for f in source.files]
    parent = {k: k for k in keys}  # union-find over keys: a duplicate joins its copy's whole group

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]  # path halving keeps chains short
            k = parent[k]
        return k

    for items in groups:
        for i in items[1:]:
            parent[find(keys[i])] = find(keys[items[0]])
    return [find(k) for k in keys]


def _present_groups(source: DataSource) -> list[list[int]]:
    """The dataset's keep-together groups as item indices of `source`, each with two or more items present."""
    try:
        groups = read_groups(source.root)
    except OwnFileLinked as e:
        raise DataError(str(e)) from None  # the pages' words for a dataset problem; no run trains past it
    if not groups:
        return []
    index: dict[str, list[int]] = defaultdict(list)  # a CSV may name one file twice: both items move
    for i, f in enumerate(source.files):
        index[_relative_if_inside(f, source.root)].append(i)
    present = [[i for path in group for i in index.get(path, [])] for group in groups]
    return [items for items in present if len(items) > 1]


def group_keys(source: DataSource, cfg: DataConfig) -> list[str] | None:
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


# ---------------------------------------------------------------- the record of a run's items and split


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
        "kept_together": int(split.kept_together),  # items moved to keep duplicate groups on one side
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
    moved = int(record.get("kept_together", 0))  # records written before keep-together groups: none moved
    sizes += f", {moved} image{'s' * (moved != 1)} moved to keep duplicates on one side" if moved else ""
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
    return source, replace(Split.from_sides(source.fixed_split), kept_together=int(record.get("kept_together", 0)))
