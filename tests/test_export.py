"""ONNX export: a real tiny run exported, ONNX Runtime against PyTorch, the JSON beside, the CLI's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import one_torch_thread, tiny_config, train_tiny_run
from PIL import Image
from test_cli import core_cli

from core.bundle import load_bundle
from core.demo import DemoSpec, make_demo_dataset
from core.export import PARITY_TOLERANCE, check_parity, export_onnx, parity_batches
from core.rundir import RunDir


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("export")
    dataset = make_demo_dataset(home / "demo", DemoSpec(n_per_class=8, size=32, seed=1))
    with one_torch_thread():
        return train_tiny_run(tiny_config(dataset), home / "runs")


def test_onnx_and_pytorch_agree_on_the_validation_images_and_on_new_ones(run: Path, tmp_path: Path):
    report = export_onnx(run, tmp_path / "m.onnx")
    assert report.parity.on == "validation images of the run" and report.parity.images > 0
    assert report.parity.max_abs_diff < PARITY_TOLERANCE
    assert report.input_shape == ("batch", 3, 32, 32)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)) for i in range(5)]
    bundle = load_bundle(run, device="cpu")
    on, batches = parity_batches(tmp_path / "elsewhere.safetensors", bundle, images)
    assert on == "given images"
    parity = check_parity(report.onnx, bundle, batches, on)
    assert parity.images == 5 and parity.max_abs_diff < PARITY_TOLERANCE


def test_the_json_beside_says_how_to_feed_it(run: Path, tmp_path: Path):
    report = export_onnx(run, tmp_path / "m.onnx")
    meta = json.loads(report.meta.read_text())
    bundle = load_bundle(run, device="cpu").meta
    assert report.meta == tmp_path / "m.onnx.json"
    assert meta["classes"] == bundle.vocab and meta["task"] == "single_label"
    pre = meta["preprocessing"]
    assert pre["mean"] == list(bundle.mean) and pre["std"] == list(bundle.std) and pre["channel_order"] == "RGB"
    assert meta["input"]["shape"] == ["batch", 3, 32, 32] and pre["presize"]["side"] == 37
    assert meta["opset"] == report.opset and meta["parity"]["max_abs_diff"] < PARITY_TOLERANCE


def test_an_existing_file_is_refused_unless_forced(run: Path, tmp_path: Path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the user's own file")
    with pytest.raises(FileExistsError):
        export_onnx(run, out)
    assert out.read_bytes() == b"the user's own file"
    export_onnx(run, out, force=True)
    assert out.stat().st_size > 1000
    assert RunDir(run).onnx.name == "model.onnx" and RunDir(run).onnx_meta.name == "model.onnx.json"


def test_cli_exports_and_refuses_an_existing_out_or_a_run_without_a_model(run: Path, tmp_path: Path):
    out = tmp_path / "cli.onnx"
    result = core_cli("export", run, "--format", "onnx", "--out", out, home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "opset" in result.stdout and "parity: max probability difference" in result.stdout and out.is_file()
    again = core_cli("export", run, "--out", out, home=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr and again.stderr.strip().count("\n") == 0
    empty = tmp_path / "no-model"
    empty.mkdir()
    missing = core_cli("export", empty, "--out", tmp_path / "x.onnx", home=tmp_path)
    assert missing.returncode == 2 and "no model" in missing.stderr


def test_the_runs_page_exports_on_click_and_then_offers_the_onnx_download(run: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch):
    from conftest import open_app_page

    monkeypatch.setenv("LOUPE_HOME", str(tmp_path))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / run.name).symlink_to(run, target_is_directory=True)
    RunDir(run).onnx.unlink(missing_ok=True)
    RunDir(run).onnx_meta.unlink(missing_ok=True)
    at = open_app_page("app_pages/runs.py")
    at.session_state["runs_table"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert not at.exception, at.exception
    assert not any(b.key == "runs_download_onnx" for b in at.get("download_button"))
    at.button(key="runs_export_onnx").click().run()
    assert not at.exception, at.exception
    assert RunDir(run).onnx.is_file() and RunDir(run).onnx_meta.is_file()
    assert at.download_button(key="runs_download_onnx").label.startswith("Download ONNX (")
    assert any("ONNX Runtime and PyTorch agree within" in c.value for c in at.caption)
    at.run()  # a rerun finds the export on disk: the download stays, nothing is exported again
    assert at.download_button(key="runs_download_onnx") and not any(b.key == "runs_export_onnx" for b in at.button)


def test_a_multi_label_bundle_file_exports_sigmoid_probabilities(tmp_path: Path):
    """A bundle file alone (no run beside it): parity on seeded random images; sigmoid, not softmax, out."""
    import onnxruntime as ort
    import torch

    from core.bundle import BundleMeta, save_bundle
    from core.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", pretrained=False), 3).eval()
    file = save_bundle(tmp_path / "m.safetensors", model, BundleMeta(arch="resnet18", vocab=["a", "b", "c"], size=32,
                                                                    task="multi_label"))
    report = export_onnx(file, tmp_path / "ml.onnx")
    assert report.parity.on == "random images" and report.parity.max_abs_diff < PARITY_TOLERANCE
    assert json.loads(report.meta.read_text())["output"]["values"] == "sigmoid probabilities"
    session = ort.InferenceSession(str(report.onnx), providers=["CPUExecutionProvider"])
    probs = session.run(None, {"input": np.zeros((3, 3, 32, 32), np.float32)})[0]
    assert probs.shape == (3, 3) and not np.allclose(probs.sum(axis=1), 1.0)  # a dynamic batch of 3
