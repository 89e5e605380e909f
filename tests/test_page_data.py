"""The Data page through Streamlit's AppTest, on real folders of images written to tmp_path."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")
BEARS = Path(__file__).resolve().parents[2] / "shared" / "data" / "bears"


@pytest.fixture
def at(home: Path) -> AppTest:
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    assert not app.exception
    return app


def classes(root: Path, counts: dict[str, int], write_image) -> Path:
    """root/<class>/<class>_<i>.png, a distinct colour per class."""
    for k, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(root / name / f"{name}_{i}.png", colour=(60 * k, 200 - 50 * k, 90), size=16)
    return root


def open_folder(at: AppTest, folder: Path | str) -> AppTest:
    at.text_input(key="data_path").input(str(folder))
    at.button(key="data_open").click()
    at.run()
    assert not at.exception
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def texts(elements) -> str:
    return "\n".join(e.value for e in elements)


def image_captions(at: AppTest) -> list[str]:
    return [img.caption for element in at.get("image") for img in element.proto.imgs]


def gallery_captions(at: AppTest) -> list[str]:
    """The file names under the gallery's thumbnails (the grid is the page's only st.grid)."""
    grids = at.get("grid")
    assert len(grids) == 1
    return [c.value for c in grids[0].caption]


def test_no_dataset_shows_the_demo_call_to_action(at: AppTest):
    assert at.button(key="data_demo").label == "Create the demo dataset"
    assert "one subfolder per class" in texts(at.info)
    assert not at.metric and not at.error


def test_demo_button_creates_the_demo_and_shows_layout_counts_and_gallery(at: AppTest, home: Path):
    at.button(key="data_demo").click()
    at.run()
    assert not at.exception
    demo = home / "demo"
    assert sorted(p.name for p in demo.iterdir() if p.is_dir()) == ["circle", "square", "triangle"]
    assert at.session_state["dataset"] == str(demo.resolve())
    assert json.loads((home / "recent.json").read_text()) == [str(demo.resolve())]
    assert at.session_state["data_options"] == {
        "layout": "auto",
        "valid_pct": 0.2,
        "seed": 42,
        "stratify": True,
        "group_regex": None,
    }

    m = metrics(at)
    assert (m["Images"], m["Classes"], m["Training"], m["Validation"], m["Left out"]) == ("120", "3", "96", "24", "0")
    assert "one folder per class" in texts(at.caption)
    charts = at.get("plotly_chart")
    assert len(charts) == 2
    counts = json.loads(charts[0].proto.spec)
    assert {trace["name"] for trace in counts["data"]} == {"train", "valid"}

    # The gallery: one class, one page of thumbnails at a time, paged.
    assert at.segmented_control(key="data_gallery_class").value == "circle"
    def stems(folder: Path) -> set[str]:
        return {f.stem for f in folder.iterdir()}

    first_page = gallery_captions(at)
    assert len(first_page) == 24 and set(first_page) <= stems(demo / "circle")
    at.pagination(key="data_gallery_page_0_all").set_value(2)
    at.run()
    second_page = gallery_captions(at)
    assert second_page and not set(second_page) & set(first_page)
    at.segmented_control(key="data_gallery_class").set_value("triangle")
    at.run()
    assert set(gallery_captions(at)) <= stems(demo / "triangle")
    at.segmented_control(key="data_gallery_side").set_value("valid")
    at.run()
    valid_triangles = gallery_captions(at)
    assert 0 < len(valid_triangles) < 24 and set(valid_triangles) <= stems(demo / "triangle")

    # The augmentation preview: two training images, each as validated plus six augmented copies.
    previews = image_captions(at)
    assert previews.count("as validated") == 2 and previews.count("training 6") == 2
    at.button(key="data_aug_shuffle").click()
    at.run()
    assert not at.exception


def test_typed_path_opens_a_folders_dataset(at: AppTest, home: Path, demo_dataset: Path):
    open_folder(at, demo_dataset)
    assert at.session_state["dataset"] == str(demo_dataset.resolve())
    m = metrics(at)
    assert m["Classes"] == "3" and int(m["Images"]) == 24
    assert not at.error
    # Reopening the page in a new session finds it among the recent folders.
    again = AppTest.from_file(APP, default_timeout=120)
    again.run()
    assert not again.exception
    assert metrics(again)["Classes"] == "3"
    assert again.selectbox(key="data_recent").options == [f"demo  ·  {demo_dataset.parent.resolve()}"]
    again.button(key="data_open_recent").click()
    again.run()
    assert not again.exception and again.session_state["dataset"] == str(demo_dataset.resolve())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "nowhere", "There is no folder at"),
        (lambda tmp: (tmp / "notes.txt").write_text("hi") and tmp / "notes.txt", "is a file, not a folder"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "is empty"),
        (
            lambda tmp: ((tmp / "docs" / "a").mkdir(parents=True), (tmp / "docs" / "a" / "x.txt").write_text("x"))
            and tmp / "docs",
            "No images in",
        ),
        (lambda tmp: "  ", "Type the path of a folder"),
    ],
    ids=["missing", "a-file", "empty", "no-images", "blank"],
)
def test_bad_path_shows_an_error_and_changes_nothing(at: AppTest, tmp_path: Path, make, message: str):
    open_folder(at, make(tmp_path))
    assert message in texts(at.error)
    assert at.session_state["dataset"] is None
    assert not at.metric


def test_one_class_folder_warns(at: AppTest, tmp_path: Path, write_image):
    open_folder(at, classes(tmp_path / "cats_only", {"cat": 12}, write_image))
    assert "Only one class found (**cat**)" in texts(at.warning)
    assert metrics(at)["Classes"] == "1"


def test_broken_files_are_listed_with_their_reasons(at: AppTest, tmp_path: Path, write_image):
    root = classes(tmp_path / "pets", {"cat": 12, "dog": 12}, write_image)
    (root / "cat" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "dog" / "empty.png").write_bytes(b"")
    open_folder(at, root)
    assert metrics(at)["Left out"] == "2"
    assert "2 file(s) will be left out of training" in texts(at.warning)
    problems = at.dataframe[0].value
    reasons = dict(zip(problems["file"], problems["reason"]))
    assert set(reasons) == {"cat/broken.jpg", "dog/empty.png"}
    assert "not an image" in reasons["cat/broken.jpg"]
    assert "empty file" in reasons["dog/empty.png"]


def test_tiny_class_warns(at: AppTest, tmp_path: Path, write_image):
    open_folder(at, classes(tmp_path / "uneven", {"big": 12, "also_big": 12, "rare": 3}, write_image))
    warning = texts(at.warning)
    assert "1 tiny class with fewer than 10 images: **rare** (3)" in warning
    assert "Only one class" not in warning


def test_train_and_valid_folders_fix_the_split(at: AppTest, tmp_path: Path, write_image):
    root = tmp_path / "fixed"
    classes(root / "train", {"a": 10, "b": 10}, write_image)
    classes(root / "valid", {"a": 3, "b": 3}, write_image)
    open_folder(at, root)
    m = metrics(at)
    assert (m["Classes"], m["Training"], m["Validation"]) == ("2", "20", "6")
    assert at.slider(key="data_valid_pct").disabled
    assert "fixes the split" in texts(at.caption)
    # Seed and groups only shape a split Loupe makes: here they are locked, and say why.
    for widget in (at.number_input(key="data_seed"), at.text_input(key="data_group_regex"),
                   at.toggle(key="data_stratify")):
        assert widget.disabled and "train/ and valid/ folders fix the split" in widget.help
    assert "The split is the dataset's own" in texts(at.caption)


def test_an_is_valid_column_fixes_the_split_too(at: AppTest, tmp_path: Path, write_image):
    root = classes(tmp_path / "csv", {"a": 6, "b": 6}, write_image)
    rows = ["file,label,is_valid"] + [f"{c}/{c}_{i}.png,{c},{int(i < 2)}" for c in "ab" for i in range(6)]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    open_folder(at, root)
    assert metrics(at)["Validation"] == "4"
    assert at.number_input(key="data_seed").disabled and "is_valid column" in at.number_input(key="data_seed").help


def test_a_dataset_deleted_while_open_shows_an_error(at: AppTest, tmp_path: Path, write_image):
    root = classes(tmp_path / "gone", {"a": 10, "b": 10}, write_image)
    open_folder(at, root)
    shutil.rmtree(root)
    at.run()
    assert not at.exception
    assert "does not exist" in texts(at.error)


def test_split_options_go_to_session_state_and_change_the_split(at: AppTest, tmp_path: Path, write_image):
    open_folder(at, classes(tmp_path / "pets", {"cat": 20, "dog": 20}, write_image))
    assert metrics(at)["Validation"] == "8"
    at.slider(key="data_valid_pct").set_value(0.5)
    at.number_input(key="data_seed").set_value(7)
    at.run()
    assert not at.exception
    assert metrics(at)["Validation"] == "20"
    assert at.session_state["data_options"]["valid_pct"] == 0.5
    assert at.session_state["data_options"]["seed"] == 7

    at.text_input(key="data_group_regex").input("(unclosed")
    at.run()
    assert not at.exception
    assert "not a valid regular expression" in texts(at.error)
    assert at.session_state["data_options"]["group_regex"] is None  # the last valid options are kept


def test_labels_from_file_names(at: AppTest, tmp_path: Path, write_image):
    root = tmp_path / "flat"
    for i in range(12):
        write_image(root / f"great_pyrenees_{i}.png", size=16)
        write_image(root / f"pug_{i}.png", colour=(10, 10, 200), size=16)
    write_image(root / "nolabel.png", size=16)
    open_folder(at, root)
    assert "labels in file names" in texts(at.caption)
    assert at.segmented_control(key="data_gallery_class").options == ["great_pyrenees (12)", "pug (12)"]
    problems = at.dataframe[0].value
    assert list(problems["file"]) == ["nolabel.png"] and list(problems["problem"]) == ["no label"]


def _zip_of(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _png(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_upload_a_zip(at: AppTest, home: Path):
    colours = {"red": (220, 0, 0), "blue": (0, 0, 220)}
    entries = {f"shapes/{c}/{i}.png": _png(colour) for c, colour in colours.items() for i in range(12)}
    entries["__MACOSX/shapes/._x.png"] = b"resource fork"
    at.file_uploader(key="data_zip").set_value(("shapes.zip", _zip_of(entries), "application/zip"))
    at.run()
    at.button(key="data_unpack").click()
    at.run()
    assert not at.exception
    target = home / "datasets" / "shapes"
    assert at.session_state["dataset"] == str(target.resolve())
    assert sorted(p.name for p in target.iterdir()) == ["blue", "red"]
    assert metrics(at)["Classes"] == "2" and metrics(at)["Images"] == "24"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"PK but not really a zip", "not a zip archive"),
        (_zip_of({"ok/a.png": b"x", "../evil.png": b"x"}), "points outside its folder"),
        (_zip_of({"notes/readme.txt": b"no images here"}), "holds no dataset"),
    ],
    ids=["not-a-zip", "zip-slip", "no-images"],
)
def test_upload_refused_with_a_message_and_nothing_left(at: AppTest, home: Path, tmp_path: Path, content, message):
    at.file_uploader(key="data_zip").set_value(("upload.zip", content, "application/zip"))
    at.run()
    at.button(key="data_unpack").click()
    at.run()
    assert not at.exception
    assert message in texts(at.error)
    assert at.session_state["dataset"] is None
    datasets = home / "datasets"
    assert not datasets.exists() or not any(datasets.iterdir())
    assert not list(tmp_path.rglob("evil.png"))


@pytest.mark.skipif(not BEARS.is_dir(), reason="the bears photos (../shared/data/bears) are not on this machine")
def test_bears_photos_show_three_classes(at: AppTest):
    open_folder(at, BEARS)
    assert metrics(at)["Classes"] == "3"
    names = [o.split(" (")[0] for o in at.segmented_control(key="data_gallery_class").options]
    assert names == ["black", "grizzly", "teddys"]
    assert len(gallery_captions(at)) == 24
    assert not at.error


def test_a_long_file_name_is_shortened_under_its_image_and_whole_on_hover(at: AppTest, tmp_path: Path, write_image):
    long_name = "10300235b6c6a1a5cc0b5f2e4b3ff7f7a5c608f9.jpg"
    classes(tmp_path / "data", {"cat": 3, "dog": 3}, write_image)
    write_image(tmp_path / "data" / "cat" / long_name, size=16)
    open_folder(at, tmp_path / "data")
    (caption,) = [c for c in at.get("grid")[0].caption if c.proto.help == long_name]  # the whole name on hover
    assert "…" in caption.value and len(caption.value) < len(long_name)
