"""core.interpret on hand-made outputs whose answers are worked out here independently, by hand or by loops."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from core.interpret import (
    accuracy,
    accuracy_multi,
    classification_report,
    confusion_matrix,
    error_rate,
    fbeta_multi,
    item_table,
    load_table,
    most_confused,
    multilabel_confusion,
    prob_columns,
    save_table,
    split_labels,
    table_path,
    table_probs,
    top_losses,
)

VOCAB = ["cat", "dog", "fox"]
# Six items: argmax gives cat, dog, fox, dog, dog, dog.
PROBS = [
    [0.70, 0.20, 0.10],  # cat -> cat
    [0.10, 0.60, 0.30],  # cat -> dog
    [0.20, 0.30, 0.50],  # dog -> fox
    [0.10, 0.80, 0.10],  # dog -> dog
    [0.05, 0.90, 0.05],  # fox -> dog
    [0.30, 0.60, 0.10],  # cat -> dog
]
TARGETS = [0, 0, 1, 1, 2, 0]
IDS = [10, 3, 7, 1, 12, 5]
FILES = [f"img_{i}.jpg" for i in IDS]

ML_VOCAB = ["clear", "haze", "road", "water"]
ML_PROBS = [
    [0.9, 0.1, 0.6, 0.3],  # actual clear road, predicted clear road
    [0.4, 0.7, 0.2, 0.8],  # actual clear haze, predicted haze water
    [0.1, 0.2, 0.3, 0.4],  # no labels, nothing predicted
    [0.5, 0.2, 0.9, 0.6],  # actual road water; 0.5 is not above the 0.5 threshold
]
ML_TARGETS = [[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]


def single_table(**kw) -> pd.DataFrame:
    return item_table(torch.tensor(PROBS), torch.tensor(TARGETS), FILES, VOCAB, multi_label=False, item_ids=IDS, **kw)


def multi_table(**kw) -> pd.DataFrame:
    return item_table(np.array(ML_PROBS), np.array(ML_TARGETS, dtype=np.float32), [f"{i}.png" for i in range(4)],
                      ML_VOCAB, multi_label=True, **kw)


# ---------------------------------------------------------------- item table


def test_single_label_table_rows_follow_the_inputs_sorted_by_item():
    df = single_table()
    assert list(df["item"]) == sorted(IDS)
    for row in df.itertuples():
        src = IDS.index(row.item)
        p, t = PROBS[src], TARGETS[src]
        best = max(range(3), key=lambda j: p[j])
        assert row.file == FILES[src] and row.split == "valid"
        assert row.actual == VOCAB[t] and row.predicted == VOCAB[best]
        assert row.prob_pred == pytest.approx(p[best]) and row.prob_actual == pytest.approx(p[t])
        assert row.loss == pytest.approx(-math.log(p[t]), rel=1e-6)
        assert row.correct == (best == t)
    assert np.allclose(table_probs(df, VOCAB), np.array(PROBS)[np.argsort(IDS)])
    assert prob_columns(VOCAB) == ["p_cat", "p_dog", "p_fox"]


def test_loss_is_finite_for_a_zero_probability_and_trainer_losses_win():
    df = item_table(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([1, 0]), ["a", "b"], ["x", "y"], multi_label=False)
    assert df["loss"].iloc[0] == pytest.approx(-math.log(1e-12))
    given = single_table(losses=np.arange(6.0))
    assert list(given.sort_values("loss")["item"]) == IDS  # losses follow their rows through the sort


def test_logits_and_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="softmax"):
        item_table(torch.tensor([[2.0, -1.0]]), torch.tensor([0]), ["a"], ["x", "y"], multi_label=False)
    with pytest.raises(ValueError, match="one column per class"):
        item_table(torch.tensor(PROBS), torch.tensor(TARGETS), FILES, ["cat", "dog"], multi_label=False)
    with pytest.raises(ValueError, match="unique"):
        item_table(torch.tensor(PROBS), torch.tensor(TARGETS), FILES, VOCAB, multi_label=False, item_ids=[1] * 6)


def test_multi_label_table_by_hand():
    df = multi_table()
    assert list(df["actual"]) == ["clear road", "clear haze", "", "road water"]
    assert list(df["predicted"]) == ["clear road", "haze water", "", "road water"]
    assert list(df["correct"]) == [True, False, True, True]
    assert df["prob_pred"].tolist() == pytest.approx([0.9, 0.8, 0.4, 0.9])
    assert df["prob_actual"].iloc[:2].tolist() == pytest.approx([0.75, 0.55])
    assert math.isnan(df["prob_actual"].iloc[2]) and df["prob_actual"].iloc[3] == pytest.approx(0.75)
    for row, p, t in zip(df.itertuples(), ML_PROBS, ML_TARGETS):
        bce = [-(y * math.log(q) + (1 - y) * math.log(1 - q)) for q, y in zip(p, t)]
        assert row.loss == pytest.approx(sum(bce) / len(bce), rel=1e-9)
    assert df[prob_columns(ML_VOCAB)].to_numpy() == pytest.approx(np.array(ML_PROBS))


def test_labels_with_spaces_are_read_back():
    vocab = ["cloudy", "partly cloudy", "road"]
    assert split_labels("partly cloudy road", vocab) == ["partly cloudy", "road"]
    assert split_labels("cloudy", vocab) == ["cloudy"] and split_labels("", vocab) == []
    with pytest.raises(ValueError, match="not a label"):
        split_labels("sunny", vocab)
    df = item_table(np.array([[0.1, 0.9, 0.8]]), np.array([[0, 1, 1]]), ["a"], vocab, multi_label=True)
    assert multilabel_confusion(df, vocab)["tp"].tolist() == [0, 1, 1]


def test_empty_table_gives_zeros_not_nan():
    df = item_table(np.zeros((0, 3)), np.zeros(0, dtype=np.int64), [], VOCAB, multi_label=False)
    assert len(df) == 0 and list(df.columns[-3:]) == prob_columns(VOCAB)
    assert confusion_matrix(df, VOCAB, normalize=True).tolist() == [[0.0] * 3] * 3
    report = classification_report(df, VOCAB)
    assert not report.isna().any().any() and report["support"].sum() == 0


# ---------------------------------------------------------------- saving


def test_parquet_round_trip_keeps_values_dtypes_and_kind(tmp_path):
    for df in (single_table(), multi_table(threshold=0.3)):
        path = table_path(tmp_path / "run", "valid")
        assert path == tmp_path / "run" / "interpret_valid.parquet"
        save_table(df, path)
        back = load_table(path)
        pd.testing.assert_frame_equal(back, df, check_exact=True)
        assert back.dtypes.to_dict() == df.dtypes.to_dict() and back.attrs == df.attrs
        assert [p.name for p in path.parent.iterdir()] == ["interpret_valid.parquet"]  # no temp file left
    assert load_table(path).attrs == {"multi_label": True, "vocab": ML_VOCAB, "threshold": 0.3}
    with pytest.raises(ValueError, match="plain name"):
        table_path(tmp_path, "../valid")


# ---------------------------------------------------------------- top losses


def test_top_losses_order_and_filters():
    df = pd.concat([single_table(), single_table(split="train").assign(item=lambda d: d["item"] + 100)],
                   ignore_index=True)
    # Items 7 and 5 both gave their true class 0.3: the tie goes to the lower item.
    expected = sorted((math.log(PROBS[i][TARGETS[i]]), IDS[i]) for i in range(6))  # by -loss, then item
    top = top_losses(df, 3, split="valid")
    assert list(top["item"]) == [item for _, item in expected[:3]] == [12, 3, 5]
    assert top["loss"].is_monotonic_decreasing and len(top_losses(df)) == 12
    assert list(top_losses(df, split="valid", actual="cat")["actual"]) == ["cat"] * 3
    wrong = top_losses(df, split="valid", predicted=["dog", "fox"], only_wrong=True)
    assert sorted(wrong["item"]) == sorted(IDS[i] for i in (1, 2, 4, 5))
    assert len(top_losses(df, 0)) == 0
    assert set(top_losses(df, actual="fox", predicted="cat")["item"]) == set()


def test_top_losses_multi_label_matches_any_label():
    df = multi_table()
    assert sorted(top_losses(df, actual="road")["item"]) == [0, 3]
    assert sorted(top_losses(df, predicted=["haze", "clear"])["item"]) == [0, 1]
    assert list(top_losses(df, only_wrong=True)["item"]) == [1]


def test_tables_without_their_kind_are_refused():
    bare = pd.DataFrame(single_table().to_dict("list"))  # same columns, no attrs
    with pytest.raises(ValueError, match="item_table"):
        top_losses(bare, actual="cat")
    with pytest.raises(ValueError, match="item_table"):
        confusion_matrix(bare, VOCAB)


# ---------------------------------------------------------------- confusion and report


def test_confusion_matrix_and_most_confused_by_hand():
    df = single_table()
    assert confusion_matrix(df, VOCAB).tolist() == [[1, 2, 0], [0, 1, 1], [0, 1, 0]]
    norm = confusion_matrix(df, VOCAB, normalize=True)
    assert norm[0] == pytest.approx([1 / 3, 2 / 3, 0]) and norm.sum(axis=1) == pytest.approx([1, 1, 1])
    mc = most_confused(df, VOCAB)
    assert list(mc.itertuples(index=False, name=None)) == [("cat", "dog", 2), ("dog", "fox", 1), ("fox", "dog", 1)]
    assert list(most_confused(df, VOCAB, min_val=2).itertuples(index=False, name=None)) == [("cat", "dog", 2)]
    assert most_confused(df, VOCAB, min_val=3).empty


def test_class_without_items_keeps_a_zero_row():
    vocab = ["a", "b", "c"]
    df = item_table(np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]), np.array([0, 0]), ["x", "y"], vocab,
                    multi_label=False)
    norm = confusion_matrix(df, vocab, normalize=True)
    assert norm.tolist() == [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    report = classification_report(df, vocab)
    assert report.loc["b"].tolist() == [0.0, 0.0, 0.0, 0] and not report.isna().any().any()


def test_classification_report_by_hand():
    report = classification_report(single_table(), VOCAB)
    assert list(report.index) == [*VOCAB, "macro avg", "weighted avg"]
    assert list(report.columns) == ["precision", "recall", "f1", "support"]
    # cat: tp 1, fp 0, fn 2.  dog: tp 1, fp 3, fn 1.  fox: tp 0, fp 1, fn 1.
    assert report.loc["cat", ["precision", "recall", "f1"]].tolist() == pytest.approx([1, 1 / 3, 0.5])
    assert report.loc["dog", ["precision", "recall", "f1"]].tolist() == pytest.approx([0.25, 0.5, 1 / 3])
    assert report.loc["fox", ["precision", "recall", "f1"]].tolist() == [0, 0, 0]
    assert report["support"].tolist() == [3, 2, 1, 6, 6]
    assert report.loc["macro avg", "precision"] == pytest.approx(1.25 / 3)
    assert report.loc["weighted avg", "recall"] == pytest.approx((3 * (1 / 3) + 2 * 0.5) / 6)


def test_multi_label_confusion_and_report_by_hand():
    df = multi_table()
    mc = multilabel_confusion(df, ML_VOCAB)
    assert mc.loc["clear"].tolist() == [1, 0, 1, 2]
    assert mc.loc["haze"].tolist() == [1, 0, 0, 3]
    assert mc.loc["road"].tolist() == [2, 0, 0, 2]
    assert mc.loc["water"].tolist() == [1, 1, 0, 2]
    report = classification_report(df, ML_VOCAB)
    assert report.loc["clear", ["precision", "recall"]].tolist() == [1.0, 0.5]
    assert report.loc["water", ["precision", "recall", "f1"]].tolist() == pytest.approx([0.5, 1.0, 2 / 3])
    assert report.loc["road", "support"] == 2
    for fn in (confusion_matrix, most_confused):
        with pytest.raises(ValueError, match="multilabel_confusion"):
            fn(df, ML_VOCAB)


def test_random_tables_agree_with_loops():
    rng = np.random.default_rng(0)
    for n, c in [(200, 5), (37, 2), (50, 7)]:
        logits = torch.tensor(rng.normal(size=(n, c)) * 2)
        targets = torch.tensor(rng.integers(0, c, size=n))
        vocab = [f"k{j}" for j in range(c)]
        df = item_table(logits.softmax(-1), targets, [str(i) for i in range(n)], vocab, multi_label=False)
        cm = confusion_matrix(df, vocab)
        loop = np.zeros((c, c), dtype=int)
        for t, p in zip(targets.tolist(), logits.argmax(-1).tolist()):
            loop[t, p] += 1
        assert (cm == loop).all()
        assert accuracy(logits, targets) == pytest.approx(df["correct"].mean())
        assert error_rate(logits, targets) == pytest.approx(1 - np.trace(loop) / n)
        report = classification_report(df, vocab)
        rows = loop.sum(axis=1)
        recall = [loop[j, j] / rows[j] if rows[j] else 0.0 for j in range(c)]
        assert report["recall"].iloc[:c].tolist() == pytest.approx(recall)
        assert report.loc["weighted avg", "recall"] == pytest.approx(np.trace(loop) / n)  # weighted recall = accuracy
        norm = confusion_matrix(df, vocab, normalize=True)
        assert norm[rows > 0].sum(axis=1) == pytest.approx(np.ones((rows > 0).sum()))
        assert most_confused(df, vocab)["count"].sum() == n - np.trace(loop)


# ---------------------------------------------------------------- metrics


def test_accuracy_multi_by_loop():
    probs, targ = torch.tensor(ML_PROBS), torch.tensor(ML_TARGETS, dtype=torch.float)
    right = sum((p > 0.5) == bool(t) for prow, trow in zip(ML_PROBS, ML_TARGETS) for p, t in zip(prow, trow))
    assert accuracy_multi(probs, targ, sigmoid=False) == pytest.approx(right / 16)
    logits = torch.log(probs / (1 - probs))
    assert accuracy_multi(logits, targ, thresh=0.3) == accuracy_multi(probs, targ, thresh=0.3, sigmoid=False)


def test_fbeta_by_hand():
    # Sample 1: tp 1, fp 1, fn 1 -> P = R = 1/2, F2 = 5 * 1/4 / (4 * 1/2 + 1/2) = 1/2.
    # Sample 2: tp 2, fp 0, fn 1 -> P = 1, R = 2/3, F2 = 5 * 2/3 / (4 + 2/3) = 5/7.
    probs = torch.tensor([[0.9, 0.3, 0.1, 0.0], [0.8, 0.7, 0.1, 0.0]])
    targ = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 0]])
    assert fbeta_multi(probs, targ, beta=2, thresh=0.2, sigmoid=False) == pytest.approx((0.5 + 5 / 7) / 2)
    # micro: tp 3, fp 1, fn 2 -> 5*3 / (5*3 + 4*2 + 1) = 15/24.
    assert fbeta_multi(probs, targ, thresh=0.2, sigmoid=False, average="micro") == pytest.approx(15 / 24)
    # F1 of sample 1 is 1/2, of sample 2 is 2 * 2/3 / (5/3) = 4/5.
    assert fbeta_multi(probs, targ, beta=1, thresh=0.2, sigmoid=False) == pytest.approx((0.5 + 0.8) / 2)
    # A sample with no labels and nothing predicted scores 0 (fastai, sklearn zero_division=0), not NaN.
    empty = torch.zeros(1, 4)
    both = fbeta_multi(torch.cat([probs, empty]), torch.cat([targ, empty.long()]), thresh=0.2, sigmoid=False)
    assert both == pytest.approx((0.5 + 5 / 7) / 3)


def fastai_v1_fbeta(y_pred, y_true, thresh=0.2, beta=2, eps=1e-9):
    """fastai v1's fbeta with sigmoid=False, written out as a reference."""
    beta2 = beta**2
    y_pred, y_true = (y_pred > thresh).float(), y_true.float()
    tp = (y_pred * y_true).sum(dim=1)
    prec, rec = tp / (y_pred.sum(dim=1) + eps), tp / (y_true.sum(dim=1) + eps)
    return ((prec * rec) / (prec * beta2 + rec + eps) * (1 + beta2)).mean().item()


