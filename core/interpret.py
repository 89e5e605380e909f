"""From model outputs to tables: per-item losses, top losses, confusion, per-class report, metrics.

Everything here is pure: it takes probabilities and targets (computed elsewhere by the inference pass)
and returns numbers, arrays and DataFrames, never figures, so pages and the CLI render them as they like.

The item table (`item_table`) is the one shared artefact: one row per item with
  item, file, split, actual, predicted, prob_pred, prob_actual, loss, correct, p_<class> for every class.
Multi-label tables join several labels with a space, in vocab order. A table knows its kind: `df.attrs`
holds {"multi_label", "vocab", "threshold"}, which pandas keeps through filtering, sorting, concat of
like tables and the parquet round trip of `save_table` / `load_table`.

Thresholds compare strictly (`p > threshold`), as fastai's `accuracy_multi`, `fbeta` and multi-label
decoding do, so a table's predictions and the trainer's multi-label metrics always agree.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.fileio import atomic_write
from core.listing import path_text
from core.rundir import RunDir

# Probabilities are clipped here before a log: a confidently wrong item gets a large, finite loss.
EPS = 1e-12
LABEL_SEP = " "
PROB_PREFIX = "p_"
# The item table's fixed columns and their dtypes, in order; the p_<class> columns (float64) follow.
TABLE_DTYPES = {"item": "int64", "file": "str", "split": "str", "actual": "str", "predicted": "str",
                "prob_pred": "float64", "prob_actual": "float64", "loss": "float64", "correct": "bool"}
REPORT_COLUMNS = ("precision", "recall", "f1", "support")

ArrayLike = torch.Tensor | np.ndarray | Sequence


# ---------------------------------------------------------------- the item table


def prob_columns(vocab: Sequence[str]) -> list[str]:
    """Names of the per-class probability columns of an item table, in vocab order."""
    return [f"{PROB_PREFIX}{c}" for c in vocab]


def _numpy(x: ArrayLike) -> np.ndarray:
    """A CPU numpy copy of a tensor or array; floats become float64 so losses are computed precisely."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.double() if x.is_floating_point() else x
        return x.numpy()
    x = np.asarray(x)
    return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x


def _check_inputs(
    probs: np.ndarray, targets: np.ndarray, n_files: int, vocab: Sequence[str], multi_label: bool
) -> None:
    if probs.ndim != 2 or probs.shape[1] != len(vocab):
        raise ValueError(f"probs must have shape [N, {len(vocab)}] (one column per class), not {list(probs.shape)}.")
    n = probs.shape[0]
    want = (n, len(vocab)) if multi_label else (n,)
    if targets.shape != want:
        kind = "a multi-hot [N, C] matrix" if multi_label else "class indices of shape [N]"
        raise ValueError(f"targets must be {kind} {list(want)}, not {list(targets.shape)}.")
    if n_files != n:
        raise ValueError(f"Got {n_files} files for {n} rows of probabilities.")
    if n and (np.isnan(probs).any() or probs.min() < -1e-6 or probs.max() > 1 + 1e-6):
        # The commonest mistake: passing logits. Say so rather than produce nonsense losses.
        raise ValueError("probs must be probabilities in [0, 1]; apply softmax (or sigmoid for multi-label) to logits.")
    if not multi_label and n and (targets.min() < 0 or targets.max() >= len(vocab)):
        raise ValueError(f"targets must be class indices in [0, {len(vocab)}).")


def _join(hot_row: np.ndarray, vocab: Sequence[str]) -> str:
    return LABEL_SEP.join(c for c, on in zip(vocab, hot_row) if on)


def _single_label_columns(probs: np.ndarray, targets: np.ndarray, vocab: Sequence[str]) -> dict:
    rows = np.arange(len(probs))
    targets = targets.astype(np.int64)
    pred = probs.argmax(axis=1)
    prob_actual = probs[rows, targets]
    return {
        "actual": [vocab[i] for i in targets],
        "predicted": [vocab[i] for i in pred],
        "prob_pred": probs[rows, pred],
        "prob_actual": prob_actual,
        "loss": -np.log(np.clip(prob_actual, EPS, 1.0)),
        "correct": pred == targets,
    }


