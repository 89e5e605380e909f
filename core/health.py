"""Dataset health: exact and near duplicates, duplicates that leak across the split, off-topic images, a map.

How it works (figures and the measurements behind each default: docs/benchmarks.md, "Dataset health"):

- Every image is read once as the decode cache's presized square (core.imagecache), so a warm cache
  (a run trained on the folder) means no JPEG is decoded again.
- **Exact duplicates**: same square (a hash of its bytes) confirmed by the SHA-256 of the full decoded
  pixels, upright and RGB: a re-saved JPEG with new metadata is the same photo; the file bytes would say not.
- **Embeddings** (`Embedding.how` says which): the selected run's model (the head's pooled features, the
  penultimate layer), else an ImageNet-pretrained backbone where its weights are on this machine, else a
  perceptual hash of the pixels (DCT of a small grey image). Each image is embedded with its mirror image
  and the two added, so a mirrored copy has the same embedding; vectors are centred on the dataset's mean
  (pooled ReLU features share a large common part that makes every cosine near 1).
- **Near duplicates**: each image's nearest neighbours by cosine are the candidates; each candidate pair
  is then matched pixel by pixel (`match_pairs`: the best normalised correlation of one image over the
  other, shifted, scaled 0.8-1 and mirrored). Cosine alone, even from a trained model, ranks look-alike
  photos (teddies on white) as close as real copies; the match is what tells a copy from a look-alike.
- **Outliers**: images whose colour statistics are far from their nearest neighbours' (and, with a pretrained
  backbone, whose embedding is); the run's doubt (1 - its highest probability) is shown beside them.
- **Map**: t-SNE (scikit-learn) of the embeddings, on a sample when the dataset is large.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from core.augment import normalize, presize_side, resize_batch
from core.config import DataConfig
from core.data import prepare
from core.fileio import read_json
from core.imagecache import DecodedImages
from core.images import open_image
from core.layouts import DataSource
from core.rundir import RunDir

DEFAULT_MATCH = 0.65  # the pixel match above which a candidate pair is reported as near duplicates (measured)
NEIGHBOURS = 5  # candidates per image for the pixel match (true copies are the first neighbour 27 times in 28)
OUTLIER_NEIGHBOURS = 30  # at most: an outlier is far from this many nearest neighbours, not just the first
MAP_MAX_POINTS = 3000  # t-SNE beyond this is slow on a CPU: the map shows a sample, and says so
MATCH_SIDE = 48  # pixels of the grey images compared (enough for a copy's layout, cheap for thousands of pairs)
MATCH_SCALES = (1.0, 0.93, 0.86, 0.8)  # how much smaller the copy's square may be (crops of up to ~20%)
COLOUR_WEIGHT = 0.5  # how much a difference in mean colour (0-1) lowers the match
BATCH = 64

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class Embedding:
    vectors: np.ndarray  # [N, D] float32, centred, unit length
    probs: np.ndarray | None  # [N, C] the run's probabilities, None without a run
    how: str  # in words, for the page: which model (or none) made the vectors
    kind: str = "run"  # "run", "pretrained" or "pixels"


@dataclass
class HealthReport:
    """Everything the Data page and the CLI show; pairs keep their scores, so a threshold is applied later."""

    root: str
    how: str  # which embedding was used
    items: pd.DataFrame  # file (relative), label, side, outlier score, x, y (NaN when not on the map)
    exact: list[list[int]]  # groups of item indices with identical pixels
    pairs: pd.DataFrame  # a, b (item indices), cosine, match: candidate near duplicates
    vocab: list[str] = field(default_factory=list)
    run: str | None = None  # the run whose model and split were used
    seconds: float = 0.0
    map_sampled: bool = False

    def duplicate_groups(self, threshold: float = DEFAULT_MATCH) -> list[list[str]]:
        """Groups of files that are the same photo: exact groups joined with pairs matching >= threshold."""
        parent = list(range(len(self.items)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        links = [(g[0], other) for g in self.exact for other in g[1:]]
        near = self.pairs[self.pairs["match"] >= threshold]
        links += list(zip(near["a"].tolist(), near["b"].tolist()))
        for a, b in links:
            parent[find(a)] = find(b)
        groups: dict[int, list[int]] = {}
        for i in {i for link in links for i in link}:
            groups.setdefault(find(i), []).append(i)
        files = self.items["file"].tolist()
        return sorted([sorted(files[i] for i in g) for g in groups.values()], key=lambda g: g[0])

    def leaks(self, threshold: float = DEFAULT_MATCH) -> list[list[str]]:
        """The duplicate groups whose members sit on more than one side of the split."""
        side = dict(zip(self.items["file"], self.items["side"]))
        return [g for g in self.duplicate_groups(threshold) if len({side[f] for f in g} - {""}) > 1]

    def near_pairs(self, threshold: float = DEFAULT_MATCH) -> pd.DataFrame:
        """Reported near-duplicate pairs, best match first, with file names and sides."""
        near = self.pairs[self.pairs["match"] >= threshold].sort_values("match", ascending=False)
        items = self.items
        return pd.DataFrame({
            "file_a": items["file"].to_numpy()[near["a"]], "file_b": items["file"].to_numpy()[near["b"]],
            "side_a": items["side"].to_numpy()[near["a"]], "side_b": items["side"].to_numpy()[near["b"]],
            "match": near["match"].round(3).to_numpy(), "cosine": near["cosine"].round(3).to_numpy(),
        })

    def outliers(self, n: int | None = None) -> pd.DataFrame:
        """Items most suspicious first (`outlier` higher = farther from everything)."""
        ranked = self.items.sort_values("outlier", ascending=False)
        return ranked if n is None else ranked.head(n)

    def summary(self, threshold: float = DEFAULT_MATCH, n_outliers: int = 40) -> dict:
        """The CLI's JSON: paths relative to the dataset folder."""
        return {
            "root": self.root, "embedding": self.how, "run": self.run, "images": len(self.items),
            "threshold": threshold,
            "duplicates": self.duplicate_groups(threshold),
            "exact_duplicates": [sorted(self.items["file"].iloc[g].tolist()) for g in self.exact],
            "leaks": self.leaks(threshold),
            "outliers": self.outliers(n_outliers)["file"].tolist(),
            "seconds": round(self.seconds, 1),
        }


