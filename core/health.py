"""Dataset health: exact and near duplicates, duplicates that leak across the split, off-topic images, a map.

How it works (figures and the measurements behind each default: docs/benchmarks.md, "Dataset health"):

- Every image is read once as the decode cache's presized square (core.imagecache; a warm cache, from a run
  trained on the folder, means no JPEG is decoded again) and reduced to a digest (core.healthdigest).
- **Exact duplicates**: same square (a hash of its bytes) confirmed by the SHA-256 of the full decoded
  pixels, upright and RGB: a re-saved JPEG with new metadata is the same photo; the file bytes would say not.
- **Embeddings** (`HealthReport.how` says which): the selected run's model (the head's pooled features, the
  penultimate layer), else an ImageNet-pretrained backbone where its weights are on this machine, else a
  perceptual hash of the pixels (DCT of a small grey image, mirror-invariant); vectors are centred on the
  dataset's mean (pooled ReLU features share a large common part that makes every cosine near 1).
- **Near duplicates**: each image's nearest neighbours by cosine, in the embedding and in the perceptual
  hash (which finds mirrored copies a model may not), are the candidates; each candidate pair
  is then matched pixel by pixel (core.healthmatch: the best normalised correlation of one image over the
  other, shifted, scaled 0.8-1 and mirrored). Cosine alone, even from a trained model, ranks look-alike
  photos (teddies on white) as close as real copies; the match is what tells a copy from a look-alike.
- **Outliers**: images whose colour statistics are far from their nearest neighbours' (and, with a pretrained
  backbone, whose embedding is); the run's doubt (1 - its highest probability) is shown beside them.
- **Map**: t-SNE (scikit-learn) of the embeddings, on a sample when the dataset is large.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.augment import presize_side
from core.config import DataConfig
from core.data import prepare
from core.fileio import read_json
from core.healthdigest import Digest, Progress, digest
from core.healthmatch import COARSE_CUT, match_pairs
from core.images import open_image
from core.layouts import DataSource
from core.rundir import RunDir

DEFAULT_MATCH = 0.68  # the pixel match above which a candidate pair is reported as near duplicates (measured)
MIN_MATCH = COARSE_CUT  # the lowest threshold to offer: below it a pair's match is only the coarse one
NEIGHBOURS = 5  # candidates per image for the pixel match (true copies are the first neighbour 27 times in 28)
HASH_NEIGHBOURS = 3  # more candidates from the perceptual hash, besides a model's (mirrored copies)
OUTLIER_NEIGHBOURS = 30  # at most: an outlier is far from this many nearest neighbours, not just the first
MAP_MAX_POINTS = 3000  # t-SNE beyond this is slow on a CPU: the map shows a sample, and says so


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
    kind: str = "pixels"  # the embedding's kind: "run", "pretrained" or "pixels" (core.healthdigest)

    def outlier_basis(self) -> str:
        """What the outlier ranking measures, in words (see `outlier_columns`)."""
        basis = "how unlike their nearest neighbours' their colours are"
        if self.kind == "pretrained":
            basis += ", and their embedding"
        return basis

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


# ---------------------------------------------------------------- exact and near duplicates


def exact_groups(files: Sequence[Path], hashes: Sequence[bytes]) -> list[list[int]]:
    """Groups of indices whose images have identical decoded pixels. Equal squares (their hashes) are the
    candidates; only those are decoded in full and compared by SHA-256 (a square is only the centre)."""
    by_square: dict[bytes, list[int]] = {}
    for i, key in enumerate(hashes):
        by_square.setdefault(key, []).append(i)
    groups = []
    for candidates in (c for c in by_square.values() if len(c) > 1):
        by_pixels: dict[str, list[int]] = {}
        for i in candidates:
            img = open_image(files[i])
            by_pixels.setdefault(f"{img.size}:{hashlib.sha256(img.tobytes()).hexdigest()}", []).append(i)
        groups += [g for g in by_pixels.values() if len(g) > 1]
    return sorted(groups)


def _centred(vectors: np.ndarray) -> np.ndarray:
    """Centred on the dataset's mean, unit length: pooled ReLU features share a large common part that makes
    every raw cosine near 1."""
    z = vectors - vectors.mean(0, keepdims=True)
    return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-8)).astype(np.float32)


def _neighbours(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest other rows by cosine (unit vectors): (row, neighbour) index arrays."""
    n = len(vectors)
    rows, cols = [], []
    v = torch.from_numpy(vectors)
    for start in range(0, n, 1024):  # blocks keep memory at 1024 x N for any N
        block = v[start : start + 1024] @ v.T
        idx = torch.arange(start, min(start + 1024, n))
        block[torch.arange(len(idx)), idx] = -2.0
        rows.append(idx.repeat_interleave(k))
        cols.append(block.topk(k, dim=1).indices.flatten())
    return torch.cat(rows).numpy(), torch.cat(cols).numpy()