def _multi_label_columns(probs: np.ndarray, targets: np.ndarray, vocab: Sequence[str], threshold: float) -> dict:
    actual_hot, pred_hot = targets > 0.5, probs > threshold
    n_actual = actual_hot.sum(axis=1)
    p = np.clip(probs, EPS, 1.0 - EPS)
    # Soft targets (label smoothing) enter the loss as they are; only the label strings threshold them.
    bce = -(targets * np.log(p) + (1.0 - targets) * np.log1p(-p))
    with np.errstate(invalid="ignore", divide="ignore"):
        prob_actual = np.where(n_actual > 0, (probs * actual_hot).sum(axis=1) / n_actual, np.nan)
    return {
        "actual": [_join(row, vocab) for row in actual_hot],
        "predicted": [_join(row, vocab) for row in pred_hot],
        # The model's most confident label: defined even when no label clears the threshold.
        "prob_pred": probs.max(axis=1) if len(probs) else np.zeros(0),
        # Mean probability given to the true labels; NaN for an item that has none.
        "prob_actual": prob_actual,
        "loss": bce.mean(axis=1) if len(probs) else np.zeros(0),
        "correct": (actual_hot == pred_hot).all(axis=1),
    }


def item_table(
    probs: ArrayLike,
    targets: ArrayLike,
    files: Sequence[str | os.PathLike],
    vocab: Sequence[str],
    *,
    multi_label: bool,
    split: str = "valid",
    item_ids: ArrayLike | None = None,
    threshold: float = 0.5,
    losses: ArrayLike | None = None,
) -> pd.DataFrame:
    """One row per item, sorted by `item`: what it is, what the model said, how wrong it was.

    probs: [N, C] softmax (single-label) or sigmoid (multi-label) outputs, not logits.
    targets: [N] class indices, or an [N, C] multi-hot (possibly soft) matrix for multi-label.
    item_ids: each row's index in the data source (default 0..N-1); must be unique.
    threshold: multi-label only; a label is predicted when its probability is above it.
    losses: per-item losses as the trainer computed them (e.g. with label smoothing); when None,
      single-label loss is cross-entropy -log(max(p_actual, 1e-12)) and multi-label loss is binary
      cross-entropy averaged over labels, with p clipped to [1e-12, 1 - 1e-12].
    """
    probs, targets = _numpy(probs), _numpy(targets)
    _check_inputs(probs, targets, len(files), vocab, multi_label)
    n = len(probs)
    ids = np.arange(n, dtype=np.int64) if item_ids is None else _numpy(item_ids).astype(np.int64).reshape(-1)
    if len(ids) != n or len(np.unique(ids)) != n:
        raise ValueError(f"item_ids must be {n} unique source indices.")
    cols = (_multi_label_columns(probs, targets, vocab, threshold) if multi_label
            else _single_label_columns(probs, targets, vocab))
    if losses is not None:
        losses = _numpy(losses).astype(np.float64).reshape(-1)
        if len(losses) != n:
            raise ValueError(f"Got {len(losses)} losses for {n} items.")
        cols["loss"] = losses
    df = pd.DataFrame({"item": ids, "file": [str(f) for f in files], "split": [split] * n, **cols})
    df = df[list(TABLE_DTYPES)].astype(TABLE_DTYPES)
    probs_df = pd.DataFrame(probs.reshape(n, len(vocab)), columns=prob_columns(vocab), dtype="float64")
    df = pd.concat([df, probs_df], axis=1).sort_values("item", kind="stable").reset_index(drop=True)
    df.attrs = {"multi_label": bool(multi_label), "vocab": [str(c) for c in vocab], "threshold": float(threshold)}
    return df


def _meta(df: pd.DataFrame) -> dict:
    if "multi_label" not in df.attrs:
        raise ValueError("This table does not say whether it is multi-label; build it with item_table or read it "
                         "with load_table (both record it in df.attrs).")
    return df.attrs


def is_multi_label(df: pd.DataFrame) -> bool:
    """Whether an item table came from a multi-label model."""
    return bool(_meta(df)["multi_label"])


