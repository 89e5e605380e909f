"""The model bundle (one safetensors file: weights plus the metadata that rebuilds and uses the model), its
validation, and prediction from it. The architectures and heads it rebuilds are core.model's."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from PIL import Image
from torch import nn

from core.augment import IMAGENET_MEAN, IMAGENET_STD, normalize, presize, presize_side, resize_batch
from core.config import MAX_SIZE, MIN_SIZE, ModelConfig
from core.env import resolve_device
from core.fileio import atomic_write
from core.images import upright_rgb
from core.model import build_model
from core.rundir import BUNDLE_FILE

TASKS = ("single_label", "multi_label")
BUNDLE_FORMAT_VERSION = 1
_META_KEY = "loupe"  # key of our JSON blob inside the safetensors header metadata


class BundleError(ValueError):
    """A file is not a (readable) Loupe model bundle."""


@dataclass
class BundleMeta:
    """Everything besides the weights needed to rebuild and use a model; stored in the bundle's header."""

    arch: str  # torchvision architecture, one of ARCHS
    vocab: list[str]  # class names; output i is vocab[i]
    size: int  # images are resized (shorter side) and center-cropped to size x size
    head: str = "fastai"  # head kind, one of HEADS
    dropout: float = 0.5  # head dropout (irrelevant at inference, needed to rebuild the same modules)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel normalisation used in training
    std: tuple[float, float, float] = IMAGENET_STD
    task: str = "single_label"  # "single_label" (softmax) or "multi_label" (sigmoid)
    threshold: float = 0.5  # multi-label: a class is predicted when its probability exceeds this
    version: int = BUNDLE_FORMAT_VERSION  # bundle format version, bumped on incompatible changes
    config: dict | None = None  # the TrainConfig the model was trained with, for the record and for retraining

    def __post_init__(self) -> None:
        # Every field is checked for its type and range: a bundle is a file from anywhere, and its header decides
        # how much memory prediction takes (size) and whether the output means anything (mean, std, vocab).
        self.vocab = _class_names(self.vocab)
        self.mean, self.std = _channel_values("mean", self.mean), _channel_values("std", self.std)
        if not (isinstance(self.arch, str) and isinstance(self.head, str) and _is_number(self.dropout)):
            raise ValueError(f"arch and head must be names and dropout a number, got {self.arch!r}, {self.head!r}, "
                             f"{self.dropout!r}.")
        ModelConfig(arch=self.arch, pretrained=False, head=self.head, dropout=self.dropout)  # validates those
        if not _is_integer(self.size) or not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"size must be a whole number of pixels from {MIN_SIZE} to {MAX_SIZE}, got {self.size!r}.")
        if min(self.std) <= 0:
            raise ValueError(f"std must be above 0 in every channel, got {self.std!r}.")
        if not isinstance(self.task, str) or self.task not in TASKS:
            raise ValueError(f"Unknown task {self.task!r}; choose one of {', '.join(TASKS)}.")
        if not _is_number(self.threshold) or not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be a number in (0, 1), got {self.threshold!r}.")
        if not _is_integer(self.version) or not 1 <= self.version <= BUNDLE_FORMAT_VERSION:
            raise ValueError(f"bundle format {self.version!r} is not one this Loupe reads "
                             f"(1 to {BUNDLE_FORMAT_VERSION}).")
        if self.config is not None and not isinstance(self.config, dict):
            raise ValueError(f"config must be a JSON object, got {type(self.config).__name__}.")

    @property
    def n_out(self) -> int:
        return len(self.vocab)

    def model_config(self) -> ModelConfig:
        """The config that rebuilds this model's modules (weights come from the bundle, not a download)."""
        return ModelConfig(arch=self.arch, pretrained=False, head=self.head, dropout=self.dropout)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "n_out": self.n_out}

    @classmethod
    def from_dict(cls, data: object) -> BundleMeta:
        """Validate and rebuild; any problem becomes a BundleError that says what is wrong."""
        if not isinstance(data, Mapping):
            raise BundleError(f"Not a Loupe bundle: metadata should be a JSON object, got {type(data).__name__}.")
        data = dict(data)
        n_out = data.pop("n_out", None)
        try:
            meta = cls(**data)
        except (TypeError, ValueError) as err:
            raise BundleError(f"Not a valid Loupe bundle: {err}") from err
        if n_out is not None and n_out != meta.n_out:
            raise BundleError(f"Not a valid Loupe bundle: n_out={n_out} but the vocab has {meta.n_out} classes.")
        return meta


