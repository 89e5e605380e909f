"""The Train page's parts: the config form, the LR finder panel and the live view of a run.

Live views read a run's events.jsonl incrementally through `RunTail` (one per run, shared by every
browser tab watching it): each poll reads only the bytes appended since the last one and keeps a
bounded, decimated history, so the server's memory stays flat however long the run.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
import torch

from core import runs
from core.data import (
    MIN_BATCHES_PER_EPOCH,
    DataConfig,
    DataFacts,
    data_facts,
    suggested_batch_size,
    suggested_size,
)
from core.env import check_data_path, runs_dir
from core.feedback import feedback_counts, feedback_dataset
from core.fileio import read_json
from core.images import DataError
from core.job import DATASET_RECORD, SweepEstimate, estimate_sweep, has_checkpoint, load_lr_find
from core.lrfind import SUGGESTIONS, LRFindResult, sweep_steps
from core.model import (
    ARCHS,
    HEADS,
    ModelConfig,
    UnsafeWeightsError,
    install_pretrained,
    pretrained_available,
    pretrained_cache_path,
)
from core.stamps import fmt_duration
from core.train import BUNDLE, OPTIMIZERS, SCHEDULES, TrainConfig
from ui import charts
from ui.cache import thumb
from ui.data_view import listing_signature, open_dataset
from ui.runs_view import split_line
from ui.state import allowed

MAX_POINTS = 1000  # per-batch points kept per run; older ones are thinned evenly as the run grows
POLL_SECONDS = 1.0
HARDEST = 12
LR_FIND_KEY = "train_lr_find_run"
LR_FIND_HINT = "lr-find"
GPUS_KEY = "train_gpus"  # only set where the machine has several GPUs
LR_FIND_TASKS = ("lr-find",)  # the task core.runs.start and core.job record for an LR-finder sweep

# ---------------------------------------------------------------- reading a run's events incrementally


def total_epochs(config: dict) -> int:
    """Epochs a run trains for: fine_tune adds its frozen epochs in front."""
    epochs = int(config.get("epochs") or 0)
    if config.get("schedule") == "fine_tune":
        epochs += int(config.get("freeze_epochs") or 0)
    return max(epochs, 1)


@dataclass(frozen=True)
class RunView:
    """A consistent snapshot of what a run has reported so far, safe to render while the reader moves on."""

    batches: pd.DataFrame  # step, epoch, smooth_loss, lr, mom (decimated)
    epochs: pd.DataFrame  # one row per epoch: epoch, step, train_loss, valid_loss, metrics..., seconds
    start: dict | None  # the latest start event (n_train, n_valid, n_batches, vocab, bad_files, config)
    last_batch: dict | None  # the latest batch event
    error: dict | None  # the latest error event (message, traceback)
    lr_points: tuple[tuple[float, float | None], ...]  # an LR sweep's (lr, loss) so far
    seen: frozenset[str]  # event kinds seen since the latest start
    total_epochs: int
    session_start: float | None  # time of the latest start event (a resume starts a new session)
    session_progress: float  # share of the run done when that session started
    cache: dict | None = None  # the latest decode-cache progress event (done, total, cache_mb)

    def progress(self) -> float:
        """Share of all batches of all epochs done, from the latest batch and epoch events."""
        done = 0.0
        if self.last_batch:
            b = self.last_batch
            done = (b.get("epoch", 0) + b.get("batch", 0) / max(b.get("n_batches") or 1, 1)) / self.total_epochs
        if len(self.epochs):
            done = max(done, (int(self.epochs["epoch"].max()) + 1) / self.total_epochs)
        return min(done, 1.0)

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the pace of the current session, or None before there is a pace to go by."""
        if self.session_start is None:
            return None
        done = self.progress() - self.session_progress
        elapsed = (now or time.time()) - self.session_start
        if done <= 0.005 or elapsed <= 0:
            return None
        return max(0.0, elapsed / done * (1.0 - self.progress()))