def candidate_pairs(vectors: np.ndarray, k: int = NEIGHBOURS, extra: np.ndarray | None = None,
                    k_extra: int = HASH_NEIGHBOURS) -> pd.DataFrame:
    """Each image's k nearest neighbours by cosine in `vectors` (and its k_extra nearest in `extra`, a second
    embedding of the same images, when given), as unique pairs a < b with their cosine in `vectors`."""
    n = len(vectors)
    if n < 2:
        return pd.DataFrame({"a": np.zeros(0, int), "b": np.zeros(0, int), "cosine": np.zeros(0, np.float32)})
    found = [_neighbours(vectors, min(k, n - 1))]
    if extra is not None:
        found.append(_neighbours(extra, min(k_extra, n - 1)))
    a, b = np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])
    table = pd.DataFrame({"a": np.minimum(a, b), "b": np.maximum(a, b)}).drop_duplicates().reset_index(drop=True)
    table["cosine"] = np.einsum("ij,ij->i", vectors[table["a"]], vectors[table["b"]])
    return table


# ---------------------------------------------------------------- outliers and the map


def _rank01(values: np.ndarray) -> np.ndarray:
    return pd.Series(values).rank(pct=True).to_numpy()


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


def outlier_columns(dig: Digest) -> dict[str, np.ndarray]:
    """Per image: `colour_far` (how unlike its nearest neighbours' its colours are), `embedding_far` (the same
    in embedding space), `doubt` (1 - the run's highest probability; with a run) and `outlier`, the ranking
    shown (higher = more suspicious). On the bear photos with planted off-topic images, colour statistics
    find far more of them than a from-scratch model's embedding or its doubt: the model has learnt the
    off-topic images as their class (docs/benchmarks.md). An ImageNet backbone knows what photos of anything
    look like, so where one embedded the images its distance joins the ranking."""
    n = len(dig.hashes)
    if n < 3:
        zeros = np.zeros(n)
        return {"outlier": zeros, "colour_far": zeros, "embedding_far": zeros}
    k = int(np.clip(n // 20, 3, OUTLIER_NEIGHBOURS))  # a few off-topic images may look alike: look past them
    columns = {"colour_far": neighbour_distance(dig.histograms, k),
               "embedding_far": neighbour_distance(dig.features, k)}
    if dig.probs is not None:
        columns["doubt"] = 1 - dig.probs.max(1)
    ranked = _rank01(columns["colour_far"])
    if dig.kind == "pretrained":
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
    dig = digest(source.files, presize_side(cfg.size), run_path, cfg.size, progress)
    keep = np.setdiff1d(np.arange(len(source)), dig.failed)
    files, labels, sides = [source.files[i] for i in keep], [" ".join(source.labels[i]) for i in keep], sides[keep]
    if progress:
        progress("exact duplicates", 0, 1)
    exact = exact_groups(files, dig.hashes)
    vectors = _centred(dig.features)
    pairs = candidate_pairs(vectors, extra=_centred(dig.phash) if dig.kind != "pixels" else None)
    exact_set = {(min(a, b), max(a, b)) for g in exact for a in g for b in g if a != b}
    pairs = pairs[[(a, b) not in exact_set for a, b in zip(pairs["a"], pairs["b"])]].reset_index(drop=True)
    if progress:
        progress("matching pairs", 0, len(pairs))
    pairs["match"] = match_pairs(dig.grey, dig.colour, pairs["a"].to_numpy(), pairs["b"].to_numpy())
    if progress:
        progress("map", 0, 1)
    chosen, xy = project(vectors)
    coords = np.full((len(files), 2), np.nan)
    coords[chosen] = xy
    rel = [f.relative_to(source.root).as_posix() if f.is_relative_to(source.root) else str(f) for f in files]
    items = pd.DataFrame({"file": rel, "label": labels, "side": sides.astype(str), **outlier_columns(dig),
                          "x": coords[:, 0], "y": coords[:, 1]})
    if dig.probs is not None:
        vocab = _run_vocab(run_path)
        items["predicted"] = [vocab[i] for i in dig.probs.argmax(1)] if vocab else ""
        items["max_prob"] = dig.probs.max(1)
    how = dig.how + ("" if run_path or dig.kind != "pretrained" else " (no run selected)")
    return HealthReport(str(source.root), how, items, exact, pairs, list(source.vocab),
                        run_path.name if run_path else None, time.monotonic() - started, len(chosen) < len(files),
                        dig.kind)


def _run_vocab(run_dir: Path | None) -> list[str]:
    if run_dir is None:
        return []
    from core.bundle import read_bundle_meta

    return list(read_bundle_meta(RunDir(run_dir).bundle).vocab)
