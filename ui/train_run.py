"""The Train page's run panel: the selected run, live while it is queued or running, its outcome once it ends.

Live events come from core.runlog.RunTail: one per run (`run_view`, cached for the server), shared by every
browser tab watching it, read by a fragment (ui.live) that polls and stops when the run ends.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import streamlit as st

from core import runs
from core.rundir import RunDir, has_checkpoint, is_lr_find
from core.runlist import list_runs
from core.runlog import RunTail, RunView, hardest_items, log_tail, read_config
from core.stamps import fmt_duration
from ui import charts
from ui.cache import split_line, thumb
from ui.live import live_fragment, safe_status

HARDEST = 12  # training images the hardest-images grid shows


@st.cache_resource(max_entries=16, show_spinner=False)
def _tail(run_dir: str) -> RunTail:
    return RunTail(Path(run_dir))


def run_view(run_dir: Path) -> RunView:
    """What `run_dir` has reported so far; the reader behind it is shared by every session watching the run."""
    return _tail(str(Path(run_dir).resolve())).update()


def is_sweep(run_dir: Path, status: dict | None = None) -> bool:
    """core.rundir.is_lr_find, with the status read here when the caller has none."""
    return is_lr_find(run_dir, status if status is not None else safe_status(run_dir))


STATE_BADGES = {
    runs.CREATED: ("not started", "gray", ":material/radio_button_unchecked:"),
    runs.QUEUED: ("queued", "gray", ":material/hourglass_top:"),
    runs.RUNNING: ("running", "blue", ":material/directions_run:"),
    runs.DONE: ("done", "green", ":material/check_circle:"),
    runs.STOPPED: ("stopped", "orange", ":material/stop_circle:"),
    runs.FAILED: ("failed", "red", ":material/error:"),
    runs.UNREADABLE: ("unreadable", "red", ":material/error:"),
}


def run_panel(run_dir: Path | None) -> None:
    """The selected run: live while it is queued or running, its outcome once it ends."""
    if run_dir is None:
        st.info("No run yet: set the options above and press **Train**.", icon=":material/model_training:")
        return
    status = safe_status(run_dir)
    if is_sweep(run_dir, status):
        st.info("The run selected in the sidebar is a learning-rate sweep (shown above). Pick a training run in "
                "the sidebar, or start one with **Train**.", icon=":material/info:")
        return
    if status.get("state") in runs.ACTIVE_STATES:
        live_fragment(run_dir, _run_body)
    else:
        _run_body(run_dir, status, live=False)


def _run_body(run_dir: Path, status: dict, live: bool) -> None:
    state = status.get("state", runs.UNREADABLE)
    view = run_view(run_dir)
    _header(run_dir, state, live)
    _outcome(run_dir, status, view)
    if view.start:
        _start_line(view)
    if len(view.batches) or len(view.epochs):
        n_batches = (view.start or {}).get("n_batches")
        total = view.total_epochs * n_batches if live and isinstance(n_batches, int) else None
        left, right = st.columns([3, 2])
        left.markdown("**Loss**")
        left.plotly_chart(charts.loss_figure(view.batches, view.epochs, revision=run_dir.name, total_steps=total),
                          width="stretch", config={"displaylogo": False})
        right.markdown("**Learning rate and momentum** (head group)")
        right.plotly_chart(charts.schedule_figure(view.batches, revision=run_dir.name, total_steps=total),
                           width="stretch", config={"displaylogo": False})
    if len(view.epochs) or state in runs.ACTIVE_STATES:
        left, right = st.columns([3, 2])
        with left:
            _epoch_table(view)
        with right:
            _hardest_images(run_dir)


def _header(run_dir: Path, state: str, live: bool) -> None:
    title, buttons = st.columns([4, 1], vertical_alignment="center")
    label, colour, icon = STATE_BADGES.get(state, (state, "gray", ":material/help:"))
    title.markdown(f"#### Run `{run_dir.name}` :{colour}-badge[{icon} {label}]")
    config = read_config(run_dir)
    if config:
        title.caption(config.summary(split_line(run_dir, config)))
    if state in runs.ACTIVE_STATES:
        stopping = runs.stop_requested(run_dir)
        if buttons.button("Stop", key="train_stop", icon=":material/stop:", width="stretch", disabled=stopping,
                          help="Stop after the current batch; a checkpoint is saved and the model exported."):
            stop_run(run_dir)
            stopping = True
        if stopping:
            title.caption(":orange[Stopping at the end of the current batch…]")
    elif state in (runs.STOPPED, runs.FAILED) and has_checkpoint(run_dir) and buttons.button(
        "Resume", key="train_resume", icon=":material/play_arrow:", width="stretch",
        help="Continue from the last checkpoint."
    ):
        try:
            runs.start(run_dir, extra_args=["--resume"])
        except (OSError, ValueError) as exc:
            st.error(f"Could not resume the run: {exc}")
            return
        st.rerun()


def stop_run(run_dir: Path) -> None:
    """Cooperative stop; a run still queued (not training yet, nothing to save) is ended at once."""
    runs.request_stop(run_dir)
    if safe_status(run_dir).get("state") == runs.QUEUED:
        runs.kill(run_dir)


def _outcome(run_dir: Path, status: dict, view: RunView) -> None:
    state = status.get("state")
    if state == runs.QUEUED:
        others = list_runs(run_dir.parent)
        busy = [r.id for r in others if r.state == runs.RUNNING and r.id != run_dir.name]
        reason = f"another run (`{busy[0]}`) is using the compute" if busy else "the training process is starting"
        st.info(f"Queued: {reason}. It starts by itself; this page follows it.", icon=":material/hourglass_top:")
    elif state == runs.RUNNING:
        _progress(view)
    elif state == runs.DONE:
        _done(status, view)
    elif state == runs.STOPPED:
        where = f" after {len(view.epochs)} of {view.total_epochs} epochs" if len(view.epochs) else ""
        note = status.get("note")  # set when it was stopped by force
        resume = " **Resume** continues from the checkpoint." if has_checkpoint(run_dir) else ""
        st.warning(f"Stopped{where}. {note or 'The model as it was is exported.'}{resume}",
                   icon=":material/stop_circle:")
    elif state in (runs.FAILED, runs.UNREADABLE):
        st.error(in_page_words(status.get("error")) or "The run failed; see its log below.", icon=":material/error:")
        error_details(run_dir, view)
    elif state == runs.CREATED:
        st.info("This run was created but never started.", icon=":material/radio_button_unchecked:")


def in_page_words(error: str | None) -> str | None:
    """A run's error as this page says it: the offline-weights failure names the form's own controls."""
    if error and error.startswith("WeightsUnavailableError"):
        return ("The run could not download the pretrained ImageNet weights: this machine seems to be offline. "
                "Give the weights file under **Weights file** in the form, or untick **Pretrained** (the schedule "
                "switches to one_cycle), and press **Train** again.")
    return error


def _progress(view: RunView) -> None:
    b = view.last_batch
    if not b:
        c = view.cache
        if c and c.get("done", 0) < c.get("total", 0):
            text = (f"Decoding images into the cache (once per dataset and size): {c['done']}/{c['total']} · "
                    f"cache {c.get('cache_mb', 0):.0f} MB")
            st.progress(c["done"] / max(c["total"], 1), text=text)
        else:
            st.progress(0.0, text="Loading the data and building the model…")
        return
    epoch, done = int(b.get("epoch", 0)), view.progress()
    finished_epochs = set(view.epochs["epoch"]) if len(view.epochs) else set()
    if len(finished_epochs) >= view.total_epochs or "early_stop" in view.seen or "stopped" in view.seen:
        text = "Exporting the model and computing the interpretation tables…"
    else:
        frozen = " (body frozen)" if view.frozen(epoch) else ""
        phase = f"batch {b.get('batch')}/{b.get('n_batches')}"
        if b.get("batch") == b.get("n_batches") and epoch not in finished_epochs:
            phase = "validating"
        elapsed = time.time() - view.session_start if view.session_start else None
        text = (f"Epoch {runs.epoch_number(epoch)}/{view.total_epochs}{frozen} · {phase} · "
                f"{fmt_duration(elapsed)} elapsed · about {fmt_duration(view.eta())} left")
    st.progress(done, text=text)


def _done(status: dict, view: RunView) -> None:
    begin, end = status.get("running_at") or status.get("started_at"), status.get("finished_at")
    timed = isinstance(begin, (int, float)) and isinstance(end, (int, float))
    took = f" in {fmt_duration(end - begin)}" if timed else ""
    parts = []
    if len(view.epochs):
        last = view.epochs.iloc[-1]
        parts.append(f"valid loss {last['valid_loss']:.4f}" if pd.notna(last.get("valid_loss")) else "")
        for metric in ("error_rate", "accuracy_multi"):
            if metric in last and pd.notna(last[metric]):
                parts.append(f"{metric.replace('_', ' ')} {last[metric]:.2%}")
    early = " (stopped early: no better valid loss)" if "early_stop" in view.seen else ""
    st.success(f"Done{took}{early}: " + ", ".join(p for p in parts if p), icon=":material/check_circle:")
    with st.container(horizontal=True):
        st.page_link("app_pages/interpret.py", label="See its mistakes on Interpret", icon=":material/insights:")
        st.page_link("app_pages/predict.py", label="Try it on Predict", icon=":material/image_search:")


def error_details(run_dir: Path, view: RunView) -> None:
    if view.error and view.error.get("traceback"):
        with st.expander("Traceback"):
            st.code(view.error["traceback"], language="python")
    else:
        log = log_tail(run_dir)
        if log:
            with st.expander("End of the run's log"):
                st.code(log, language=None)


def _start_line(view: RunView) -> None:
    s = view.start
    vocab = s.get("vocab") or []
    names = ", ".join(vocab[:8]) + (", …" if len(vocab) > 8 else "")
    st.caption(f"{s.get('n_train')} training and {s.get('n_valid')} validation images · {len(vocab)} classes "
               f"({names}) · {s.get('n_batches')} batches per epoch · on {s.get('device')}")
    bad = s.get("bad_files") or []
    if bad:
        with st.expander(f"{len(bad)} unreadable image(s) were skipped", icon=":material/warning:"):
            st.dataframe(pd.DataFrame(bad), hide_index=True, width="stretch")


def _epoch_table(view: RunView) -> None:
    st.markdown("**Epochs**")
    if not len(view.epochs):
        st.caption("The table grows by one row per epoch.")
        return
    table = view.epochs.drop(columns=[c for c in ("step",) if c in view.epochs], errors="ignore").copy()
    table["epoch"] = runs.epoch_number(table["epoch"])
    if "seconds" in table:
        table["time"] = table.pop("seconds").map(fmt_duration)
    number = st.column_config.NumberColumn(format="%.4f")
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={c: number for c in table.columns if c not in ("epoch", "time")})


@st.cache_data(max_entries=64, show_spinner=False)
def _hardest(npz: str, npz_mtime: float, record: str, record_mtime: float, k: int) -> list[dict]:
    return hardest_items(npz, record, k)


def _hardest_images(run_dir: Path) -> None:
    run = RunDir(run_dir)
    latest = run.latest_item_losses()
    if latest is None or not run.dataset_record.exists():
        st.markdown("**Hardest training images**")
        st.caption("After the first epoch: the training images with the highest loss.")
        return
    epoch, npz = latest
    st.markdown(f"**Hardest training images** · epoch {runs.epoch_number(epoch)}")
    try:
        record = run.dataset_record
        rows = _hardest(str(npz), npz.stat().st_mtime, str(record), record.stat().st_mtime, HARDEST)
    except (OSError, ValueError, KeyError) as exc:
        st.caption(f"Cannot read the per-image losses: {exc}")
        return
    per_row = 4
    for start in range(0, len(rows), per_row):
        for col, row in zip(st.columns(per_row), rows[start:start + per_row]):
            data = thumb(row["file"], size=160)
            if data is None:
                col.caption(f"(file gone) {row['label']}")
            else:
                col.image(data, width="stretch")
            col.caption(f"**{row['label']}** · loss {row['loss']:.2f}")
