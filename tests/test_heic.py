"""HEIC/HEIF photos (iPhones' default) on real files written by pillow-heif: decoded upright, listed, verified,
thumbnailed, cached, trained on, and classified and kept as feedback on the Predict page."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import one_torch_thread, open_app_page, tiny_config, train_tiny_run
from PIL import Image

from core.data import DataConfig, make_dataloaders, prepare
from core.feedback import digest_of, feedback_counts, read_image
from core.imagecache import DecodedImages
from core.images import HEIF_REASON, check_image, open_image
from core.listing import list_images
from core.thumbs import thumbnail

RED, BLUE = (230, 20, 20), (20, 20, 230)
ROTATE_CW = 6  # EXIF orientation: the stored pixels are shown turned 90 degrees clockwise


def two_halves(width: int = 32, height: int = 16) -> Image.Image:
    """A wide image, red on the left half and blue on the right: where the red ends up tells the turn."""
    img = Image.new("RGB", (width, height), BLUE)
    img.paste(RED, (0, 0, width // 2, height))
    return img


def heic_bytes(img: Image.Image, orientation: int | None = None) -> bytes:
    """`img` encoded as HEIC by pillow-heif (registered by core.images), with an EXIF orientation if given."""
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    img.save(buffer, format="HEIF", quality=90, **kwargs)
    return buffer.getvalue()


def write_heic(path: Path, img: Image.Image, orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(heic_bytes(img, orientation))
    return path


def is_red(pixel) -> bool:
    r, g, b = (int(v) for v in pixel)
    return r > 150 and g < 90 and b < 90


def is_blue(pixel) -> bool:
    r, g, b = (int(v) for v in pixel)
    return b > 150 and r < 90 and g < 90


# ---------------------------------------------------------------- decoding


def test_a_heic_opens_as_stored_when_it_has_no_orientation(tmp_path: Path):
    path = write_heic(tmp_path / "IMG_0001.heic", two_halves())
    assert check_image(path) is None
    img = open_image(path)
    assert img.mode == "RGB" and img.size == (32, 16)
    assert is_red(img.getpixel((4, 8))) and is_blue(img.getpixel((28, 8)))


def test_a_sideways_heic_is_turned_upright_exactly_once(tmp_path: Path):
    path = write_heic(tmp_path / "IMG_0002.HEIC", two_halves(), ROTATE_CW)
    with Image.open(path) as raw:  # pillow-heif turns it as it decodes and resets the EXIF tag to 1 ...
        assert raw.format == "HEIF" and raw.size == (16, 32) and raw.getexif().get(0x0112) == 1
    img = open_image(path)  # ... so upright_rgb's exif_transpose turns it no further (twice would be 32x16)
    assert img.size == (16, 32)
    assert is_red(img.getpixel((8, 4))) and is_blue(img.getpixel((8, 28)))  # the left half turned to the top
    assert check_image(path) is None
    assert open_image(path, draft=8).size == (16, 32)  # a draft request changes nothing without a thumbnail


def test_a_draft_of_a_heic_decodes_its_embedded_thumbnail_upright(tmp_path: Path):
    path = tmp_path / "IMG_0004.heic"
    exif = Image.Exif()
    exif[0x0112] = ROTATE_CW
    two_halves(128, 64).save(path, format="HEIF", quality=90, thumbnails=[32], exif=exif.tobytes())
    assert open_image(path).size == (64, 128)
    small = open_image(path, draft=16)  # the 16x32 thumbnail, turned like the image itself
    assert small.size == (16, 32) and is_red(small.getpixel((8, 4))) and is_blue(small.getpixel((8, 28)))
    assert check_image(path) is None  # the image itself is decoded: no draft for HEIC, the thumbnail proves nothing


def test_a_truncated_heic_is_reported_not_decoded(tmp_path: Path):
    data = heic_bytes(Image.effect_noise((128, 128), 60).convert("RGB"))
    truncated = tmp_path / "cut.heic"
    truncated.write_bytes(data[: len(data) // 2])
    assert "cannot be decoded" in check_image(truncated)
    header_only = tmp_path / "header.heif"
    header_only.write_bytes(data[:40])
    assert check_image(header_only) == HEIF_REASON


def test_thumbnails_and_the_decode_cache_read_heic_upright(tmp_path: Path, home: Path):
    path = write_heic(tmp_path / "IMG_0003.heic", two_halves(), ROTATE_CW)
    thumb = Image.open(io.BytesIO(thumbnail(path, size=64)))
    assert thumb.format == "JPEG" and thumb.size == (16, 32)  # never upscaled
    assert is_red(thumb.getpixel((8, 2))) and is_blue(thumb.getpixel((8, 29)))
    decoded = DecodedImages([path], side=16, root=tmp_path / "cache")[0]
    assert decoded.shape == (3, 16, 16) and decoded.dtype == np.uint8
    assert is_red(decoded[:, 0, 8]) and is_blue(decoded[:, -1, 8])


def test_an_upload_is_read_by_its_content(tmp_path: Path):
    data = heic_bytes(two_halves(), ROTATE_CW)
    upload = read_image(data)
    assert upload.format == "HEIF" and upload.extension == ".heic" and (upload.width, upload.height) == (16, 32)
    assert upload.image.size == (16, 32) and is_red(upload.image.getpixel((8, 4)))
    small = read_image(data, min_side=8).image  # downscaled as it is for the model, still upright
    assert small.size == (8, 16) and is_red(small.getpixel((4, 2))) and is_blue(small.getpixel((4, 14)))


# ---------------------------------------------------------------- a dataset of HEIC photos


def write_heic_dataset(root: Path, n: int = 4) -> Path:
    """root/<red|blue>/IMG_<i>.heic (every other one .HEIF and sideways), 16 px."""
    for name, colour in (("red", RED), ("blue", BLUE)):
        for i in range(n):
            suffix, orientation = (".HEIF", ROTATE_CW) if i % 2 else (".heic", None)
            write_heic(root / name / f"IMG_{i}{suffix}", Image.new("RGB", (16, 16), colour), orientation)
    return root


def test_a_folder_of_heic_photos_is_listed_verified_and_loaded(tmp_path: Path):
    root = write_heic_dataset(tmp_path / "photos")
    assert len(list_images(root)) == 8
    cfg = DataConfig(path=str(root), size=16, batch_size=4, num_workers=0, valid_pct=0.25)
    source, bad, _ = prepare(cfg)
    assert bad == [] and source.vocab == ["blue", "red"] and len(source) == 8
    dls = make_dataloaders(cfg)
    seen = 0
    for x, y, idx in dls.train:
        for image, label in zip(x, y.tolist()):
            assert is_red(image[:, 8, 8]) == (dls.vocab[label] == "red")
        seen += len(idx)
    assert seen == len(dls.split.train)


@pytest.fixture(scope="module")
def heic_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a workspace, its run trained on HEIC photos only): trained once for the module."""
    home = tmp_path_factory.mktemp("heic_home")
    with pytest.MonkeyPatch.context() as mp, one_torch_thread():
        mp.setenv("LOUPE_HOME", str(home))
        dataset = write_heic_dataset(home / "photos")
        run_dir = train_tiny_run(tiny_config(dataset, {"batch_size": 4}, mixed_precision=False), home / "runs")
    return home, run_dir


