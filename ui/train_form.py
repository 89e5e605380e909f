"""The Train page's form: its widgets bound to TrainConfig fields, the defaults that fit this machine and dataset,
the config it builds, hints before launching, and the launch itself."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import streamlit as st
import torch

from core import runs
from core.config import HEADS, OPTIMIZERS, SCHEDULES, DataConfig, ModelConfig, TrainConfig
from core.data import MIN_BATCHES_PER_EPOCH, DataFacts, data_facts, suggested_batch_size, suggested_size
from core.env import runs_dir
from core.feedback import feedback_counts, feedback_dataset
from core.images import DataError
from core.keeptogether import groups_version
from core.listing import listing_signature
from core.model import ARCHS, pretrained_available
from core.rundir import RunDir
from core.runlog import read_config
from ui.data_chooser import open_dataset
from ui.live import safe_status
from ui.state import allowed, set_run
from ui.train_run import is_sweep
from ui.train_weights import arch_changed, match_schedule_to_weights, weights_file, weights_hint, weights_line

SCHEDULE_HELP = (
    "**fine_tune**: fastai's transfer-learning recipe, the pretrained body frozen for the first epoch(s), then "
    "everything trained at lower rates. **one_cycle**: everything trained from the start, the rate warming up "
    "then annealing (best from scratch). **plateau**: a fixed rate, cut when the valid loss stops improving."
)
WORKER_CHOICES = ("auto", 0, 1, 2, 4, 8)
FEEDBACK_KEY = "train_feedback"
CONTINUE_KEY = "train_continue"
SEEDED_KEY = "train_form_seeded"  # set once this session's form has its starting values
GPUS_KEY = "train_gpus"  # only set where the machine has several GPUs


# Each widget of the form (by key) and the TrainConfig field it sets: "field", "data.field" or "model.field".
FORM_FIELDS = {
    "train_arch": "model.arch",
    "train_pretrained": "model.pretrained",
    "train_schedule": "schedule",
    "train_epochs": "epochs",
    "train_lr": "lr",
    "train_size": "data.size",
    "train_bs": "data.batch_size",
    "train_freeze_epochs": "freeze_epochs",
    "train_optimizer": "optimizer",
    "train_wd": "weight_decay",
    "train_pct_start": "pct_start",
    "train_label_smoothing": "label_smoothing",
    "train_dropout": "model.dropout",
    "train_head": "model.head",
    "train_early_stopping": "early_stopping",
    "train_workers": "data.num_workers",
    "train_keep_best": "keep_best",
    "train_mixed_precision": "mixed_precision",
}


def _field(cfg: TrainConfig, path: str) -> Any:
    value: Any = cfg
    for name in path.split("."):
        value = getattr(value, name)
    return value


def _widget_value(path: str, value: Any) -> Any:
    """A config value as its widget holds it: the rate as text, the workers as a choice, numbers as floats where
    the widget is a float input."""
    if path == "lr":
        return f"{value:g}"
    if path == "data.num_workers":
        return value if value in WORKER_CHOICES[1:] else "auto"
    return float(value) if isinstance(value, float) else value


def _config_value(path: str, value: Any, default: Any) -> Any:
    """A widget's value as its TrainConfig field holds it (the field's default says which type)."""
    if path == "lr":
        return parse_lr(value)
    if path == "data.num_workers":
        return None if value == "auto" else int(value)
    for kind in (bool, int, float):
        if isinstance(default, kind):
            return kind(value)
    return value


def form_values(cfg: TrainConfig) -> dict[str, Any]:
    """The form's widget values (by key) that give back `cfg`; the inverse of `build_config`."""
    feedback = feedback_dataset() if cfg.data.extra_train else None  # a look at the workspace only when it matters
    values = {key: _widget_value(path, _field(cfg, path)) for key, path in FORM_FIELDS.items()}
    return values | {
        FEEDBACK_KEY: feedback is not None and str(feedback) in cfg.data.extra_train,
        CONTINUE_KEY: False,  # continuing is asked afresh for each run: it names the run to start from
    }


