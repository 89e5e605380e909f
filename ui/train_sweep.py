"""The Train page's learning-rate finder: launch a sweep, say how long one takes, follow it, offer its suggestions."""

from __future__ import annotations

import json
from pathlib import Path

import streamlit as st

from core import runs
from core.config import TrainConfig
from core.data import DataFacts
from core.env import runs_dir
from core.job import SweepEstimate, estimate_sweep, load_lr_find
from core.lrfind import SUGGESTIONS, LRFindResult, sweep_steps
from core.rundir import LR_FIND
from core.runlist import list_runs
from core.runlog import RunView, read_config
from core.stamps import fmt_duration
from ui import charts
from ui.live import live_fragment, safe_status
from ui.train_run import error_details, is_sweep, run_view

LR_FIND_KEY = "train_lr_find_run"
RECENT_SWEEPS = 20  # sweeps looked through for the newest one on the open dataset


def launch_lr_find(cfg: TrainConfig, facts: DataFacts | None = None) -> Path | None:
    """Start an LR-finder sweep in the background for this config; its run id is kept for the session.
    The sweep gets the steps the page's estimate counted (without facts the run sizes it to the data itself)."""
    steps = ["--num-it", str(_sweep_steps(cfg, facts))] if facts else []
    try:
        run_dir = runs.create(cfg.to_dict(), root=runs_dir(), name_hint=LR_FIND, task=LR_FIND)
        runs.start(run_dir, extra_args=steps)
    except (OSError, ValueError) as exc:
        st.error(f"Could not start the learning-rate finder: {exc}")
        return None
    st.session_state[LR_FIND_KEY] = run_dir.name
    return run_dir


def _sweep_steps(cfg: TrainConfig, facts: DataFacts) -> int:
    return sweep_steps(max(1, facts.n_train // cfg.data.batch_size))


def lr_find_run(dataset: str, selected: Path | None) -> Path | None:
    """The sweep to show: this session's, else the selected run when it is a sweep, else the newest for `dataset`."""
    run_id = st.session_state.get(LR_FIND_KEY)
    if run_id and (runs_dir() / run_id).is_dir():
        return runs_dir() / run_id
    if selected is not None and is_sweep(selected):
        return selected
    sweeps = [info for info in list_runs(runs_dir()) if info.is_lr_find][:RECENT_SWEEPS]
    return next((info.path for info in sweeps if info.config and info.config.data.path == dataset), None)


def _use_lr(lr: float) -> None:
    st.session_state["train_lr"] = f"{lr:.2e}"


def lr_find_panel(run_dir: Path | None, cfg: TrainConfig | None = None, facts: DataFacts | None = None) -> None:
    """The sweep (live while it runs), and, for the form's settings, how long a new sweep would take."""
    st.subheader("Learning rate finder", anchor=False)
    status = safe_status(run_dir) if run_dir is not None else {}
    if status.get("state") not in runs.ACTIVE_STATES and cfg is not None and facts is not None:
        _sweep_estimate_line(cfg, facts)
    if run_dir is None:
        st.caption("Trains a few batches with the rate growing from 1e-7 to 10 and plots the loss. Pick a rate "
                   "where the loss still falls steeply, a bit before the minimum; *valley* is a good default.")
        return
    if status.get("state") in runs.ACTIVE_STATES:
        live_fragment(run_dir, _lr_find_body)
    else:
        _lr_find_body(run_dir, status, live=False)


@st.cache_data(ttl=60, max_entries=16, show_spinner=False)
def _estimate(config_json: str, n_train: int, runs_root: str, runs_version: int) -> SweepEstimate:
    """core.job.estimate_sweep, once per form state and change to the runs folder (a new run may time steps)."""
    cfg = TrainConfig.from_dict(json.loads(config_json))
    return estimate_sweep(cfg, n_train, runs_root, device=cfg.device)


def _sweep_estimate_line(cfg: TrainConfig, facts: DataFacts) -> None:
    root = runs_dir()
    estimate = _estimate(json.dumps(cfg.to_dict(), sort_keys=True), facts.n_train, str(root), root.stat().st_mtime_ns)
    basis = (f"step times of run `{estimate.measured_on}`" if estimate.measured_on
             else "a rough guess for this machine; a first run will time it")
    st.caption(f":material/timer: With these settings a sweep takes about **{fmt_duration(estimate.seconds)}**: "
               f"up to {estimate.steps} steps, fewer once the loss clearly climbs ({basis}).")


def _planned_steps(run_dir: Path) -> int | None:
    """The steps a sweep was sized for, from its lr_find_start event (a few lines into a short file)."""
    started = runs.load_events(run_dir, "lr_find_start")
    return int(started[-1]["steps"]) if started and isinstance(started[-1].get("steps"), int) else None


def _sweep_progress(run_dir: Path, state: str, view: RunView) -> None:
    n, planned = len(view.lr_points), _planned_steps(run_dir)
    if state == runs.QUEUED and not n:
        st.progress(0.0, text="Queued: waiting for the compute…")
    elif not n and view.cache and view.cache.get("total"):
        done, total = int(view.cache.get("done", 0)), int(view.cache["total"])
        st.progress(min(done / total, 1.0), text=f"Reading the images once: {done}/{total}")
    elif not n or not planned:
        st.progress(0.0, text="Starting: loading PyTorch, the model and the data…")
    else:
        st.progress(min(n / planned, 1.0), text=f"Sweeping: step {n} of at most {planned}")


def _lr_find_body(run_dir: Path, status: dict, live: bool) -> None:
    state = status.get("state")
    view = run_view(run_dir)
    if state == runs.FAILED:
        st.error(f"The learning-rate finder failed: {status.get('error') or 'see its log'}", icon=":material/error:")
        error_details(run_dir, view)
        return
    if state in runs.ACTIVE_STATES:
        _sweep_progress(run_dir, state, view)
    result = load_lr_find(run_dir) if state == runs.DONE else None
    lrs = result.lrs if result else [p[0] for p in view.lr_points]
    losses = result.losses if result else [p[1] for p in view.lr_points]
    suggestions = result.suggestions if result else {}
    if lrs:
        fig = charts.lr_find_figure(lrs, losses, suggestions, height=330, revision=run_dir.name)
        st.plotly_chart(fig, width="stretch", config={"displaylogo": False})
    if result and not live:
        _sweep_outcome(result)
        names = [name for name in SUGGESTIONS if name in suggestions]
        cols = st.columns(2)
        for i, name in enumerate(names):
            cols[i % 2].button(f"Use {name}: {suggestions[name]:.1e}", key=f"train_use_{name}", on_click=_use_lr,
                               args=(suggestions[name],), width="stretch",
                               type="primary" if name == "valley" else "secondary")
        config = read_config(run_dir)
        st.caption(f"Sweep `{run_dir.name}`" + (f" · {config.summary()}" if config else ""))


def _sweep_outcome(result: LRFindResult) -> None:
    """How the sweep ended, and a warning when no rate along it is worth training with."""
    if result.planned and len(result.lrs) < result.planned:
        st.caption(f"Stopped after {len(result.lrs)} of {result.planned} steps, at a rate of "
                   f"{result.lrs[-1]:.1e}: the loss had clearly climbed, so higher rates could not change the answer.")
    if not result.suggestions:
        st.warning("The loss never fell clearly during the sweep, so no learning rate along it is worth suggesting. "
                   "Keep the rate you have, or sweep again with a smaller batch size or more images.",
                   icon=":material/trending_flat:")
