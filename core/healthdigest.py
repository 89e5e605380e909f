"""What the health check keeps of each image: a digest made in one pass over the decode cache.

The check never holds the images themselves (10,000 squares at 258 px are 2 GB): each batch of the decode
cache's presized squares is reduced at once to a hash of its pixels, a small grey image for the pixel match
(core.healthmatch), its mean colour, its colour histogram and its embedding, then dropped.

Embeddings, best first (`Digest.how` says which was used): the selected run's model (the head's pooled
features, its penultimate layer, and its probabilities), an ImageNet-pretrained backbone where its weights
are on this machine, or a perceptual hash (the low frequencies of a 32-pixel grey image's DCT, as pHash,
mirror-invariant). The perceptual hash is kept in every digest: it finds mirrored copies as neighbours
(31 of 32 true pairs among each image's 5 nearest on the bear photos), which one pass of a model does less
well, at a fraction of the cost of a second, mirrored pass (the model's cost is most of the check's).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.augment import IMAGENET_MEAN, IMAGENET_STD, normalize, resize_batch
from core.imagecache import DecodedImages
from core.rundir import RunDir

MATCH_SIDE = 48  # pixels of the grey images the pixel match compares (a copy's layout; cheap for many pairs)
HISTOGRAM_LEVELS = 8  # per channel: 512 joint RGB bins
BATCH = 64

Progress = Callable[[str, int, int], None]  # (stage, done, total)
Embedder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]  # uint8 batch -> (features, probs)


@dataclass
class Digest:
    hashes: list[bytes]  # of each square's pixels: identical images share one (confirmed in full, core.health)
    grey: torch.Tensor  # [N, 1, MATCH_SIDE, MATCH_SIDE] float32
    colour: torch.Tensor  # [N, 3] mean RGB, 0-255
    histograms: np.ndarray  # [N, 512] square roots of the joint RGB histogram (cosine = Hellinger affinity)
    features: np.ndarray  # [N, D] embedding, not yet centred
    phash: np.ndarray  # [N, 63] the perceptual hash (the same as `features` when it is the embedding)
    probs: np.ndarray | None  # [N, C] the run's probabilities
    how: str  # which embedding, in words
    kind: str  # "run", "pretrained" or "pixels"
    failed: list[int]  # indices whose file could not be read (gone since it was listed)


def grey(squares: torch.Tensor, side: int) -> torch.Tensor:
    g = (squares.float() * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(-3, keepdim=True)
    return F.interpolate(g, size=(side, side), mode="area")


def colour_histograms(squares: torch.Tensor, levels: int = HISTOGRAM_LEVELS) -> np.ndarray:
    """Each image's joint RGB histogram, square-rooted: what colours an image is made of, whatever their layout."""
    q = squares.long() * levels // 256
    codes = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]
    offsets = torch.arange(len(q))[:, None, None] * levels**3
    counts = torch.bincount((codes + offsets).flatten(), minlength=len(q) * levels**3).view(len(q), -1).float()
    return (counts / counts.sum(1, keepdim=True)).sqrt().numpy()