# ---------------------------------------------------------------- reading the images


def _squares(files: Sequence[Path], side: int, progress: Progress | None) -> tuple[np.ndarray, list[int]]:
    """The decode cache's uint8 squares [N, 3, side, side] (decoded now where the cache is cold), and the
    indices that failed (a file removed since it was listed): their squares stay black and are dropped later."""
    cache = DecodedImages(files, side)
    failed = cache.warm(on_progress=(lambda d, t: progress("reading images", d, t)) if progress else None)
    out = np.zeros((len(files), 3, side, side), dtype=np.uint8)
    bad = set(failed)
    for i in range(len(files)):
        if i not in bad:
            out[i] = cache[i]
    return out, failed


def exact_groups(files: Sequence[Path], squares: np.ndarray) -> list[list[int]]:
    """Groups of indices whose images have identical decoded pixels. The squares' hash finds candidates
    cheaply; only those are decoded in full and compared by SHA-256 (a square is only the centre)."""
    by_square: dict[bytes, list[int]] = {}
    for i, square in enumerate(squares):
        by_square.setdefault(hashlib.blake2b(square.tobytes(), digest_size=16).digest(), []).append(i)
    groups = []
    for candidates in (c for c in by_square.values() if len(c) > 1):
        by_pixels: dict[str, list[int]] = {}
        for i in candidates:
            img = open_image(files[i])
            key = f"{img.size}:{hashlib.sha256(img.tobytes()).hexdigest()}"
            by_pixels.setdefault(key, []).append(i)
        groups += [g for g in by_pixels.values() if len(g) > 1]
    return sorted(groups)


