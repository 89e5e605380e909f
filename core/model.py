"""Architectures, pretrained weights, body/head, freezing, parameter groups, the model bundle, and prediction.

A Loupe model is always `nn.Sequential(body, head)`: the body is a torchvision backbone cut before its
pooling/classifier (it returns a [B, C, H, W] feature map), the head is new and sized to the classes.
That fixed shape is what lets freeze/unfreeze and parameter groups work the same for every architecture.
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import safetensors
import safetensors.torch
import torch
from PIL import Image
from torch import nn
from torchvision.models import get_model, get_model_weights

from core.augment import IMAGENET_MEAN, IMAGENET_STD, normalize, presize, presize_side, resize_batch
from core.config import (  # defined there, torch-free; re-exported here
    ARCHS as ARCHS,
)
from core.config import (
    HEADS as HEADS,
)
from core.config import (
    MAX_SIZE as MAX_SIZE,
)
from core.config import (
    MIN_SIZE as MIN_SIZE,
)
from core.config import (
    ArchSpec as ArchSpec,
)
from core.config import (
    ModelConfig as ModelConfig,
)
from core.env import resolve_device
from core.fileio import atomic_write, create_file
from core.images import upright_rgb
from core.rundir import BUNDLE_FILE

TASKS = ("single_label", "multi_label")
BUNDLE_FILENAME = BUNDLE_FILE  # a run directory names its model so (core.rundir)
BUNDLE_FORMAT_VERSION = 1
_META_KEY = "loupe"  # key of our JSON blob inside the safetensors header metadata

# fastai keeps normalisation layers trainable while the body is frozen (`train_bn`): their statistics and
# affine parameters must adapt to the new data, and they are a tiny fraction of the parameters.
NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LayerNorm,  # torchvision's LayerNorm2d (ConvNeXt) subclasses it
)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded (usually: this machine is offline)."""


class UnsafeWeightsError(ValueError):
    """A weights file holds more than tensors, so loading it would mean running arbitrary code."""


class BundleError(ValueError):
    """A file is not a (readable) Loupe model bundle."""


# ---------------------------------------------------------------------------------------------- architectures


def _body_names(full: nn.Module, spec: ArchSpec) -> list[str]:
    """Top-level child names of the torchvision model that make up the body."""
    if spec.body_attr is not None:
        return [spec.body_attr]
    return [name for name, _ in full.named_children()][:-2]  # drop avgpool + fc


def _cut_body(full: nn.Module, spec: ArchSpec) -> nn.Sequential:
    if spec.body_attr is not None:
        return getattr(full, spec.body_attr)
    # Keep the torchvision names (conv1, layer1...) so body keys read like the ImageNet checkpoint's.
    return nn.Sequential(OrderedDict((name, getattr(full, name)) for name in _body_names(full, spec)))


class AdaptiveConcatPool2d(nn.Module):
    """Max-pool and average-pool to 1x1 and concatenate: 2C features, as in fastai."""

    def __init__(self) -> None:
        super().__init__()
        self.mp = nn.AdaptiveMaxPool2d(1)
        self.ap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mp(x), self.ap(x)], dim=1)


def _fastai_head(channels: int, n_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        AdaptiveConcatPool2d(),
        nn.Flatten(),
        nn.BatchNorm1d(2 * channels),
        nn.Dropout(dropout / 2),
        nn.Linear(2 * channels, 512, bias=False),  # bias is redundant before a BatchNorm
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(512),
        nn.Dropout(dropout),
        nn.Linear(512, n_out),
    )


def _linear_head(channels: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, n_out))


def _init_head(head: nn.Module) -> None:
    """fastai's `apply_init(head, kaiming_normal_)`: linear weights kaiming-normal, biases zero, norms untouched."""
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_model(cfg: ModelConfig, n_out: int) -> nn.Sequential:
    """Build `nn.Sequential(body, head)` for `n_out` outputs, loading the starting weights `cfg` asks for."""
    if n_out < 1:
        raise ValueError(f"n_out must be at least 1, got {n_out}.")
    spec = ARCHS[cfg.arch]
    full = get_model(cfg.arch, weights=None)
    state = _starting_weights(cfg)
    if state is not None:
        _load_body_weights(full, spec, state, cfg.arch)
    body = _cut_body(full, spec)
    if cfg.head == "fastai":
        head = _fastai_head(spec.channels, n_out, cfg.dropout)
    else:
        head = _linear_head(spec.channels, n_out)
    _init_head(head)
    return nn.Sequential(body, head)


