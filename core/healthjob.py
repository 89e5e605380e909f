"""A health check as a background job: its folder (progress, report, log), launching it, reading it back.

One folder per (dataset, run) under <workspace>/health/: the Data page starts `python -m core health ...
--out FOLDER` there, follows progress.json while it runs, and loads the saved report when done; reopening
the page, or another tab, finds the same folder. The report's files are written atomically, so a reader
never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core.config import DataConfig
from core.env import workspace_dir
from core.fileio import atomic_write, atomic_write_json, read_json
from core.health import HealthReport
from core.runs import launch_background, process_alive

PROGRESS_FILE, REPORT_FILE, ITEMS_FILE, PAIRS_FILE = "progress.json", "report.json", "items.parquet", "pairs.parquet"
JOB_FILE, LOG_FILE = "job.json", "health.log"


def job_folder(cfg: DataConfig, run_dir: str | os.PathLike | None) -> Path:
    """The folder of the check of this dataset (as `cfg` reads it) with this run's model (or none)."""
    key = json.dumps([os.path.realpath(cfg.path), cfg.layout, cfg.csv_file, cfg.label_regex, cfg.valid_pct, cfg.seed,
                      cfg.group_regex, cfg.size, str(run_dir) if run_dir else None])
    return workspace_dir() / "health" / hashlib.sha1(key.encode()).hexdigest()[:16]


def write_progress(folder: Path, stage: str, done: int, total: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / PROGRESS_FILE, {"stage": stage, "done": done, "total": total, "time": time.time()})


def save_report(report: HealthReport, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / ITEMS_FILE, lambda tmp: report.items.to_parquet(tmp, index=False))
    atomic_write(folder / PAIRS_FILE, lambda tmp: report.pairs.to_parquet(tmp, index=False))
    meta = {"root": report.root, "how": report.how, "exact": report.exact, "vocab": report.vocab, "run": report.run,
            "seconds": report.seconds, "map_sampled": report.map_sampled, "kind": report.kind, "finished": time.time()}
    atomic_write_json(folder / REPORT_FILE, meta)  # last: its presence means the report is complete


def load_report(folder: Path) -> HealthReport | None:
    """The saved report, or None when there is none (yet)."""
    if not (folder / REPORT_FILE).exists():
        return None
    meta = read_json(folder / REPORT_FILE)
    return HealthReport(meta["root"], meta["how"], pd.read_parquet(folder / ITEMS_FILE),
                        [list(g) for g in meta["exact"]], pd.read_parquet(folder / PAIRS_FILE), meta["vocab"],
                        meta["run"], meta["seconds"], meta["map_sampled"], meta.get("kind", "pixels"))


@dataclass
class JobState:
    state: str  # "none", "running", "done" or "failed"
    stage: str = ""
    done: int = 0
    total: int = 0
    error: str = ""


def start(cfg: DataConfig, run_dir: str | os.PathLike | None) -> Path:
    """Launch the check in the background (its own session: a rerun or reload of the app never kills it)."""
    folder = job_folder(cfg, run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (REPORT_FILE, PROGRESS_FILE):  # a new check: the old report is replaced only when it finishes
        (folder / name).unlink(missing_ok=True)
    command = [sys.executable, "-m", "core", "health", cfg.path, "--layout", cfg.layout, "--size", str(cfg.size),
               "--valid-pct", str(cfg.valid_pct), "--seed", str(cfg.seed), "--out", str(folder)]
    for flag, value in (("--csv", cfg.csv_file), ("--label-regex", cfg.label_regex),
                        ("--group-regex", cfg.group_regex), ("--run-dir", run_dir)):
        if value:
            command += [flag, str(value)]
    (folder / LOG_FILE).unlink(missing_ok=True)  # the log of this check only: job_state reads its last error
    pid, pid_started = launch_background(command, folder / LOG_FILE)
    atomic_write_json(folder / JOB_FILE, {"pid": pid, "pid_started": pid_started, "started": time.time()})
    return folder


def job_state(folder: Path) -> JobState:
    if (folder / REPORT_FILE).exists():
        return JobState("done")
    if not (folder / JOB_FILE).exists():
        return JobState("none")
    job = read_json(folder / JOB_FILE)
    alive = process_alive(job["pid"], job.get("pid_started"), folder.name)
    progress = read_json(folder / PROGRESS_FILE) if (folder / PROGRESS_FILE).exists() else {}
    if alive:
        return JobState("running", progress.get("stage", "starting"), progress.get("done", 0), progress.get("total", 0))
    log = (folder / LOG_FILE).read_text(errors="replace").strip().splitlines() if (folder / LOG_FILE).exists() else []
    errors = [line.removeprefix("error: ") for line in log if line.startswith("error: ")]
    return JobState("failed", error=errors[-1] if errors else (log[-1] if log else "The check stopped."))


def print_report(report: HealthReport, threshold: float) -> None:
    """The CLI's human-readable summary."""
    summary = report.summary(threshold)
    print(f"{summary['images']} images of {report.root}; embedding: {report.how}; {report.seconds:.1f} s")
    print(f"{len(summary['exact_duplicates'])} groups of identical images, {len(summary['duplicates'])} duplicate "
          f"groups in all (pixel match >= {threshold:.2f}), {len(summary['leaks'])} across the split:")
    for group in summary["leaks"][:20]:
        print("  leak: " + "  ".join(group))
    print("Most unusual images:")
    for file in summary["outliers"][:10]:
        print(f"  {file}")