def table_probs(df: pd.DataFrame, vocab: Sequence[str]) -> np.ndarray:
    """The [N, C] probabilities stored in an item table, columns in `vocab` order."""
    return df[prob_columns(vocab)].to_numpy(dtype=np.float64)


# ---------------------------------------------------------------- saving


def table_path(run_dir: str | os.PathLike, split: str) -> Path:
    """Where a run keeps the item table of one split (see core.rundir.RunDir.table)."""
    return RunDir(run_dir).table(split)


def save_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write an item table as parquet, atomically; its attrs (kind, vocab, threshold) go along."""
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, engine="pyarrow", index=False))


def load_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read an item table written by `save_table`, attrs included."""
    return pd.read_parquet(path, engine="pyarrow")


# ---------------------------------------------------------------- label sets


def split_labels(text: str, vocab: Sequence[str]) -> list[str]:
    """The labels of a joined label string, read back against `vocab`.

    Labels may themselves contain spaces, so the longest run of words that is a known label wins.
    """
    known, words, out, i = set(vocab), text.split(LABEL_SEP) if text else [], [], 0
    while i < len(words):
        j = next((j for j in range(len(words), i, -1) if LABEL_SEP.join(words[i:j]) in known), None)
        if j is None:
            raise ValueError(f"{LABEL_SEP.join(words[i:])!r} in {text!r} is not a label of this vocab.")
        out.append(LABEL_SEP.join(words[i:j]))
        i = j
    return out