# ---------------------------------------------------------------- embeddings


def _centred(vectors: np.ndarray) -> np.ndarray:
    z = vectors - vectors.mean(0, keepdims=True)
    return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-8)).astype(np.float32)


def _model_features(body: torch.nn.Module, pool: torch.nn.Module, head: torch.nn.Module | None, squares: np.ndarray,
                    size: int, mean, std, progress: Progress | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Pooled features of each image plus its mirror image, and the head's probabilities (when a head)."""
    feats, probs = [], []
    device = next(body.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(squares), BATCH):
            x = torch.from_numpy(squares[start : start + BATCH]).to(device)
            x = normalize(resize_batch(x, size), mean, std).contiguous(memory_format=torch.channels_last)
            fmap = body(x)
            feats.append((pool(fmap) + pool(body(x.flip(3)))).float().cpu())
            if head is not None:
                probs.append(head(fmap).float().cpu())
            if progress:
                progress("embedding", min(start + BATCH, len(squares)), len(squares))
    logits = torch.cat(probs) if probs else None
    return torch.cat(feats).numpy(), logits


def run_embedding(run_dir: Path, squares: np.ndarray, progress: Progress | None) -> Embedding:
    """The run's model: penultimate (pooled) features and its probabilities."""
    from core.bundle import load_bundle

    bundle = load_bundle(RunDir(run_dir).bundle, device="cpu")
    body, head = bundle.model[0], bundle.model[1]
    body.to(memory_format=torch.channels_last)
    pool = head[:2]  # concat (or average) pooling and flatten: the features the head's layers start from
    feats, logits = _model_features(body, pool, head, squares, bundle.meta.size, bundle.meta.mean, bundle.meta.std,
                                    progress)
    assert logits is not None
    probs = logits.sigmoid() if bundle.meta.task != "single_label" else logits.softmax(1)
    return Embedding(_centred(feats), probs.numpy(), f"the model of run {Path(run_dir).name} (penultimate layer)")


def pretrained_embedding(arch: str, squares: np.ndarray, size: int, progress: Progress | None) -> Embedding:
    from core.augment import IMAGENET_MEAN, IMAGENET_STD
    from core.model import AdaptiveConcatPool2d, ModelConfig, build_model

    model = build_model(ModelConfig(arch=arch, pretrained=True), n_out=2).eval()
    body = model[0].to(memory_format=torch.channels_last)
    pool = torch.nn.Sequential(AdaptiveConcatPool2d(), torch.nn.Flatten())
    feats, _ = _model_features(body, pool, None, squares, size, IMAGENET_MEAN, IMAGENET_STD, progress)
    return Embedding(_centred(feats), None, f"an ImageNet-pretrained {arch} (no run selected)", "pretrained")


def pixel_embedding(squares: np.ndarray) -> Embedding:
    """A perceptual hash as a vector: the low frequencies of a 32-pixel grey image's DCT (pHash's 8x8 block,
    the constant term left out). Coefficients odd in x change sign under a mirror, so they enter as magnitudes."""
    from scipy.fft import dctn

    grey = _grey(torch.from_numpy(squares), 32).numpy()[:, 0]
    coeffs = dctn(grey, axes=(1, 2), norm="ortho")[:, :8, :8].copy()
    coeffs[:, :, 1::2] = np.abs(coeffs[:, :, 1::2])
    vectors = coeffs.reshape(len(squares), -1)[:, 1:]
    return Embedding(_centred(vectors), None, "a perceptual hash of the pixels (no run, no pretrained weights)",
                     "pixels")


def embed(squares: np.ndarray, run_dir: Path | None, size: int, progress: Progress | None = None) -> Embedding:
    """The best embedding this machine offers: the run's model, a pretrained backbone, or the pixels."""
    from core.model import pretrained_available

    if run_dir is not None:
        return run_embedding(run_dir, squares, progress)
    if pretrained_available("resnet18"):
        return pretrained_embedding("resnet18", squares, size, progress)
    return pixel_embedding(squares)


# ---------------------------------------------------------------- near duplicates


def candidate_pairs(vectors: np.ndarray, k: int = NEIGHBOURS) -> pd.DataFrame:
    """Each image's k nearest neighbours by cosine, as unique pairs a < b with their cosine."""
    n = len(vectors)
    if n < 2:
        return pd.DataFrame({"a": [], "b": [], "cosine": []})
    k = min(k, n - 1)
    rows_a, rows_b, sims = [], [], []
    v = torch.from_numpy(vectors)
    for start in range(0, n, 1024):  # blocks keep memory at 1024 x N for any N
        block = v[start : start + 1024] @ v.T
        idx = torch.arange(start, min(start + 1024, n))
        block[torch.arange(len(idx)), idx] = -2.0
        top = block.topk(k, dim=1)
        rows_a.append(idx.repeat_interleave(k))
        rows_b.append(top.indices.flatten())
        sims.append(top.values.flatten())
    a, b, s = torch.cat(rows_a).numpy(), torch.cat(rows_b).numpy(), torch.cat(sims).numpy()
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    table = pd.DataFrame({"a": lo, "b": hi, "cosine": s}).drop_duplicates(["a", "b"])
    return table.reset_index(drop=True)


def _grey(squares: torch.Tensor, side: int) -> torch.Tensor:
    g = (squares.float() * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(-3, keepdim=True)
    return F.interpolate(g, size=(side, side), mode="area")


def _gradient(g: torch.Tensor) -> torch.Tensor:
    gx, gy = g[..., :-1, 1:] - g[..., :-1, :-1], g[..., 1:, :-1] - g[..., :-1, :-1]
    return torch.sqrt(gx**2 + gy**2 + 1e-6)


def _best_correlation(images: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """For each pair p, the highest normalised cross-correlation of templates[p] at any position in images[p]
    (one grouped convolution for all pairs)."""
    p, _, h, w = templates.shape
    t = templates - templates.mean((2, 3), keepdim=True)
    t = t / t.flatten(1).norm(dim=1).clamp_min(1e-6)[:, None, None, None]
    num = F.conv2d(images.transpose(0, 1), t, groups=p)[0]
    ones = torch.ones(1, 1, h, w)
    s1, s2 = F.conv2d(images, ones)[:, 0], F.conv2d(images**2, ones)[:, 0]
    var = (s2 - s1**2 / (h * w)).clamp_min(1e-3 * h * w)  # flat patches: no correlation, not a division by ~0
    return (num / var.sqrt()).flatten(1).max(1).values.clamp(-1, 1)


def match_pairs(squares: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 256) -> np.ndarray:
    """How well the pixels of image a[i] and b[i] line up, in [-1, 1]: the mean, over the grey image and its
    gradient magnitude, of the best correlation of either image, shrunk by a scale in MATCH_SCALES and
    mirrored or not, at any shift over the other, less the distance of their mean colours (grey structure
    alone cannot tell two colour gradients apart; a copy keeps its colours). How well this tells resized,
    recompressed, cropped and mirrored copies from look-alike photos is measured in docs/benchmarks.md."""
    out = np.empty(len(a), dtype=np.float32)
    for start in range(0, len(a), chunk):
        ia = torch.tensor(np.array(a[start : start + chunk], dtype=np.int64))
        ib = torch.tensor(np.array(b[start : start + chunk], dtype=np.int64))
        pa, pb = torch.from_numpy(squares[ia.numpy()]), torch.from_numpy(squares[ib.numpy()])
        scores = []
        for grad in (False, True):
            best = torch.full((len(ia),), -1.0)
            for src, dst in ((pa, pb), (pb, pa)):
                target = _grey(dst, MATCH_SIDE)
                target = _gradient(target) if grad else target
                for scale in MATCH_SCALES:
                    tpl = _grey(src, max(8, round(MATCH_SIDE * scale)))
                    tpl = _gradient(tpl) if grad else tpl
                    for t in (tpl, tpl.flip(3)):
                        best = torch.maximum(best, _best_correlation(target, t))
            scores.append(best)
        colour = (pa.float().mean((2, 3)) - pb.float().mean((2, 3))).norm(dim=1) / (255 * 3**0.5)
        out[start : start + len(ia)] = ((scores[0] + scores[1]) / 2 - COLOUR_WEIGHT * colour).numpy()
    return out


# ---------------------------------------------------------------- outliers and the map


def _rank01(values: np.ndarray) -> np.ndarray:
    return pd.Series(values).rank(pct=True).to_numpy()


def colour_histograms(squares: np.ndarray, levels: int = 8) -> np.ndarray:
    """Each image's joint RGB histogram (`levels` per channel), square-rooted so that cosine is the Hellinger
    affinity: what colours an image is made of, whatever their layout."""
    out = np.empty((len(squares), levels**3), dtype=np.float32)
    for start in range(0, len(squares), 256):
        q = torch.from_numpy(squares[start : start + 256]).long() * levels // 256
        codes = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]
        offsets = torch.arange(len(q))[:, None, None] * levels**3
        counts = torch.bincount((codes + offsets).flatten(), minlength=len(q) * levels**3).view(len(q), -1).float()
        out[start : start + len(q)] = (counts / counts.sum(1, keepdim=True)).sqrt().numpy()
    return out


def neighbour_distance(vectors: np.ndarray, k: int) -> np.ndarray:
    """The mean cosine distance of each (centred) vector to its k nearest others."""
    v = torch.from_numpy(_centred(vectors))
    n = len(v)
    k = min(k, n - 1)
    dist = np.empty(n, dtype=np.float32)
    for start in range(0, n, 1024):  # blocks keep memory at 1024 x N for any N
        block = v[start : start + 1024] @ v.T
        idx = torch.arange(start, min(start + 1024, n))
        block[torch.arange(len(idx)), idx] = -2.0
        dist[start : start + len(idx)] = (1 - block.topk(k, dim=1).values.mean(1)).numpy()
    return dist


def outlier_columns(emb: Embedding, squares: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: `colour_far` (how unlike its nearest neighbours its colours are), `embedding_far` (the same
    in embedding space), `doubt` (1 - the run's highest probability; with a run) and `outlier`, the ranking
    shown (higher = more suspicious). On the bear photos with planted off-topic images, colour statistics
    find far more of them than a from-scratch model's embedding or its doubt, which have learnt the off-topic
    images as their class (docs/benchmarks.md); an ImageNet backbone knows what a photo of anything looks
    like, so its embedding joins the ranking."""
    n = len(squares)
    if n < 3:
        zeros = np.zeros(n)
        return {"outlier": zeros, "colour_far": zeros, "embedding_far": zeros}
    k = int(np.clip(n // 20, 3, OUTLIER_NEIGHBOURS))  # a few off-topic images may look alike: look past them
    columns = {"colour_far": neighbour_distance(colour_histograms(squares), k),
               "embedding_far": neighbour_distance(emb.vectors, k)}
    if emb.probs is not None:
        columns["doubt"] = 1 - emb.probs.max(1)
    ranked = _rank01(columns["colour_far"])
    if emb.kind == "pretrained":
        ranked = (ranked + _rank01(columns["embedding_far"])) / 2
    return {"outlier": ranked, **columns}


def project(vectors: np.ndarray, seed: int = 0, max_points: int = MAP_MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """2-D map coordinates (t-SNE over the first 50 principal components) of at most `max_points` items:
    (indices, xy). A random sample when there are more; PCA alone below a dozen images."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(vectors)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    x = vectors[chosen]
    if len(x) < 3:
        return chosen, np.zeros((len(x), 2))
    x = PCA(n_components=min(50, x.shape[1], len(x)), random_state=seed).fit_transform(x)
    if len(x) < 12:
        return chosen, x[:, :2] if x.shape[1] >= 2 else np.pad(x, ((0, 0), (0, 2 - x.shape[1])))
    tsne = TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed)
    return chosen, tsne.fit_transform(x)


# ---------------------------------------------------------------- the check


def _items_and_sides(cfg: DataConfig, run_dir: Path | None) -> tuple[DataSource, np.ndarray]:
    """The dataset's readable images now, and each one's side: the run's split where the run had the file
    (a leak is about that run's validation), else the split Loupe draws for the folder today."""
    source, _, split = prepare(cfg)
    sides = split.sides(len(source))
    if run_dir is not None:
        record = read_json(RunDir(run_dir).dataset_record)
        by_file = {str(Path(record["root"]) / item["file"]): item["split"] for item in record["items"]}
        sides = np.array([by_file.get(str(f), s) for f, s in zip(source.files, sides)], dtype=object)
    return source, sides


def check_health(cfg: DataConfig, run_dir: str | Path | None = None, progress: Progress | None = None) -> HealthReport:
    """The whole check over the dataset `cfg` describes, with the run's model and split when `run_dir`."""
    started = time.monotonic()
    run_path = Path(run_dir) if run_dir is not None else None
    if run_path is not None and not RunDir(run_path).has_model:
        raise ValueError(f"Run {run_path.name} has no model yet; choose a finished run, or none.")
    if run_path is not None:
        from core.job import load_config

        cfg = load_config(run_path).data
    source, sides = _items_and_sides(cfg, run_path)
    squares, failed = _squares(source.files, presize_side(cfg.size), progress)
    keep = np.setdiff1d(np.arange(len(source)), failed)
    squares, files = squares[keep], [source.files[i] for i in keep]
    labels = [" ".join(source.labels[i]) for i in keep]
    sides = sides[keep]
    if progress:
        progress("exact duplicates", 0, 1)
    exact = exact_groups(files, squares)
    emb = embed(squares, run_path, cfg.size, progress)
    pairs = candidate_pairs(emb.vectors)
    if progress:
        progress("matching pairs", 0, len(pairs))
    exact_set = {(min(a, b), max(a, b)) for g in exact for a in g for b in g if a != b}
    pairs = pairs[[(a, b) not in exact_set for a, b in zip(pairs["a"], pairs["b"])]].reset_index(drop=True)
    pairs["match"] = match_pairs(squares, pairs["a"].to_numpy(), pairs["b"].to_numpy())
    if progress:
        progress("map", 0, 1)
    chosen, xy = project(emb.vectors)
    coords = np.full((len(files), 2), np.nan)
    coords[chosen] = xy
    rel = [f.relative_to(source.root).as_posix() if f.is_relative_to(source.root) else str(f) for f in files]
    items = pd.DataFrame({"file": rel, "label": labels, "side": sides.astype(str), **outlier_columns(emb, squares),
                          "x": coords[:, 0], "y": coords[:, 1]})
    if emb.probs is not None:
        vocab = _run_vocab(run_path)
        items["predicted"] = [vocab[i] for i in emb.probs.argmax(1)] if vocab else ""
        items["max_prob"] = emb.probs.max(1)
    return HealthReport(str(source.root), emb.how, items, exact, pairs, list(source.vocab),
                        run_path.name if run_path else None, time.monotonic() - started, len(chosen) < len(files))


def _run_vocab(run_dir: Path | None) -> list[str]:
    if run_dir is None:
        return []
    from core.bundle import read_bundle_meta

    return list(read_bundle_meta(RunDir(run_dir).bundle).vocab)
