"""Architectures, pretrained weights, body/head, freezing and parameter groups (the bundle and prediction: core.bundle).

A Loupe model is always `nn.Sequential(body, head)`: the body is a torchvision backbone cut before its
pooling/classifier (it returns a [B, C, H, W] feature map), the head is new and sized to the classes.
That fixed shape is what lets freeze/unfreeze and parameter groups work the same for every architecture.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import safetensors
import safetensors.torch
import torch
from torch import nn
from torchvision.models import get_model, get_model_weights

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
from core.fileio import create_file

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