class RunTail:
    """Follows one run's events.jsonl from a byte offset; keeps derived data small."""

    def __init__(self, run_dir: Path, max_points: int = MAX_POINTS):
        self.run_dir = Path(run_dir)
        self.max_points = max_points
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.offset = 0
        self.stride = 1
        self.batches: list[tuple[int, int, float | None, float | None, float | None]] = []
        self.last_batch: dict | None = None
        self.epochs: dict[int, dict] = {}
        self.start: dict | None = None
        self.error: dict | None = None
        self.lr_points: list[tuple[float, float | None]] = []
        self.seen: set[str] = set()
        self.session_start: float | None = None
        self.session_progress = 0.0
        self.cache: dict | None = None
        try:
            self.total = total_epochs(read_json(self.run_dir / runs.CONFIG_FILE))
        except (OSError, ValueError, TypeError):
            self.total = 1

    def update(self) -> RunView:
        """Read what was appended since the last call (nothing at all when the file did not grow)."""
        with self._lock:
            path = self.run_dir / runs.EVENTS_FILE
            size = path.stat().st_size if path.exists() else 0
            if size < self.offset:  # replaced or truncated: start over
                self._reset()
            if size > self.offset:
                events, self.offset = runs.read_events(self.run_dir, since=self.offset)
                for event in events:
                    self._add(event)
            return self._view()

    def _add(self, e: dict[str, Any]) -> None:
        kind = e.get("event")
        self.seen.add(kind)
        if kind == "batch":
            self._add_batch(e)
        elif kind == "epoch":
            row = {k: v for k, v in e.items() if k not in ("event", "time")}
            row["step"] = self.last_batch.get("step") if self.last_batch else None
            self.epochs[int(e.get("epoch", len(self.epochs)))] = row
        elif kind == "start":
            self.start = e
            self.seen = {"start"}
            self.error = None
            if isinstance(e.get("config"), dict):
                self.total = total_epochs(e["config"])
            self.session_start = e.get("time")
            self.session_progress = self._view().progress()
        elif kind == "error":
            self.error = e
        elif kind == "lr_find":
            self.lr_points.append((e.get("lr"), e.get("loss")))
        elif kind == "cache":
            self.cache = e

    def _add_batch(self, e: dict[str, Any]) -> None:
        self.last_batch = e
        step = int(e.get("step", 0))
        if step % self.stride:
            return
        self.batches.append((step, e.get("epoch"), e.get("smooth_loss"), e.get("lr"), e.get("mom")))
        if len(self.batches) > self.max_points:  # thin evenly: keep every other kept point, sample half as often
            self.stride *= 2
            self.batches = [b for b in self.batches if b[0] % self.stride == 0]

    def _view(self) -> RunView:
        batches = list(self.batches)
        if self.last_batch and (not batches or batches[-1][0] != self.last_batch.get("step")):
            b = self.last_batch  # the curve always reaches the latest step, whatever the thinning
            batches.append((b.get("step"), b.get("epoch"), b.get("smooth_loss"), b.get("lr"), b.get("mom")))
        frame = pd.DataFrame(batches, columns=["step", "epoch", "smooth_loss", "lr", "mom"])
        epochs = pd.DataFrame([self.epochs[k] for k in sorted(self.epochs)])
        return RunView(frame, epochs, self.start, self.last_batch, self.error, tuple(self.lr_points),
                       frozenset(self.seen), self.total, self.session_start, self.session_progress, self.cache)


@st.cache_resource(max_entries=16, show_spinner=False)
def _tail(run_dir: str) -> RunTail:
    return RunTail(Path(run_dir))


def run_view(run_dir: Path) -> RunView:
    """What `run_dir` has reported so far; the reader behind it is shared by every session watching the run."""
    return _tail(str(Path(run_dir).resolve())).update()


# ---------------------------------------------------------------- small helpers


def safe_status(run_dir: Path) -> dict:
    try:
        return runs.status(run_dir)
    except (OSError, ValueError) as exc:
        return {"state": runs.UNREADABLE, "error": f"Cannot read the run's status: {exc}"}


def read_config(run_dir: Path) -> dict:
    try:
        config = read_json(Path(run_dir) / runs.CONFIG_FILE)
    except (OSError, ValueError):
        return {}
    # An odd config.json ("data": "oops") reads as none, as the run listing shows it: unreadable.
    return config if isinstance(config, dict) and runs.config_problem(config) is None else {}


def is_lr_find(run_dir: Path, status: dict | None = None) -> bool:
    status = status if status is not None else safe_status(run_dir)
    return status.get("task") in LR_FIND_TASKS or (Path(run_dir) / "lr_find.json").exists()


def _log_tail(run_dir: Path, n_bytes: int = 6000) -> str:
    path = Path(run_dir) / runs.LOG_FILE
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - n_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def config_summary(config: dict, split: str | None = None) -> str:
    """One line about a run: model, schedule, data, and `split` (see ui.runs_view.split_line) once it is known."""
    model, data = config.get("model", {}), config.get("data", {})
    schedule = config.get("schedule", "?")
    epochs = config.get("epochs")
    if schedule == "fine_tune":
        epochs = f"{config.get('freeze_epochs', 0)}+{epochs}"
    weights = "pretrained" if model.get("pretrained") else "from scratch"
    return (f"{model.get('arch', '?')} ({weights}) · {schedule} · {epochs} epochs · lr {config.get('lr', 0):.1e} · "
            f"{data.get('size')} px · batch {data.get('batch_size')} · data `{Path(data.get('path', '')).name}`"
            + (f" · {split}" if split else ""))


# ---------------------------------------------------------------- the form