def _is_number(value: object) -> bool:
    """A finite int or float, not a bool (JSON's true is no number here) and not NaN or infinity."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _class_names(vocab: object) -> list[str]:
    """A list of distinct, non-empty class names; a string is not a list (\"abc\" is not three classes)."""
    if not isinstance(vocab, (list, tuple)) or not all(isinstance(v, str) and v for v in vocab):
        raise ValueError(f"vocab must be a list of class names, got {str(vocab)[:60]!r}.")
    if not vocab:
        raise ValueError("vocab is empty; a model needs at least one class.")
    if len(set(vocab)) != len(vocab):
        raise ValueError("vocab has duplicate class names.")
    return list(vocab)


def _channel_values(name: str, values: object) -> tuple[float, float, float]:
    """Three finite numbers, one per colour channel."""
    if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(_is_number(v) for v in values):
        raise ValueError(f"{name} needs 3 finite numbers, one per colour channel, got {str(values)[:60]!r}.")
    return tuple(float(v) for v in values)


@dataclass
class Bundle:
    """A loaded model ready for inference."""

    model: nn.Sequential  # in eval mode
    meta: BundleMeta
    path: Path | None = field(default=None)  # the model.safetensors it came from, if any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def bundle_file(path: str | Path) -> Path:
    """A bundle path is either the .safetensors file itself or a directory holding model.safetensors."""
    path = Path(path).expanduser()
    return path if path.suffix == ".safetensors" else path / BUNDLE_FILE


def save_bundle(path: str | Path, model: nn.Module, meta: BundleMeta) -> Path:
    """Write weights + metadata atomically to one safetensors file; returns the file written."""
    target = bundle_file(path)
    # safetensors wants contiguous CPU tensors; detach so no autograd state is touched.
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {_META_KEY: json.dumps(meta.to_dict())}
    return atomic_write(target, lambda tmp: safetensors.torch.save_file(state, str(tmp), metadata=metadata))


def read_bundle_meta(path: str | Path) -> BundleMeta:
    """Just the metadata of a bundle: cheap, reads only the safetensors header."""
    file = bundle_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"No model bundle at {file}")
    try:
        with safetensors.safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for anything malformed
        raise BundleError(f"Not a Loupe bundle: {file} is not a safetensors file ({err}).") from err
    if _META_KEY not in header:
        raise BundleError(f"Not a Loupe bundle: {file} has no {_META_KEY!r} metadata.")
    try:
        data = json.loads(header[_META_KEY])
    except json.JSONDecodeError as err:
        raise BundleError(f"Not a Loupe bundle: the metadata in {file} is not valid JSON ({err}).") from err
    return BundleMeta.from_dict(data)


def load_bundle(path: str | Path, device: torch.device | str | None = None) -> Bundle:
    """Load a bundle saved by `save_bundle`, in eval mode on `device` (default: the best available)."""
    meta = read_bundle_meta(path)
    file = bundle_file(path)
    device = resolve_device() if device is None else torch.device(device)
    state = safetensors.torch.load_file(str(file))
    # Build on the meta device: no time wasted on random init, the bundle supplies every tensor.
    with torch.device("meta"):
        model = build_model(meta.model_config(), meta.n_out)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise BundleError(f"The weights in {file} do not match its metadata ({meta.arch}, {meta.head}): {err}") from err
    return Bundle(model=model.to(device).eval(), meta=meta, path=file)


# ---------------------------------------------------------------------------------------------- prediction


def preprocess(bundle: Bundle, images: Sequence[Image.Image]) -> torch.Tensor:
    """A normalised float batch on the bundle's device, made exactly as validation batches are made."""
    side, size = presize_side(bundle.meta.size), bundle.meta.size
    raw = torch.stack([torch.from_numpy(presize(upright_rgb(im), side)) for im in images])
    return normalize(resize_batch(raw.to(bundle.device), size), bundle.meta.mean, bundle.meta.std)


def predict_probs(bundle: Bundle, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
    """Probabilities [N, n_out] on the CPU: softmax for single-label, sigmoid for multi-label."""
    meta, model = bundle.meta, bundle.model.eval()
    outs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            logits = model(preprocess(bundle, images[start : start + batch_size])).float()
            probs = logits.softmax(dim=1) if meta.task == "single_label" else logits.sigmoid()
            outs.append(probs.cpu())
    return torch.cat(outs) if outs else torch.empty(0, meta.n_out)


def predict(
    bundle: Bundle, images: Sequence[Image.Image], top_k: int = 3, batch_size: int = 64
) -> list[list[tuple[str, float]]]:
    """For each image, the top_k (label, probability) pairs, most probable first."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    probs = predict_probs(bundle, images, batch_size)
    k = min(top_k, bundle.meta.n_out)
    values, indices = probs.topk(k, dim=1)  # topk returns values sorted descending
    vocab = bundle.meta.vocab
    return [
        [(vocab[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())]
        for row_p, row_i in zip(values, indices)
    ]