FORM_DEFAULTS: dict[str, Any] = form_values(TrainConfig())


def run_form_values(run_dir: Path | None) -> dict[str, Any] | None:
    """The form values of the run at `run_dir` (training run or sweep), None when it has no readable config."""
    if run_dir is None:
        return None
    config = read_config(run_dir)  # None for an empty, older or hand-edited config: the defaults serve instead
    return form_values(config) if config else None


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


def continue_source(selected: Path | None) -> Path | None:
    """`selected` when a new run can start from its model: a training run that ended with its model exported."""
    if selected is None or is_sweep(selected):
        return None
    state = safe_status(selected).get("state")
    return selected if state in (runs.DONE, runs.STOPPED) and RunDir(selected).has_model() else None


def _follow_source_model(source: Path) -> None:
    """Continuing from a run keeps its architecture and head (its weights only fit those)."""
    config = read_config(source)
    for key in ("train_arch", "train_head", "train_dropout"):
        if config is not None:
            st.session_state[key] = _widget_value(FORM_FIELDS[key], _field(config, FORM_FIELDS[key]))


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
    c1.selectbox("Architecture", list(ARCHS), key="train_arch", on_change=arch_changed, disabled=continuing,
                 help="torchvision backbone; resnet18/34 train fast.", **keep)
    c2.checkbox("Pretrained", key="train_pretrained", on_change=match_schedule_to_weights, disabled=continuing,
                help="Start from ImageNet weights: far better with little data. Untick to train from scratch "
                     "(the schedule switches to one_cycle).", **keep)
    weights_line(st.session_state["train_arch"], source if continuing else None)
    weights_file(st.session_state["train_arch"])
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
def _facts(config_json: str, signature: tuple[int, int], groups: tuple[int, int, int]) -> DataFacts | None:
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
    # groups: the keep-together file changes the split but not the listing (which skips .loupe)
    return _facts(json.dumps(asdict(cfg), sort_keys=True), listing_signature(dataset), groups_version(dataset))


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
    config = read_config(selected) if selected is not None else None
    folder = config.data.path if config else None
    with st.container(horizontal=True):
        st.page_link("app_pages/data.py", label="Go to Data", icon=":material/photo_library:")
        offered = folder and Path(folder).is_dir() and allowed(folder)
        if offered and st.button(f"Open `{Path(folder).name}`, the dataset of run `{selected.name}`",
                                 key="train_open_run_dataset", icon=":material/folder_open:"):
            open_dataset(folder)


def build_config(dataset: str, data_options: dict, values: dict[str, Any]) -> TrainConfig:
    """The TrainConfig for the form's values on `dataset`; raises ValueError with a message for the user."""
    defaults = TrainConfig()
    changes: dict[str, dict[str, Any]] = {"": {}, "data": {}, "model": {}}
    for key, path in FORM_FIELDS.items():
        section, _, name = path.rpartition(".")
        changes[section][name] = _config_value(path, values[key], _field(defaults, path))
    data = replace(_data_config(dataset, data_options), **changes["data"],
                   extra_train=list(values.get("extra_train") or []))
    return TrainConfig(data=data, model=ModelConfig(**changes["model"]), init_from=values.get("init_from"),
                       **changes[""])


def config_hints(cfg: TrainConfig, facts: DataFacts | None = None) -> None:
    """Warnings worth reading before launching: missing offline weights, a recipe or sizes that do not fit."""
    if not cfg.init_from:  # continuing from a run starts from its weights: nothing to download, nothing from scratch
        weights_hint(cfg)
    if facts is not None:
        _size_hints(cfg.data, facts)


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


def launch_training(cfg: TrainConfig) -> Path | None:
    """Create the run, start its process in the background and select it; errors end up on the page."""
    try:
        run_dir = runs.create(cfg.to_dict(), root=runs_dir(), name_hint=cfg.model.arch)
        runs.start(run_dir, gpus=int(st.session_state.get(GPUS_KEY, 1)))
    except (OSError, ValueError) as exc:
        st.error(f"Could not start the run: {exc}")
        return None
    set_run(run_dir.name)
    return run_dir