SCHEDULE_HELP = (
    "**fine_tune**: fastai's transfer-learning recipe, the pretrained body frozen for the first epoch(s), then "
    "everything trained at lower rates. **one_cycle**: everything trained from the start, the rate warming up "
    "then annealing (best from scratch). **plateau**: a fixed rate, cut when the valid loss stops improving."
)
WORKER_CHOICES = ("auto", 0, 1, 2, 4, 8)
FEEDBACK_KEY = "train_feedback"
CONTINUE_KEY = "train_continue"
WEIGHTS_UPLOAD_KEY = "train_weights_upload"
WEIGHTS_PATH_KEY = "train_weights_path"
WEIGHTS_NOTE_KEY = "train_weights_note"  # (kind, message) of the last weights file given, shown once
SEEDED_KEY = "train_form_seeded"  # set once this session's form has its starting values
WEIGHTS_SUFFIXES = ("pth", "pt", "safetensors")


def form_values(cfg: TrainConfig) -> dict[str, Any]:
    """The form's widget values (by key) that give back `cfg`; the inverse of `build_config`."""
    data, model = cfg.data, cfg.model
    feedback = feedback_dataset() if data.extra_train else None  # a look at the workspace only when it matters
    return {
        "train_arch": model.arch,
        "train_pretrained": model.pretrained,
        "train_schedule": cfg.schedule,
        "train_epochs": cfg.epochs,
        "train_lr": f"{cfg.lr:g}",
        "train_size": data.size,
        "train_bs": data.batch_size,
        "train_freeze_epochs": cfg.freeze_epochs,
        "train_optimizer": cfg.optimizer,
        "train_wd": float(cfg.weight_decay),
        "train_pct_start": float(cfg.pct_start),
        "train_label_smoothing": float(cfg.label_smoothing),
        "train_dropout": float(model.dropout),
        "train_head": model.head,
        "train_early_stopping": cfg.early_stopping,
        "train_workers": data.num_workers if data.num_workers in WORKER_CHOICES[1:] else "auto",
        "train_keep_best": cfg.keep_best,
        "train_mixed_precision": cfg.mixed_precision,
        FEEDBACK_KEY: feedback is not None and str(feedback) in data.extra_train,
        CONTINUE_KEY: False,  # continuing is asked afresh for each run: it names the run to start from
    }


FORM_DEFAULTS: dict[str, Any] = form_values(TrainConfig())


def run_form_values(run_dir: Path | None) -> dict[str, Any] | None:
    """The form values of the run at `run_dir` (training run or sweep), None when it has no readable config."""
    if run_dir is None:
        return None
    try:
        return form_values(TrainConfig.from_dict(read_config(run_dir)))
    except (TypeError, ValueError):  # an empty, older or hand-edited config: the defaults serve instead
        return None


def default_values(facts: DataFacts | None) -> dict[str, Any]:
    """Defaults fitted to this machine and dataset: pretrained + fine_tune only where the ImageNet weights are on
    this machine (else from scratch + one_cycle, which needs no download), image and batch size from the data."""
    values = dict(FORM_DEFAULTS)
    values["train_pretrained"] = pretrained_available(values["train_arch"])
    values["train_schedule"] = "fine_tune" if values["train_pretrained"] else "one_cycle"
    if facts is not None:
        values["train_size"] = suggested_size(facts.typical_side)
        values["train_bs"] = suggested_batch_size(facts.n_train)
    return values


def seed_form(selected: Path | None, facts: DataFacts | None) -> None:
    """Once per browser session, before the widgets exist: start the form from the selected run's settings
    (a reload must not change what **Train** starts), else from the defaults that fit this machine and data."""
    if st.session_state.get(SEEDED_KEY):
        return
    st.session_state[SEEDED_KEY] = True
    for key, value in (run_form_values(selected) or default_values(facts)).items():
        st.session_state.setdefault(key, value)


def _match_schedule_to_weights() -> None:
    """fine_tune's frozen first phase only makes sense on pretrained weights: unticking Pretrained moves it to
    one_cycle, ticking it moves one_cycle back to fine_tune (plateau, a deliberate choice, stays)."""
    pretrained, schedule = st.session_state["train_pretrained"], st.session_state["train_schedule"]
    if not pretrained and schedule == "fine_tune":
        st.session_state["train_schedule"] = "one_cycle"
    elif pretrained and schedule == "one_cycle":
        st.session_state["train_schedule"] = "fine_tune"


def _arch_changed() -> None:
    st.session_state["train_pretrained"] = pretrained_available(st.session_state["train_arch"])
    _match_schedule_to_weights()


def continue_source(selected: Path | None) -> Path | None:
    """`selected` when a new run can start from its model: a training run that ended with its model exported."""
    if selected is None or is_lr_find(selected):
        return None
    state = safe_status(selected).get("state")
    return selected if state in (runs.DONE, runs.STOPPED) and (selected / BUNDLE).is_file() else None


def _follow_source_model(source: Path) -> None:
    """Continuing from a run keeps its architecture and head (its weights only fit those)."""
    model = read_config(source).get("model", {})
    for key, field in (("train_arch", "arch"), ("train_head", "head"), ("train_dropout", "dropout")):
        if model.get(field) is not None:
            st.session_state[key] = model[field]


