"""Dataset health on generated photos with planted problems: an exact copy, a near copy across the split (a
leak), an off-topic image; the check in this process, from the command line and as a background job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from core import healthjob
from core.config import DataConfig
from core.health import DEFAULT_MATCH, check_health
from core.healthdigest import digest
from core.healthmatch import match_pairs
from core.keeptogether import add_groups
from core.split import split_items

REPO = Path(__file__).resolve().parents[1]
CLASSES = {"red": (190, 40, 40), "green": (40, 160, 60), "blue": (40, 60, 190)}


def photo(rng: np.random.Generator, colour: tuple[int, int, int], size: int = 96) -> Image.Image:
    """A 'photo': a textured background of its own (a random 32x24 mosaic, smoothed) and a blob of the class
    colour."""
    field = Image.fromarray(rng.integers(60, 250, (24, 32, 3), dtype=np.uint8)).resize((size, size * 3 // 4),
                                                                                         Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(field)
    cx, cy = size // 2 + int(rng.integers(-12, 12)), size * 3 // 8 + int(rng.integers(-8, 8))
    r = int(rng.integers(12, 22))
    draw.ellipse((cx - r, cy - r * 3 // 4, cx + r, cy + r * 3 // 4), fill=colour)
    noise = rng.normal(0, 6, (field.height, field.width, 3))
    return Image.fromarray(np.clip(np.asarray(field) + noise, 0, 255).astype(np.uint8))


def near_copy(img: Image.Image) -> Image.Image:
    """Resized by 0.8, a 10% crop off one corner, mirrored (and re-encoded by whoever saves it)."""
    small = img.resize((round(img.width * 0.8), round(img.height * 0.8)), Image.Resampling.BICUBIC)
    return ImageOps.mirror(small.crop((small.width // 10, 0, small.width, small.height * 9 // 10)))


def off_topic(size: int = 96) -> Image.Image:
    """Black and white stripes: nothing like any photo of the set."""
    stripes = (np.arange(size)[None, :] // 8 % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.repeat(stripes, size * 3 // 4, 0)).convert("RGB")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """train/ and valid/ folders of 8 + 2 photos per class, with: valid/red/copy.jpg a near copy of
    train/red/0.jpg (a leak), train/green/same.png the same pixels as train/green/1.jpg (exact), and
    train/blue/stripes.png off-topic."""
    root = tmp_path_factory.mktemp("health") / "data"
    rng = np.random.default_rng(0)
    for name, colour in CLASSES.items():
        for i in range(10):
            side = "train" if i < 8 else "valid"
            (root / side / name).mkdir(parents=True, exist_ok=True)
            photo(rng, colour).save(root / side / name / f"{i}.jpg", quality=90)
    near_copy(Image.open(root / "train/red/0.jpg")).save(root / "valid/red/copy.jpg", quality=80)
    Image.open(root / "train/green/1.jpg").save(root / "train/green/same.png")  # decoded pixels, saved anew
    off_topic().save(root / "train/blue/stripes.png")
    return {"root": root, "near": ["train/red/0.jpg", "valid/red/copy.jpg"],
            "exact": ["train/green/1.jpg", "train/green/same.png"], "off": "train/blue/stripes.png"}


@pytest.fixture(scope="module")
def report(planted, tmp_path_factory):
    os.environ["LOUPE_HOME"] = str(tmp_path_factory.mktemp("home"))
    return check_health(DataConfig(path=str(planted["root"]), size=64))


def test_exact_copies_are_found_by_their_pixels_not_their_bytes(report, planted):
    assert [sorted(report.items["file"].iloc[g]) for g in report.exact] == [planted["exact"]]
    assert planted["exact"] in report.duplicate_groups()


def test_a_near_copy_across_the_split_is_a_duplicate_and_a_leak(report, planted):
    pairs = report.near_pairs()
    assert {frozenset(p) for p in zip(pairs["file_a"], pairs["file_b"])} == {frozenset(planted["near"])}
    assert report.leaks() == [planted["near"]]  # the exact pair sits on one side: no leak
    # A stricter threshold than the pair's own match reports no near pairs; the exact group stays.
    strict = float(pairs["match"].max()) + 0.01
    assert report.near_pairs(strict).empty and report.duplicate_groups(strict) == [planted["exact"]]


def test_the_off_topic_image_is_the_top_outlier(report, planted):
    assert report.outliers(1)["file"].tolist() == [planted["off"]]
    assert "perceptual hash" in report.how  # no run and no pretrained weights on a test machine


def test_the_match_tells_a_copy_from_a_look_alike(planted, tmp_path, monkeypatch):
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path))
    files = [planted["root"] / f for f in ("train/red/0.jpg", "valid/red/copy.jpg", "train/red/1.jpg")]
    dig = digest(files, 74, None, 64)
    copy, look_alike = match_pairs(dig.grey, dig.colour, np.array([0, 0]), np.array([1, 2]))
    assert copy >= DEFAULT_MATCH > look_alike


def test_keeping_the_leak_together_moves_the_copy_to_train(planted, report, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(planted["root"], root)
    add_groups(root, report.leaks())
    from core.layouts import load_source

    cfg = DataConfig(path=str(root), size=64)
    source = load_source(cfg)
    split = split_items(source, cfg)
    sides = dict(zip((f.relative_to(root).as_posix() for f in source.files), split.sides(len(source))))
    assert sides["valid/red/copy.jpg"] == "train" and split.kept_together == 1


def test_the_command_line_prints_duplicates_leaks_and_outliers_as_json(planted, tmp_path):
    env = {**os.environ, "LOUPE_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "core", "health", str(planted["root"]), "--size", "64", "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert sorted(map(sorted, out["duplicates"])) == sorted([planted["exact"], planted["near"]])
    assert out["leaks"] == [planted["near"]] and out["outliers"][0] == planted["off"]


def test_a_missing_folder_is_one_line_on_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "core", "health", str(tmp_path / "nowhere"), "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LOUPE_HOME": str(tmp_path / "home")})
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def test_the_background_job_reports_progress_and_saves_a_report_that_loads(planted, tmp_path, monkeypatch):
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path / "home"))
    cfg = DataConfig(path=str(planted["root"]), size=64)
    folder = healthjob.start(cfg, None)
    assert folder == healthjob.job_folder(cfg, None)
    deadline = time.monotonic() + 180
    while (state := healthjob.job_state(folder)).state == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert state.state == "done", state
    loaded = healthjob.load_report(folder)
    assert loaded is not None and loaded.leaks() == [planted["near"]]
    assert loaded.items["x"].notna().all()  # every image on the map (no sample at this size)


def test_a_failed_job_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path / "home"))
    empty = tmp_path / "empty"
    empty.mkdir()
    folder = healthjob.start(DataConfig(path=str(empty)), None)
    deadline = time.monotonic() + 120
    while (state := healthjob.job_state(folder)).state == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert state.state == "failed" and state.error and "Traceback" not in state.error


def _flat_layout(planted: dict, root: Path, name) -> list[str]:
    """Every planted image copied into one folder, named by `name(class, stem, number, suffix)`; returns the
    new names of the planted exact pair, then of the near pair."""
    import shutil

    root.mkdir(parents=True)
    names = {}
    for number, f in enumerate(sorted(planted["root"].rglob("*.*"))):
        rel = f.relative_to(planted["root"]).as_posix()
        target = name(f.parent.name, f"{f.parent.parent.name}{f.stem}", number, f.suffix)
        shutil.copy(f, root / target)
        names[rel] = target
    return [names[f] for f in planted["exact"]] + [names[f] for f in planted["near"]]


@pytest.mark.parametrize("layout", ["folders", "filename_regex", "csv"])
def test_every_layout_finds_the_planted_copies(planted, tmp_path, monkeypatch, layout):
    """The check reads each layout Loupe reads (split_folders is the fixture's own): the exact pair and the near
    copy are found, by the paths as the layout names them."""
    import shutil

    monkeypatch.setenv("LOUPE_HOME", str(tmp_path / "home"))
    root = tmp_path / layout
    if layout == "folders":  # train/red/0.jpg -> red/train0.jpg
        root.mkdir()
        for f in planted["root"].rglob("*.*"):
            (root / f.parent.name).mkdir(exist_ok=True)
            shutil.copy(f, root / f.parent.name / f"{f.parent.parent.name}{f.stem}{f.suffix}")
        rel = lambda f: f"{f.split('/')[1]}/{f.split('/')[0]}{Path(f).stem}{Path(f).suffix}"  # noqa: E731
        expected = [rel(f) for f in planted["exact"] + planted["near"]]
    elif layout == "filename_regex":  # red_17.jpg, as Oxford-IIIT Pets names its photos
        expected = _flat_layout(planted, root, lambda cls, stem, number, suffix: f"{cls}_{number}{suffix}")
    else:
        expected = _flat_layout(planted, root, lambda cls, stem, number, suffix: f"{cls}-{stem}{suffix}")
        rows = [f"{p.name},{p.name.split('-')[0]}" for p in sorted(root.iterdir())]
        (root / "labels.csv").write_text("fname,labels\n" + "\n".join(rows) + "\n")
    report = check_health(DataConfig(path=str(root), size=64, layout=layout))
    groups = report.duplicate_groups()
    assert sorted(expected[:2]) in groups and sorted(expected[2:]) in groups


def test_with_imagenet_weights_on_the_machine_the_backbone_embeds(planted, tmp_path, monkeypatch):
    """Where the pretrained weights sit in the torch hub cache (here a file the test saves: this machine is
    offline), the check embeds with that backbone and says so; the copies are still found."""
    import torch
    from torchvision.models import get_model

    from core.model import pretrained_cache_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path / "home"))
    pretrained_cache_path("resnet18").parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(get_model("resnet18", weights=None).state_dict(), pretrained_cache_path("resnet18"))
    report = check_health(DataConfig(path=str(planted["root"]), size=64))
    assert report.kind == "pretrained" and "ImageNet-pretrained resnet18" in report.how
    assert planted["exact"] in report.duplicate_groups() and planted["near"] in report.duplicate_groups()
    assert report.outlier_basis().endswith("and their embedding")  # the backbone joins the outlier ranking