def test_fbeta_matches_fastai_and_loops_and_averages_over_batches():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 6, generator=g) * 2
    targ = (torch.rand(64, 6, generator=g) < 0.3).float()
    targ[:3] = 0  # samples with no labels score 0 either way
    probs = logits.sigmoid()
    ours = fbeta_multi(logits, targ)
    assert ours == pytest.approx(fastai_v1_fbeta(probs, targ), abs=1e-6)
    per_sample = []
    for p_row, t_row in zip(probs.tolist(), targ.tolist()):
        tp = sum(p > 0.2 and t == 1 for p, t in zip(p_row, t_row))
        pp, tt = sum(p > 0.2 for p in p_row), sum(t == 1 for t in t_row)
        prec, rec = (tp / pp if pp else 0.0), (tp / tt if tt else 0.0)
        per_sample.append(5 * prec * rec / (4 * prec + rec) if tp else 0.0)
    assert ours == pytest.approx(sum(per_sample) / len(per_sample), abs=1e-12)
    sizes = (10, 30, 24)
    batches = zip(logits.split(sizes), targ.split(sizes))
    assert sum(fbeta_multi(x, y) * len(x) for x, y in batches) / 64 == pytest.approx(ours, abs=1e-12)
    macro = [fbeta_multi(logits[:, [j]], targ[:, [j]], average="micro") for j in range(6)]
    assert fbeta_multi(logits, targ, average="macro") == pytest.approx(sum(macro) / 6)


def test_metrics_on_no_items_are_nan_and_shapes_are_checked():
    assert math.isnan(accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))
    assert math.isnan(fbeta_multi(torch.zeros(0, 3), torch.zeros(0, 3)))
    with pytest.raises(ValueError, match="same"):
        accuracy_multi(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="average"):
        fbeta_multi(torch.zeros(2, 3), torch.zeros(2, 3), average="weighted")