def config_form(selected: Path | None = None, facts: DataFacts | None = None) -> dict[str, Any]:
    """The training form; returns the widget values by key, plus `init_from` and `extra_train`. Values live in
    widget state kept for the session (persist_state), so a page switch or a suggestion button never loses them."""
    seed_form(selected, facts)
    for key, default in FORM_DEFAULTS.items():
        st.session_state.setdefault(key, default)
    source = continue_source(selected)
    continuing = source is not None and bool(st.session_state[CONTINUE_KEY])
    if continuing:
        _follow_source_model(source)
    keep = {"persist_state": "session"}
    c1, c2 = st.columns([3, 2], vertical_alignment="bottom")
    c1.selectbox("Architecture", list(ARCHS), key="train_arch", on_change=_arch_changed, disabled=continuing,
                 help="torchvision backbone; resnet18/34 train fast.", **keep)
    c2.checkbox("Pretrained", key="train_pretrained", on_change=_match_schedule_to_weights, disabled=continuing,
                help="Start from ImageNet weights: far better with little data. Untick to train from scratch "
                     "(the schedule switches to one_cycle).", **keep)
    _weights_line(st.session_state["train_arch"], source if continuing else None)
    _weights_file(st.session_state["train_arch"])
    c1, c2 = st.columns([3, 2])
    c1.selectbox("Schedule", SCHEDULES, key="train_schedule", help=SCHEDULE_HELP, **keep)
    c2.number_input("Epochs", min_value=1, max_value=1000, step=1, key="train_epochs",
                    help="fine_tune: epochs after the frozen one(s).", **keep)
    c1, c2, c3 = st.columns(3)
    c1.text_input("Learning rate", key="train_lr", help="e.g. 3e-3. fine_tune: base rate; one_cycle: peak rate. "
                  "The LR finder suggests one.", **keep)
    c2.number_input("Image size (px)", min_value=16, max_value=1024, step=32, key="train_size", **keep)
    c3.number_input("Batch size", min_value=1, max_value=1024, step=8, key="train_bs", **keep)
    extra_train = _feedback_option(facts)
    if source is not None:
        st.checkbox("Continue from the selected run's model", key=CONTINUE_KEY,
                    help="Start from this run's trained weights instead of ImageNet's or random ones, to train on "
                         "at a new image size (progressive resizing: 128 px first, then 224 px from that model) or "
                         "with more data. With the same classes the whole model carries over, else its body.",
                    **keep)
    _more_options(keep)
    values = {key: st.session_state[key] for key in FORM_DEFAULTS}
    return values | {"init_from": str(source) if continuing else None, "extra_train": extra_train}


def _more_options(keep: dict[str, str]) -> None:
    with st.expander("More options"):
        c1, c2 = st.columns(2)
        c1.selectbox("Optimizer", OPTIMIZERS, key="train_optimizer", **keep)
        c2.number_input("Weight decay", min_value=0.0, max_value=1.0, step=0.01, format="%.3f", key="train_wd", **keep)
        c1.number_input("Frozen epochs (fine_tune)", min_value=0, max_value=100, step=1, key="train_freeze_epochs",
                        disabled=st.session_state["train_schedule"] != "fine_tune", **keep)
        c2.number_input("Warm-up share (one_cycle)", min_value=0.05, max_value=0.95, step=0.05, key="train_pct_start",
                        disabled=st.session_state["train_schedule"] != "one_cycle", **keep)
        c1.number_input("Label smoothing", min_value=0.0, max_value=0.5, step=0.05, key="train_label_smoothing", **keep)
        c2.number_input("Head dropout", min_value=0.0, max_value=0.9, step=0.05, key="train_dropout", **keep)
        c1.selectbox("Head", HEADS, key="train_head", **keep)
        c2.number_input("Early stopping", min_value=0, max_value=100, step=1, key="train_early_stopping",
                        help="Stop after this many epochs without a better valid loss; 0 = off.", **keep)
        c1.selectbox("Loader workers", WORKER_CHOICES, key="train_workers",
                     help="DataLoader worker processes; auto picks from the cores available.", **keep)
        c2.checkbox("Keep the best epoch", key="train_keep_best",
                    help="Export the weights of the epoch with the lowest valid loss, not the last.", **keep)
        c2.checkbox("Mixed precision (CUDA)", key="train_mixed_precision", **keep)
        if gpu_count() > 1:  # shown only where DDP can help
            c1.number_input("GPUs", min_value=1, max_value=gpu_count(), step=1, key=GPUS_KEY,
                            help="Train on several GPUs of this machine with DDP (torchrun). The batch size is per "
                                 "GPU; the learning rate is not scaled for you.", **keep)


def _weights_line(arch: str, source: Path | None) -> None:
    """One line on where the starting weights come from, so the defaults explain themselves."""
    if source is not None:
        st.caption(f":material/history: Starts from the model of run `{source.name}`: its weights, and so its "
                   "architecture and head.")
    elif pretrained_available(arch):
        st.caption(f":material/check_circle: The ImageNet weights for {arch} are on this machine, so the defaults "
                   "fine-tune them: *Pretrained* with *fine_tune*.")
    else:
        st.caption(f":material/cloud_off: The ImageNet weights for {arch} are not on this machine, so the defaults "
                   "train from scratch: *Pretrained* unticked, *one_cycle*. To fine-tune offline, give a weights file "
                   "below.")


