"""core.data and core.demo on real files: layouts, file discovery, splits, bad images, decoding, loaders."""

from __future__ import annotations

import os
import struct
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.augment import presize_side
from core.data import DataConfig, make_dataloaders, prepare
from core.demo import SHAPE_COLOURS, DemoSpec, make_demo_dataset, mislabelled_files
from core.images import DataError, check_image, open_image, verify_images
from core.layouts import DataSource, detect_layout, load_source
from core.listing import list_images
from core.split import Split, split_items

BEARS = Path(__file__).resolve().parents[2] / "shared" / "data" / "bears"


def _rel(paths: list[Path], root: Path) -> list[str]:
    return sorted(p.relative_to(root.resolve()).as_posix() for p in paths)


def _class_folders(root: Path, counts: dict[str, int], write_image, name: str = "{c}_{i}.png") -> Path:
    """root/<class>/<name> with `counts[class]` images each, a distinct colour per class."""
    for k, (c, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(root / c / name.format(c=c, i=i), colour=(40 * k, 200 - 40 * k, 90))
    return root


# ---------------------------------------------------------------- layouts


def test_folders_layout(tmp_path, write_image):
    _class_folders(tmp_path, {"cat": 3, "dog": 2}, write_image)
    write_image(tmp_path / "dog" / "nested" / "deep.png")  # any depth below the class folder counts
    write_image(tmp_path / "stray.png")  # not in a class folder: not an item
    cfg = DataConfig(path=str(tmp_path))
    assert detect_layout(cfg) == "folders"
    source = load_source(cfg)
    assert source.layout == "folders" and source.vocab == ["cat", "dog"] and not source.multi_label
    assert source.class_counts() == {"cat": 3, "dog": 3}
    assert dict(zip(_rel(source.files, tmp_path), [ls[0] for ls in source.labels]))["dog/nested/deep.png"] == "dog"
    assert "one folder per class" in source.describe() and "2 classes, 6 images" in source.describe()


@pytest.mark.parametrize("valid_name", ["valid", "val"])
def test_split_folders_layout_keeps_its_split(tmp_path, write_image, valid_name):
    _class_folders(tmp_path / "train", {"cat": 3, "dog": 3}, write_image)
    _class_folders(tmp_path / valid_name, {"cat": 1, "dog": 1}, write_image)
    _class_folders(tmp_path / "test", {"cat": 1}, write_image)
    cfg = DataConfig(path=str(tmp_path), valid_pct=0.5)  # ignored: the folders fix the split
    assert detect_layout(cfg) == "split_folders"
    source = load_source(cfg)
    split = split_items(source, cfg)

    def side(ids: list[int]) -> set[str]:
        return {source.files[i].relative_to(tmp_path.resolve()).parts[0] for i in ids}

    assert (len(split.train), len(split.valid), len(split.test)) == (6, 2, 1)
    assert side(split.train) == {"train"} and side(split.valid) == {valid_name} and side(split.test) == {"test"}
    assert source.vocab == ["cat", "dog"]
    assert "train/valid folders" in source.describe()


def test_filename_regex_layout_pets_style(tmp_path, write_image):
    for name in ["great_pyrenees_173.jpg", "great_pyrenees_2.jpg", "Abyssinian_1.jpg", "Abyssinian_22.png"]:
        write_image(tmp_path / name)
    write_image(tmp_path / "readme_image.jpg")  # no number before the extension
    write_image(tmp_path / "noise.jpg")
    cfg = DataConfig(path=str(tmp_path))
    assert detect_layout(cfg) == "filename_regex"
    source = load_source(cfg)
    assert source.vocab == ["Abyssinian", "great_pyrenees"]
    labels = dict(zip(_rel(source.files, tmp_path), [ls[0] for ls in source.labels]))
    assert labels["great_pyrenees_173.jpg"] == "great_pyrenees" and labels["Abyssinian_22.png"] == "Abyssinian"
    assert sorted(p.name for p, _ in source.unlabelled) == ["noise.jpg", "readme_image.jpg"]
    assert all("does not match" in why for _, why in source.unlabelled)
    assert "labels in file names" in source.describe()


def test_csv_layout_fixed_split_and_missing_file(tmp_path, write_image):
    rows = ["filename,label,is_valid"]
    for i in range(4):
        write_image(tmp_path / "images" / f"c{i}.jpg")
        write_image(tmp_path / "images" / f"d{i}.jpg", colour=(0, 0, 200))
        rows += [f"images/c{i}.jpg,cat,{int(i == 0)}", f"images/d{i}.jpg,dog,{'True' if i == 0 else 'False'}"]
    rows.append("images/ghost.jpg,cat,0")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = DataConfig(path=str(tmp_path), valid_pct=0.5)
    assert detect_layout(cfg) == "csv"
    source = load_source(cfg)
    assert len(source) == 8 and source.vocab == ["cat", "dog"] and not source.multi_label
    assert [(p.name, "not found" in why) for p, why in source.unlabelled] == [("ghost.jpg", True)]
    split = split_items(source, cfg)
    assert sorted(source.files[i].name for i in split.valid) == ["c0.jpg", "d0.jpg"]
    assert len(split.train) == 6
    assert "labels in a CSV file" in source.describe()


def test_csv_planet_style_names_without_extension_are_multi_label(tmp_path, write_image):
    tags = ["clear primary", "haze", "clear", "primary haze water", "clear primary"]
    for i in range(len(tags)):
        write_image(tmp_path / "train-jpg" / f"train_{i}.jpg")
    lines = ["image_name,tags"] + [f"train_{i},{t}" for i, t in enumerate(tags)]
    (tmp_path / "train_v2.csv").write_text("\n".join(lines) + "\n")
    source = load_source(DataConfig(path=str(tmp_path)))
    assert source.layout == "csv" and source.multi_label and not source.unlabelled
    assert source.vocab == ["clear", "haze", "primary", "water"]
    by_name = {f.name: ls for f, ls in zip(source.files, source.labels)}
    assert by_name["train_3.jpg"] == ("primary", "haze", "water")
    hot = source.targets()
    assert hot.dtype == torch.float32 and hot.shape == (5, 4)
    assert hot.sum(1).tolist() == [2, 1, 1, 3, 2]
    assert "multi-label" in source.describe()


def test_detect_layout_errors_on_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        detect_layout(DataConfig(path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    with pytest.raises(DataError, match="No images found"):
        detect_layout(DataConfig(path=str(tmp_path / "empty")))


# ---------------------------------------------------------------- finding image files


def test_list_images_extensions_hidden_and_non_images(tmp_path, write_image):
    names = ["a.jpg", "b.jpeg", "c.png", "d.bmp", "e.gif", "f.webp", "g.tif", "h.tiff", "i.JPG", "j.PNG"]
    for name in names:
        write_image(tmp_path / "cls" / name)
    write_image(tmp_path / "cls" / ".hidden.jpg")
    write_image(tmp_path / "cls" / ".cache" / "k.jpg")
    write_image(tmp_path / ".thumbs" / "cls" / "l.jpg")
    (tmp_path / "cls" / "notes.txt").write_text("not an image")
    (tmp_path / "cls" / "meta.json").write_text("{}")
    found = list_images(tmp_path)
    assert _rel(found, tmp_path) == sorted(f"cls/{n}" for n in names)
    assert verify_images(found) == []  # every real image in every format decodes


@pytest.mark.timeout(30)
def test_list_images_symlinks_stay_inside_root(tmp_path, write_image):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_image(root / "cls" / "a.png")
    write_image(outside / "o.png")
    write_image(outside / "more" / "m.png")
    os.symlink("a.png", root / "cls" / "link.png")  # inside the root: an item
    os.symlink(outside / "o.png", root / "cls" / "out.png")  # a file elsewhere: not followed
    os.symlink(outside / "more", root / "cls" / "outdir")  # a folder elsewhere: not followed
    os.symlink(root, root / "cls" / "back_to_root")  # a cycle
    os.symlink("l2.png", root / "cls" / "l1.png")  # a link loop
    os.symlink("l1.png", root / "cls" / "l2.png")
    assert _rel(list_images(root), root) == ["cls/a.png", "cls/link.png"]


# ---------------------------------------------------------------- splits


def _memory_source(counts: dict[str, int]) -> DataSource:
    """A source without files on disk: splitting only looks at labels and paths."""
    root = Path("/data")
    files = [root / c / f"{c}_{i}.jpg" for c, n in counts.items() for i in range(n)]
    labels = [(c,) for c, n in counts.items() for _ in range(n)]
    return DataSource(root, "folders", files, labels, sorted(counts), multi_label=False)


def _assert_partition(split, n: int) -> None:
    train, valid = set(split.train.tolist()), set(split.valid.tolist())
    assert not train & valid and train | valid == set(range(n))


def test_stratified_split_keeps_small_classes_on_both_sides():
    source = _memory_source({"big": 40, "mid": 10, "tiny2": 2, "tiny3": 3})
    cfg = DataConfig(valid_pct=0.2, seed=1)
    split = split_items(source, cfg)
    _assert_partition(split, len(source))
    for side in (split.train, split.valid):
        assert {source.labels[i][0] for i in side} == set(source.vocab)
    assert abs(len(split.valid) - 0.2 * len(source)) <= 2
    assert np.array_equal(split.valid, split_items(source, cfg).valid)
    assert not np.array_equal(split.valid, split_items(source, DataConfig(valid_pct=0.2, seed=2)).valid)


def test_unstratified_split_sizes_and_seeds():
    source = _memory_source({"a": 30, "b": 25})
    split = split_items(source, DataConfig(valid_pct=0.2, seed=0, stratify=False))
    _assert_partition(split, len(source))
    assert len(split.valid) == 11
    other = split_items(source, DataConfig(valid_pct=0.2, seed=5, stratify=False))
    assert not np.array_equal(split.valid, other.valid)


def test_a_split_and_the_side_of_each_item_convert_both_ways():
    sides = ["valid", "train", "test", "train", "valid", "train"]
    split = Split.from_sides(sides)
    assert split.train.tolist() == [1, 3, 5] and split.valid.tolist() == [0, 4] and split.test.tolist() == [2]
    assert split.sides(len(sides)).tolist() == sides
    assert Split(np.array([0]), np.array([2])).sides(3).tolist() == ["train", "", "valid"]  # item 1 on no side


def _assert_groups_not_split(source: DataSource, split, group_of) -> None:
    side = {}
    for name, ids in (("train", split.train), ("valid", split.valid)):
        for i in ids:
            assert side.setdefault(group_of(i), name) == name, f"group {group_of(i)} on both sides"
    assert len(split.valid) > 0 and len(split.train) > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_regex_split_never_straddles(tmp_path, write_image, seed):
    # Every photographer shot both classes: groups are bigger than a class's valid quota.
    for who in ("alice", "bob", "carol", "dave", "erin"):
        for c in ("cat", "dog"):
            for i in range(3):
                write_image(tmp_path / c / f"{who}_{c}{i}.png")
    cfg = DataConfig(path=str(tmp_path), group_regex=r"^([a-z]+)_", valid_pct=0.2, seed=seed)
    source, bad, split = prepare(cfg)
    assert bad == []
    _assert_partition(split, len(source))
    _assert_groups_not_split(source, split, lambda i: source.files[i].name.split("_")[0])


def test_group_column_split_never_straddles(tmp_path, write_image):
    rows = ["file,label,patient"]
    for p in range(6):
        for i in range(4):
            name = f"p{p}_{i}.png"
            write_image(tmp_path / name)
            rows.append(f"{name},{'sick' if (p + i) % 2 else 'well'},patient{p}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = DataConfig(path=str(tmp_path), group_col="patient", valid_pct=0.3, seed=3)
    source, _, split = prepare(cfg)
    assert source.groups is not None
    _assert_partition(split, len(source))
    _assert_groups_not_split(source, split, lambda i: source.groups[i])


# ---------------------------------------------------------------- bad files


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_bomb(path: Path, side: int) -> Path:
    """A valid 1-bit PNG of side x side pixels: tens of KB on disk, hundreds of MB once decoded."""
    pack = zlib.compressobj(9)
    rows = (b"\x00" * (1 + (side + 7) // 8)) * 1000  # filter byte + packed bits, 1000 rows at a time
    idat = b"".join(pack.compress(rows) for _ in range(side // 1000)) + pack.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    path.write_bytes(png)
    return path


def _truncated_jpeg(path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_verify_images_reports_each_bad_file_with_a_reason(tmp_path, write_image):
    good = [write_image(tmp_path / "good.jpg"), write_image(tmp_path / "good.png")]
    png_as_jpg = write_image(tmp_path / "really_png.png").rename(tmp_path / "really_png.jpg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    html = tmp_path / "page.jpg"
    html.write_text("<html><body>403 Forbidden</body></html>")
    truncated = _truncated_jpeg(tmp_path / "truncated.jpg")
    bomb = write_png_bomb(tmp_path / "bomb.png", 20_000)  # past PIL's own hard limit
    big = write_png_bomb(tmp_path / "big.png", 10_000)  # 100 Mpx: past Loupe's limit only
    assert bomb.stat().st_size < 100_000
    start = time.perf_counter()
    bad = verify_images([*good, png_as_jpg, empty, html, truncated, bomb, big])
    assert time.perf_counter() - start < 5  # refused by the declared size, not decoded
    reasons = {b.path.name: b.reason for b in bad}
    assert set(reasons) == {"empty.jpg", "page.jpg", "truncated.jpg", "bomb.png", "big.png"}
    assert "empty" in reasons["empty.jpg"]
    assert "not an image" in reasons["page.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "decompression bomb" in reasons["bomb.png"] and "400000000" in reasons["bomb.png"]
    assert "decompression bomb" in reasons["big.png"] and "10000x10000" in reasons["big.png"]
    with pytest.raises(DataError, match="decompression bomb"):
        open_image(bomb)


def test_max_pixels_refuses_by_declared_size(tmp_path, write_image):
    path = write_image(tmp_path / "x.png", size=64)
    assert check_image(path) is None
    reason = check_image(path, max_pixels=1000)
    assert reason is not None and "decompression bomb" in reason and "64x64" in reason
    with pytest.raises(DataError, match="64x64"):
        open_image(path, max_pixels=1000)


def test_prepare_drops_broken_files_and_their_empty_class(tmp_path, write_image):
    _class_folders(tmp_path, {"cat": 3, "dog": 3}, write_image)
    (tmp_path / "cat" / "zero.png").write_bytes(b"")
    (tmp_path / "bird").mkdir()
    _truncated_jpeg(tmp_path / "bird" / "b0.jpg")
    (tmp_path / "bird" / "b1.jpg").write_text("not a bird")
    source, bad, split = prepare(DataConfig(path=str(tmp_path), valid_pct=0.34))
    assert source.vocab == ["cat", "dog"] and len(source) == 6
    assert sorted(b.path.name for b in bad) == ["b0.jpg", "b1.jpg", "zero.png"]
    _assert_partition(split, len(source))


def test_all_broken_or_single_class_datasets_raise_clear_errors(tmp_path, write_image):
    broken = tmp_path / "broken"
    for c in ("cat", "dog"):
        (broken / c).mkdir(parents=True)
        (broken / c / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="failed to load"):
        prepare(DataConfig(path=str(broken)))
    single = _class_folders(tmp_path / "single", {"cat": 4}, write_image)
    with pytest.raises(DataError, match="only one class"):
        make_dataloaders(DataConfig(path=str(single), size=16, num_workers=0))


# ---------------------------------------------------------------- decoding


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    img = open_image(tmp_path / "g16.png")
    assert img.mode == "RGB" and img.size == (8, 8)
    grey = np.asarray(img)[..., 0].ravel()
    assert len(set(grey.tolist())) >= 32
    assert np.all(np.diff(grey.astype(int)) >= 0) and grey[0] == 0 and grey[-1] == 255


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def test_unusual_modes_come_back_rgb(tmp_path):
    palette = Image.new("P", (6, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    frames = [Image.new("RGB", (5, 7), c) for c in ("red", "blue")]
    cases = {
        "cmyk.jpg": (_save(Image.new("CMYK", (10, 6), (0, 255, 255, 0)), tmp_path / "cmyk.jpg"), (10, 6)),
        "palette.png": (_save(palette, tmp_path / "palette.png", transparency=0), (6, 4)),
        "rgba.png": (_save(Image.new("RGBA", (4, 3), (0, 0, 0, 0)), tmp_path / "rgba.png"), (4, 3)),
        "la.png": (_save(Image.new("LA", (3, 5), (0, 0)), tmp_path / "la.png"), (3, 5)),
        "anim.gif": (_save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:]), (5, 7)),
        "one.png": (_save(Image.new("L", (1, 1), 7), tmp_path / "one.png"), (1, 1)),
        "wide.png": (_save(Image.new("RGB", (4000, 1), "green"), tmp_path / "wide.png"), (4000, 1)),
    }
    out = {name: open_image(path) for name, (path, _) in cases.items()}
    for name, (_, size) in cases.items():
        assert out[name].mode == "RGB" and out[name].size == size, name
    r, g, b = out["cmyk.jpg"].getpixel((5, 3))
    assert r > 200 and g < 60 and b < 60
    assert out["palette.png"].getpixel((0, 0)) == (255, 255, 255)  # transparent over white
    assert out["palette.png"].getpixel((1, 0)) == (255, 0, 0)
    assert out["rgba.png"].getpixel((0, 0)) == (255, 255, 255)
    assert out["la.png"].getpixel((0, 0)) == (255, 255, 255)
    assert out["anim.gif"].getpixel((0, 0))[0] > 200  # the first frame (red), not the last
    assert out["one.png"].getpixel((0, 0)) == (7, 7, 7)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(Image.new("RGB", (16, 8), "blue"), tmp_path / "rotated.jpg", exif=exif)
    assert Image.open(path).size == (16, 8)
    assert open_image(path).size == (8, 16)


# ---------------------------------------------------------------- loaders


def _check_batches(loader, source: DataSource) -> list[int]:
    """Each batch is (x, y, idx) with y the label of source item idx; returns every idx seen."""
    seen = []
    for x, y, idx in loader:
        side = presize_side(32)  # batches are presized uint8; augmentation happens on the device
        assert x.shape[1:] == (3, side, side) and x.dtype == torch.uint8 and len(y) == len(idx) == len(x)
        assert [source.vocab[k] for k in y.tolist()] == [source.labels[i][0] for i in idx.tolist()]
        seen += idx.tolist()
    return seen


def test_make_dataloaders_on_demo_data(demo_dataset):
    cfg = DataConfig(path=str(demo_dataset), size=32, batch_size=8, num_workers=0, valid_pct=0.25)
    dls = make_dataloaders(cfg)
    assert dls.vocab == ["circle", "square", "triangle"] and dls.n_classes == 3 and not dls.multi_label
    train_seen = _check_batches(dls.train, dls.source)
    assert sorted(train_seen) == dls.split.train.tolist()  # 18 images at batch 8: the last batch of 2 is kept
    assert sorted(_check_batches(dls.valid, dls.source)) == dls.split.valid.tolist()


def test_make_dataloaders_with_worker_processes(demo_dataset):
    cfg = DataConfig(path=str(demo_dataset), size=32, batch_size=8, num_workers=2, valid_pct=0.25)
    dls = make_dataloaders(cfg)
    assert dls.train.num_workers == 2
    assert sorted(_check_batches(dls.valid, dls.source)) == dls.split.valid.tolist()
    assert len(_check_batches(dls.train, dls.source)) > 0


def test_train_loader_never_yields_a_batch_of_one(tmp_path, write_image):
    _class_folders(tmp_path, {"a": 5, "b": 6}, write_image)
    cfg = DataConfig(path=str(tmp_path), size=16, batch_size=8, num_workers=0, valid_pct=0.2)
    dls = make_dataloaders(cfg)
    assert len(dls.split.train) == 9  # one full batch and one image left over
    assert [len(x) for x, _, _ in dls.train] == [8]
    small = make_dataloaders(DataConfig(path=str(tmp_path), size=16, batch_size=16, num_workers=0, valid_pct=0.2))
    assert [len(x) for x, _, _ in small.train] == [9]  # fewer than a batch: kept, not dropped


def test_file_deleted_after_loading_is_skipped(demo_dataset):
    cfg = DataConfig(path=str(demo_dataset), size=32, batch_size=8, num_workers=0, valid_pct=0.25)
    dls = make_dataloaders(cfg)
    gone = int(dls.split.valid[0])
    dls.source.files[gone].unlink()
    seen = _check_batches(dls.valid, dls.source)
    assert gone not in seen and len(seen) == len(dls.split.valid) - 1


def test_multi_label_csv_yields_multi_hot_targets(tmp_path, write_image):
    tags = ["a", "b", "a b", "b c", "a c", "c"] * 2
    rows = ["fname,labels"]
    for i, t in enumerate(tags):
        write_image(tmp_path / "img" / f"{i}.png", colour=(20 * i, 100, 50))
        rows.append(f"img/{i}.png,{t}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    dls = make_dataloaders(DataConfig(path=str(tmp_path), size=16, batch_size=4, num_workers=0, valid_pct=0.25))
    assert dls.multi_label and dls.vocab == ["a", "b", "c"]
    for _, y, idx in dls.valid:
        assert y.dtype == torch.float32 and y.shape == (len(idx), 3)
        for row, i in zip(y.tolist(), idx.tolist()):
            assert {dls.vocab[k] for k, v in enumerate(row) if v == 1.0} == set(dls.source.labels[i])


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "zip"}, "layout must be one of"),
        ({"valid_pct": 1.0}, "valid_pct must be in"),
        ({"valid_pct": -0.1}, "valid_pct must be in"),
        ({"label_regex": "(unclosed"}, "label_regex .* is not a valid regular expression"),
        ({"group_regex": "[a-"}, "group_regex .* is not a valid regular expression"),
    ],
)
def test_data_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


# ---------------------------------------------------------------- demo generator


def test_demo_dataset_counts_and_mislabelled_files(tmp_path):
    spec = DemoSpec(n_per_class=10, size=8, mislabel_frac=0.3, seed=1)
    root = make_demo_dataset(tmp_path / "demo", spec)
    files = list_images(root)
    assert len(files) == 30
    wrong = {p.resolve() for p in mislabelled_files(root)}
    assert wrong and wrong <= set(files)
    for f in files:
        assert (f.name.split("_")[0] != f.parent.name) == (f in wrong), f
    assert load_source(DataConfig(path=str(root))).vocab == ["circle", "square", "triangle"]


def _contents(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root.resolve()).as_posix(): p.read_bytes() for p in list_images(root)}


def test_demo_dataset_is_deterministic_by_seed(tmp_path):
    spec = DemoSpec(n_per_class=4, size=8, seed=7)
    a = _contents(make_demo_dataset(tmp_path / "a", spec))
    assert a == _contents(make_demo_dataset(tmp_path / "b", spec))
    assert a != _contents(make_demo_dataset(tmp_path / "c", DemoSpec(n_per_class=4, size=8, seed=8)))


def _shape_colour(path: Path) -> np.ndarray:
    """Mean colour of the pixels bright enough to be the shape (the background stays below about 130)."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float).reshape(-1, 3)
    return pixels[pixels.max(axis=1) > 150].mean(axis=0)


def test_demo_colours_make_look_alike_shapes(tmp_path):
    # squares are green by default; drawn in the circle's red they differ from circles by outline alone
    spec = DemoSpec(classes=("circle", "square"), n_per_class=6, size=32, mislabel_frac=0.0, seed=2,
                    colours={"square": SHAPE_COLOURS["circle"]})
    root = make_demo_dataset(tmp_path / "pairs", spec)
    default = make_demo_dataset(tmp_path / "plain", replace(spec, colours=None))
    for f in list_images(root / "square"):
        red, green, _ = _shape_colour(f)
        assert red > green + 60, f
    for f in list_images(default / "square"):
        red, green, _ = _shape_colour(f)
        assert green > red + 60, f


def test_demo_dataset_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        make_demo_dataset(tmp_path / "mine", DemoSpec(n_per_class=2, size=8))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mine")]  # no staging folder left behind


# ---------------------------------------------------------------- real photos


@pytest.mark.skipif(not BEARS.is_dir(), reason=f"real bear photos not found at {BEARS} (a fresh clone has no shared/)")
def test_real_bear_photos():
    cfg = DataConfig(path=str(BEARS))
    source, bad, split = prepare(cfg)
    assert source.layout == "folders" and source.vocab == ["black", "grizzly", "teddys"]
    assert len(source) == 517 and bad == []
    assert {source.labels[i][0] for i in split.valid} == set(source.vocab)
    _assert_partition(split, len(source))


def test_extra_training_folders_join_the_train_side_only(demo_dataset, tmp_path, write_image):
    from core.data import prepare
    from core.split import source_from_record, source_record

    feedback = tmp_path / "feedback"
    for i in range(3):
        write_image(feedback / "circle" / f"fb_{i}.png", (250, 10, 10))
    write_image(feedback / "hexagon" / "fb_new.png", (10, 10, 250))
    source, _, split = prepare(DataConfig(path=str(demo_dataset), extra_train=[str(feedback)]))
    extra = {i for i, f in enumerate(source.files) if f.is_relative_to(feedback.resolve())}
    assert len(extra) == 4 and extra <= set(split.train.tolist())
    assert not extra & set(split.valid.tolist())
    assert "hexagon" in source.vocab and source.vocab == sorted(source.vocab)
    rebuilt, rebuilt_split = source_from_record(source_record(source, split))
    assert rebuilt.files == source.files and rebuilt_split.train.tolist() == sorted(split.train.tolist())


def test_split_is_described_from_what_the_run_used_not_from_the_config(tmp_path, write_image):
    from core.split import describe_split, source_record

    def described(cfg: DataConfig) -> str:
        source, _, split = prepare(cfg)
        return describe_split(source_record(source, split), cfg)

    # train/ and val/ folders fix the split: valid_pct and seed were never used, so they are not reported.
    for side, n in (("train", 6), ("val", 4)):
        for i in range(n):
            write_image(tmp_path / "bears" / side / "grizzly" / f"{i}.png", (i * 20, 90, 40))
    cfg = DataConfig(path=str(tmp_path / "bears"), valid_pct=0.2, seed=42)
    assert described(cfg) == "train/ and val/ folders: 6 train · 4 valid (40%)"

    rows = ["file,label,is_valid"] + [f"{i}.png,cat,{int(i < 3)}" for i in range(10)]
    for i in range(10):
        write_image(tmp_path / "csv" / f"{i}.png", (i * 20, 40, 90))
    (tmp_path / "csv" / "labels.csv").write_text("\n".join(rows) + "\n")
    assert described(DataConfig(path=str(tmp_path / "csv"))) == "the CSV's is_valid column: 7 train · 3 valid (30%)"

    for i in range(10):
        write_image(tmp_path / "loose" / "cat" / f"{i}.png", (i * 20, 40, 90))
    cfg = DataConfig(path=str(tmp_path / "loose"), valid_pct=0.3, seed=7)
    assert described(cfg) == "random 30% split per class, seed 7: 7 train · 3 valid (30%)"


def test_an_epoch_leaves_out_at_most_one_training_image(tmp_path, write_image):
    # 96 training images at batch 64 used to train on 64 of them an epoch: the incomplete batch was dropped.
    make_demo_dataset(tmp_path / "demo", DemoSpec(n_per_class=40, size=16, seed=0))
    dls = make_dataloaders(DataConfig(path=str(tmp_path / "demo"), size=16, batch_size=64, num_workers=0))
    assert len(dls.split.train) == 96
    assert [len(x) for x, _, _ in dls.train] == [64, 32]
    _class_folders(tmp_path / "eleven", {"a": 7, "b": 6}, write_image)  # 11 training images (2 held out)
    eleven = make_dataloaders(DataConfig(path=str(tmp_path / "eleven"), size=16, batch_size=4, num_workers=0))
    assert [len(x) for x, _, _ in eleven.train] == [4, 4, 3]


def test_defaults_fitted_to_a_dataset(tmp_path, write_image):
    from core.data import MIN_BATCHES_PER_EPOCH, data_facts, suggested_batch_size, suggested_size

    demo = make_demo_dataset(tmp_path / "demo", DemoSpec(n_per_class=40, size=64, seed=0))
    facts = data_facts(DataConfig(path=str(demo)))
    assert (facts.n_train, facts.vocab, facts.typical_side, facts.split_fixed) == (
        96, ("circle", "square", "triangle"), 64, None)
    assert suggested_size(facts.typical_side) == 64  # not upscaled to 224
    bs = suggested_batch_size(facts.n_train)
    assert bs < 64 and -(-facts.n_train // bs) >= MIN_BATCHES_PER_EPOCH // 2
    assert suggested_size(500) == 224 and suggested_size(100) == 96 and suggested_size(None) == 224
    assert suggested_batch_size(100_000) == 64 and suggested_batch_size(3) == 16
    for side, n in (("train", 4), ("valid", 2)):
        for i in range(n):
            write_image(tmp_path / "split" / side / "cat" / f"{i}.png", size=300)
            write_image(tmp_path / "split" / side / "dog" / f"{i}.png", size=280)
    facts = data_facts(DataConfig(path=str(tmp_path / "split"), valid_pct=0.4))
    assert facts.n_train == 8 and facts.typical_side == 290  # the median of 280s and 300s
    assert "train/ and valid/ folders" in facts.split_fixed


def test_split_fixed_by_names_what_fixes_the_split(tmp_path, write_image):
    from core.layouts import split_fixed_by

    _class_folders(tmp_path / "loose", {"a": 2, "b": 2}, write_image)
    assert split_fixed_by(DataConfig(path=str(tmp_path / "loose"))) is None
    for with_column in (True, False):
        folder = tmp_path / f"csv_{with_column}"
        for i in range(4):
            write_image(folder / f"{i}.png")
        rows = ["file,label,is_valid"] if with_column else ["file,label"]
        rows += [f"{i}.png,{'ab'[i % 2]}" + (f",{int(i == 0)}" if with_column else "") for i in range(4)]
        (folder / "labels.csv").write_text("\n".join(rows) + "\n")
        reason = split_fixed_by(DataConfig(path=str(folder)))
        assert (reason is not None and "is_valid" in reason) if with_column else reason is None
    assert split_fixed_by(DataConfig(path=str(tmp_path / "nowhere"))) is None


def test_listing_signature_changes_with_the_listing_and_only_then(tmp_path, write_image):
    from core.listing import listing_signature

    root = _class_folders(tmp_path / "set", {"cat": 2, "dog": 2}, write_image)
    (root / "labels.csv").write_text("a,b\n")
    before = listing_signature(root)
    assert listing_signature(root) == before and before[0] == 5
    write_image(root / "dog" / "new.png")  # a file added deep down: its folder's mtime moves
    added = listing_signature(root)
    assert added != before and added[0] == 6
    stamp = os.stat(root / "labels.csv").st_mtime_ns + 10**9
    os.utime(root / "labels.csv", ns=(stamp, stamp))  # a CSV at the top edited in place
    assert listing_signature(root) != added


def test_split_counts_counts_each_class_per_side(tmp_path, write_image):
    from core.data import DataConfig, prepare
    from core.split import split_counts

    root = _class_folders(tmp_path / "set", {"cat": 5, "dog": 5}, write_image)
    source, _, split = prepare(DataConfig(path=str(root), valid_pct=0.2))
    table = split_counts(source, split)
    counts = {(row["class"], row["split"]): row["images"] for _, row in table.iterrows()}
    assert counts == {("cat", "train"): 4, ("cat", "valid"): 1, ("dog", "train"): 4, ("dog", "valid"): 1}
