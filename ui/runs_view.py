"""What the Runs page shows: one table row per run, per-run epoch histories, the comparison figure.

Epoch histories are read from events.jsonl once per file version (path, mtime and size), so reruns are cheap
even for long runs whose event files hold thousands of batch lines.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from core import runs
from core.rundir import RunDir
from core.runlist import RunInfo

EPOCH_COLUMNS = ("epoch", "train_loss", "valid_loss")
RUN_COLOURS = qualitative.Plotly + qualitative.D3
# The second panel of the comparison: the first metric of these that any selected run logged.
METRIC_PREFERENCE = ("error_rate", "accuracy_multi", "accuracy")


def _file_key(path: Path) -> tuple[float, int]:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return 0.0, 0
    return stat.st_mtime, stat.st_size


class History(NamedTuple):
    epochs: pd.DataFrame  # one row per finished epoch (the latest of each, should a resume have repeated one)
    exported: tuple[int | None, str | None]  # see core.runs.exported_epoch


@st.cache_data(max_entries=256, show_spinner=False)
def _history(run_dir: str, mtime: float, size: int) -> History:
    events = runs.load_events(run_dir)
    rows = [{k: v for k, v in e.items() if k not in ("event", "time")} for e in events if e.get("event") == "epoch"]
    table = pd.DataFrame(rows)
    for column in EPOCH_COLUMNS:
        if column not in table:
            table[column] = pd.Series(dtype=float)
    table = table.drop_duplicates("epoch", keep="last").reset_index(drop=True)
    return History(table, runs.exported_epoch(events))


def history_of(run_dir: str | Path) -> History:
    run_dir = Path(run_dir)
    return _history(str(run_dir), *_file_key(RunDir(run_dir).events))


def epoch_history(run_dir: str | Path) -> pd.DataFrame:
    """One row per finished epoch: epoch, train_loss, valid_loss, the metrics, seconds (empty if none)."""
    return history_of(run_dir).epochs


MODEL_FROM = {"best": "best", "last": "last", "stopped": "stop"}  # core.runs.exported_epoch's answer, in short


def shown_epoch(history: History) -> tuple[dict[str, Any], str]:
    """The epoch row a run's summary shows, and where its model comes from: the epoch the exported model holds
    (the same numbers Interpret and Predict work with), else, without a model, the latest epoch."""
    epoch, how = history.exported
    rows = history.epochs[history.epochs["epoch"] == epoch] if epoch is not None else history.epochs.iloc[0:0]
    if rows.empty:
        rows = history.epochs.tail(1)
    return (rows.iloc[0].to_dict() if len(rows) else {}), MODEL_FROM.get(how, "")


def _duration_minutes(info: RunInfo) -> float | None:
    seconds, status = info.duration, info.status
    if seconds is None and info.active:
        begin = status.get("running_at") or status.get("started_at")
        seconds = time.time() - begin if isinstance(begin, (int, float)) else None
    return None if seconds is None else seconds / 60


def model_origin(history: History) -> str:
    """Which weights the exported model holds, in words: "model from epoch 3 of 4, the best one"."""
    epoch, how = history.exported
    if epoch is None:
        return "model saved at a stop during the first epoch" if how == "stopped" else ""
    n, total = runs.epoch_number(epoch), len(history.epochs)
    if how == "stopped":
        return f"model saved at the stop, part way into epoch {n + 1} (after epoch {n})"
    return f"model from epoch {n} of {total}" + (", the one with the lowest valid loss" if how == "best" else "")


def _number(row: dict[str, Any], column: str) -> float | None:
    value = row.get(column)
    return float(value) if isinstance(value, (int, float)) and pd.notna(value) else None


def runs_table(listing: list[RunInfo]) -> pd.DataFrame:
    """The Runs page's table, one row per run in `listing` order (newest first). Losses and metrics are those
    of the epoch the exported model comes from (see `shown_epoch`), so they describe the model in use."""
    rows = []
    for info in listing:
        config = info.config
        history = history_of(info.path)
        planned = config.total_epochs if config and not info.is_lr_find else None
        shown, model_from = shown_epoch(history)
        exported = info.has_model() and shown and model_from
        rows.append(
            {
                "id": info.id,
                "created": datetime.fromtimestamp(info.created_at),
                "state": info.state,
                "task": info.task,
                "dataset": Path(config.data.path).name if config and config.data.path else "",
                "network": f"{config.model.arch} · {config.data.size} px" if config else "",
                "epochs": f"{len(history.epochs)}/{planned}" if planned else "",
                "valid loss": _number(shown, "valid_loss"),
                "error rate": _number(shown, "error_rate"),
                # multi-label runs log accuracy_multi instead of an error rate
                "accuracy (multi-label)": _number(shown, "accuracy_multi"),
                "model": f"{runs.epoch_number(int(shown['epoch']))} · {model_from}" if exported else "",
                "minutes": _duration_minutes(info),
                "disk": runs.disk_usage(info.path) / 2**20,
            }
        )
    table = pd.DataFrame(rows)
    return table.drop(columns=[name for name, says_nothing in OPTIONAL_COLUMNS.items() if says_nothing(table[name])])


# Left out when they would say nothing: no LR-finder run, no multi-label run.
OPTIONAL_COLUMNS = {
    "task": lambda col: (col == "train").all(),
    "accuracy (multi-label)": lambda col: col.isna().all(),
}
# Sized to fit a 1400-pixel-wide window beside the sidebar: a column past the edge is a column nobody sees.
TABLE_COLUMNS = {
    "id": st.column_config.TextColumn("run", width=190, pinned=True),
    "created": st.column_config.DatetimeColumn("created", format="MM-DD HH:mm", width=90),
    "state": st.column_config.TextColumn("state", width=60),
    "task": st.column_config.TextColumn("task", width=60),
    "dataset": st.column_config.TextColumn("dataset", width=85),
    "network": st.column_config.TextColumn("network", width=105, help="architecture · image size"),
    "epochs": st.column_config.TextColumn("epochs", help="epochs finished / planned", width=50),
    "valid loss": st.column_config.NumberColumn("valid loss", format="%.4f", width=70,
                                                help="validation loss of the model's epoch (see model), else of "
                                                     "the latest epoch"),
    "error rate": st.column_config.NumberColumn("error", format="percent", width=55,
                                                help="validation error rate of the model's epoch (see model), else "
                                                     "of the latest epoch"),
    "accuracy (multi-label)": st.column_config.NumberColumn("accuracy", format="percent", width=70,
                                                            help="multi-label runs: accuracy_multi of the model's "
                                                                 "epoch"),
    "model": st.column_config.TextColumn("model", width=65,
                                         help="the epoch the exported model comes from, and why: the last epoch; "
                                              "the best one (lowest valid loss, with Keep the best epoch); or the "
                                              "weights at a stop, part way into the epoch after it. Empty: no model "
                                              "yet"),
    "minutes": st.column_config.NumberColumn("duration", format="%.1f min", width=65,
                                             help="training time (so far, while active)"),
    "disk": st.column_config.NumberColumn("disk", format="%.0f MB", width=60,
                                          help="space the run's folder takes; a run keeps its checkpoint (the "
                                               "model with the optimizer's state) only while it can be resumed"),
}


def comparison_metric(histories: dict[str, pd.DataFrame]) -> str | None:
    for name in METRIC_PREFERENCE:
        if any(name in h and h[name].notna().any() for h in histories.values()):
            return name
    return None


def compare_figure(histories: dict[str, pd.DataFrame], height: int = 420) -> go.Figure:
    """Loss per epoch (valid solid, train dotted) and the main metric per epoch, one colour per run."""
    metric = comparison_metric(histories)
    titles = ("Loss per epoch (valid solid, train dotted)", metric.replace("_", " ") if metric else "")
    n_cols = 2 if metric else 1
    fig = make_subplots(rows=1, cols=n_cols, subplot_titles=titles[:n_cols], horizontal_spacing=0.08)
    for i, (run_id, history) in enumerate(histories.items()):
        if history.empty:
            continue
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        x = runs.epoch_number(history["epoch"])
        line = {"color": colour, "width": 2}
        fig.add_trace(
            go.Scatter(x=x, y=history["valid_loss"], mode="lines+markers", name=run_id, legendgroup=run_id, line=line,
                       hovertemplate="epoch %{x}: valid loss %{y:.4f}<extra>" + run_id + "</extra>"),
            row=1, col=1,
        )
        fig.add_trace(
            go.Scatter(x=x, y=history["train_loss"], mode="lines", name=f"{run_id} (train)", legendgroup=run_id,
                       showlegend=False, line={"color": colour, "width": 1.5, "dash": "dot"},
                       hovertemplate="epoch %{x}: train loss %{y:.4f}<extra>" + run_id + "</extra>"),
            row=1, col=1,
        )
        if metric and metric in history:
            fig.add_trace(
                go.Scatter(x=x, y=history[metric], mode="lines+markers", name=f"{run_id} ({metric})",
                           legendgroup=run_id, showlegend=False, line=line,
                           hovertemplate="epoch %{x}: %{y:.2%}<extra>" + run_id + "</extra>"),
                row=1, col=2,
            )
    fig.update_xaxes(title_text="epoch", dtick=1)
    fig.update_yaxes(title_text="loss", rangemode="tozero", row=1, col=1)
    if metric:
        fig.update_yaxes(tickformat=".0%", rangemode="tozero", row=1, col=2)
    fig.update_layout(
        height=height,
        margin={"l": 10, "r": 10, "t": 60, "b": 10},
        legend={"orientation": "h", "yanchor": "top", "y": -0.18, "xanchor": "left", "x": 0},
        hovermode="closest",
    )
    return fig
