"""Keep-together groups (core.keeptogether) on real folders: leaked duplicates end up on one side of the split."""

from __future__ import annotations

import numpy as np
import pytest

from core import interpret
from core.cleanlog import STATE_DIR, OwnFileLinked
from core.config import DataConfig
from core.data import data_facts, prepare
from core.images import DataError
from core.keeptogether import GROUPS_FILE, add_groups, groups_version, read_groups
from core.labelcheck import assign_folds
from core.layouts import load_source
from core.split import describe_split, fold_groups, source_from_record, source_record, split_items


def _folders(root, write_image, n: int = 10):
    for k, c in enumerate(("cat", "dog")):
        for i in range(n):
            write_image(root / c / f"{i}.png", colour=(20 * i, 200 - 80 * k, 90))
    return root


def _rel(source, i: int) -> str:
    return source.files[i].relative_to(source.root).as_posix()


def _sides(source, split) -> dict[str, str]:
    return dict(zip((_rel(source, i) for i in range(len(source))), split.sides(len(source))))


def test_a_leaked_pair_moves_to_train_and_nothing_else_moves(tmp_path, write_image):
    root = _folders(tmp_path / "ds", write_image)
    cfg = DataConfig(path=str(root), valid_pct=0.3, seed=3)
    source = load_source(cfg)
    before = _sides(source, split_items(source, cfg))
    train = sorted(f for f, s in before.items() if s == "train")
    valid = sorted(f for f, s in before.items() if s == "valid")
    # A leaked pair, a group already on one side, and a member deleted since (ignored).
    assert add_groups(root, [[train[0], valid[0], "cat/gone.png"], [train[1], train[2]]]) == 2
    split = split_items(source, cfg)
    after = _sides(source, split)
    assert after[valid[0]] == after[train[0]] == "train"
    assert {f: s for f, s in after.items() if f != valid[0]} == {f: s for f, s in before.items() if f != valid[0]}
    assert split.kept_together == 1 and len(split.valid) == len(valid) - 1
    # Every caller that splits the dataset gets the same split.
    assert prepare(cfg)[2].valid.tolist() == split.valid.tolist()
    assert data_facts(cfg).n_train == len(split.train)

    record = source_record(source, split)
    assert record["kept_together"] == 1
    assert describe_split(record, cfg).endswith(", 1 image moved to keep duplicates on one side")
    assert source_from_record(record)[1].kept_together == 1
    del record["kept_together"]  # a record written before keep-together groups: none moved
    assert "moved" not in describe_split(record, cfg) and source_from_record(record)[1].kept_together == 0


def test_stratified_and_grouped_splits_keep_groups_too(tmp_path, write_image):
    root = _folders(tmp_path / "ds", write_image)
    for cfg in (DataConfig(path=str(root), valid_pct=0.5, seed=1, stratify=False),
                DataConfig(path=str(root), valid_pct=0.5, seed=1, group_regex=r"^(\d)")):
        (root / STATE_DIR / GROUPS_FILE).unlink(missing_ok=True)
        source = load_source(cfg)
        pairs = [(i, j) for i in range(len(source)) for j in range(len(source))]
        drawn = split_items(source, cfg).sides(len(source))
        i, j = next((i, j) for i, j in pairs if drawn[i] == "train" and drawn[j] == "valid")
        add_groups(root, [[_rel(source, j), _rel(source, i)]])
        assert split_items(source, cfg).sides(len(source))[[i, j]].tolist() == ["train", "train"]


def test_split_folders_lose_the_valid_copy_to_train(tmp_path, write_image):
    root = tmp_path / "bears"
    for side, n in (("train", 6), ("valid", 3), ("test", 2)):
        for i in range(n):
            write_image(root / side / "grizzly" / f"{i}.png", colour=(30 * i, 90, 40))
    add_groups(root, [["valid/grizzly/0.png", "train/grizzly/0.png"], ["valid/grizzly/1.png", "test/grizzly/1.png"]])
    cfg = DataConfig(path=str(root))
    source = load_source(cfg)
    split = split_items(source, cfg)
    sides = _sides(source, split)
    assert sides["valid/grizzly/0.png"] == "train" and sides["test/grizzly/1.png"] == "valid"  # first side held
    assert (len(split.train), len(split.valid), len(split.test), split.kept_together) == (7, 3, 1, 2)
    assert describe_split(source_record(source, split), cfg) == (
        "train/, valid/ and test/ folders: 7 train · 3 valid (30%) · 1 test, 2 images moved to keep duplicates on "
        "one side")