def _indices(names: pd.Series, vocab: Sequence[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted(set(names) - index.keys())
    if unknown:
        raise ValueError(f"Classes {unknown[:5]} are in the table but not in vocab.")
    return names.map(index).to_numpy(dtype=np.int64)


def _hot(names: pd.Series, vocab: Sequence[str], multi_label: bool) -> np.ndarray:
    """[N, C] booleans: which classes each row's label string names."""
    hot = np.zeros((len(names), len(vocab)), dtype=bool)
    if not multi_label:
        hot[np.arange(len(names)), _indices(names, vocab)] = True
        return hot
    index = {c: i for i, c in enumerate(vocab)}
    for row, text in enumerate(names):
        hot[row, [index[c] for c in split_labels(text, vocab)]] = True
    return hot


# ---------------------------------------------------------------- views of the table


def _as_set(x: str | Sequence[str]) -> set[str]:
    return {x} if isinstance(x, str) else set(x)


def _label_filter(col: pd.Series, wanted: str | Sequence[str], df: pd.DataFrame) -> pd.Series:
    wanted = _as_set(wanted)
    if not is_multi_label(df):
        return col.isin(wanted)
    vocab = _meta(df)["vocab"]
    return col.map(lambda text: not wanted.isdisjoint(split_labels(text, vocab))).astype(bool)


def top_losses(
    df: pd.DataFrame,
    k: int | None = None,
    *,
    split: str | None = None,
    actual: str | Sequence[str] | None = None,
    predicted: str | Sequence[str] | None = None,
    only_wrong: bool = False,
) -> pd.DataFrame:
    """The `k` highest-loss rows (all when None), loss descending, ties by item.

    Filters combine with AND. For multi-label tables `actual="x"` keeps items whose labels include x.
    """
    if k is not None and k < 0:
        raise ValueError(f"k must be >= 0, not {k}.")
    keep = pd.Series(True, index=df.index)
    if split is not None:
        keep &= df["split"] == split
    if actual is not None:
        keep &= _label_filter(df["actual"], actual, df)
    if predicted is not None:
        keep &= _label_filter(df["predicted"], predicted, df)
    if only_wrong:
        keep &= ~df["correct"]
    out = df[keep].sort_values(["loss", "item"], ascending=[False, True], kind="stable")
    return (out if k is None else out.head(k)).reset_index(drop=True)


def confusion_matrix(df: pd.DataFrame, vocab: Sequence[str], normalize: bool = False) -> np.ndarray:
    """[C, C] counts, rows = actual, columns = predicted; `normalize` makes each non-empty row sum to 1.

    Single-label only: a multi-label item can be right about one label and wrong about another.
    """
    if is_multi_label(df):
        raise ValueError("confusion_matrix needs a single-label table; for multi-label use "
                         "multilabel_confusion (tp, fp, fn, tn per label).")
    c = len(vocab)
    flat = _indices(df["actual"], vocab) * c + _indices(df["predicted"], vocab)
    cm = np.bincount(flat, minlength=c * c).reshape(c, c).astype(np.int64)
    if not normalize:
        return cm
    totals = cm.sum(axis=1, keepdims=True)
    # A class with no items keeps a row of zeros rather than 0/0 = NaN.
    return np.divide(cm, totals, out=np.zeros(cm.shape, dtype=np.float64), where=totals > 0)


def most_confused(df: pd.DataFrame, vocab: Sequence[str], min_val: int = 1) -> pd.DataFrame:
    """Off-diagonal (actual, predicted, count) with count >= min_val, most frequent first, then by names."""
    cm = confusion_matrix(df, vocab)
    rows = [(vocab[i], vocab[j], int(cm[i, j])) for i in range(len(vocab)) for j in range(len(vocab))
            if i != j and cm[i, j] >= max(min_val, 1)]
    rows.sort(key=lambda r: (-r[2], r[0], r[1]))
    out = pd.DataFrame(rows, columns=["actual", "predicted", "count"])
    return out.astype({"actual": "str", "predicted": "str", "count": "int64"})


def multilabel_confusion(df: pd.DataFrame, vocab: Sequence[str]) -> pd.DataFrame:
    """Per class, one-vs-rest counts tp, fp, fn, tn (index = class).

    Meant for multi-label tables (predictions thresholded when the table was built); for a single-label
    table it gives each class's one-vs-rest view of the confusion matrix.
    """
    multi = is_multi_label(df)
    actual, pred = _hot(df["actual"], vocab, multi), _hot(df["predicted"], vocab, multi)
    counts = {
        "tp": (actual & pred).sum(axis=0),
        "fp": (~actual & pred).sum(axis=0),
        "fn": (actual & ~pred).sum(axis=0),
        "tn": (~actual & ~pred).sum(axis=0),
    }
    return pd.DataFrame(counts, index=pd.Index(list(vocab), name="class"), dtype="int64")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, with 0 where den is 0 (sklearn's zero_division=0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(num.shape), where=den > 0)


def classification_report(df: pd.DataFrame, vocab: Sequence[str]) -> pd.DataFrame:
    """Precision, recall, f1 and support per class, then "macro avg" and "weighted avg" rows.

    Zero divisions give 0 (a class never predicted has precision 0). Support is the number of items
    that truly have the class; both average rows carry the total support. Multi-label tables are scored
    per label on their thresholded predictions.
    """
    mc = multilabel_confusion(df, vocab)
    tp, fp, fn = (mc[k].to_numpy() for k in ("tp", "fp", "fn"))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * precision * recall, precision + recall)
    support = tp + fn
    per_class = np.stack([precision, recall, f1], axis=1)
    macro = per_class.mean(axis=0) if len(vocab) else np.zeros(3)
    weighted = (per_class * support[:, None]).sum(axis=0) / support.sum() if support.sum() else np.zeros(3)
    body = np.vstack([per_class, macro, weighted])
    report = pd.DataFrame(body, columns=list(REPORT_COLUMNS[:3]),
                          index=pd.Index([*vocab, "macro avg", "weighted avg"], name="class"))
    report["support"] = np.concatenate([support, [support.sum()] * 2]).astype(np.int64)
    return report


def error_without(table: pd.DataFrame, files: Collection[str | os.PathLike]) -> tuple[float, float, int]:
    """(error of every row, error without the rows whose `file` is in `files`, rows left out) of an item table:
    what leaked duplicates did to a run's validation error ("0.12 with the 6 leaked images, 0.14 without").

    `files` are in the table's own form: a run's tables hold each item's absolute path, under the dataset root
    with its links resolved (DataSource.root), as core.listing.path_text writes it; paths are compared after
    path_text, so Path objects do too. Single-label error is 1 - accuracy (the share of rows not `correct`);
    multi-label error is 1 - accuracy_multi at the table's threshold (the share of wrong (item, label)
    decisions), the numbers the epoch table shows. NaN for no rows."""
    wanted = {path_text(f) for f in files}
    left_out = table["file"].isin(wanted).to_numpy()
    if is_multi_label(table):
        vocab = _meta(table)["vocab"]
        wrong = (table_probs(table, vocab) > _meta(table)["threshold"]) != _hot(table["actual"], vocab, True)
        per_row = wrong.mean(axis=1) if len(vocab) else np.zeros(len(table))
    else:
        per_row = (~table["correct"].to_numpy(dtype=bool)).astype(np.float64)

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if len(x) else float("nan")

    # Every row has the same number of labels, so the mean of per-row shares is the share over all decisions.
    return mean(per_row), mean(per_row[~left_out]), int(left_out.sum())


# ---------------------------------------------------------------- metrics (torch, batch-friendly)


def accuracy(inp: torch.Tensor, targ: torch.Tensor) -> float:
    """Share of items whose argmax class is the target; logits or probabilities alike. NaN for no items."""
    if inp.shape[0] == 0:
        return float("nan")
    return (inp.argmax(dim=-1) == targ.to(inp.device)).float().mean().item()


def error_rate(inp: torch.Tensor, targ: torch.Tensor) -> float:
    """1 - accuracy."""
    return 1.0 - accuracy(inp, targ)


def _multi_hot_preds(
    inp: torch.Tensor, targ: torch.Tensor, thresh: float, sigmoid: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if inp.shape != targ.shape:
        raise ValueError(f"inp and targ must have the same [N, C] shape, not {list(inp.shape)} and {list(targ.shape)}.")
    probs = inp.float().sigmoid() if sigmoid else inp.float()
    # Targets may be soft (label smoothing); a label counts as present above one half.
    return probs > thresh, targ.to(inp.device) > 0.5


def accuracy_multi(inp: torch.Tensor, targ: torch.Tensor, thresh: float = 0.5, sigmoid: bool = True) -> float:
    """fastai's accuracy_multi: share of (item, label) decisions right, a label predicted when p > thresh."""
    if inp.numel() == 0:
        return float("nan")
    pred, true = _multi_hot_preds(inp, targ, thresh, sigmoid)
    return (pred == true).float().mean().item()


def fbeta_multi(
    inp: torch.Tensor,
    targ: torch.Tensor,
    beta: float = 2.0,
    thresh: float = 0.2,
    sigmoid: bool = True,
    average: str = "samples",
) -> float:
    """F-beta of thresholded multi-label predictions (F2 at 0.2 is the Planet competition's metric).

    A label is predicted when p > thresh (p = sigmoid(inp) if `sigmoid`). With tp, fp, fn counted over a
    sample's labels (average="samples"), over all items and labels ("micro") or per label ("macro"):

        F = (1 + beta^2) tp / ((1 + beta^2) tp + beta^2 fn + fp),  and F = 0 when tp = 0,

    which equals (1 + beta^2) P R / (beta^2 P + R) with P = tp / (tp + fp), R = tp / (tp + fn).
    "samples" averages F over items: fastai's FBetaMulti (sklearn fbeta_score, zero_division=0) exactly,
    and fastai v1's fbeta up to its eps of 1e-9 in each denominator. Only "samples" is a per-item mean,
    so only it may be averaged over batches weighted by batch size. NaN for no items.
    """
    if average not in ("samples", "micro", "macro"):
        raise ValueError(f"average must be 'samples', 'micro' or 'macro', not {average!r}.")
    if inp.numel() == 0:
        return float("nan")
    pred, true = _multi_hot_preds(inp, targ, thresh, sigmoid)
    dims = {"samples": 1, "macro": 0, "micro": (0, 1)}[average]
    tp = (pred & true).sum(dim=dims).double()
    fp = (pred & ~true).sum(dim=dims).double()
    fn = (~pred & true).sum(dim=dims).double()
    b2 = beta**2
    # torch.where picks 0 where tp = 0, so the 0/0 of a sample with no labels either way never shows.
    f = torch.where(tp > 0, (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp), torch.zeros_like(tp))
    return f.mean().item()
