"""core.clean on real files: trash, relabel, collisions, the log, undo to the exact prior state, refusals."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from core import clean, cleanlog
from core.clean import Change, apply_changes, plan_changes, undo_last
from core.cleanlog import read_log
from core.data import DataConfig
from core.layouts import load_source


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path; Loupe's own log folder left out (it is meant to grow)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] != cleanlog.STATE_DIR:
            out[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def folders(tmp_path, write_image) -> Path:
    """root/<class>/*.png: three classes, distinct pixels so every file has its own hash."""
    root = tmp_path / "pets"
    for c, cls in enumerate(("cat", "dog", "fox")):
        for i in range(3):
            write_image(root / cls / f"{cls}_{i}.png", colour=(40 * c, 20 * i, 7))
    return root


def test_delete_goes_to_trash_with_the_same_relative_path_and_is_logged(folders):
    before = hashes(folders)
    result = apply_changes(folders, [Change(folders / "cat" / "cat_0.png", "delete")], layout="folders")
    assert len(result.applied) == 1 and not result.skipped and result.batch_id
    moved = folders / clean.TRASH_DIR / result.batch_id / "cat" / "cat_0.png"
    assert moved.is_file() and not (folders / "cat" / "cat_0.png").exists()
    assert hashlib.sha256(moved.read_bytes()).hexdigest() == before["cat/cat_0.png"]
    (entry,) = read_log(folders)
    assert entry["action"] == "delete" and entry["batch"] == result.batch_id
    assert entry["source"] == "cat/cat_0.png" and entry["target"] == f".trash/{result.batch_id}/cat/cat_0.png"
    assert entry["sha256"] == before["cat/cat_0.png"] and entry["size"] == moved.stat().st_size
    # The trash is hidden: the dataset no longer counts the file, and .trash is no class.
    source = load_source(DataConfig(path=str(folders)))
    assert len(source) == 8 and source.vocab == ["cat", "dog", "fox"]


def test_relabel_moves_to_the_new_class_folder(folders):
    result = apply_changes(folders, [Change(folders / "cat" / "cat_1.png", "relabel", "dog")], layout="folders")
    assert [m.target for m in result.applied] == [folders.resolve() / "dog" / "cat_1.png"]
    assert (folders / "dog" / "cat_1.png").is_file() and not (folders / "cat" / "cat_1.png").exists()
    assert read_log(folders)[0]["new_label"] == "dog"


def test_relabel_to_a_new_class_creates_its_folder_and_undo_removes_it(folders):
    apply_changes(folders, [Change(folders / "fox" / "fox_0.png", "relabel", "wolf")], layout="folders")
    assert (folders / "wolf" / "fox_0.png").is_file()
    undo_last(folders)
    assert not (folders / "wolf").exists() and (folders / "fox" / "fox_0.png").is_file()


def test_a_collision_gets_a_new_name_and_both_files_are_kept(folders, write_image):
    write_image(folders / "dog" / "same.png", colour=(1, 2, 3))
    write_image(folders / "cat" / "same.png", colour=(9, 9, 9))
    write_image(folders / "fox" / "same.png", colour=(5, 5, 5))
    dog_hash = hashes(folders)["dog/same.png"]
    changes = [Change(folders / "cat" / "same.png", "relabel", "dog"),
               Change(folders / "fox" / "same.png", "relabel", "dog")]
    result = apply_changes(folders, changes, layout="folders")
    assert [m.target.name for m in result.applied] == ["same (1).png", "same (2).png"]
    after = hashes(folders)
    assert after["dog/same.png"] == dog_hash  # never overwritten
    assert {"dog/same (1).png", "dog/same (2).png"} <= after.keys()


def test_undo_restores_the_exact_prior_state(folders):
    before = hashes(folders)
    changes = [
        Change(folders / "cat" / "cat_0.png", "delete"),
        Change(folders / "cat" / "cat_1.png", "relabel", "dog"),
        Change(folders / "dog" / "dog_2.png", "relabel", "fox"),
        Change(folders / "fox" / "fox_1.png", "delete"),
    ]
    applied = apply_changes(folders, changes, layout="folders")
    assert len(applied.applied) == 4 and hashes(folders) != before
    undone = undo_last(folders)
    assert undone.undone == applied.batch_id and len(undone.applied) == 4 and not undone.skipped
    assert hashes(folders) == before
    assert not (folders / clean.TRASH_DIR).exists()  # the folders the batch created are gone again
    log = read_log(folders)
    assert [e["action"] for e in log].count("undo") == 4
    assert all(e["undoes"] == applied.batch_id for e in log if e["action"] == "undo")
    # Nothing left to undo: a second undo does nothing and says so.
    again = undo_last(folders)
    assert again.undone is None and not again.applied and hashes(folders) == before


def test_undo_goes_back_one_batch_at_a_time(folders):
    start = hashes(folders)
    first = apply_changes(folders, [Change(folders / "cat" / "cat_0.png", "delete")], layout="folders")
    middle = hashes(folders)
    time.sleep(0.01)
    apply_changes(folders, [Change(folders / "dog" / "dog_0.png", "delete")], layout="folders")
    undo_last(folders)
    assert hashes(folders) == middle
    assert cleanlog.undoable(folders)[0] == first.batch_id
    undo_last(folders)
    assert hashes(folders) == start


def test_undo_never_overwrites_a_file_that_took_the_old_place(folders, write_image):
    apply_changes(folders, [Change(folders / "cat" / "cat_0.png", "delete")], layout="folders")
    write_image(folders / "cat" / "cat_0.png", colour=(99, 99, 99))
    newcomer = hashes(folders)["cat/cat_0.png"]
    result = undo_last(folders)
    assert not result.applied and "not overwritten" in result.skipped[0].reason
    assert hashes(folders)["cat/cat_0.png"] == newcomer


def test_missing_and_changed_files_are_skipped_with_reasons(folders):
    staged = folders / "dog" / "dog_1.png"
    stat = staged.stat()
    computed_at = time.time()
    changes = [
        Change(folders / "cat" / "gone.png", "delete"),
        Change(staged, "delete", size=stat.st_size, mtime=stat.st_mtime, computed_at=computed_at),
        Change(folders / "fox" / "fox_2.png", "delete", sha256="0" * 64),
        Change(folders / "cat" / "cat_2.png", "relabel", "fox"),
    ]
    # dog_1 is edited after its loss was computed: it must not be acted on blind.
    time.sleep(0.02)
    staged.write_bytes(staged.read_bytes() + b"\0")
    before = hashes(folders)
    result = apply_changes(folders, changes, layout="folders")
    reasons = {m.source.name: m.reason for m in result.skipped}
    assert "not found" in reasons["gone.png"]
    assert "changed on disk" in reasons["dog_1.png"]
    assert "content differs" in reasons["fox_2.png"]
    assert [m.source.name for m in result.applied] == ["cat_2.png"]  # the rest still happened
    assert hashes(folders)["dog/dog_1.png"] == before["dog/dog_1.png"]
    assert hashes(folders)["fox/fox_2.png"] == before["fox/fox_2.png"]
    assert [e["source"] for e in read_log(folders)] == ["cat/cat_2.png"]


def test_computed_at_skips_a_file_modified_after_the_losses(folders):
    target = folders / "cat" / "cat_0.png"
    computed_at = time.time() - 60
    result = apply_changes(folders, [Change(target, "delete", computed_at=computed_at)], layout="folders")
    assert "since its loss was computed" in result.skipped[0].reason and target.exists()


def test_dotdot_and_symlinks_escaping_the_root_are_refused(folders, tmp_path, write_image):
    outside = write_image(tmp_path / "elsewhere" / "secret.png", colour=(1, 1, 1))
    outside_dir = outside.parent
    (folders / "cat" / "link.png").symlink_to(outside)
    (folders / "evil").symlink_to(outside_dir, target_is_directory=True)
    before, outside_hash = hashes(folders), hashlib.sha256(outside.read_bytes()).hexdigest()
    changes = [
        Change(folders / "cat" / ".." / ".." / "elsewhere" / "secret.png", "delete"),
        Change(folders / "cat" / "link.png", "delete"),
        Change(folders / "evil" / "secret.png", "relabel", "dog"),
        Change(Path("../elsewhere/secret.png"), "delete"),
        Change(folders / "dog" / "dog_0.png", "relabel", "evil"),  # the target folder is a link out of the root
        Change(folders / "dog" / "dog_1.png", "relabel", "../../elsewhere"),
    ]
    result = apply_changes(folders, changes, layout="folders")
    assert not result.applied and len(result.skipped) == 6
    for move in result.skipped:
        assert "outside the dataset" in move.reason or "symbolic link" in move.reason or "folder name" in move.reason
    assert hashes(folders) == before and outside.exists()
    assert hashlib.sha256(outside.read_bytes()).hexdigest() == outside_hash
    assert sorted(p.name for p in outside_dir.iterdir()) == ["secret.png"]
    assert read_log(folders) == []


def test_dry_run_lists_the_changes_and_touches_nothing(folders):
    before = hashes(folders)
    changes = [Change(folders / "cat" / "cat_0.png", "delete"), Change(folders / "cat" / "cat_1.png", "relabel", "fox")]
    result = apply_changes(folders, changes, layout="folders", dry_run=True)
    assert result.dry_run and result.batch_id is None
    assert [(m.action, m.target.relative_to(folders.resolve()).parts[-2:]) for m in result.applied] == [
        ("delete", ("cat", "cat_0.png")),
        ("relabel", ("fox", "cat_1.png")),
    ]
    assert hashes(folders) == before
    assert not (folders / cleanlog.STATE_DIR).exists() and not (folders / clean.TRASH_DIR).exists()


def test_plan_matches_what_apply_does(folders):
    changes = [Change(folders / "cat" / "cat_0.png", "relabel", "dog"), Change(folders / "cat" / "cat_0.png", "delete")]
    planned = plan_changes(folders, changes, "folders")
    assert planned[0].ok and "more than once" in planned[1].reason
    result = apply_changes(folders, changes, layout="folders")
    assert [m.target for m in result.applied] == [planned[0].target]


def test_split_folders_relabel_stays_within_its_split(tmp_path, write_image):
    root = tmp_path / "split"
    for split in ("train", "valid"):
        for cls in ("cat", "dog"):
            write_image(root / split / cls / f"{split}_{cls}.png", colour=(len(split) * 20, len(cls), 3))
    changes = [Change(root / "valid" / "cat" / "valid_cat.png", "relabel", "dog"),
               Change(root / "train" / "dog" / "train_dog.png", "relabel", "cat")]
    result = apply_changes(root, changes)  # layout detected: split_folders
    assert not result.skipped
    assert (root / "valid" / "dog" / "valid_cat.png").is_file()
    assert (root / "train" / "cat" / "train_dog.png").is_file()
    source = load_source(DataConfig(path=str(root)))
    assert source.layout == "split_folders" and sorted(source.fixed_split) == ["train", "train", "valid", "valid"]


def test_csv_layout_refuses_relabel_with_a_message_but_deletes(tmp_path, write_image):
    root = tmp_path / "planet"
    for name in ("a.png", "b.png"):
        write_image(root / "images" / name)
    (root / "labels.csv").write_text("file,tags\nimages/a.png,cloudy\nimages/b.png,haze\n")
    before = hashes(root)
    result = apply_changes(root, [Change(root / "images" / "a.png", "relabel", "haze")])
    assert not result.applied and "not supported yet" in result.skipped[0].reason
    assert "deleting works" in result.skipped[0].reason and hashes(root) == before
    deleted = apply_changes(root, [Change(root / "images" / "b.png", "delete")])
    assert len(deleted.applied) == 1 and not (root / "images" / "b.png").exists()


def test_bad_class_names_are_refused(folders):
    for label in ("", ".hidden", "a/b", "..", " padded"):
        (move,) = plan_changes(folders, [Change(folders / "cat" / "cat_0.png", "relabel", label)], "folders")
        assert not move.ok and move.target is None
    (move,) = plan_changes(folders, [Change(folders / "cat" / "cat_0.png", "relabel", "cat")], "folders")
    assert "already in class" in move.reason


def test_handled_files_lists_what_is_moved_and_not_back(folders):
    result = apply_changes(folders, [Change(folders / "cat" / "cat_0.png", "delete"),
                                     Change(folders / "dog" / "dog_0.png", "relabel", "fox")], layout="folders")
    handled = cleanlog.handled_files(folders)
    root = folders.resolve()
    assert handled[root / "cat" / "cat_0.png"]["action"] == "delete"
    assert handled[root / "dog" / "dog_0.png"]["target"] == "fox/dog_0.png"
    assert cleanlog.undoable(folders)[:2] == (result.batch_id, 2)
    undo_last(folders)
    assert cleanlog.handled_files(folders) == {}


def test_relative_paths_and_a_symlinked_root_work(folders, tmp_path):
    link = tmp_path / "pets-link"
    os.symlink(folders, link, target_is_directory=True)
    result = apply_changes(link, [Change(Path("cat/cat_0.png"), "delete")], layout="folders")
    assert len(result.applied) == 1 and not (folders / "cat" / "cat_0.png").exists()
    assert undo_last(link).applied and (folders / "cat" / "cat_0.png").exists()


# ---------------------------------------------------------------- issue 16: links, lost trash, long names


@pytest.mark.parametrize("link", ["log", "lock", "folder"])
def test_the_cleaner_never_reads_or_writes_through_a_symlinked_file_of_its_own(folders, tmp_path, link):
    """.loupe/clean_log.jsonl (or the lock, or .loupe itself) replaced by a link to a file outside the dataset:
    refused before anything moves, and the outside file keeps its bytes."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = elsewhere / (cleanlog.LOCK_FILE if link == "lock" else cleanlog.LOG_FILE)
    outside.write_text("someone else's file\n")
    state = folders / cleanlog.STATE_DIR
    if link == "folder":
        state.symlink_to(elsewhere, target_is_directory=True)
    else:
        state.mkdir()
        (state / outside.name).symlink_to(outside)
    before = hashes(folders)
    with pytest.raises(cleanlog.OwnFileLinked, match="symbolic link"):
        apply_changes(folders, [Change(folders / "cat" / "cat_0.png", "delete")], layout="folders")
    with pytest.raises(cleanlog.OwnFileLinked):
        undo_last(folders)
    if link != "lock":
        with pytest.raises(cleanlog.OwnFileLinked):
            read_log(folders)
    assert outside.read_text() == "someone else's file\n"
    assert hashes(folders) == before and not (folders / clean.TRASH_DIR).exists()


def test_undo_reports_what_cannot_be_restored_and_moves_on_to_the_batch_before(folders):
    start = hashes(folders)
    first = apply_changes(folders, [Change(folders / "cat" / "cat_0.png", "delete")], layout="folders")
    time.sleep(0.01)
    second = apply_changes(folders, [Change(folders / "dog" / "dog_0.png", "delete"),
                                     Change(folders / "fox" / "fox_0.png", "relabel", "cat")], layout="folders")
    shutil.rmtree(folders / clean.TRASH_DIR / second.batch_id)  # emptied by hand

    result = undo_last(folders)
    assert result.undone == second.batch_id
    assert [m.source.name for m in result.applied] == ["fox_0.png"]  # what can be undone is undone
    assert len(result.skipped) == 1 and "no longer there" in result.skipped[0].reason
    assert result.summary() == "Restored 1 file; skipped 1."
    assert cleanlog.undoable(folders)[0] == first.batch_id

    result = undo_last(folders)
    assert result.undone == first.batch_id and [m.source.name for m in result.applied] == ["cat_0.png"]
    assert hashes(folders) == {k: v for k, v in start.items() if k != "dog/dog_0.png"}
    assert undo_last(folders).undone is None
    assert [e["action"] for e in read_log(folders)].count(cleanlog.UNDO_SKIPPED) == 1


def test_a_class_name_too_long_for_a_folder_is_refused_up_front(folders):
    before = hashes(folders)
    for label in ("x" * 256, "熊" * 86):  # 256 and 258 bytes
        result = apply_changes(folders, [Change(folders / "cat" / "cat_0.png", "relabel", label)], layout="folders")
        assert not result.applied and "bytes long" in result.skipped[0].reason
    assert hashes(folders) == before and sorted(p.name for p in folders.iterdir()) == [".loupe", "cat", "dog", "fox"]
    longest = "y" * 255
    result = apply_changes(folders, [Change(folders / "cat" / "cat_0.png", "relabel", longest)], layout="folders")
    assert result.applied and (folders / longest / "cat_0.png").is_file()