def test_add_groups_merges_overlapping_groups_and_survives_a_garbled_file(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    assert read_groups(root) == [] and groups_version(root) == (0, 0, 0)  # no file yet
    assert add_groups(root, [["a.png", "b.png"]]) == 1
    stamp = groups_version(root)
    assert add_groups(root, [["c.png", "b.png"], ["d.png", "e.png"], ["d.png"]]) == 2
    assert read_groups(root) == [["a.png", "b.png", "c.png"], ["d.png", "e.png"]]
    assert groups_version(root) != stamp  # a page's cache key sees the change (.loupe is hidden from listings)
    assert add_groups(root, [["e.png", "a.png"]]) == 1  # two groups joined by a new pair
    assert read_groups(root) == [["a.png", "b.png", "c.png", "d.png", "e.png"]]

    path = root / STATE_DIR / GROUPS_FILE
    path.write_text('{"version": 1, "groups": [["a.png", "b')  # a write cut short (not by Loupe: it is atomic)
    assert read_groups(root) == []
    path.write_text('{"version": 1, "groups": [["x.png", 3, "y.png"], "z.png", [], ["/etc/passwd", "../up.png"]]}')
    assert read_groups(root) == [["x.png", "y.png"]]  # a damaged entry costs that entry
    path.write_text('{"version": 99, "groups": [["x.png", "y.png"]]}')
    assert read_groups(root) == []
    assert add_groups(root, [["p.png", "q.png"]]) == 1 and read_groups(root) == [["p.png", "q.png"]]
    with pytest.raises(ValueError, match="relative"):
        add_groups(root, [["p.png", "/abs/q.png"]])
    assert read_groups(root) == [["p.png", "q.png"]]


def test_a_linked_keep_together_file_or_folder_is_refused(tmp_path, write_image):
    root = _folders(tmp_path / "ds", write_image, n=3)
    outside = tmp_path / "precious.json"
    outside.write_text('{"version": 1, "groups": [["cat/0.png", "dog/0.png"]]}')
    (root / STATE_DIR).mkdir()
    (root / STATE_DIR / GROUPS_FILE).symlink_to(outside)
    with pytest.raises(OwnFileLinked, match="symbolic link"):
        read_groups(root)
    with pytest.raises(OwnFileLinked):
        add_groups(root, [["cat/1.png", "dog/1.png"]])
    assert outside.read_text() == '{"version": 1, "groups": [["cat/0.png", "dog/0.png"]]}'
    with pytest.raises(DataError, match="symbolic link"):  # a run never trains past it
        split_items(load_source(DataConfig(path=str(root))), DataConfig(path=str(root)))

    linked = _folders(tmp_path / "linked", write_image, n=3)
    (tmp_path / "elsewhere").mkdir()
    (linked / STATE_DIR).symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(OwnFileLinked):
        add_groups(linked, [["cat/1.png", "dog/1.png"]])
    with pytest.raises(OwnFileLinked):
        read_groups(linked)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_label_check_folds_keep_duplicates_in_one_fold(tmp_path, write_image):
    root = _folders(tmp_path / "ds", write_image)
    cfg = DataConfig(path=str(root), valid_pct=0.2, seed=0)
    source = load_source(cfg)
    assert fold_groups(source, cfg) is None  # neither a group key nor duplicates: folds as before
    pairs = [["cat/0.png", "dog/0.png"], ["cat/1.png", "cat/2.png", "dog/3.png"]]
    add_groups(root, pairs)
    keys = fold_groups(source, cfg)
    index = {_rel(source, i): i for i in range(len(source))}
    for seed in range(4):
        fold_of = assign_folds(source, split_items(source, cfg), seed=seed, folds=4, groups=keys)
        for group in pairs:
            assert len({fold_of[index[f]] for f in group}) == 1
    grouped = fold_groups(source, DataConfig(path=str(root), group_regex=r"^(\d)"))  # 0.png in cat and dog: one
    assert grouped[index["cat/1.png"]] == grouped[index["dog/3.png"]] == grouped[index["cat/3.png"]]
    assert grouped[index["cat/0.png"]] != grouped[index["cat/1.png"]]


def test_error_without_leaves_out_the_leaked_rows():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    files = ["/d/cat/0.png", "/d/cat/1.png", "/d/dog/0.png", "/d/dog/1.png"]
    table = interpret.item_table(probs, np.array([0, 0, 1, 1]), files, ["cat", "dog"], multi_label=False)
    assert interpret.error_without(table, ["/d/cat/0.png", "/d/dog/1.png"]) == (0.5, 1.0, 2)  # both right
    assert interpret.error_without(table, []) == (0.5, 0.5, 0)
    all_out = interpret.error_without(table, files)
    assert all_out[0] == 0.5 and np.isnan(all_out[1]) and all_out[2] == 4

    # Multi-label: 1 - accuracy_multi at the table's threshold, the share of wrong (item, label) decisions.
    targets = np.array([[1, 0], [1, 1], [0, 1]])
    multi = interpret.item_table(np.array([[0.9, 0.35], [0.6, 0.2], [0.1, 0.9]]), targets, files[:3],
                                 ["cat", "dog"], multi_label=True, threshold=0.3)
    with_all, without, removed = interpret.error_without(multi, [files[0]])
    assert removed == 1 and with_all == pytest.approx(2 / 6) and without == pytest.approx(1 / 4)
    assert with_all == pytest.approx(1 - interpret.accuracy_multi(
        torch_tensor(multi[interpret.prob_columns(["cat", "dog"])].to_numpy()), torch_tensor(targets), 0.3, False))


def torch_tensor(x):
    import torch

    return torch.as_tensor(np.asarray(x, dtype=np.float32))
