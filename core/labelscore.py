"""Scores for label issues, from out-of-sample predictions (a label check's folds, core.labelcheck).

cleanlab does the scoring (we do not write our own confident learning): its label-quality score ranks every
image, and `find_label_issues` flags the ones confident learning counts as mislabelled. The suggested label is
what the out-of-sample model predicts. Besides, each image's training loss across epochs (the folds that
trained on it) is kept as its history: the Clean page draws it, and `dynamics` (one minus the mean probability
training gave the label, the data-map "confidence") is a second score a benchmark can weigh.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from core.interpret import LABEL_SEP, is_multi_label, split_labels, table_probs

# Measured on planted flips (bench/label_noise.py, docs/benchmarks.md): self-confidence is best or within 0.04
# of the best on every set; normalized margin ties on look-alike flips but is 0.07 worse on random ones.
METHOD = "self_confidence"
COLUMNS = ("file", "label", "suggested", "score", "issue", "prob_given", "prob_suggested", "dynamics", "fold",
           "loss_history")


def score_labels(table: pd.DataFrame, root: Path, history: np.ndarray | None = None,
                 method: str = METHOD) -> pd.DataFrame:
    """One row per image of an out-of-sample item table, most likely mislabelled first.

    Columns: `file` (relative to `root` when inside it, as on disk), `label` (given), `suggested` (the
    out-of-sample prediction), `score` (1 - cleanlab's label quality: higher = more likely wrong), `issue`
    (flagged by confident learning), `prob_given` and `prob_suggested` (the out-of-sample probabilities of
    the given and suggested labels; for multi-label the mean over the given labels and over the suggested
    ones), `dynamics` (see the module doc), `fold` and `loss_history` (training loss per epoch, space-separated).
    """
    vocab = list(table.attrs["vocab"])
    probs = np.clip(table_probs(table, vocab), 0.0, 1.0)
    if is_multi_label(table):
        scores = _multi_label(table, probs, vocab, float(table.attrs.get("threshold", 0.5)), method)
    else:
        scores = _single_label(table, probs, vocab, method)
    history = np.full((len(table), 0), np.nan) if history is None else history
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # an item no fold trained on: NaN, not a warning
        dynamics = 1.0 - np.nanmean(np.exp(-history), axis=1) if history.shape[1] else np.full(len(table), np.nan)
    frame = pd.DataFrame({
        "file": [_relative(f, root) for f in table["file"]],
        **scores,
        "dynamics": dynamics,
        "fold": table["fold"].to_numpy() if "fold" in table else 0,
        "loss_history": [" ".join(f"{v:.3f}" for v in row if np.isfinite(v)) for row in history],
    })
    return frame[list(COLUMNS)].sort_values(["score", "file"], ascending=[False, True], kind="stable",
                                             ignore_index=True)


def _single_label(table: pd.DataFrame, probs: np.ndarray, vocab: list[str], method: str) -> dict:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
    labels = np.array([vocab.index(a) for a in table["actual"]], dtype=int)
    quality = get_label_quality_scores(labels, probs, method=method)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a class with very few images: the flags are still sound
            issue = find_label_issues(labels, probs, n_jobs=1)
    except (ValueError, IndexError):  # too few images per class for confident learning: flag disagreements
        issue = probs.argmax(axis=1) != labels
    suggested = probs.argmax(axis=1)
    rows = np.arange(len(labels))
    return {
        "label": list(table["actual"]),
        "suggested": [vocab[i] for i in suggested],
        "score": 1.0 - quality,
        "issue": np.asarray(issue, dtype=bool),
        "prob_given": probs[rows, labels],
        "prob_suggested": probs[rows, suggested],
    }


def _multi_label(table: pd.DataFrame, probs: np.ndarray, vocab: list[str], threshold: float, method: str) -> dict:
    """Per-label issues: the suggestion is the set of labels the model predicts; `issue` is cleanlab's flag."""
    from cleanlab.multilabel_classification.filter import find_label_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores

    given = [[vocab.index(c) for c in split_labels(text, vocab)] for text in table["actual"]]
    quality = get_label_quality_scores(given, probs, method=method)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            issue = find_label_issues(given, probs, n_jobs=1)
    except (ValueError, IndexError):
        issue = None
    hot = np.zeros_like(probs, dtype=bool)
    for i, labels in enumerate(given):
        hot[i, labels] = True
    predicted = probs > threshold
    if issue is None:
        issue = (hot != predicted).any(axis=1)
    return {
        "label": list(table["actual"]),
        "suggested": [LABEL_SEP.join(c for c, on in zip(vocab, row) if on) for row in predicted],
        "score": 1.0 - quality,
        "issue": np.asarray(issue, dtype=bool),
        "prob_given": _mean_where(probs, hot),
        "prob_suggested": _mean_where(probs, predicted),
    }


def _mean_where(probs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    counts = mask.sum(axis=1)
    return np.where(counts > 0, (probs * mask).sum(axis=1) / np.maximum(counts, 1), np.nan)


def _relative(file: str, root: Path) -> str:
    path = Path(file)
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def label_changes(label: str, suggested: str, vocab: list[str]) -> tuple[list[str], list[str]]:
    """Multi-label: the labels the suggestion adds to and removes from the given ones."""
    given, wanted = set(split_labels(label, vocab)), set(split_labels(suggested, vocab))
    return sorted(wanted - given), sorted(given - wanted)


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(history: str, top: float | None = None) -> str:
    """A loss history ("0.91 0.55 0.32", as label_issues.csv keeps it) as a line of block characters, scaled
    from 0 to `top` (default: its own maximum), so a glance shows a loss that fell (learned) or stayed high."""
    values = [float(v) for v in history.split()] if history else []
    if not values:
        return ""
    top = top or max(values) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int(len(SPARKS) * max(v, 0.0) / top))] for v in values)