def _weights_file(arch: str) -> None:
    """Upload, or point at, a weights file; it is checked and put where every pretrained run looks."""
    target = pretrained_cache_path(arch)
    with st.expander(f"Weights file for {arch}", icon=":material/upload_file:"):
        st.caption(f"torchvision's ImageNet weights for {arch} as .pth or .safetensors (e.g. `{target.name}` "
                   f"downloaded on another machine). Loupe checks that the file holds only tensors that fit {arch}, "
                   f"then keeps a copy at `{target}`, where every run looks for it.")
        st.file_uploader("Upload the weights file", type=list(WEIGHTS_SUFFIXES), key=WEIGHTS_UPLOAD_KEY,
                         on_change=_weights_uploaded)
        c1, c2 = st.columns([4, 1], vertical_alignment="bottom")
        c1.text_input("…or its path on this machine", key=WEIGHTS_PATH_KEY, placeholder=f"~/Downloads/{target.name}")
        c2.button("Use it", key="train_weights_use", on_click=_weights_path_given, width="stretch")
    note = st.session_state.pop(WEIGHTS_NOTE_KEY, None)
    if note:
        kind, message = note
        (st.success if kind == "success" else st.error)(message, icon=":material/upload_file:")


def _weights_uploaded() -> None:
    upload = st.session_state.get(WEIGHTS_UPLOAD_KEY)
    if upload is None:
        return
    suffix = Path(upload.name).suffix.lower()  # says how to read the file; the rest of the name is not used
    with tempfile.TemporaryDirectory(prefix="loupe-weights-") as tmp:
        path = Path(tmp) / f"weights{suffix}"
        path.write_bytes(upload.getbuffer())
        _install_weights(path, upload.name)


def _weights_path_given() -> None:
    text = str(st.session_state.get(WEIGHTS_PATH_KEY) or "").strip()
    if not text:
        st.session_state[WEIGHTS_NOTE_KEY] = ("error", "Type the path of the weights file first.")
        return
    try:
        check_data_path(text)  # a server with LOUPE_DATA_ROOTS reads nothing outside them, weights included
    except ValueError as exc:
        st.session_state[WEIGHTS_NOTE_KEY] = ("error", f"{exc}")
        return
    _install_weights(Path(text).expanduser(), text)


def _install_weights(path: Path, shown: str) -> None:
    """Install the weights file at `path` (named `shown` to the user) for the form's architecture; the outcome
    becomes the note shown under the control, and success ticks Pretrained (with fine_tune)."""
    arch = st.session_state["train_arch"]
    try:
        target = install_pretrained(arch, path)
    except FileNotFoundError:
        note = ("error", f"There is no file at `{shown}`.")
    except UnsafeWeightsError:
        note = ("error", (f"`{shown}` holds more than weights (Python objects that could run code when loaded), so "
                          "Loupe refused it. Use torchvision's own weights file, or save just the model's state_dict "
                          "(or a .safetensors file)."))
    except FileExistsError as exc:
        note = ("error", f"{exc}")
    except (OSError, ValueError) as exc:  # unreadable, not a state dict, or weights of another architecture
        note = ("error", f"`{shown}` cannot be used as the {arch} weights: {str(exc).replace(str(path), shown)}")
    else:
        st.session_state["train_pretrained"] = True
        _match_schedule_to_weights()
        note = ("success", f"The {arch} weights are in place (`{target}`): *Pretrained* is ticked, with *fine_tune*.")
    st.session_state[WEIGHTS_NOTE_KEY] = note


def _feedback_option(facts: DataFacts | None) -> list[str]:
    """Predict's feedback images as extra training data, with their counts; returns the folders to add."""
    counts = feedback_counts()
    help_text = ("Images marked as wrongly predicted on **Predict** are kept with their right label. They join the "
                 "training side only, so the validation images stay those of earlier runs.")
    if not counts:
        st.session_state[FEEDBACK_KEY] = False  # a run that added feedback since deleted: nothing to add now
        st.checkbox("Add Predict's feedback images", key=FEEDBACK_KEY, disabled=True,
                    help=help_text + " None yet.")
        return []
    added = st.checkbox("Add Predict's feedback images", key=FEEDBACK_KEY, help=help_text,
                        persist_state="session")
    listed = ", ".join(f"{label} {n}" for label, n in counts.items())
    st.caption(f"{sum(counts.values())} feedback images: {listed}.")
    unknown = sorted(set(counts) - set(facts.vocab)) if facts else []
    if added and unknown:
        st.caption(f":orange[Not classes of this dataset: {', '.join(unknown)}. The model learns them from the "
                   "feedback images alone, and no validation image measures them.]")
    folder = feedback_dataset()
    return [str(folder)] if added and folder is not None else []


