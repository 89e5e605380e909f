"""core.feedback: uploads judged by content, and the feedback dataset of corrected predictions."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from core import feedback
from core.data import DataConfig
from core.feedback import BadUpload, read_image, save_feedback
from core.layouts import load_source


def image_bytes(fmt: str = "PNG", colour=(200, 30, 30), size=(24, 16), mode: str = "RGB", **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---------------------------------------------------------------- reading uploads


def test_read_image_judges_by_content_and_turns_upright():
    png = read_image(image_bytes("PNG", mode="RGBA", colour=(10, 20, 30, 0)))
    assert (png.format, png.extension, png.image.mode) == ("PNG", ".png", "RGB")
    assert png.image.getpixel((0, 0)) == (255, 255, 255)  # transparency over white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees to view
    jpeg = read_image(image_bytes("JPEG", size=(40, 20), exif=exif.tobytes()))
    assert jpeg.format == "JPEG" and jpeg.extension == ".jpg"
    assert jpeg.image.size == (20, 40) and (jpeg.width, jpeg.height) == (40, 20)


def test_read_image_downscales_to_min_side():
    got = read_image(image_bytes("PNG", size=(300, 100)), min_side=50)
    assert got.image.size == (150, 50)
    small = read_image(image_bytes("PNG", size=(30, 10)), min_side=50)
    assert small.image.size == (30, 10)  # never upscaled


@pytest.mark.parametrize(
    "data, kwargs, words",
    [
        (b"", {}, "empty"),
        (b"hello, I am a text file pretending to be a PNG", {}, "not an image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", {}, "not an image"),  # EPS is never opened
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), {}, "HEIC/HEIF image that cannot be decoded"),
        (image_bytes("PNG")[:60], {}, "cannot be decoded"),
        (image_bytes("PNG"), {"max_bytes": 10}, "over the"),
        (image_bytes("PNG", size=(40, 40)), {"max_pixels": 1000}, "decompression bomb"),
    ],
)
def test_read_image_refuses_with_a_clear_reason(data, kwargs, words):
    with pytest.raises(BadUpload, match=words):
        read_image(data, **kwargs)


# ---------------------------------------------------------------- saving feedback


def test_save_stores_by_content_hash_with_the_extension_of_the_content(home: Path):
    png = image_bytes("PNG")
    path = save_feedback(png, "holiday.txt", predicted="black", correct_label="grizzly", run_id="run-1")
    root = home / "feedback"
    assert path == root / "grizzly" / f"{feedback.digest_of(png)[:16]}.png"
    assert path.read_bytes() == png
    jpeg_named_png = save_feedback(image_bytes("JPEG"), "x.png", "grizzly", "black", "run-1")
    assert jpeg_named_png.suffix == ".jpg" and jpeg_named_png.parent.name == "black"
    log = [json.loads(line) for line in (root / ".feedback_log.jsonl").read_text().splitlines()]
    assert [(r["run"], r["predicted"], r["correct"]) for r in log] == [
        ("run-1", "black", "grizzly"),
        ("run-1", "grizzly", "black"),
    ]
    assert log[0]["source_name"] == "holiday.txt" and log[0]["file"] == f"grizzly/{path.name}"
    assert feedback.feedback_log() == log
    assert not list(root.rglob(".*.tmp"))  # atomic writes leave no temp files


def test_same_image_twice_is_stored_once_and_a_new_label_moves_it(home: Path):
    png = image_bytes("PNG")
    first = save_feedback(png, "a.png", "black", "grizzly", "r1")
    again = save_feedback(png, "b.png", "black", "grizzly", "r2")
    root = home / "feedback"
    assert first == again and files_under(root) == [root / ".feedback_log.jsonl", first]
    moved = save_feedback(png, "a.png", "grizzly", "teddy", "r3")
    assert moved.parent.name == "teddy" and moved.read_bytes() == png
    assert files_under(root) == [root / ".feedback_log.jsonl", moved]
    assert not (root / "grizzly").exists()  # the emptied class folder is gone, so it is no class any more
    assert len(feedback.feedback_log()) == 3 and feedback.feedback_log()[-1]["moved_from"] == ["grizzly"]


@pytest.mark.parametrize(
    "label, folder",
    [
        ("../../evil", "evil"),
        ("a/../b", "a_b"),
        ("a/b\\c", "a_b_c"),
        ("  grizzly  bear ", "grizzly bear"),
        (".hidden", "hidden"),
        ("x\x00y", "x y"),
    ],
)
def test_labels_are_sanitised_into_one_folder_inside_the_root(home: Path, label: str, folder: str):
    path = save_feedback(image_bytes("PNG"), "a.png", "black", label, "r1")
    root = (home / "feedback").resolve()
    assert path.parent == root / folder
    assert path.resolve().is_relative_to(root)


@pytest.mark.parametrize("label", ["", "   ", "..", ".", "/", "._."])
def test_unusable_labels_are_refused_and_nothing_is_written(home: Path, label: str):
    with pytest.raises(ValueError, match="cannot be used as a class name"):
        save_feedback(image_bytes("PNG"), "a.png", "black", label, "r1")
    assert files_under(home / "feedback") == []


def test_a_non_image_is_refused_and_nothing_is_written(home: Path):
    with pytest.raises(BadUpload, match="not an image"):
        save_feedback(b"just text\n" * 20, "photo.png", "black", "grizzly", "r1")
    assert not (home / "feedback").exists()
    assert feedback.feedback_dataset() is None and feedback.feedback_counts() == {}


def test_the_feedback_folder_is_a_folders_dataset(home: Path):
    save_feedback(image_bytes("PNG", colour=(1, 2, 3)), "a.png", "black", "grizzly", "r1")
    save_feedback(image_bytes("PNG", colour=(4, 5, 6)), "b.png", "black", "grizzly", "r1")
    save_feedback(image_bytes("JPEG"), "c.jpg", "grizzly", "black", "r1")
    dataset = feedback.feedback_dataset()
    assert dataset == (home / "feedback").resolve()
    assert feedback.feedback_counts() == {"black": 1, "grizzly": 2}
    source = load_source(DataConfig(path=str(dataset)))
    assert source.layout == "folders"
    assert source.vocab == ["black", "grizzly"]
    assert sorted(labels[0] for labels in source.labels) == ["black", "grizzly", "grizzly"]
    assert all(not f.name.startswith(".") for f in source.files)  # the log is not an item


def test_explicit_root(tmp_path: Path):
    root = tmp_path / "elsewhere"
    path = save_feedback(image_bytes("BMP"), "a.bmp", "x", "y", "r", root=root)
    assert path == root / "y" / path.name and path.suffix == ".bmp"
    assert feedback.feedback_counts(root) == {"y": 1}
    assert feedback.feedback_dataset(root) == root.resolve()
