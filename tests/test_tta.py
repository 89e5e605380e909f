"""Test-time augmentation (core.tta) on a real tiny run: fastai's blend, reproducible draws, the cached table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_torch_thread, tiny_config, train_tiny_run

from core import interpret
from core.bundle import load_bundle, predict_probs
from core.demo import DemoSpec, make_demo_dataset
from core.images import open_image
from core.job import interpret_run
from core.listing import list_images
from core.rundir import RunDir
from core.tta import blend, bundle_augment, interpret_run_tta, predict_probs_tta


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("tta-home")
    data = make_demo_dataset(home / "shapes", DemoSpec(n_per_class=10, size=32, seed=5))
    with pytest.MonkeyPatch.context() as mp, one_torch_thread():
        mp.setenv("LOUPE_HOME", str(home))
        return train_tiny_run(tiny_config(data, epochs=2, lr=1e-3, mixed_precision=False), home / "runs")


@pytest.fixture(scope="module")
def images(run) -> list:
    data = Path(interpret_run(run)["file"].iloc[0]).parents[1]
    return [open_image(p) for p in list_images(data)[:6]]


def test_blend_is_fastais_lerp_and_max():
    plain, augs = torch.tensor([[0.8, 0.2]]), [torch.tensor([[0.4, 0.6]]), torch.tensor([[0.6, 0.4]])]
    assert torch.allclose(blend(plain, augs, 0.25), 0.75 * torch.tensor([[0.5, 0.5]]) + 0.25 * plain)
    assert torch.equal(blend(plain, augs, 1.0), plain)
    assert torch.equal(blend(plain, augs, use_max=True), torch.tensor([[0.8, 0.6]]))
    with pytest.raises(ValueError):
        blend(plain, augs, 1.5)


def test_predict_beta_1_is_the_plain_prediction_and_below_it_differs(run, images):
    bundle = load_bundle(run, device="cpu")
    plain = predict_probs(bundle, images)
    assert torch.allclose(predict_probs_tta(bundle, images, beta=1.0), plain, atol=1e-6)
    tta = predict_probs_tta(bundle, images)
    assert not torch.allclose(tta, plain, atol=1e-4)
    assert torch.allclose(tta.sum(dim=1), torch.ones(len(images)), atol=1e-5)
    assert torch.equal(predict_probs_tta(bundle, images), tta)  # the same seed, the same draws
    assert not torch.equal(predict_probs_tta(bundle, images, seed=1), tta)


def test_the_bundles_own_augmentation_is_used(run):
    bundle = load_bundle(run, device="cpu")
    augment = bundle_augment(bundle)
    assert (augment.size, augment.min_scale, augment.max_rotate) == (32, 0.75, 0)  # tiny_config's settings
    bundle.meta.config = None
    assert bundle_augment(bundle).min_scale == 0.35  # no config recorded: BatchAugment's defaults


def test_split_table_beta_1_is_the_runs_table_and_is_cached(run):
    plain = interpret_run(run)
    vocab = plain.attrs["vocab"]
    same = interpret_run_tta(run, beta=1.0)
    np.testing.assert_allclose(interpret.table_probs(same, vocab), interpret.table_probs(plain, vocab), atol=1e-6)
    assert same["item"].tolist() == plain["item"].tolist()

    tta = interpret_run_tta(run)
    probs = interpret.table_probs(tta, vocab)
    assert not np.allclose(probs, interpret.table_probs(plain, vocab), atol=1e-4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    path = RunDir(run).table_tta("valid")
    assert path.exists() and interpret.load_table(path).attrs["tta"] == {"n": 4, "beta": 0.25, "seed": 0}
    mtime = path.stat().st_mtime_ns
    again = interpret_run_tta(run)  # read back from disk, not recomputed
    assert path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(interpret.table_probs(again, vocab), probs)