# ---------------------------------------------------------------------------------------------- weights


def _starting_weights(cfg: ModelConfig) -> Mapping[str, torch.Tensor] | None:
    if cfg.weights_path is not None:
        return load_weights_file(cfg.weights_path)
    if cfg.pretrained:
        return download_pretrained(cfg.arch)
    return None


def pretrained_cache_path(arch: str) -> Path:
    """Where torch hub keeps (or expects) `arch`'s ImageNet weights: <hub dir>/checkpoints/<file of the URL>."""
    url = get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def pretrained_available(arch: str) -> bool:
    """Whether `arch`'s ImageNet weights are on this machine already, so a pretrained run needs no download."""
    return pretrained_cache_path(arch).is_file()


def check_weights_fit(arch: str, state: Mapping[str, torch.Tensor]) -> None:
    """ValueError, saying why, unless `state` holds every tensor of `arch`'s body in the right shapes."""
    spec = ARCHS[arch]
    with torch.device("meta"):  # shapes only: no memory for, and no time spent on, a random init
        full = get_model(arch, weights=None)
    _load_body_weights(full, spec, state, arch, assign=True)


def install_pretrained(arch: str, source: str | Path) -> Path:
    """Check the weights file `source` and put it where a pretrained `arch` run looks for its ImageNet weights
    (the torch hub cache, under torchvision's file name); returns that path.

    The file is read tensors-only (`load_weights_file`) and must fit `arch`'s body. It is stored as the plain
    state dict torchvision's loader reads, whatever it came as (.pth, a wrapped checkpoint, .safetensors).
    A file already in that place is never replaced: the same weights are accepted as they are, different
    ones raise FileExistsError.
    """
    state = load_weights_file(source)
    check_weights_fit(arch, state)
    target = pretrained_cache_path(arch)
    if target.exists():
        if _same_weights(target, state):
            return target
        raise FileExistsError(
            f"There are already other {arch} weights at {target}, and Loupe uses those. To use this file "
            "instead, move that one elsewhere first."
        )
    return create_file(target, lambda tmp: torch.save(state, tmp))


def _same_weights(path: Path, state: Mapping[str, torch.Tensor]) -> bool:
    try:
        existing = load_weights_file(path)
    except (OSError, ValueError):
        return False
    return existing.keys() == state.keys() and all(torch.equal(existing[k], state[k]) for k in state)


def download_pretrained(arch: str) -> Mapping[str, torch.Tensor]:
    """torchvision's DEFAULT ImageNet state dict for `arch`, from the hub cache or downloaded into it."""
    weights = get_model_weights(arch).DEFAULT
    try:
        # load_state_dict_from_url defaults to weights_only=False (torch 2.14), i.e. it would unpickle
        # whatever sits in the cache; ask for tensors only.
        return weights.get_state_dict(progress=False, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:  # URLError is an OSError
        # Read by the command line and by the Train page alike, so in words, not in either one's option names.
        raise WeightsUnavailableError(
            f"Could not get the pretrained ImageNet weights for {arch} from {weights.url} ({err}). "
            f"If this machine is offline, download that file elsewhere and place it at "
            f"{pretrained_cache_path(arch)}, give a local weights file instead, or train from scratch "
            f"(without pretrained weights, best with the one_cycle schedule)."
        ) from err


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a .safetensors file or a PyTorch file, never unpickling arbitrary objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            state = safetensors.torch.load_file(str(path))
        except safetensors.SafetensorError as err:
            raise ValueError(f"{path} is not a valid safetensors file: {err}") from err
    else:
        state = _torch_load_weights_only(path)
    return _as_state_dict(state, path)


def _torch_load_weights_only(path: Path) -> object:
    if not _looks_like_torch_file(path):  # else the weights-only loader calls any stray file "unsafe"
        raise ValueError(f"{path} is not a PyTorch weights file (.pth) nor a .safetensors file.")
    try:
        # weights_only: a .pth is a pickle, and an unrestricted unpickle can run any code in the file.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeWeightsError(
            f"Refused to load {path}: it is not a plain tensor file (the weights-only loader rejected it: "
            f"{str(err).splitlines()[0]}). Loading it fully could run arbitrary code. "
            f"Save just the state_dict, or convert it to .safetensors."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"Could not read {path} as a PyTorch weights file: {err}") from err


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (PyTorch 1.6 on) or, in the legacy format, a pickle (opcode PROTO first)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError:
        return True  # torch.load reports the reading error itself
    return head == b"\x80" or zipfile.is_zipfile(path)


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    # Training checkpoints often wrap the weights; accept the two common wrappers.
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return dict(obj)


