"""Interpret: where a finished run goes wrong. Confusion matrix, most-confused pairs, per-class report, top losses."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core import interpret
from ui.cache import run_table, run_tta_table
from ui.charts import confusion_figure
from ui.gallery import grid, image_or_note, loss_caption, paginate, refuse_outside_roots, require_run_tables
from ui.heatmaps import TOGGLE_HELP, file_overlay

PER_PAGE = 12
PAGE_KEY = "interpret_page"
ALL = "All classes"


def label_counts_figure(mc: pd.DataFrame) -> go.Figure:
    """Multi-label: per label, stacked tp / fn / fp bars (tn dwarfs the rest, so it stays in the table)."""
    fig = go.Figure()
    for col, colour, name in (("tp", "#2b8a3e", "true positive"), ("fn", "#e8590c", "missed (fn)"),
                              ("fp", "#c92a2a", "false alarm (fp)")):
        fig.add_bar(x=mc.index, y=mc[col], name=name, marker_color=colour)
    fig.update_layout(barmode="stack", height=360, margin={"l": 10, "r": 10, "t": 10, "b": 10},
                      legend={"orientation": "h", "y": 1.08})
    return fig


st.title("Interpret")
run, valid = require_run_tables()
refuse_outside_roots(run, "shown")
vocab: list[str] = list(valid.attrs["vocab"])
multi = interpret.is_multi_label(valid)
wrong = int((~valid["correct"]).sum())

st.caption(f"Run **{run.name}**, validation images: what the model got wrong and how sure it was.")
with st.container(horizontal=True, gap="medium"):
    st.metric("Validation images", len(valid), border=True, width=220)
    st.metric("Accuracy" if not multi else "Exact-match accuracy",
              f"{1 - wrong / max(len(valid), 1):.1%}", border=True, width=220)
    st.metric("Wrong", wrong, border=True, width=220)
if st.toggle("Test-time augmentation", key="interpret_tta",
             help="Predict each validation image 4 more times with the training augmentation and blend the average "
             "with the plain prediction (fastai's tta): the metrics with it, beside those without."):
    tta_table = run_tta_table(run, "valid")
    tta_wrong = int((~tta_table["correct"]).sum())
    n_valid = max(len(valid), 1)
    with st.container(horizontal=True, gap="medium"):
        st.metric("Error rate with TTA", f"{tta_wrong / n_valid:.1%}", f"{(tta_wrong - wrong) / n_valid:+.1%}",
                  delta_color="inverse", border=True, width=220, help=f"without TTA: {wrong / n_valid:.1%}")
        st.metric("Accuracy with TTA", f"{1 - tta_wrong / n_valid:.1%}", f"{(wrong - tta_wrong) / n_valid:+.1%}",
                  border=True, width=220, help=f"without TTA: {1 - wrong / n_valid:.1%}")
        st.metric("Wrong with TTA", tta_wrong, tta_wrong - wrong, delta_color="inverse", border=True, width=220)
    if not multi:
        with st.expander("Confusion matrix with TTA"):
            st.plotly_chart(confusion_figure(interpret.confusion_matrix(tta_table, vocab), vocab, False),
                            key="interpret_confusion_tta", config={"displayModeBar": False})

# ---------------------------------------------------------------- confusion
left, right = st.columns([3, 2], gap="large")
with left:
    if multi:
        st.subheader("Per-label confusion")
        mc = interpret.multilabel_confusion(valid, vocab)
        st.plotly_chart(label_counts_figure(mc), key="interpret_label_chart")
        st.dataframe(mc, key="interpret_label_table")
    else:
        st.subheader("Confusion matrix")
        normalised = st.toggle("Normalise each row (share of the actual class)", key="interpret_normalise")
        cm = interpret.confusion_matrix(valid, vocab, normalize=normalised)
        st.plotly_chart(confusion_figure(cm, vocab, normalised), key="interpret_confusion",
                        config={"displayModeBar": False})
with right:
    if not multi:
        st.subheader("Most confused")
        counts = interpret.confusion_matrix(valid, vocab)
        top = int((counts - np.diag(np.diag(counts))).max(initial=0))
        min_val = st.slider("Show pairs confused at least this often", 1, max(top, 2), 1, key="interpret_min_val")
        pairs = interpret.most_confused(valid, vocab, min_val=min_val)
        if pairs.empty:
            st.success(f"No pair of classes is confused {min_val} time{'s' if min_val > 1 else ''} or more.")
        else:
            st.dataframe(pairs, hide_index=True, key="interpret_pairs",
                         column_config={"count": st.column_config.ProgressColumn("count", format="%d", min_value=0,
                                                                                 max_value=top)})
    st.subheader("Per-class report")
    report = interpret.classification_report(valid, vocab)
    st.dataframe(report, key="interpret_report", column_config={
        c: st.column_config.NumberColumn(c, format="%.3f") for c in ("precision", "recall", "f1")})

# ---------------------------------------------------------------- top losses
st.subheader("Top losses")
tables = {"valid": valid, "train": run_table(run, "train")}
splits = [s for s, t in tables.items() if t is not None]
with st.container(horizontal=True, gap="medium", vertical_alignment="bottom"):
    split = st.segmented_control("Split", splits, default="valid", required=True, key="interpret_split")
    actual = st.selectbox("Actual class", [ALL, *vocab], key="interpret_actual", width=220)
    predicted = st.selectbox("Predicted class", [ALL, *vocab], key="interpret_predicted", width=220)
    only_wrong = st.toggle("Only wrong predictions", key="interpret_only_wrong")
    heatmaps = st.toggle("Show heatmaps", key="interpret_heatmaps", help=TOGGLE_HELP)

losses = interpret.top_losses(tables[split], split=split, actual=None if actual == ALL else actual,
                              predicted=None if predicted == ALL else predicted, only_wrong=only_wrong)
st.caption(f"{len(losses)} image{'s' if len(losses) != 1 else ''}, highest loss first. "
           "Each caption: **predicted** / actual, then the loss and the probability of the prediction.")
if losses.empty:
    st.info("No image matches these filters.")
else:
    gallery_slot = st.container()
    shown = paginate(len(losses), PER_PAGE, PAGE_KEY, scope=(run.name, split, actual, predicted, only_wrong))

    def cell(row: pd.Series) -> None:
        overlay = file_overlay(run, row["file"], row["predicted"] or None) if heatmaps else None
        if overlay is not None:  # the predicted class's heatmap over the centre square the model saw
            st.image(overlay, width="stretch")
        else:
            image_or_note(row["file"])
        st.markdown(loss_caption(row), help=row["file"])

    with gallery_slot:
        grid([losses.iloc[i] for i in shown], cell)