def cpu_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16, AMX): then a model's inference pass under
    bf16 autocast takes about half the time (resnet18 at 128 px: 42 s instead of 78 s per 10,000 images on
    the development machine), and embeddings for nearest neighbours need no more precision. PyTorch has no
    public test for it; oneDNN's is asked, and a PyTorch without it answers no."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _model_embedder(body: torch.nn.Module, pool: torch.nn.Module, head: torch.nn.Module | None, size: int,
                    mean, std, multi_label: bool = False) -> Embedder:
    body = body.eval().to(memory_format=torch.channels_last)
    bf16 = cpu_bf16()

    def embed(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = normalize(resize_batch(batch, size), mean, std).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fmap = body(x)
            features = pool(fmap).float()
            logits = head(fmap).float() if head is not None else None
        if logits is None:
            return features, None
        return features, logits.sigmoid() if multi_label else logits.softmax(1)

    return embed


def run_embedder(run_dir: Path) -> tuple[Embedder, str]:
    """The run's model: pooled features (what the head's layers start from) and its probabilities."""
    from core.bundle import load_bundle

    bundle = load_bundle(RunDir(run_dir).bundle, device="cpu")
    body, head = bundle.model[0], bundle.model[1]
    meta = bundle.meta
    embed = _model_embedder(body, head[:2], head, meta.size, meta.mean, meta.std, meta.task != "single_label")
    return embed, f"the model of run {Path(run_dir).name} (penultimate layer)"


def pretrained_embedder(arch: str, size: int) -> tuple[Embedder, str]:
    from core.model import AdaptiveConcatPool2d, ModelConfig, build_model

    body = build_model(ModelConfig(arch=arch, pretrained=True), n_out=2)[0]
    pool = torch.nn.Sequential(AdaptiveConcatPool2d(), torch.nn.Flatten())
    return _model_embedder(body, pool, None, size, IMAGENET_MEAN, IMAGENET_STD), f"an ImageNet-pretrained {arch}"


def phash_features(batch: torch.Tensor) -> tuple[torch.Tensor, None]:
    """pHash's 8x8 low-frequency DCT block of a 32-pixel grey image, without the constant term; coefficients
    odd in x change sign under a mirror, so they enter as magnitudes."""
    from scipy.fft import dctn

    coeffs = dctn(grey(batch, 32).numpy()[:, 0], axes=(1, 2), norm="ortho")[:, :8, :8].copy()
    coeffs[:, :, 1::2] = np.abs(coeffs[:, :, 1::2])
    return torch.from_numpy(coeffs.reshape(len(batch), -1)[:, 1:]), None


def choose_embedder(run_dir: Path | None, size: int) -> tuple[Embedder, str, str]:
    """(embedder, how in words, kind): the run's model, else a pretrained backbone on this machine, else pHash."""
    from core.model import pretrained_available

    if run_dir is not None:
        return *run_embedder(run_dir), "run"
    if pretrained_available("resnet18"):
        return *pretrained_embedder("resnet18", size), "pretrained"
    return phash_features, "a perceptual hash of the pixels (no run, no pretrained weights)", "pixels"


def digest(files: Sequence[Path], side: int, run_dir: Path | None, size: int,
           progress: Progress | None = None) -> Digest:
    """One pass over the decode cache's squares of `files` (decoding, in parallel, those not cached yet)."""
    cache = DecodedImages(files, side)
    failed = set(cache.warm(on_progress=(lambda d, t: progress("reading images", d, t)) if progress else None))
    embed, how, kind = choose_embedder(run_dir, size)
    hashes, greys, colours, hists, feats, probs, phashes = [], [], [], [], [], [], []
    readable = [i for i in range(len(files)) if i not in failed]
    with torch.inference_mode():
        for start in range(0, len(readable), BATCH):
            batch = torch.from_numpy(np.stack([cache[i] for i in readable[start : start + BATCH]]))
            hashes += [hashlib.blake2b(square.numpy().tobytes(), digest_size=16).digest() for square in batch]
            greys.append(grey(batch, MATCH_SIDE))
            colours.append(batch.float().mean((2, 3)))
            hists.append(colour_histograms(batch))
            phashes.append(phash_features(batch)[0].numpy())
            f, p = embed(batch) if kind != "pixels" else (torch.from_numpy(phashes[-1]), None)
            feats.append(f.float().numpy())
            if p is not None:
                probs.append(p.float().numpy())
            if progress:
                progress("embedding", min(start + BATCH, len(readable)), len(readable))
    n_feats = feats[0].shape[1] if feats else 0
    return Digest(hashes, torch.cat(greys) if greys else torch.zeros(0, 1, MATCH_SIDE, MATCH_SIDE),
                  torch.cat(colours) if colours else torch.zeros(0, 3),
                  np.concatenate(hists) if hists else np.zeros((0, HISTOGRAM_LEVELS**3), np.float32),
                  np.concatenate(feats) if feats else np.zeros((0, n_feats), np.float32),
                  np.concatenate(phashes) if phashes else np.zeros((0, 63), np.float32),
                  np.concatenate(probs) if probs else None, how, kind, sorted(failed))
