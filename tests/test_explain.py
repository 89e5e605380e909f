"""Grad-CAM (core.explain): a real tiny model, every architecture's target layer, and the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, train_tiny_run
from PIL import Image

from core.bundle import Bundle, BundleMeta, load_bundle
from core.config import ARCHS
from core.demo import DemoSpec, make_demo_dataset
from core.explain import gradcam, overlay, target_layer
from core.model import ModelConfig, build_model

REPO = Path(__file__).resolve().parents[1]
# The block each architecture's heatmap comes from: the body's last child, before a trailing max-pool (vgg16_bn)
EXPECTED = {"resnet18": "layer4", "resnet34": "layer4", "resnet50": "layer4", "squeezenet1_1": "12",
            "vgg16_bn": "42", "mobilenet_v3_small": "12", "mobilenet_v3_large": "16", "efficientnet_b0": "8",
            "convnext_tiny": "7"}


def test_every_arch_is_covered():
    assert set(EXPECTED) == set(ARCHS)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_target_layer_gives_a_finite_map_of_the_image_size(arch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, pretrained=False), 3).eval()
    names = {id(module): name for name, module in model[0].named_children()}
    assert names[id(target_layer(model, arch))] == EXPECTED[arch]
    bundle = Bundle(model=model, meta=BundleMeta(arch=arch, vocab=["a", "b", "c"], size=64))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    heat = gradcam(bundle, image, class_index=1)
    assert heat.shape == (64, 64) and np.isfinite(heat).all() and 0 <= heat.min() and heat.max() <= 1
    picture = overlay(image, heat)
    assert picture.mode == "RGB" and picture.size == (70, 70)  # the centre square, at the image's resolution


def test_target_layer_refuses_an_unknown_arch():
    model = build_model(ModelConfig(arch="resnet18", pretrained=False), 2)
    with pytest.raises(ValueError, match="Unknown arch"):
        target_layer(model, "resnet9000")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("explain")
    data = make_demo_dataset(home / "shapes", DemoSpec(n_per_class=8, size=32, seed=0))
    return train_tiny_run(tiny_config(data), home / "runs")


def core_cli(*args: object, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOUPE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "core", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)


def test_cli_writes_a_png_and_refuses_to_overwrite(run, tmp_path):
    image = next((Path(load_bundle(run).meta.config["data"]["path"]) / "circle").glob("*.png"))
    out = tmp_path / "heat.png"
    result = core_cli("explain", run, image, "--out", out, "--class", "circle", home=tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(out) as png:
        assert png.format == "PNG" and png.mode == "RGB"
    before = out.read_bytes()
    again = core_cli("explain", run, image, "--out", out, home=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert again.stderr.strip().count("\n") == 0 and out.read_bytes() == before
    unknown = core_cli("explain", run, image, "--out", tmp_path / "other.png", "--class", "hexagon", home=tmp_path)
    assert unknown.returncode == 2 and "Unknown class" in unknown.stderr and not (tmp_path / "other.png").exists()


def image_urls(at) -> list[str]:
    return [img.proto.imgs[0].url for img in at.image]


def test_the_pages_heatmap_toggles_render_overlays(run, monkeypatch):
    """Interpret's top losses and Predict's close look, heatmaps on: overlays instead of the plain images."""
    from conftest import open_app_page

    monkeypatch.setenv("LOUPE_HOME", str(run.parents[1]))
    at = open_app_page("app_pages/interpret.py")
    plain = image_urls(at)
    at.toggle(key="interpret_heatmaps").set_value(True).run()
    assert not at.exception, at.exception
    assert len(image_urls(at)) == len(plain) > 0 and image_urls(at) != plain

    image = next((run.parents[1] / "shapes" / "circle").glob("*.png"))
    at = open_app_page("app_pages/predict.py")
    at.file_uploader(key="predict_files").set_value((image.name, image.read_bytes(), "image/png")).run()
    plain = image_urls(at)
    at.toggle(key="predict_heatmap").set_value(True).run()
    assert not at.exception, at.exception
    assert len(image_urls(at)) == len(plain) == 1 and image_urls(at) != plain
