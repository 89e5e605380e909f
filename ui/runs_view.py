"""What the Runs page shows: one table row per run, per-run epoch histories, the comparison figure.

Epoch histories are read from events.jsonl once per file version (path, mtime and size), so reruns are cheap
even for long runs whose event files hold thousands of batch lines.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from core import runs
from core.data import DataConfig, describe_split
from core.fileio import read_json
from core.job import DATASET_RECORD
from core.train import BUNDLE

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


@st.cache_data(max_entries=256, show_spinner=False)
def _history(run_dir: str, mtime: float, size: int) -> tuple[pd.DataFrame, bool]:
    events = runs.load_events(run_dir)
    rows = [{k: v for k, v in e.items() if k not in ("event", "time")} for e in events if e.get("event") == "epoch"]
    lr_find = any(e.get("event") in ("lr_find", "lr_find_done") for e in events)
    table = pd.DataFrame(rows)
    for column in EPOCH_COLUMNS:
        if column not in table:
            table[column] = pd.Series(dtype=float)
    return table, lr_find


def epoch_history(run_dir: str | Path) -> pd.DataFrame:
    """One row per finished epoch: epoch, train_loss, valid_loss, the metrics, seconds (empty if none)."""
    run_dir = Path(run_dir)
    return _history(str(run_dir), *_file_key(run_dir / runs.EVENTS_FILE))[0]


def task_of(info: dict[str, Any]) -> str:
    """"lr_find" for an LR-finder run, else "train" (a running LR finder is known by its events)."""
    if info["status"].get("task") == "lr-find":
        return "lr_find"
    run_dir = Path(info["path"])
    return "lr_find" if _history(str(run_dir), *_file_key(run_dir / runs.EVENTS_FILE))[1] else "train"


def has_model(run_dir: str | Path) -> bool:
    return (Path(run_dir) / BUNDLE).is_file()


def _best(history: pd.DataFrame, column: str, lowest: bool = True) -> float | None:
    if column not in history or history[column].dropna().empty:
        return None
    values = history[column].dropna()
    return float(values.min() if lowest else values.max())


def _duration_minutes(info: dict[str, Any]) -> float | None:
    seconds = info["summary"].get("duration")
    status = info["status"]
    if seconds is None and info["state"] in runs.ACTIVE_STATES:
        begin = status.get("running_at") or status.get("started_at")
        seconds = time.time() - begin if isinstance(begin, (int, float)) else None
    return None if seconds is None else seconds / 60


def runs_table(listing: list[dict[str, Any]]) -> pd.DataFrame:
    """The Runs page's table, one row per run in `listing` order (newest first)."""
    rows = []
    for info in listing:
        config = info["config"]
        data, model = config.get("data") or {}, config.get("model") or {}
        history = epoch_history(info["path"])
        task = task_of(info)
        planned = config.get("epochs")
        if task == "train" and config.get("schedule") == "fine_tune" and isinstance(planned, int):
            planned += config.get("freeze_epochs") or 0
        rows.append(
            {
                "id": info["id"],
                "state": info["state"],
                "task": task,
                "dataset": Path(data["path"]).name if data.get("path") else None,
                "arch": model.get("arch"),
                "size": data.get("size"),
                "epochs": f"{len(history)}/{planned}" if task == "train" and planned else None,
                "best valid loss": _best(history, "valid_loss"),
                "best error rate": _best(history, "error_rate"),
                # multi-label runs log accuracy_multi instead of an error rate
                "best accuracy (multi-label)": _best(history, "accuracy_multi", lowest=False),
                "minutes": _duration_minutes(info),
                "created": datetime.fromtimestamp(info["created_at"]),
                "model": has_model(info["path"]),
            }
        )
    table = pd.DataFrame(rows)
    return table.drop(columns=[name for name, says_nothing in OPTIONAL_COLUMNS.items() if says_nothing(table[name])])


# Left out when they would say nothing: no LR-finder run, no multi-label run.
OPTIONAL_COLUMNS = {
    "task": lambda col: (col == "train").all(),
    "best accuracy (multi-label)": lambda col: col.isna().all(),
}
TABLE_COLUMNS = {
    "id": st.column_config.TextColumn("run", width=215),
    "state": st.column_config.TextColumn("state", width=65),
    "task": st.column_config.TextColumn("task", width=65),
    "dataset": st.column_config.TextColumn("dataset", width=80),
    "arch": st.column_config.TextColumn("arch", width=80),
    "size": st.column_config.NumberColumn("size", format="%d px", width=55),
    "epochs": st.column_config.TextColumn("epochs", help="epochs finished / planned", width=55),
    "best valid loss": st.column_config.NumberColumn("best loss", format="%.4f", width=75,
                                                     help="lowest validation loss over the epochs"),
    "best error rate": st.column_config.NumberColumn("best error", format="percent", width=75,
                                                     help="lowest validation error rate over the epochs"),
    "best accuracy (multi-label)": st.column_config.NumberColumn("best accuracy", format="percent", width=90,
                                                                 help="multi-label runs: highest accuracy_multi"),
    "minutes": st.column_config.NumberColumn("duration", format="%.1f min", width=70,
                                             help="training time (so far, while active)"),
    "created": st.column_config.DatetimeColumn("created", format="MM-DD HH:mm", width=90),
    "model": st.column_config.CheckboxColumn("model", help="has an exported model (model.safetensors)", width=50),
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
        x = history["epoch"] + 1  # epochs are counted from 0 in the events, from 1 for people
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


@st.cache_data(max_entries=256, show_spinner=False)
def _split_line(record: str, mtime: float, size: int, data: dict[str, Any]) -> str:
    return describe_split(read_json(record), DataConfig(**data))


def split_line(run_dir: str | Path, config: dict[str, Any]) -> str | None:
    """The split the run used, in words, from its dataset record; None before the run has read its data."""
    record = Path(run_dir) / DATASET_RECORD
    mtime, size = _file_key(record)
    if not size:
        return None
    try:
        return _split_line(str(record), mtime, size, config.get("data") or {})
    except (OSError, ValueError, KeyError, TypeError):  # a damaged record, or a config this version cannot read
        return None


def config_lines(config: dict[str, Any], split: str | None) -> list[str]:
    """A few human lines about a run: data (with the split it used, see `split_line`), model, schedule."""
    data, model = config.get("data") or {}, config.get("model") or {}
    lines = []
    if data.get("path"):
        lines.append(f"**Data** `{data['path']}` · {data.get('size')} px · batch {data.get('batch_size')} · "
                     + (split or "split not known yet: the run has not read its data"))
    if model:
        weights = "ImageNet weights" if model.get("pretrained") else "from scratch"
        if model.get("weights_path"):
            weights = f"weights from `{Path(model['weights_path']).name}`"
        lines.append(f"**Model** {model.get('arch')} · {weights} · {model.get('head')} head")
    if config.get("schedule"):
        lr = config.get("lr")
        frozen = f" ({config.get('freeze_epochs')} frozen first)" if config.get("schedule") == "fine_tune" else ""
        rate = f"lr {lr:g}" if isinstance(lr, (int, float)) else "lr ?"
        lines.append(f"**Schedule** {config['schedule']} · {config.get('epochs')} epochs{frozen} · {rate} · "
                     f"{config.get('optimizer')} · wd {config.get('weight_decay')}")
    return lines
