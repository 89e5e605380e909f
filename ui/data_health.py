"""Data: the dataset's health (core.health): exact and near duplicates, duplicates leaking across the split,
off-topic images and the map, each with the fix a click away (Clean's delete queue, keep-together groups).

The check runs in the background (core.healthjob, one folder per dataset and run): the page starts it, follows
its progress in a polling fragment, and shows the saved report, cached by its folder and report.json's mtime.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import streamlit as st

from core import healthjob, keeptogether, runs
from core.config import DataConfig
from core.fileio import read_json
from core.health import DEFAULT_MATCH, MIN_MATCH, HealthReport
from core.layouts import DataSource
from core.listing import path_text
from core.rundir import RunDir, is_label_check, is_lr_find
from core.split import Split
from ui import clean_queue, data_map, gallery
from ui.cache import run_table
from ui.state import current_run, set_run, training_runs

POLL_SECONDS = 1.0
PER_PAGE = 12  # duplicate groups or leaks per page (three cells a row)
N_OUTLIERS = 30
MATCH_KEY = "data_health_match"
ERROR_KEY = "data_health_error"
FIXED_KEY = "data_health_fixed"
OUTLIER_MARK = "data_health_out:"  # + file: each outlier's checkbox
SIDE_ORDER = {"train": 0, "valid": 1, "test": 2}
MATCH_HELP = ("How well the pixels of two images line up, from -1 to 1: the best correlation of one over the other, "
              "shifted, shrunk by up to a fifth (a crop) and mirrored, less the difference of their colours. "
              "On the bear photos, resized, recompressed, cropped or mirrored copies score 0.63-0.85 (most above "
              "0.7) and different photos, however alike, below 0.68 (the default). Lower finds more copies, and "
              "look-alikes with them. Applies to Duplicates and Leaks.")


# ---------------------------------------------------------------- which run, which report


@st.cache_data(max_entries=256, show_spinner=False)
def _record_root(path: str, mtime: float) -> str | None:
    try:
        return os.path.realpath(read_json(path)["root"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def trained_here(run: Path, root: str | os.PathLike) -> bool:
    """Whether `run` is a finished training run with a model, trained on the dataset folder `root`."""
    record = RunDir(run).dataset_record
    try:
        status = runs.read_status(run)
        mtime = record.stat().st_mtime
    except (OSError, ValueError):
        return False
    if status.get("state") != runs.DONE or is_lr_find(run, status) or is_label_check(run, status):
        return False
    return RunDir(run).has_model and _record_root(str(record), mtime) == os.path.realpath(root)


def model_run(root: str) -> Path | None:
    """The selected run when it trained on this folder and has a model, else None (no model is guessed)."""
    run = current_run()
    return run if run is not None and trained_here(run, root) else None


def clean_run(root: str, picked: Path | None) -> Path | None:
    """The run the Clean page will open for this folder: `picked`, else the newest one trained here with tables."""
    if picked is not None and gallery.has_tables(picked):
        return picked
    return next((i.path for i in training_runs() if trained_here(i.path, root) and gallery.has_tables(i.path)), None)


def embedding_line(run: Path | None) -> str:
    if run is not None:
        return f"the model of run **{run.name}** (its penultimate layer) and its split"
    from core.model import pretrained_available  # imports torchvision: only when no run is selected

    if pretrained_available("resnet18"):
        return "an ImageNet-pretrained resnet18 (select a run trained on this folder to use its model)"
    return "a perceptual hash of the pixels (train a model on this folder to use its embedding)"


@st.cache_data(max_entries=4, show_spinner="Loading the health report…")
def _report(folder: str, mtime: float) -> HealthReport | None:
    return healthjob.load_report(Path(folder))


def load(folder: Path) -> HealthReport | None:
    path = folder / healthjob.REPORT_FILE
    return _report(str(folder), path.stat().st_mtime) if path.exists() else None


def with_current_sides(report: HealthReport, source: DataSource, split: Split) -> HealthReport:
    """A report made without a run, its sides replaced by the split the page draws now (keep-together groups
    included): that split is what the next run trains on, so a fixed leak is gone at once."""
    if report.run is not None or Path(report.root) != Path(source.root):
        return report
    sides = split.sides(len(source))
    now = {f.relative_to(source.root).as_posix(): str(s) for f, s in zip(source.files, sides)
           if f.is_relative_to(source.root)}
    return replace(report, items=report.items.assign(side=[now.get(f, "") for f in report.items["file"]]))


# ---------------------------------------------------------------- the section


def render_health(source: DataSource, split: Split, cfg: DataConfig) -> None:
    st.subheader("Health", anchor=False)
    run = model_run(str(source.root))
    folder = healthjob.job_folder(cfg, run)
    job = job_state(folder)
    if job.state == "running":
        st.caption(f"Checking for duplicates, leaks across the split and off-topic images with {embedding_line(run)}. "
                   "The check runs in the background: you may leave the page and come back.")
        _follow(folder)
        return
    report = None
    if job.state == "done":
        try:
            report = load(folder)
        except (OSError, ValueError, KeyError, TypeError) as e:
            st.error(f"The saved health report cannot be read ({e}): check again.", icon=":material/error:")
    with st.container(horizontal=True, vertical_alignment="center", gap="small"):
        if report is None:
            st.caption(f"Duplicates, copies that leak from training into validation, and images that belong to no "
                       f"class. The check will use {embedding_line(run)}.")
        else:
            st.caption(_report_line(report, folder))
        st.button("Check again" if report is not None else "Check health", key="data_health_start",
                  icon=":material/refresh:" if report is not None else ":material/health_and_safety:",
                  type="secondary" if report is not None else "primary", on_click=_start, args=(cfg, run))
    if st.session_state.get(ERROR_KEY):
        st.error(f"Could not start the health check: {st.session_state.pop(ERROR_KEY)}", icon=":material/error:")
    if job.state == "failed":
        st.error(f"The health check failed: {job.error}", icon=":material/error:")
    if report is not None:
        render_report(with_current_sides(report, source, split), cfg, run)


def job_state(folder: Path) -> healthjob.JobState:
    try:
        return healthjob.job_state(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged job file: as if the check had failed
        return healthjob.JobState("failed", error=f"its files in {folder} cannot be read ({e})")


def _report_line(report: HealthReport, folder: Path) -> str:
    when = time.strftime("%d %b %H:%M", time.localtime((folder / healthjob.REPORT_FILE).stat().st_mtime))
    return (f"Checked {len(report.items):,} images on {when} in {report.seconds:.0f} s, with {report.how}. "
            "Check again after changing the folder.")


def _start(cfg: DataConfig, run: Path | None) -> None:
    try:
        healthjob.start(cfg, run)
    except (OSError, ValueError) as e:
        st.session_state[ERROR_KEY] = str(e)


def _follow(folder: Path) -> None:
    """A progress bar redrawn each poll; the whole page reruns once the check has ended (done or failed)."""

    def live() -> None:
        job = job_state(folder)
        if job.state != "running":
            st.rerun()
        counted = f" ({job.done:,} of {job.total:,})" if job.total > 1 and job.done else ""
        value = min(1.0, job.done / job.total) if job.total else 0.0
        st.progress(value, text=f"Checking the images: {job.stage}{counted}…")

    st.fragment(live, run_every=POLL_SECONDS)()


def render_report(report: HealthReport, cfg: DataConfig, run: Path | None) -> None:
    threshold = st.slider("Pixel match", MIN_MATCH, 0.95, DEFAULT_MATCH, 0.01, key=MATCH_KEY, help=MATCH_HELP,
                          width=360, format="%.2f")
    groups = report.duplicate_groups(threshold)
    pairs = report.near_pairs(threshold)
    leaks = report.leaks(threshold)
    outliers = report.outliers(N_OUTLIERS)
    n_dup = len(report.exact) + len(pairs)
    fixed = st.session_state.pop(FIXED_KEY, None)
    if fixed:  # above the tabs: their titles change with the fix, and the open tab may change with them
        st.success(fixed, icon=":material/check_circle:")
    dup, leak, odd, where = st.tabs([f"Duplicates ({n_dup})", f"Leaks ({len(leaks)})",
                                     f"Off-topic? (top {len(outliers)})", "Map"])
    with dup:
        render_duplicates(report, groups, pairs, threshold, run)
    with leak:
        render_leaks(report, leaks, run)
    with odd:
        render_outliers(report, outliers, run)
    with where:
        data_map.render_map(report, cfg)


# ---------------------------------------------------------------- duplicates


def _sides(report: HealthReport) -> dict[str, str]:
    return dict(zip(report.items["file"], report.items["side"]))


def keeper(root: Path, group: list[str], sides: dict[str, str]) -> str:
    """The copy a group keeps: on the training side first (validation loses the copy it should not have), then
    the largest file (the least compressed), then the shortest name ("a.jpg" before "a copy.jpg")."""

    def size(f: str) -> int:
        try:
            return (root / f).stat().st_size
        except OSError:
            return -1  # gone: never the one kept

    return min(group, key=lambda f: (SIDE_ORDER.get(sides.get(f, ""), 3), -size(f), len(f), f))


def _member(root: Path, file: str, side: str, kept: bool | None) -> None:
    gallery.image_or_note(root / file, size=160)
    fate = "" if kept is None else (" · :green[kept]" if kept else " · :red[copy]")
    st.caption(f"{gallery.short_name(Path(file).name, 18)}  \n{side or 'no side'}{fate}", help=file)


def _group_cell(root: Path, files: list[str], sides: dict[str, str], line: str, keep: set[str] | None) -> None:
    shown = files[:3]
    for col, f in zip(st.columns(len(shown), gap="small"), shown):
        with col:
            _member(root, f, sides.get(f, ""), None if keep is None else f in keep)
    more = f" · {len(files) - len(shown)} more" if len(files) > len(shown) else ""
    spans = len({sides.get(f, "") for f in files} - {""}) > 1
    st.caption(line + more + (" · :orange[:material/call_split: across the split]" if spans else ""))


def render_duplicates(report: HealthReport, groups: list[list[str]], pairs: pd.DataFrame, threshold: float,
                      run: Path | None) -> None:
    root, sides = Path(report.root), _sides(report)
    files = report.items["file"].tolist()
    keep = {keeper(root, g, sides) for g in groups}
    entries = [([files[i] for i in g], "identical pixels") for g in report.exact]
    entries += [([p.file_a, p.file_b], f"match {p.match:.2f} · cosine {p.cosine:.2f}") for p in pairs.itertuples()]
    if not entries:
        st.success(f"No duplicates: no two images are identical or match at {threshold:.2f} or more.",
                   icon=":material/check_circle:")
        return
    identical = (f"{len(report.exact)} group{'s' if len(report.exact) != 1 else ''} of identical images"
                 if report.exact else "No identical images")
    near = f"{len(pairs)} near-duplicate pair{'s' if len(pairs) != 1 else ''}" if len(pairs) else "no near duplicates"
    st.caption(f"{identical} and {near} (pixel match ≥ {threshold:.2f}), best first. Each group keeps one copy "
               "(kept): the one on the training side, else the largest file; the others are copies.")
    slot = st.container()
    page = gallery.paginate(len(entries), PER_PAGE, "data_health_dup_page", scope=(threshold,))
    with slot:
        if len(entries) > PER_PAGE:
            st.caption(f"Showing {page.start + 1}–{page.stop} of {len(entries)}; the pager below shows the rest.")
        gallery.grid([entries[k] for k in page], lambda e: _group_cell(root, e[0], sides, e[1], keep), columns=3)
    copies = [root / f for g in groups for f in g if f not in keep and (root / f).exists()]
    _send_button(report, run, copies, f"Send the {len(copies)} copies to Clean (delete)", "data_health_send_dups")


def _send_button(report: HealthReport, run: Path | None, files: list[Path], label: str, key: str) -> None:
    """Stage `files` for deletion on the Clean page and open it, on the run trained on this folder."""
    target = clean_run(report.root, run)
    if st.button(label, key=key, icon=":material/delete:", disabled=target is None or not files,
                 help="Stages them on the Clean page; nothing moves until you apply there (to the trash, with undo)."):
        clean_queue.stage(files)
        set_run(target.name)  # Clean opens the selected run: this folder's
        st.switch_page(clean_queue.CLEAN_PAGE)
    if target is None:
        st.caption(":material/info: Clean works on a run's images: train a model on this folder first.")


# ---------------------------------------------------------------- leaks


def render_leaks(report: HealthReport, leaks: list[list[str]], run: Path | None) -> None:
    root, sides = Path(report.root), _sides(report)
    if not leaks:
        where = f"run {report.run}'s split" if report.run else "the split"
        st.success(f"No leaks: no duplicate group spans the sides of {where}.", icon=":material/check_circle:")
        return
    leaked_valid = [root / f for g in leaks for f in g if sides.get(f) == "valid"]
    whose = f"run {report.run}'s" if report.run else "the"
    st.caption(f"{len(leaks)} group{'s' if len(leaks) != 1 else ''} of copies on more than one side of {whose} "
               "split: validation then scores images the model has trained on, and its error flatters the model.")
    if run is not None and report.run == run.name:
        _error_with_and_without(run, leaked_valid)
    slot = st.container()
    page = gallery.paginate(len(leaks), PER_PAGE, "data_health_leak_page", scope=(len(leaks),))
    with slot:
        gallery.grid([leaks[k] for k in page], lambda g: _group_cell(root, g, sides, f"{len(g)} copies", None),
                     columns=3)
    try:
        stored = keeptogether.read_groups(root)
    except OSError as e:
        st.error(f"The dataset's keep-together file cannot be used: {e}", icon=":material/block:")
        return
    pending = [g for g in leaks if not any(set(g) <= set(s) for s in stored)]
    if st.button("Keep each group on one side", key="data_health_keep", icon=":material/join:",
                 disabled=not pending, type="primary",
                 help="Writes the groups to the dataset's .loupe/keep_together.json: every later split moves each "
                 "group wholly to one side. Nothing is deleted."):
        try:
            total = keeptogether.add_groups(root, pending)
        except (OSError, ValueError) as e:
            st.error(f"Could not save the groups: {e}", icon=":material/error:")
            return
        inflated = f" Run {report.run}'s validation error stays inflated: retrain to measure it." if report.run else ""
        st.session_state[FIXED_KEY] = (f"Kept {len(pending)} group{'s' if len(pending) != 1 else ''} together "
                                       f"({total} in the dataset's file): the next training run puts each group on "
                                       f"one side of its split.{inflated}")
        st.rerun()
    if not pending:
        st.caption(":material/check: These groups are kept together already: the next training run splits them "
                   "onto one side each." + (f" Run {report.run} was split before." if report.run else ""))


def _error_with_and_without(run: Path, leaked_valid: list[Path]) -> None:
    table = run_table(run, "valid")
    if table is None or not leaked_valid:
        return
    from core.interpret import error_without  # imports torch: only with a run's table

    with_all, without, n = error_without(table, [path_text(f) for f in leaked_valid])
    if not n:
        return
    left, right = st.columns(2)
    left.metric(f"Validation error of run {run.name}", f"{with_all:.1%}", border=True,
                help=f"All {len(table):,} validation images, leaked copies included.")
    right.metric(f"Without the {n} leaked validation image{'s' if n != 1 else ''}", f"{without:.1%}",
                 delta=f"{without - with_all:+.1%}", delta_color="inverse", border=True,
                 help="The same run scored only on validation images with no copy in training.")


# ---------------------------------------------------------------- outliers


def _outlier_cell(root: Path, row: pd.Series) -> None:
    gallery.image_or_note(root / row["file"], size=160)
    guess = row.get("predicted")
    verdict = f"  \npredicted {guess} ({row['max_prob']:.2f})" if isinstance(guess, str) and guess else ""
    st.caption(f"**{row['label'] or '—'}** · score {row['outlier']:.2f}{verdict}", help=row["file"])
    st.checkbox("Delete", key=OUTLIER_MARK + row["file"])


def render_outliers(report: HealthReport, outliers: pd.DataFrame, run: Path | None) -> None:
    root = Path(report.root)
    doubt = "; under each, the run's prediction and its probability" if report.run else ""
    st.caption(f"The {len(outliers)} most unusual images: ranked by {report.outlier_basis()}{doubt}; score 1 = the "
               "most unusual. Most are fine: look for images that belong to no class, or to another.")
    cells = st.grid(6, min_column_width=120, border=True, gap="small")  # dense, as the Data gallery
    for _, row in outliers.iterrows():
        with cells.cell():
            _outlier_cell(root, row)
    checked = [root / f for f in outliers["file"] if st.session_state.get(OUTLIER_MARK + f)]
    _send_button(report, run, checked, f"Send the {len(checked)} checked to Clean's delete queue",
                 "data_health_send_outliers")
