"""From a folder on disk to DataLoaders: items and labels (core.layouts, over core.listing's walk), verified
images, the split (core.split), defaults that fit the data, and the loaders.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from core.augment import presize_side
from core.config import (  # defined there, torch-free; re-exported here
    LAYOUTS as LAYOUTS,
)
from core.config import (
    MAX_SIZE as MAX_SIZE,
)
from core.config import (
    MIN_SIZE as MIN_SIZE,
)
from core.config import (
    PETS_REGEX as PETS_REGEX,
)
from core.config import (
    DataConfig as DataConfig,
)
from core.env import default_num_workers
from core.imagecache import DecodedImages
from core.images import DEFAULT_MAX_PIXELS, BadImage, DataError, verify_images
from core.layouts import DataSource, load_source, split_fixed_by
from core.split import Split, split_items

# ---------------------------------------------------------------- defaults that fit the data

SIDE_SAMPLE = 200  # image headers read to judge a dataset's typical image size
MIN_BATCHES_PER_EPOCH = 8  # a small dataset gets a batch size that still gives each epoch this many steps
MIN_SUGGESTED_BATCH = 16  # ...but no smaller: BatchNorm's batch statistics get noisy below about 16 images


@dataclass(frozen=True)
class DataFacts:
    """What a training form needs to know about a dataset to suggest settings; read without decoding images."""

    n_train: int  # items on the training side of the split (files that fail to decode not yet dropped)
    vocab: tuple[str, ...]  # class names
    typical_side: int | None  # median shorter side, in pixels, of a sample of the images (None: none readable)
    split_fixed: str | None  # why the dataset fixes its own split (see `split_fixed_by`), None when Loupe splits


def data_facts(cfg: DataConfig) -> DataFacts:
    """Count, classes, typical image size and split of the dataset `cfg` describes (DataError when unreadable)."""
    source = load_source(cfg)
    n_train = len(split_items(source, cfg).train)
    files = source.files
    if len(files) > SIDE_SAMPLE:  # the same sample every time, spread over all classes
        files = [files[i] for i in sorted(np.random.default_rng(0).choice(len(files), SIDE_SAMPLE, replace=False))]
    sides = [side for side in map(_shorter_side, files) if side]
    typical = int(np.median(sides)) if sides else None
    return DataFacts(n_train, tuple(source.vocab), typical, split_fixed_by(cfg))


def _shorter_side(path: Path) -> int | None:
    """From the file header only (no decode); an EXIF quarter turn swaps the sides, never the shorter one."""
    try:
        with Image.open(path) as img:
            return min(img.size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def suggested_size(typical_side: int | None, default: int = DataConfig.size) -> int:
    """The training size for images of `typical_side` pixels: `default`, or the images' own size when they are
    smaller (upscaling 64-pixel images to 224 adds no detail, only 12 times the compute), in steps of 16."""
    if typical_side is None or typical_side >= default:
        return default
    return max(32, typical_side // 16 * 16)


def suggested_batch_size(n_train: int, default: int = DataConfig.batch_size) -> int:
    """`default`, or, for a small training set, the power of two that still gives an epoch MIN_BATCHES_PER_EPOCH
    steps (96 images at 64 would be 2 steps an epoch, too few for a schedule to warm up and anneal), not below
    MIN_SUGGESTED_BATCH."""
    fit = 1 << max(0, (n_train // MIN_BATCHES_PER_EPOCH).bit_length() - 1)
    return max(MIN_SUGGESTED_BATCH, min(default, fit))


# ---------------------------------------------------------------- datasets and loaders


class ImageDataset(Dataset):
    """Some items of a source; yields (presized uint8 image [3, S, S], target, item index in the source),
    or None for a file that fails to load. Augmentation happens later, on whole batches (core.augment)."""

    def __init__(self, source: DataSource, ids: np.ndarray, side: int, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.images = DecodedImages([source.files[i] for i in ids], side, max_pixels=max_pixels)
        self.targets = source.targets()[torch.as_tensor(ids, dtype=torch.long)]
        self.ids = [int(i) for i in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        try:
            image = self.images[i]
        except (OSError, ValueError, SyntaxError):
            return None  # vanished or changed since it was verified: skipped, and visible as a missing index
        return torch.from_numpy(image), self.targets[i], self.ids[i]


def collate_skipping_failed(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Stack a batch, leaving out items that failed to load; None when all of them failed."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    xs, ys, idx = zip(*batch)
    return torch.stack(xs), torch.stack(ys), torch.tensor(idx)


def shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of `order`: padded by wrapping around to a multiple of world_size, then every
    world_size-th item from `rank`, so every rank gets the same count (DDP hangs when ranks take different
    numbers of steps). The order itself when alone."""
    if world_size == 1:
        return order
    total = -(-len(order) // world_size) * world_size
    padded = order[torch.arange(total) % max(len(order), 1)] if len(order) else order
    return padded[rank::world_size]


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order is a pure function of (seed, epoch), so a resumed run sees the
    same order, and which can skip the batches an interrupted epoch already trained on. Under DDP each rank
    draws its shard (see `shard`) of that same order."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int, skip_batches: int = 0, batch_size: int = 1) -> None:
        self.epoch, self.start = epoch, skip_batches * batch_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        return iter(shard(order, self.rank, self.world_size)[self.start :].tolist())

    def __len__(self) -> int:
        return -(-self.n // self.world_size) - self.start


class ShardSampler(Sampler[int]):
    """Evaluation under DDP: this rank's shard of the items in order, never shuffled (padding repeats a few
    items; gathering drops them again by id)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(shard(torch.arange(self.n), self.rank, self.world_size).tolist())

    def __len__(self) -> int:
        return -(-self.n // self.world_size) if self.n else 0


@dataclass
class DataLoaders:
    """The train and valid loaders of one dataset and split, with what a model needs to know about them."""

    train: DataLoader
    valid: DataLoader
    source: DataSource
    split: Split
    bad: list[BadImage]

    @property
    def vocab(self) -> list[str]:
        return self.source.vocab

    @property
    def n_classes(self) -> int:
        return len(self.source.vocab)

    @property
    def multi_label(self) -> bool:
        return self.source.multi_label


def prepare(cfg: DataConfig) -> tuple[DataSource, list[BadImage], Split]:
    """Label, verify and split the dataset: broken files are dropped and returned with their reasons."""
    source = load_source(cfg)
    bad = verify_images(source.files, cfg.max_pixels)
    source = source.without({b.path for b in bad})
    if not source.files:
        raise DataError(f"Every image in {str(source.root)!r} failed to load; first reason: {bad[0].reason}.")
    split = split_items(source, cfg)
    for folder in cfg.extra_train:
        extra = load_source(DataConfig(path=folder, layout="folders"))
        extra_bad = verify_images(extra.files, cfg.max_pixels)
        source, split = _add_to_train(source, split, extra.without({b.path for b in extra_bad}))
        bad += extra_bad
    return source, bad, split


def _add_to_train(source: DataSource, split: Split, extra: DataSource) -> tuple[DataSource, Split]:
    n = len(source)
    added = np.arange(n, n + len(extra))
    merged = replace(
        source,
        files=source.files + extra.files,
        labels=source.labels + extra.labels,
        vocab=sorted(set(source.vocab) | set(extra.vocab)),
        fixed_split=None if source.fixed_split is None else source.fixed_split + ["train"] * len(extra),
        groups=None if source.groups is None else source.groups + [str(f) for f in extra.files],
    )
    return merged, replace(split, train=np.concatenate([split.train, added]))


def drops_last(n_items: int, batch_size: int) -> bool:
    """Whether an epoch over `n_items` training items leaves out its last, incomplete batch.

    Only when that batch would hold a single image: BatchNorm cannot train on one item (it has no batch
    statistics), while a last batch of two or more is a smaller but sound step. Dropping every incomplete
    batch instead (PyTorch's drop_last) leaves out up to batch_size - 1 images an epoch: a third of a
    96-image dataset at batch 64. This way an epoch leaves out at most one image, a different one each epoch.
    """
    return n_items > 1 and n_items % batch_size == 1


def make_loader(
    source: DataSource,
    ids: np.ndarray,
    cfg: DataConfig,
    train: bool,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader of presized uint8 batches over some items of `source`: shuffled per epoch when `train`.
    With world_size > 1 (DDP) it yields only this rank's shard, the same number of batches on every rank."""
    workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    if train:
        sampler = EpochSampler(len(ids), cfg.seed, rank, world_size)
    else:
        sampler = ShardSampler(len(ids), rank, world_size) if world_size > 1 else None
    per_rank = -(-len(ids) // world_size)
    return DataLoader(
        ImageDataset(source, ids, presize_side(cfg.size), cfg.max_pixels),
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=train and drops_last(per_rank, cfg.batch_size),
        num_workers=workers,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
        collate_fn=collate_skipping_failed,
    )


def make_dataloaders(
    cfg: DataConfig, device: torch.device | None = None, rank: int = 0, world_size: int = 1
) -> DataLoaders:
    """DataLoaders over the verified, split dataset at `cfg.path` (this rank's shards under DDP)."""
    source, bad, split = prepare(cfg)
    return loaders_for(source, split, bad, cfg, device, rank, world_size)


def loaders_for(
    source: DataSource, split: Split, bad: list[BadImage], cfg: DataConfig, device: torch.device | None = None,
    rank: int = 0, world_size: int = 1,
) -> DataLoaders:
    """DataLoaders over items already verified (`prepare`) for one split of them: a run's split, or one fold of
    a label check (core.labelcheck), which verifies the data once and trains on several splits of it."""
    if len(source.vocab) < 2 and not source.multi_label:
        raise DataError(f"Found only one class ({source.vocab[0]!r}); a classifier needs at least two.")
    if len(split.train) == 0:
        raise DataError("The split left no training images; lower valid_pct or add images.")
    train = make_loader(source, split.train, cfg, train=True, device=device, rank=rank, world_size=world_size)
    valid = make_loader(source, split.valid, cfg, train=False, device=device, rank=rank, world_size=world_size)
    return DataLoaders(train, valid, source, split, bad)