def test_a_run_trains_on_heic_photos(heic_run):
    _, run_dir = heic_run
    assert (run_dir / "model.safetensors").is_file()


def test_the_predict_page_classifies_a_heic_upload_and_keeps_it_as_feedback(
    heic_run, monkeypatch: pytest.MonkeyPatch
):
    home, run_dir = heic_run
    monkeypatch.setenv("LOUPE_HOME", str(home))
    data = heic_bytes(two_halves(), ROTATE_CW)
    at = open_app_page("app_pages/predict.py")
    assert at.selectbox(key="predict_model").value == run_dir.name
    at.file_uploader(key="predict_files").set_value(("IMG_4242.HEIC", data, "image/heic")).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) == 1
    assert [img.caption for element in at.get("image") for img in element.proto.imgs] == ["IMG_4242.HEIC · 16x32"]

    key = digest_of(data)[:16]
    at.selectbox(key=f"predict_fb_label_{key}").set_value("red")
    at.button(key=f"predict_fb_save_{key}").click().run()
    assert not at.exception, at.exception
    saved = home / "feedback" / "red" / f"{key}.heic"
    assert saved.read_bytes() == data
    assert feedback_counts(home / "feedback") == {"red": 1}  # a .heic counts as an image of the feedback dataset
    log = [json.loads(line) for line in (home / "feedback" / ".feedback_log.jsonl").read_text().splitlines()]
    assert [r["file"] for r in log] == [f"red/{key}.heic"]
