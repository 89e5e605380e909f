"""Clean: the label check of the dataset (start it, follow it, resume it) and what it says about each image."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from core import runs
from core.config import TrainConfig
from core.env import runs_dir
from core.interpret import LABEL_SEP
from core.labelcheck import (
    DEFAULT_FOLDS,
    MAX_FOLDS,
    MIN_FOLDS,
    CheckSettings,
    check_progress,
    create_check,
    issue_rows,
    latest_check,
    read_issues,
    read_settings,
)
from core.labelscore import label_changes, sparkline
from core.runlist import describe
from core.stamps import fmt_duration
from ui.live import live_fragment

CHECK, LOSS = "check", "loss"  # the two rankings the page offers
FOLDS_KEY = "clean_check_folds"


@st.cache_data(max_entries=8, show_spinner=False)
def _issues(path: str, mtime: float, root: str) -> pd.DataFrame:
    return issue_rows(read_issues(Path(path).parent), Path(root))


def check_panel(run: Path, cfg: TrainConfig, root: Path, handled: dict[Path, dict]) -> tuple[pd.DataFrame | None, str]:
    """The label check of the run's dataset, in an expander: start, progress, stop, resume. Returns the
    check's rows (full file paths) once it is done, else None, and a line naming the check (and how many
    changes the cleaner applied since, `handled` being core.cleanrun.handled_in's answer)."""
    info = latest_check(cfg.data.path, runs_dir())
    done = info is not None and info.state == runs.DONE and info.run.label_issues.exists()
    summary = _summary(info.path) if done else ""
    title = "Label check" + (f" · {info.id} · {info.state}" if info else ": find mislabelled images")
    with st.expander(title, expanded=info is None or info.active, icon=":material/fact_check:"):
        if info is None:
            st.markdown("A **label check** trains this run's model K times, each time on all images but one fold, "
                        "so every image is judged by a model that never saw it. That ranks mislabelled images far "
                        "better than the training losses, which a model lowers by memorising wrong labels.")
            _start_controls(run, cfg, "Check labels")
        elif info.active:
            live_fragment(info.path, _progress)
            st.button("Stop the check", key="clean_check_stop", on_click=runs.request_stop, args=(info.path,),
                      icon=":material/stop:", help="It can be resumed: the folds already done are kept.")
        elif info.state == runs.STOPPED:
            st.info(f"The check was stopped. {check_progress(info.path).folds_done} fold(s) are done and kept.")
            st.button("Resume the check", key="clean_check_resume", on_click=runs.start, args=(info.path, ["--resume"]),
                      icon=":material/play_arrow:")
        elif not done:
            st.error(f"The label check {info.id} failed: {info.error or 'see its train.log'}.")
            _start_controls(run, cfg, "Check again")
        else:
            st.caption(f"{summary} Checked again after cleaning, it judges the cleaned labels.")
            _start_controls(run, cfg, "Check again")
    if not done:
        return None, ""
    rows = _issues(str(info.run.label_issues), info.run.label_issues.stat().st_mtime, str(root))
    agree = (rows["suggested"] == rows["label"]).mean()
    trust = (f" Its models agree with {agree:.0%} of the given labels out of sample"
             + ("; a weak model suggests wrongly, so train longer before accepting many." if agree < 0.8 else "."))
    finished = info.status.get("finished_at") or 0
    since = sum(entry.get("time", 0) > finished for entry in handled.values())
    stale = f" **{since} change(s) applied since it ran**: check again to judge the cleaned labels." if since else ""
    return rows, summary + trust + stale


def _summary(check: Path) -> str:
    return (f"Ranked by label check **{check.name}**: {read_settings(check).folds}-fold, out of sample, cleanlab's "
            "label quality (score 1 = surely wrong).")


def _progress(check: Path, status: dict, live: bool) -> None:
    progress = check_progress(check)
    st.progress(progress.fraction, text=progress.line())


def _start_controls(run: Path, cfg: TrainConfig, label: str) -> None:
    with st.container(horizontal=True, vertical_alignment="bottom", gap="small"):
        folds = st.number_input("Folds (K)", MIN_FOLDS, MAX_FOLDS, DEFAULT_FOLDS, key=FOLDS_KEY, width=120)
        st.button(label, key="clean_check_start", on_click=start_check, args=(cfg, int(folds)),
                  icon=":material/fact_check:", type="primary")
    duration = describe(run).duration
    if duration:  # each fold trains on (K-1)/K of every image; the run trained on its train side
        estimate = duration * folds * (folds - 1) / folds / max(1 - cfg.data.valid_pct, 0.5)
        st.caption(f"About {fmt_duration(estimate)} here: {folds} trainings like run {run.name} "
                   f"({fmt_duration(duration)}). It runs in the background; this page follows it.")


def start_check(cfg: TrainConfig, folds: int) -> None:
    check = create_check(cfg, CheckSettings(folds=folds), root=runs_dir())
    try:
        runs.start(check)
    except (OSError, ValueError) as e:
        st.session_state["clean_check_error"] = f"Could not start the label check: {e}"


def evidence(row: pd.Series, vocab: list[str], multi_label: bool) -> str:
    """What the check says about one image, for its caption."""
    if multi_label:
        add, drop = label_changes(row["label"], row["suggested"], vocab)
        change = " ".join([*(f"+{c}" for c in add), *(f"−{c}" for c in drop)]) or "labels look right"
        line = f"score {row['score']:.2f} · {change}"
    elif row["suggested"] != row["label"]:
        line = (f"score {row['score']:.2f} · given **{row['label']}** {row['prob_given']:.2f} · "
                f"suggested **{row['suggested']}** {row['prob_suggested']:.2f}")
    else:
        line = f"score {row['score']:.2f} · **{row['label']}** {row['prob_given']:.2f}"
    spark = sparkline(row["loss_history"])
    return line + (f" · loss by epoch `{spark}`" if spark else "")


def suggestion_of(row: pd.Series, multi_label: bool) -> str | None:
    """The class the check suggests moving the image to, or None (it agrees, or the data is multi-label)."""
    suggested = row["suggested"]
    if multi_label or not suggested or suggested == row["label"] or LABEL_SEP in suggested:
        return None
    return suggested
