"""The pixel match that tells a copy of a photo from a photo that only looks alike.

A resized, recompressed, slightly cropped or mirrored copy still lines up with its original pixel for
pixel once shifted, scaled and perhaps mirrored; two photos of look-alike teddies on white do not. The
match of a pair is the mean, over the grey image and its gradient magnitude, of the best normalised
correlation of either image, shrunk by a scale in SCALES and mirrored or not, at any shift over the other,
less the distance of their mean colours (grey structure alone cannot tell two colour gradients apart; a
copy keeps its colours). It runs coarse to fine: every pair at 24 pixels, then at 48 only the pairs whose
coarse match could reach a threshold a user would set (the coarse and fine matches correlate at 0.985 on
the bear photos; docs/benchmarks.md), a small share of the candidates.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SCALES = (1.0, 0.93, 0.86, 0.8)  # how much smaller the copy's square may be (crops of up to ~20%)
COARSE_SIDE = 24
COARSE_CUT = 0.6  # pairs whose coarse match is below this are not refined (planted copies: >= 0.67 coarse)
COLOUR_WEIGHT = 0.5  # how much a difference in mean colour (0-1) lowers the match


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


def _structure_match(grey: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The grey-and-gradient part of the match for pairs (a[i], b[i]) of the grey images `grey` [N, 1, S, S]."""
    side = grey.shape[-1]
    scores = []
    for use_gradient in (False, True):
        best = torch.full((len(a),), -1.0)
        for src, dst in ((a, b), (b, a)):
            target = _gradient(grey[dst]) if use_gradient else grey[dst]
            for scale in SCALES:
                template = F.interpolate(grey[src], size=max(6, round(side * scale)), mode="area")
                template = _gradient(template) if use_gradient else template
                for t in (template, template.flip(3)):
                    best = torch.maximum(best, _best_correlation(target, t))
        scores.append(best)
    return (scores[0] + scores[1]) / 2


def _match(grey: torch.Tensor, colour: torch.Tensor, a: np.ndarray, b: np.ndarray, chunk: int = 256) -> np.ndarray:
    out = np.empty(len(a), dtype=np.float32)
    for start in range(0, len(a), chunk):
        ia = torch.tensor(np.array(a[start : start + chunk], dtype=np.int64))
        ib = torch.tensor(np.array(b[start : start + chunk], dtype=np.int64))
        colour_distance = (colour[ia] - colour[ib]).norm(dim=1) / (255 * 3**0.5)
        out[start : start + len(ia)] = (_structure_match(grey, ia, ib) - COLOUR_WEIGHT * colour_distance).numpy()
    return out


def match_pairs(grey: torch.Tensor, colour: torch.Tensor, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The match of each pair (a[i], b[i]), in [-1.5, 1]: from `grey` [N, 1, S, S] (core.healthdigest) and mean
    colours [N, 3]; below COARSE_CUT it is the coarse match (enough to know the pair is no copy)."""
    with torch.inference_mode():
        coarse = F.interpolate(grey, size=COARSE_SIDE, mode="area")
        score = _match(coarse, colour, a, b)
        refine = np.flatnonzero(score >= COARSE_CUT)
        score[refine] = _match(grey, colour, np.asarray(a)[refine], np.asarray(b)[refine])
    return score