def _load_body_weights(
    full: nn.Module, spec: ArchSpec, state: Mapping[str, torch.Tensor], arch: str, assign: bool = False
) -> None:
    """Load the body's tensors strictly into the full torchvision model; the old classifier is ignored.
    `assign` puts the given tensors in place of the model's (needed for a model on the meta device)."""
    names = set(_body_names(full, spec))
    body_state = {k: v for k, v in state.items() if k.split(".", 1)[0] in names}
    if not body_state:
        example = next(iter(full.state_dict()))
        raise ValueError(
            f"The weights have none of {arch}'s body keys (e.g. {example!r}); are they a torchvision {arch} state dict?"
        )
    try:
        missing, unexpected = full.load_state_dict(body_state, strict=False, assign=assign)
    except RuntimeError as err:  # shape mismatches: the weights belong to another architecture
        raise ValueError(f"The weights do not fit {arch}: {err}") from err
    missing = [k for k in missing if k.split(".", 1)[0] in names]
    if missing or unexpected:
        raise ValueError(
            f"The weights do not fit {arch}: missing {missing[:5]} ... ({len(missing)}), "
            f"unexpected {unexpected[:5]} ... ({len(unexpected)})."
        )


# ---------------------------------------------------------------------------------------------- freezing & groups


def _body_params_to_freeze(model: nn.Sequential) -> list[nn.Parameter]:
    """Body parameters that freezing turns off: all but those of normalisation layers."""
    return [
        p
        for module in model[0].modules()
        if not isinstance(module, NORM_TYPES)
        for p in module.parameters(recurse=False)
    ]


def freeze(model: nn.Sequential) -> None:
    """Train only the head (and the body's norm layers, as fastai does)."""
    unfreeze(model)
    for p in _body_params_to_freeze(model):
        p.requires_grad_(False)


def unfreeze(model: nn.Sequential) -> None:
    """Train every parameter."""
    for p in model.parameters():
        p.requires_grad_(True)


def is_frozen(model: nn.Sequential) -> bool:
    """True when no non-norm body parameter is trainable."""
    return not any(p.requires_grad for p in _body_params_to_freeze(model))


def param_groups(model: nn.Sequential, arch: str) -> list[list[nn.Parameter]]:
    """Three groups for discriminative learning rates: early body, late body, head."""
    body, head = model[0], model[1]
    split = ARCHS[arch].split
    if split is None:
        split = len(body) // 2
    return [list(body[:split].parameters()), list(body[split:].parameters()), list(head.parameters())]


def lrs_for_groups(lr: float | tuple[float, float], n_groups: int) -> list[float]:
    """One learning rate per parameter group, following fastai's `slice` rules.

    `(lo, hi)` (fastai's `slice(lo, hi)`) spreads geometrically: lo * (hi/lo) ** (i / (n-1)), so the first
    group gets lo and the last hi. A single `lr` (fastai's `slice(lr)`) gives lr/10 to every group but the
    last and lr to the last: the pretrained body moves gently, the new head at full speed.
    """
    if n_groups < 1:
        raise ValueError(f"n_groups must be at least 1, got {n_groups}.")
    if isinstance(lr, tuple):
        lo, hi = lr
        if lo <= 0 or hi <= 0:
            raise ValueError(f"learning rates must be positive, got {lr!r}.")
        if n_groups == 1:
            return [hi]
        return [lo * (hi / lo) ** (i / (n_groups - 1)) for i in range(n_groups)]
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr!r}.")
    return [lr / 10] * (n_groups - 1) + [lr]


# ---------------------------------------------------------------------------------------------- bundle


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
            raise ValueError(f"bundle format {self.version!r} is not one this Loupe reads (1 to {BUNDLE_FORMAT_VERSION}).")
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
    return path if path.suffix == ".safetensors" else path / BUNDLE_FILENAME


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