@st.cache_resource
def gpu_count() -> int:
    """CUDA GPUs visible to PyTorch; cached because the answer never changes while the server runs."""
    return torch.cuda.device_count()


def parse_lr(text: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ValueError(f"Learning rate {text!r} is not a number; write it like 3e-3 or 0.003.") from None
    if not math.isfinite(value):
        raise ValueError(f"Learning rate {text!r} is not a finite number.")
    return value


_FORM_OWNED = {"path", "size", "batch_size", "num_workers"}


def data_options_line(data_options: dict) -> str:
    """The Data page's label and split choices that differ from the defaults, for a one-line reminder."""
    defaults = DataConfig()
    changed = {k: v for k, v in (data_options or {}).items()
               if k not in _FORM_OWNED and getattr(defaults, k, object()) != v}
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in changed.items())


SPLIT_OPTIONS = ("valid_pct", "seed", "stratify", "group_regex", "group_col")


def _data_config(dataset: str, data_options: dict) -> DataConfig:
    """The dataset as the Data page's label and split options read it (the form owns size, batch and workers)."""
    known = {f.name for f in fields(DataConfig)} - _FORM_OWNED
    return DataConfig(path=dataset, **{k: v for k, v in (data_options or {}).items() if k in known})


@st.cache_data(max_entries=16, show_spinner="Counting the images…")
def _facts(config_json: str, signature: tuple[int, int]) -> DataFacts | None:
    try:
        return data_facts(DataConfig(**json.loads(config_json)))
    except (DataError, OSError, ValueError):  # the Data page says what is wrong with the folder
        return None


def dataset_facts(dataset: str, data_options: dict) -> DataFacts | None:
    """core.data.data_facts for the open dataset, once per folder state and options; None when it cannot be read."""
    try:
        cfg = _data_config(dataset, data_options)
    except ValueError:
        return None
    return _facts(json.dumps(asdict(cfg), sort_keys=True), listing_signature(dataset))


def dataset_caption(dataset: str, data_options: dict, facts: DataFacts | None) -> str:
    """Which dataset, read how, split how: the split this dataset really gets, fixed by it or made by Loupe."""
    options = dict(data_options or {})
    labels = data_options_line({k: v for k, v in options.items() if k not in SPLIT_OPTIONS})
    if facts is not None and facts.split_fixed:
        split = f"the split is the dataset's own: {facts.split_fixed}"
    else:
        defaults = DataConfig()
        split = (f"{options.get('valid_pct', defaults.valid_pct):.0%} held out for validation · "
                 f"split seed {options.get('seed', defaults.seed)}")
        if not options.get("stratify", defaults.stratify):
            split += " · not stratified"
        if options.get("group_regex"):
            split += f" · groups `{options['group_regex']}`"
    return " · ".join(part for part in (f"Dataset `{Path(dataset).name}`", labels, split) if part)


def dataset_needed(selected: Path | None) -> None:
    """No dataset is open: the form needs one. Offers the selected run's own dataset when it may be opened."""
    st.info("Open or create a dataset to train a new model: training needs images to learn from.",
            icon=":material/photo_library:")
    folder = read_config(selected).get("data", {}).get("path") if selected is not None else None
    with st.container(horizontal=True):
        st.page_link("app_pages/data.py", label="Go to Data", icon=":material/photo_library:")
        offered = folder and Path(folder).is_dir() and allowed(folder)
        if offered and st.button(f"Open `{Path(folder).name}`, the dataset of run `{selected.name}`",
                                 key="train_open_run_dataset", icon=":material/folder_open:"):
            open_dataset(folder)


def build_config(dataset: str, data_options: dict, values: dict[str, Any]) -> TrainConfig:
    """The TrainConfig for the form's values on `dataset`; raises ValueError with a message for the user."""
    workers = values["train_workers"]
    data = replace(_data_config(dataset, data_options), size=int(values["train_size"]),
                   batch_size=int(values["train_bs"]), num_workers=None if workers == "auto" else int(workers),
                   extra_train=list(values.get("extra_train") or []))
    model = ModelConfig(arch=values["train_arch"], pretrained=bool(values["train_pretrained"]),
                        head=values["train_head"], dropout=float(values["train_dropout"]))
    return TrainConfig(
        data=data,
        model=model,
        schedule=values["train_schedule"],
        epochs=int(values["train_epochs"]),
        freeze_epochs=int(values["train_freeze_epochs"]),
        lr=parse_lr(values["train_lr"]),
        pct_start=float(values["train_pct_start"]),
        optimizer=values["train_optimizer"],
        weight_decay=float(values["train_wd"]),
        label_smoothing=float(values["train_label_smoothing"]),
        early_stopping=int(values["train_early_stopping"]),
        keep_best=bool(values["train_keep_best"]),
        mixed_precision=bool(values["train_mixed_precision"]),
        init_from=values.get("init_from"),
    )


