"""The settings of a run, as plain dataclasses: what a page builds from its widgets and a run saves as config.json.

Torch-free on purpose: pages, the run listing and the event-log reader use these without loading PyTorch.
core.data, core.model and core.train import them from here (and re-export them under their old names).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from core.fileio import read_json
from core.images import DEFAULT_MAX_PIXELS
from core.rundir import CONFIG_FILE

LAYOUTS = ("auto", "folders", "split_folders", "filename_regex", "csv")
PETS_REGEX = r"^(.+)_\d+\.\w+$"
MIN_SIZE, MAX_SIZE = 16, 1024  # the image sizes, in pixels, a model may train (and a bundle may ask) for
HEADS = ("fastai", "linear")
SCHEDULES = ("fine_tune", "one_cycle", "plateau")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class DataConfig:
    """Where the data is, how it is labelled and split, and how images become tensors."""

    path: str = ""  # dataset root folder
    layout: str = "auto"  # one of LAYOUTS; "auto" detects it
    label_regex: str = PETS_REGEX  # filename_regex layout: the first group is the label
    csv_file: str | None = None  # csv layout: CSV path (relative to `path`); None finds the one CSV in the root
    csv_fname_col: str | None = None  # csv layout: column of file names (default: the first column)
    csv_label_col: str | None = None  # csv layout: column of labels (default: the second column)
    label_delim: str = " "  # csv layout: separator between several labels of one image
    valid_pct: float = 0.2  # share of items held out for validation (ignored when the layout fixes the split)
    seed: int = 42  # seed of the split and of the data order
    stratify: bool = True  # keep each class's share the same in train and valid
    group_regex: str | None = None  # items whose path (else name) gives the same match or first group stay together
    group_col: str | None = None  # csv layout: column naming each item's group
    size: int = 224  # square side, in pixels, of the images the model sees
    batch_size: int = 64  # images per training step per process: under DDP (torchrun, N processes) a step
    # sees batch_size × N images
    min_scale: float = 0.35  # smallest share of the image a random resized crop keeps
    flip: bool = True  # random horizontal flips
    flip_vert: bool = False  # vertical flips and 90-degree turns too, for overhead imagery
    max_rotate: float = 10.0  # random rotation up to this many degrees (0 turns it off)
    max_lighting: float = 0.2  # random brightness and contrast change up to this share (0 turns it off)
    num_workers: int | None = None  # DataLoader worker processes; None picks from the cores available
    max_pixels: int = DEFAULT_MAX_PIXELS  # images declaring more pixels are refused as decompression bombs
    extra_train: list[str] = field(default_factory=list)  # one-folder-per-class datasets (e.g. Predict's
    # feedback) whose images join the training side only, so validation stays comparable between runs

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}.")
        if not 0.0 <= self.valid_pct < 1.0:
            raise ValueError(f"valid_pct must be in [0, 1), not {self.valid_pct}.")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"size must be from {MIN_SIZE} to {MAX_SIZE} pixels, not {self.size}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}.")
        if not 0.0 < self.min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], not {self.min_scale}.")
        for name in ("label_regex", "group_regex"):
            pattern = getattr(self, name)
            if pattern:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"{name} {pattern!r} is not a valid regular expression: {e}.") from None



@dataclass(frozen=True)
class ArchSpec:
    """How to turn one torchvision classifier into a Loupe body."""

    channels: int  # C of the body's [B, C, H, W] output; the tests check it with a real forward pass
    body_attr: str | None = "features"  # attribute holding the body; None: every child but the last two (resnets)
    split: int | None = None  # body children before this index form parameter group 1; None: half of them


ARCHS: dict[str, ArchSpec] = {
    # split=6 is fastai's `_resnet_split`: stem + layer1 + layer2 | layer3 + layer4
    "resnet18": ArchSpec(channels=512, body_attr=None, split=6),
    "resnet34": ArchSpec(channels=512, body_attr=None, split=6),
    "resnet50": ArchSpec(channels=2048, body_attr=None, split=6),
    "squeezenet1_1": ArchSpec(channels=512),
    "vgg16_bn": ArchSpec(channels=512),
    "mobilenet_v3_small": ArchSpec(channels=576),
    "mobilenet_v3_large": ArchSpec(channels=960),
    "efficientnet_b0": ArchSpec(channels=1280),
    "convnext_tiny": ArchSpec(channels=768),
}


@dataclass
class ModelConfig:
    """Which backbone, which starting weights and which head."""

    # torchvision architecture name; one of ARCHS
    arch: str = "resnet18"
    # start from torchvision's ImageNet weights (downloaded once into the torch hub cache)
    pretrained: bool = True
    # a local .pth/.pt or .safetensors state dict of the full torchvision model; when set it is used
    # instead of the download (for offline machines), whatever `pretrained` says
    weights_path: str | None = None
    # "fastai": concat-pool + two BN/dropout/linear blocks; "linear": average-pool + one linear layer
    head: str = "fastai"
    # dropout before the fastai head's last linear layer; the first one gets half (fastai's `ps`)
    dropout: float = 0.5

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"Unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}.")
        if not isinstance(self.pretrained, bool):
            # ValueError like every other bad value here: callers catch one error type for a bad config.
            raise ValueError(f"pretrained must be True or False, got {self.pretrained!r}.")  # noqa: TRY004
        if self.weights_path is not None and not str(self.weights_path).strip():
            raise ValueError("weights_path is empty; give a file path or leave it as None.")
        if self.head not in HEADS:
            raise ValueError(f"Unknown head {self.head!r}; choose one of {', '.join(HEADS)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")


@dataclass
class TrainConfig:
    """Everything a run needs, saved as config.json in the run and inside the model bundle."""

    data: DataConfig = field(default_factory=DataConfig)  # dataset, split, image size, batch size (per process:
    # under DDP with N processes a step sees batch_size × N images; lr is not rescaled for it), augmentation
    model: ModelConfig = field(default_factory=ModelConfig)  # architecture, pretrained weights, head
    schedule: str = "fine_tune"  # fine_tune (frozen then unfrozen), one_cycle, or plateau (ReduceLROnPlateau)
    epochs: int = 4  # epochs (after the frozen ones, for fine_tune)
    freeze_epochs: int = 1  # fine_tune: epochs with the pretrained body frozen
    lr: float = 2e-3  # base learning rate (fine_tune), peak learning rate (one_cycle), start rate (plateau)
    lr_min: float | None = None  # one_cycle/plateau: lowest group's rate, spread geometrically up to lr
    # (fastai's slice(lr_min, lr)); None: every group at lr, as fastai's fit_one_cycle(epochs, lr)
    pct_start: float = 0.25  # one_cycle: share of steps spent warming up
    optimizer: str = "adamw"  # adamw, or sgd with momentum
    weight_decay: float = 0.01  # decoupled weight decay
    momentum: float = 0.9  # sgd momentum (one-cycle cycles it between 0.95 and 0.85 for both optimizers)
    label_smoothing: float = 0.0  # single-label: share of the target spread over all classes
    threshold: float = 0.5  # multi-label: probability above which a label is predicted
    fbeta: float = 2.0  # multi-label: beta of the F-beta metric (2 as on the Planet data)
    plateau_patience: int = 1  # plateau: epochs without improvement before the rate is cut
    plateau_factor: float = 0.2  # plateau: factor the rate is multiplied by
    early_stopping: int = 0  # stop after this many epochs without a better valid loss (0 = off)
    keep_best: bool = False  # export the weights of the epoch with the lowest valid loss, not the last
    mixed_precision: bool = True  # CUDA only: bf16 where supported, else fp16 with a gradient scaler
    channels_last: bool = True  # NHWC memory layout, faster convolutions on GPU and recent CPUs
    init_from: str | None = None  # a run dir or bundle to start from (progressive resizing, more data)
    device: str = "auto"  # auto, cuda, mps or cpu
    sync_bn: bool = False  # DDP only: BatchNorm statistics over the whole batch of all processes (SyncBatchNorm)

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        checks = [
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}."),
            (self.optimizer in OPTIMIZERS,
             f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}."),
            (self.epochs >= 1, f"epochs must be at least 1, not {self.epochs}."),
            (self.freeze_epochs >= 0, f"freeze_epochs cannot be negative ({self.freeze_epochs})."),
            (self.lr > 0, f"lr must be a positive learning rate, not {self.lr}."),
            (self.lr_min is None or 0 < self.lr_min <= self.lr, f"lr_min must be in (0, lr], not {self.lr_min}."),
            (0 < self.pct_start < 1, f"pct_start must be in (0, 1), not {self.pct_start}."),
            (self.weight_decay >= 0, f"weight_decay cannot be negative ({self.weight_decay})."),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), not {self.label_smoothing}."),
            (0 < self.threshold < 1, f"threshold must be in (0, 1), not {self.threshold}."),
            (self.early_stopping >= 0, f"early_stopping cannot be negative ({self.early_stopping})."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict such as config.json, refusing unknown keys so typos do not pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown TrainConfig fields: {', '.join(sorted(unknown))}.")
        return cls(**d)

    @property
    def total_epochs(self) -> int:
        """Epochs the run trains for: fine_tune adds its frozen epochs in front."""
        return self.epochs + (self.freeze_epochs if self.schedule == "fine_tune" else 0)

    def summary(self, split: str | None = None) -> str:
        """The one line every page shows about a run's settings: model, schedule, data, and `split` (the split it
        used, from its dataset record: core.split.describe_split) once it is known."""
        epochs = f"{self.freeze_epochs}+{self.epochs}" if self.schedule == "fine_tune" else str(self.epochs)
        weights = "pretrained" if self.model.pretrained else "from scratch"
        if self.model.weights_path:
            weights = f"weights from `{Path(self.model.weights_path).name}`"
        return (f"{self.model.arch} ({weights}) · {self.schedule} · {epochs} epochs · lr {self.lr:.1e} · "
                f"{self.data.size} px · batch {self.data.batch_size} · data `{Path(self.data.path).name}`"
                + (f" · {split}" if split else ""))


def config_problem(config: dict[str, Any]) -> str | None:
    """Why a run's config.json cannot be shown: a field of TrainConfig holding another kind of JSON value than
    TrainConfig's own (`"data": "oops"`, a text where a number belongs); None when every known field fits.
    Pages read these fields without checking each, so one odd run must be caught here, once."""
    return _shape_problem(config, asdict(TrainConfig()), "")


def _shape_problem(values: dict[str, Any], defaults: dict[str, Any], where: str) -> str | None:
    for name, default in defaults.items():
        value = values.get(name)
        if value is None or default is None:  # absent, or optional: pages treat None as "not set"
            continue
        kind = dict if isinstance(default, dict) else (int, float) if isinstance(default, float) else type(default)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            wanted = {dict: "a JSON object", list: "a list", str: "text", bool: "true or false"}.get(kind, "a number")
            return f"{CONFIG_FILE}: {where}{name!r} should be {wanted}, not {json.dumps(value)[:40]}"
        if kind is dict:
            problem = _shape_problem(value, default, f"{where}{name}.")
            if problem:
                return problem
    return None


def read_run_config(run_dir: str | os.PathLike) -> tuple[TrainConfig | None, str | None]:
    """A run's config.json as a TrainConfig, or None and why not: the one reading every page and the listing use."""
    try:
        data = read_json(Path(run_dir) / CONFIG_FILE)
    except (OSError, ValueError) as exc:
        return None, f"{CONFIG_FILE}: {exc}"
    if not isinstance(data, dict):
        return None, f"{CONFIG_FILE} does not hold a JSON object"
    problem = config_problem(data)
    if problem:  # pages read the config without checking it: an odd one must not reach them
        return None, problem
    try:
        return TrainConfig.from_dict(data), None
    except (TypeError, ValueError) as exc:
        return None, f"{CONFIG_FILE}: {exc}"
