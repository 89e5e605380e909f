"""Plotly figure builders for training curves; pages call these and pass the figure to st.plotly_chart.

They take plain tables (pandas DataFrames or sequences), never run directories, so any page can reuse them:
the Train page feeds them from a live event reader, the Runs page from a finished run's events.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core import runs

TRAIN_COLOUR = "#1f77b4"
VALID_COLOUR = "#ff7f0e"
LR_COLOUR = "#2ca02c"
MOM_COLOUR = "#9467bd"
# One marker and colour per LR-finder suggestion; fastai's valley is the default and drawn first.
SUGGESTION_STYLE = {
    "valley": ("circle", "#d62728"),
    "steep": ("diamond", "#2ca02c"),
    "minimum": ("square", "#9467bd"),
    "slide": ("triangle-up", "#8c564b"),
}


def _layout(fig: go.Figure, title: str | None, height: int, revision: str | None) -> go.Figure:
    """Shared look. The legend sits in a band above the plot, and a title (when given) above the legend,
    so neither ever covers the other or the curves."""
    top = 30 + (28 if title else 0)
    fig.update_layout(
        title=dict(text=title, x=0, xanchor="left", y=1, yanchor="top", font=dict(size=15)) if title else None,
        height=height,
        margin=dict(l=10, r=10, t=top, b=10),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="left", x=0),
        hovermode="x unified",
        # Same revision, same zoom: a live chart redrawn every second keeps what the user zoomed into.
        uirevision=revision,
    )
    return fig


def loss_figure(
    batches: pd.DataFrame,
    epochs: pd.DataFrame,
    title: str | None = None,
    height: int = 360,
    revision: str | None = None,
    total_steps: int | None = None,
) -> go.Figure:
    """Per-batch smoothed training loss and per-epoch losses on one chart, against the training step.

    total_steps: when given (a live run), the x axis spans the whole run, so the curve shows how far it has come.

    batches: columns `step` and `smooth_loss` (optionally `loss`, drawn faintly behind).
    epochs:  columns `epoch`, `train_loss`, `valid_loss`, and `step` (the step at the epoch's end); without
             `step` the epoch points are spread evenly over the batch steps.
    """
    fig = go.Figure()
    if len(batches) and "loss" in batches:
        fig.add_trace(go.Scattergl(x=batches["step"], y=batches["loss"], mode="lines", name="train (batch)",
                                   line=dict(color=TRAIN_COLOUR, width=1), opacity=0.25, hoverinfo="skip"))
    if len(batches):
        fig.add_trace(go.Scattergl(x=batches["step"], y=batches["smooth_loss"], mode="lines", name="train (smoothed)",
                                   line=dict(color=TRAIN_COLOUR, width=2)))
    if len(epochs):
        x = epochs["step"] if "step" in epochs else _epoch_steps(batches, epochs)
        label = [f"epoch {runs.epoch_number(int(e))}" for e in epochs["epoch"]]
        fig.add_trace(go.Scatter(x=x, y=epochs["valid_loss"], mode="lines+markers", name="valid (epoch)",
                                 line=dict(color=VALID_COLOUR, width=2), marker=dict(size=8), text=label,
                                 hovertemplate="%{text}: %{y:.4f}<extra>valid</extra>"))
        if not len(batches):  # no per-batch points (e.g. an old run): show the epoch training loss instead
            fig.add_trace(go.Scatter(x=x, y=epochs["train_loss"], mode="lines+markers", name="train (epoch)",
                                     line=dict(color=TRAIN_COLOUR, width=2), text=label,
                                     hovertemplate="%{text}: %{y:.4f}<extra>train</extra>"))
    fig.update_xaxes(title_text="step (batches seen)", rangemode="tozero")
    if total_steps:
        fig.update_xaxes(range=[0, total_steps])
    fig.update_yaxes(title_text="loss", rangemode="tozero")
    return _layout(fig, title, height, revision)


def _epoch_steps(batches: pd.DataFrame, epochs: pd.DataFrame) -> list[float]:
    last = float(batches["step"].max()) if len(batches) else float(len(epochs))
    n = max(len(epochs), 1)
    return [last * (i + 1) / n for i in range(len(epochs))]


def schedule_figure(
    batches: pd.DataFrame,
    title: str | None = None,
    height: int = 360,
    revision: str | None = None,
    total_steps: int | None = None,
) -> go.Figure:
    """Learning rate (top) and momentum (bottom) against the training step, from columns step, lr, mom."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    if len(batches):
        fig.add_trace(go.Scattergl(x=batches["step"], y=batches["lr"], mode="lines", name="learning rate",
                                   line=dict(color=LR_COLOUR, width=2)), row=1, col=1)
        if "mom" in batches:
            fig.add_trace(go.Scattergl(x=batches["step"], y=batches["mom"], mode="lines", name="momentum",
                                       line=dict(color=MOM_COLOUR, width=2)), row=2, col=1)
    fig.update_yaxes(title_text="lr", exponentformat="e", row=1, col=1)
    fig.update_yaxes(title_text="momentum", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    if total_steps:
        fig.update_xaxes(range=[0, total_steps])
    fig = _layout(fig, title, height, revision)
    fig.update_layout(showlegend=False, margin=dict(t=10 + (28 if title else 0)))
    return fig


def lr_find_figure(
    lrs: Sequence[float],
    losses: Sequence[float | None],
    suggestions: Mapping[str, float] | None = None,
    title: str | None = None,
    height: int = 380,
    revision: str | None = None,
) -> go.Figure:
    """The LR-finder curve, loss against learning rate on a log axis, with one marker per suggestion."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=list(lrs), y=list(losses), mode="lines", name="smoothed loss",
                             line=dict(color=TRAIN_COLOUR, width=2),
                             hovertemplate="lr %{x:.2e}: loss %{y:.4f}<extra></extra>"))
    for name, lr in (suggestions or {}).items():
        symbol, colour = SUGGESTION_STYLE.get(name, ("x", "#7f7f7f"))
        fig.add_trace(go.Scatter(x=[lr], y=[_loss_at(lrs, losses, lr)], mode="markers", name=f"{name} {lr:.1e}",
                                 marker=dict(symbol=symbol, size=13, color=colour, line=dict(width=1, color="white")),
                                 hovertemplate=f"{name}: lr %{{x:.2e}}<extra></extra>"))
    fig.update_xaxes(type="log", title_text="learning rate (log scale)", exponentformat="e")
    fig.update_yaxes(title_text="loss", range=_loss_range(losses))
    fig = _layout(fig, title, height, revision)
    fig.update_layout(hovermode="closest")
    return fig


def _loss_at(lrs: Sequence[float], losses: Sequence[float | None], lr: float) -> float | None:
    """The curve's loss at the sweep step closest to `lr` in log space (suggestions sit on the curve)."""
    points = [(abs(math.log(x) - math.log(lr)), y) for x, y in zip(lrs, losses) if x > 0 and y is not None]
    return min(points)[1] if points and lr > 0 else None


def _loss_range(losses: Sequence[float | None]) -> list[float] | None:
    """Keep the interesting part in view: from the lowest loss to a little above the starting loss.

    The sweep ends once the loss blows up, and a last point several times higher would squash the valley.
    """
    finite = [y for y in losses if y is not None and math.isfinite(y)]
    if len(finite) < 2:
        return None
    low, start = min(finite), finite[0]
    high = min(max(finite), max(start, low) * 1.25 + 1e-9)
    pad = 0.05 * (high - low or 1.0)
    return [low - pad, high + pad]


def confusion_figure(cm: np.ndarray, vocab: list[str], normalised: bool) -> go.Figure:
    """Heatmap, actual down the side and predicted across, every cell annotated."""
    text = [[f"{v:.2f}" if normalised else f"{int(v)}" for v in row] for row in cm]
    fig = go.Figure(go.Heatmap(
        z=cm.tolist(), x=vocab, y=vocab, text=text, texttemplate="%{text}", colorscale="Blues", showscale=False,
        zmin=0, zmax=1 if normalised else max(int(cm.max()), 1),
        hovertemplate="actual %{y}<br>predicted %{x}<br>%{text}<extra></extra>",
    ))
    side = min(900, 200 + 80 * len(vocab))
    fig.update_layout(height=side, margin={"l": 10, "r": 10, "t": 10, "b": 10},
                      xaxis={"title": "Predicted", "side": "bottom", "tickangle": -45 if len(vocab) > 8 else 0,
                                 "constrain": "domain"},
                      yaxis={"title": "Actual", "autorange": "reversed", "scaleanchor": "x", "constrain": "domain"})
    return fig


# The colourings of the data map: categorical columns get one trace (and legend entry) per value, scores a scale.
MAP_CATEGORICAL = ("label", "predicted", "side")
MAP_HOVER = ("file", "label", "side", "predicted", "outlier", "score")  # shown when the column is there
MAP_MAX_LEGEND = 40  # more classes than this: one trace per class still, but no legend (it would fill the page)
MAP_SIDE_COLOURS = {"train": TRAIN_COLOUR, "valid": VALID_COLOUR, "test": LR_COLOUR}


def data_map_figure(items: pd.DataFrame, colour: str, height: int = 560) -> go.Figure:
    """The dataset's 2-D map (health report items with x, y): one dot per image on the map, coloured by
    `colour` (a column of `items`: label, predicted, side, or a score such as outlier). Each point's
    customdata starts with its row label in `items`, so a selection maps back to the rows; the rest feeds
    the hover text. The drag tool is the lasso (box select is in the toolbar)."""
    shown = items[items["x"].notna()] if "x" in items else items.iloc[:0]
    hover_cols = [c for c in MAP_HOVER if c in shown]
    names = {"outlier": "outlier score", "score": "label check score"}
    lines = []
    for i, col in enumerate(hover_cols, start=1):
        value = f"%{{customdata[{i}]:.2f}}" if col in ("outlier", "score") else f"%{{customdata[{i}]}}"
        lines.append(f"{names.get(col, col)}: {value}" if col != "file" else f"<b>{value}</b>")
    template = "<br>".join(lines) + "<extra></extra>"
    n = len(shown)
    size = 9 if n <= 300 else 7 if n <= 1000 else 5
    scatter = go.Scatter if n <= 1000 else go.Scattergl  # SVG is crisper; WebGL keeps thousands of points fluid

    def trace(rows: pd.DataFrame, **kwargs) -> go.Scatter:
        custom = np.column_stack([rows.index.to_numpy(), *(rows[c].to_numpy() for c in hover_cols)]) \
            if len(rows) else None
        return scatter(x=rows["x"], y=rows["y"], mode="markers", customdata=custom, hovertemplate=template,
                       **kwargs)

    fig = go.Figure()
    if colour in MAP_CATEGORICAL:
        values = shown[colour].fillna("").astype(str)
        palette = _qualitative(values.nunique())
        for k, value in enumerate(sorted(values.unique())):
            rows = shown[values == value]
            col = MAP_SIDE_COLOURS.get(value) if colour == "side" else None
            fig.add_trace(trace(rows, name=value or "(none)", marker=dict(size=size, opacity=0.8,
                                                                           color=col or palette[k % len(palette)])))
        fig.update_layout(showlegend=values.nunique() <= MAP_MAX_LEGEND,
                          legend=dict(itemsizing="constant", yanchor="top", y=1, xanchor="left", x=1.01))
    else:
        score = shown[colour] if colour in shown else pd.Series(np.nan, index=shown.index)
        fig.add_trace(trace(shown, name=names.get(colour, colour), marker=dict(
            size=size, opacity=0.85, color=score, colorscale="Viridis", cmin=0, cmax=1, showscale=True,
            colorbar=dict(title=dict(text=names.get(colour, colour), side="right"), thickness=14))))
        fig.update_layout(showlegend=False)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    # The top margin keeps the toolbar off the points and the legend.
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=36, b=10), dragmode="lasso", hovermode="closest",
                      plot_bgcolor="rgba(0,0,0,0)")
    return fig


def _qualitative(n: int) -> list[str]:
    import plotly.express as px

    q = px.colors.qualitative
    return q.Plotly if n <= 10 else q.Alphabet if n <= 26 else q.Alphabet + q.Dark24 + q.Light24
