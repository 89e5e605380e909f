"""Decode-once cache and batch augmentation: real images on disk, real torch ops."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from core.augment import BatchAugment, normalize, presize, presize_side, resize_batch
from core.fileio import file_version_key
from core.imagecache import DecodedImages, cache_size_bytes


def _halves(w: int = 60, h: int = 40) -> Image.Image:
    """Left half red, right half blue: flips are visible."""
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[:, : w // 2, 0] = 255
    pixels[:, w // 2 :, 2] = 255
    return Image.fromarray(pixels)


def test_presize_keeps_the_centre_square_at_the_shorter_side():
    out = presize(_halves(60, 40), 20)
    assert out.shape == (3, 20, 20) and out.dtype == np.uint8
    assert out[0, :, 0].min() > 200 and out[2, :, -1].min() > 200  # still red left, blue right
    assert presize_side(224) == 258


def test_resize_batch_and_normalize():
    x = torch.from_numpy(presize(_halves(), presize_side(16)))[None]
    y = resize_batch(x, 16)
    assert y.shape == (1, 3, 16, 16) and 0 <= y.min() and y.max() <= 1
    assert normalize(torch.zeros(1, 3, 2, 2)).max() < 0


def test_batch_augment_shapes_ranges_and_seeded_determinism():
    x = torch.from_numpy(np.stack([presize(_halves(), 37)] * 8))
    aug = BatchAugment(size=32)
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    c = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_identity_settings_reproduce_the_image():
    x = torch.from_numpy(presize(_halves(), 32))[None]
    aug = BatchAugment(size=32, min_scale=1.0, flip=False, max_rotate=0, max_lighting=0)
    theta = aug.affine(1)
    assert theta.shape == (1, 2, 3)
    # area 1 with a random aspect ratio crops a little on one axis; the colours stay where they were
    out = aug(x, torch.Generator().manual_seed(0))[0]
    assert out[0, :, :8].mean() > 0.9 and out[2, :, -8:].mean() > 0.9


def test_flips_happen_about_half_the_time():
    x = torch.from_numpy(np.stack([presize(_halves(), 32)] * 200))
    out = BatchAugment(size=32, min_scale=1.0, max_rotate=0, max_lighting=0)(x, torch.Generator().manual_seed(0))
    red_on_left = (out[:, 0, :, :8].mean(dim=(1, 2)) > 0.5).float().mean().item()
    assert 0.35 < red_on_left < 0.65


def test_decoded_images_are_cached_on_disk_and_invalidated_when_a_file_changes(tmp_path):
    files = []
    for i in range(4):
        path = tmp_path / "data" / f"img_{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((30, 50, 3), i * 40, dtype=np.uint8)).save(path)
        files.append(path)
    broken = tmp_path / "data" / "broken.png"
    broken.write_bytes(b"not an image")
    cache = tmp_path / "cache"
    cold = DecodedImages(files + [broken], side=20, root=cache)
    assert cold.warm(workers=2) == [4]
    assert len(list((cache / "20").glob("*.npy"))) == 4 and cache_size_bytes(cache) > 0

    warm = DecodedImages(files, side=20, root=cache)  # a new process would start like this: memory empty
    for i in range(4):
        assert np.array_equal(warm[i], cold[i])  # results do not depend on whether the cache was warm

    Image.fromarray(np.full((30, 50, 3), 250, dtype=np.uint8)).save(files[0])
    os.utime(files[0], ns=(1, 10**18))  # a different mtime even on coarse file systems
    changed = DecodedImages(files, side=20, root=cache)
    assert changed[0].min() == 250  # the stale entry is not used
    files[1].unlink()
    with pytest.raises(OSError):
        DecodedImages(files, side=20, root=cache)[1]


def test_decoded_images_from_an_older_presize_are_never_read(tmp_path):
    """The cache key carries PRESIZE_VERSION: an entry keyed as before (side only) belongs to an older presize."""
    path = tmp_path / "img.png"
    Image.fromarray(np.full((30, 50, 3), 200, dtype=np.uint8)).save(path)
    stale = tmp_path / "cache" / "20" / f"{file_version_key(path, 20)}.npy"
    stale.parent.mkdir(parents=True)
    np.save(stale, np.zeros((3, 20, 20), dtype=np.uint8))
    assert DecodedImages([path], side=20, root=tmp_path / "cache")[0].min() == 200