def config_hints(cfg: TrainConfig, facts: DataFacts | None = None) -> None:
    """Warnings worth reading before launching: missing offline weights, a recipe or sizes that do not fit."""
    if not cfg.init_from:  # continuing from a run starts from its weights: nothing to download, nothing from scratch
        _weights_hint(cfg)
    if facts is not None:
        _size_hints(cfg.data, facts)


def _weights_hint(cfg: TrainConfig) -> None:
    model = cfg.model
    if model.pretrained and not model.weights_path:
        if not pretrained_available(model.arch):
            st.warning(
                f"The pretrained {model.arch} weights are not on this machine: the run downloads them, and "
                f"**fails if this machine is offline**. To work offline, give a weights file above, "
                "or untick *Pretrained* to train from scratch.",
                icon=":material/cloud_off:",
            )
    elif not model.pretrained and cfg.schedule == "fine_tune":
        st.info("Training from scratch: *one_cycle* fits better than *fine_tune*, whose frozen first phase "
                "only makes sense with pretrained weights.", icon=":material/lightbulb:")


def _size_hints(data: DataConfig, facts: DataFacts) -> None:
    """Image and batch sizes that waste compute or leave an epoch too few steps, with the sizes that fit."""
    size = suggested_size(facts.typical_side)
    if facts.typical_side and data.size > max(size, facts.typical_side * 1.5):
        st.info(f"The images are about {facts.typical_side} px: training at {data.size} px upscales them, which adds "
                f"no detail and costs {(data.size / facts.typical_side) ** 2:.0f}× the compute. {size} px fits them.",
                icon=":material/photo_size_select_large:")
    steps = -(-facts.n_train // data.batch_size)
    fit = suggested_batch_size(facts.n_train)
    if steps < MIN_BATCHES_PER_EPOCH // 2 and fit < data.batch_size:
        st.info(f"{facts.n_train} training images at batch size {data.batch_size} make {steps} step(s) an epoch, too "
                f"few for the schedule to warm up and settle. Batch size {fit} gives "
                f"{-(-facts.n_train // fit)}.", icon=":material/stacks:")


# ---------------------------------------------------------------- launching


def launch_training(cfg: TrainConfig) -> Path | None:
    """Create the run, start its process in the background and select it; errors end up on the page."""
    try:
        run_dir = runs.create(cfg.to_dict(), root=runs_dir(), name_hint=cfg.model.arch)
        runs.start(run_dir, gpus=int(st.session_state.get(GPUS_KEY, 1)))
    except (OSError, ValueError) as exc:
        st.error(f"Could not start the run: {exc}")
        return None
    from ui.state import set_run

    set_run(run_dir.name)
    return run_dir


def launch_lr_find(cfg: TrainConfig, facts: DataFacts | None = None) -> Path | None:
    """Start an LR-finder sweep in the background for this config; its run id is kept for the session.
    The sweep gets the steps the page's estimate counted (without facts the run sizes it to the data itself)."""
    steps = ["--num-it", str(_sweep_steps(cfg, facts))] if facts else []
    try:
        run_dir = runs.create(cfg.to_dict(), root=runs_dir(), name_hint=LR_FIND_HINT)
        runs.start(run_dir, task="lr-find", extra_args=steps)
    except (OSError, ValueError) as exc:
        st.error(f"Could not start the learning-rate finder: {exc}")
        return None
    st.session_state[LR_FIND_KEY] = run_dir.name
    return run_dir


def _sweep_steps(cfg: TrainConfig, facts: DataFacts) -> int:
    return sweep_steps(max(1, facts.n_train // cfg.data.batch_size))


# ---------------------------------------------------------------- the LR finder panel


def lr_find_run(dataset: str, selected: Path | None) -> Path | None:
    """The sweep to show: this session's, else the selected run when it is a sweep, else the newest for `dataset`."""
    run_id = st.session_state.get(LR_FIND_KEY)
    if run_id and (runs_dir() / run_id).is_dir():
        return runs_dir() / run_id
    if selected is not None and is_lr_find(selected):
        return selected
    sweeps = sorted((p for p in runs_dir().iterdir() if p.is_dir() and f"-{LR_FIND_HINT}-" in p.name), reverse=True)
    for path in sweeps[:20]:
        if read_config(path).get("data", {}).get("path") == dataset:
            return path
    return None


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
        live = st.fragment(_live(run_dir, _lr_find_body), run_every=POLL_SECONDS)
        live()
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
        _error_details(run_dir, view)
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
        st.caption(f"Sweep `{run_dir.name}` · {_config_line(read_config(run_dir))}")


def _sweep_outcome(result: LRFindResult) -> None:
    """How the sweep ended, and a warning when no rate along it is worth training with."""
    if result.planned and len(result.lrs) < result.planned:
        st.caption(f"Stopped after {len(result.lrs)} of {result.planned} steps, at a rate of "
                   f"{result.lrs[-1]:.1e}: the loss had clearly climbed, so higher rates could not change the answer.")
    if not result.suggestions:
        st.warning("The loss never fell clearly during the sweep, so no learning rate along it is worth suggesting. "
                   "Keep the rate you have, or sweep again with a smaller batch size or more images.",
                   icon=":material/trending_flat:")


def _config_line(config: dict) -> str:
    model, data = config.get("model", {}), config.get("data", {})
    frozen = " · body frozen" if config.get("schedule") == "fine_tune" and config.get("freeze_epochs") else ""
    weights = "pretrained" if model.get("pretrained") else "from scratch"
    return f"{model.get('arch')} ({weights}) · {data.get('size')} px · batch {data.get('batch_size')}{frozen}"


# ---------------------------------------------------------------- the run view


STATE_BADGES = {
    runs.CREATED: ("not started", "gray", ":material/radio_button_unchecked:"),
    runs.QUEUED: ("queued", "gray", ":material/hourglass_top:"),
    runs.RUNNING: ("running", "blue", ":material/directions_run:"),
    runs.DONE: ("done", "green", ":material/check_circle:"),
    runs.STOPPED: ("stopped", "orange", ":material/stop_circle:"),
    runs.FAILED: ("failed", "red", ":material/error:"),
    runs.UNREADABLE: ("unreadable", "red", ":material/error:"),
}


def _live(run_dir: Path, body: Callable[[Path, dict, bool], None]) -> Callable[[], None]:
    """A fragment body that redraws `body` each poll and reruns the whole page once the run is final,
    so the parts outside the fragment (buttons, the sidebar) catch up and the polling stops."""

    def live() -> None:
        status = safe_status(run_dir)
        if status.get("state") not in runs.ACTIVE_STATES:
            st.rerun()
        body(run_dir, status, True)

    return live


def run_panel(run_dir: Path | None) -> None:
    """The selected run: live while it is queued or running, its outcome once it ends."""
    if run_dir is None:
        st.info("No run yet: set the options above and press **Train**.", icon=":material/model_training:")
        return
    status = safe_status(run_dir)
    if is_lr_find(run_dir, status):
        st.info("The run selected in the sidebar is a learning-rate sweep (shown above). Pick a training run in "
                "the sidebar, or start one with **Train**.", icon=":material/info:")
        return
    if status.get("state") in runs.ACTIVE_STATES:
        live = st.fragment(_live(run_dir, _run_body), run_every=POLL_SECONDS)
        live()
    else:
        _run_body(run_dir, status, live=False)


def _run_body(run_dir: Path, status: dict, live: bool) -> None:
    state = status.get("state", runs.UNREADABLE)
    config = read_config(run_dir)
    view = run_view(run_dir)
    _header(run_dir, state, config, live)
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


def _header(run_dir: Path, state: str, config: dict, live: bool) -> None:
    title, buttons = st.columns([4, 1], vertical_alignment="center")
    label, colour, icon = STATE_BADGES.get(state, (state, "gray", ":material/help:"))
    title.markdown(f"#### Run `{run_dir.name}` :{colour}-badge[{icon} {label}]")
    if config:
        title.caption(config_summary(config, split_line(run_dir, config)))
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
        others = runs.list_runs(run_dir.parent)
        busy = [r["id"] for r in others if r["state"] == runs.RUNNING and r["id"] != run_dir.name]
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
        _error_details(run_dir, view)
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
        frozen = ""
        config = (view.start or {}).get("config") or {}
        if config.get("schedule") == "fine_tune" and epoch < int(config.get("freeze_epochs") or 0):
            frozen = " (body frozen)"
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


def _error_details(run_dir: Path, view: RunView) -> None:
    if view.error and view.error.get("traceback"):
        with st.expander("Traceback"):
            st.code(view.error["traceback"], language="python")
    else:
        log = _log_tail(run_dir)
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
    with np.load(npz) as arrays:
        items, losses = arrays["item"], arrays["loss"]
    data = read_json(record)
    entries, root = data["items"], Path(data["root"])
    out, seen = [], set()
    # Item ids index the dataset record exactly as the run saw it (not a rebuilt source, which drops files
    # deleted since, and would shift every index after them).
    for i in np.argsort(-losses, kind="stable"):
        item = int(items[i])
        if item in seen or not 0 <= item < len(entries):
            continue
        seen.add(item)
        entry = entries[item]
        out.append({"file": str(root / entry["file"]), "label": ", ".join(entry["labels"]), "loss": float(losses[i])})
        if len(out) == k:
            break
    return out


def latest_item_losses(run_dir: Path) -> Path | None:
    files = sorted((Path(run_dir) / "item_losses").glob("epoch_*.npz"))
    return files[-1] if files else None


def _hardest_images(run_dir: Path) -> None:
    npz, record = latest_item_losses(run_dir), Path(run_dir) / DATASET_RECORD
    if npz is None or not record.exists():
        st.markdown("**Hardest training images**")
        st.caption("After the first epoch: the training images with the highest loss.")
        return
    epoch = int(npz.stem.split("_")[-1])
    st.markdown(f"**Hardest training images** · epoch {runs.epoch_number(epoch)}")
    try:
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
