"""One batch on the device and one optimizer step on it, shared by training, the LR finder and inference.

How a JPEG becomes a batch on the device: the loader's workers decode and presize each file once
(core.data.ImageDataset, cached by core.imagecache) and stack uint8 squares; `OnDevice.batch` moves the
bytes to the device, then augments (training) or resizes (evaluation), normalises and lays them out
channels-last there. `TrainStep` runs forward and backward under autocast, in micro-batches once memory
ran out, and updates through a gradient scaler (active for fp16). `get_preds` is the inference pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from core import distributed
from core.augment import BatchAugment, normalize, resize_batch

if TYPE_CHECKING:
    from core.train import TrainConfig


@dataclass(frozen=True)
class OnDevice:
    """Where and how batches are computed: device, image size, autocast dtype, memory layout, augmentation."""

    device: torch.device
    size: int
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    augment: BatchAugment | None = None

    @classmethod
    def for_config(cls, cfg: TrainConfig, device: torch.device) -> OnDevice:
        """Mixed precision on CUDA only (bf16 where supported, else fp16); channels-last on CUDA and CPU."""
        amp = None
        if cfg.mixed_precision and device.type == "cuda":
            amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        channels_last = cfg.channels_last and device.type in ("cuda", "cpu")
        return cls(device, cfg.data.size, amp, channels_last, BatchAugment.from_config(cfg.data))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def place(self, model: nn.Module) -> nn.Module:
        """The model on the device, in the layout batches will have."""
        model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def batch(self, x: torch.Tensor, y: torch.Tensor, train: bool = False,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 batch in, normalised float batch out, on the device: augmented (train) or resized (eval).
        The bytes cross to the GPU before any float work, a quarter of the traffic of float images.
        `generator` (a CPU one) draws the augmentation: test-time augmentation passes a seeded one."""
        x = x.to(self.device, non_blocking=True)
        x = normalize(self.augment(x, generator) if train and self.augment else resize_batch(x, self.size))
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt), y.to(self.device, non_blocking=True)


def make_optimizer(cfg: TrainConfig, groups: list[list[nn.Parameter]], lrs: list[float]) -> torch.optim.Optimizer:
    """AdamW (fastai's betas and eps) or SGD with momentum, one parameter group per model group."""
    param_groups_ = [{"params": g, "lr": lr} for g, lr in zip(groups, lrs)]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups_, lr=lrs[-1], momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(param_groups_, lr=lrs[-1], betas=(0.9, 0.99), eps=1e-5, weight_decay=cfg.weight_decay)


def make_loss(cfg: TrainConfig, multi_label: bool) -> nn.Module:
    """Per-item losses (reduction='none'): their mean trains the model, each one is kept for top losses."""
    if multi_label:
        return nn.BCEWithLogitsLoss(reduction="none")
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="none")


def per_item(losses: torch.Tensor) -> torch.Tensor:
    """Multi-label losses come per item and label; an item's loss is their mean."""
    return losses.mean(dim=1) if losses.ndim == 2 else losses


class TrainStep:
    """One optimizer step on one uint8 batch: `backward` leaves the gradients of the batch's mean loss and
    returns the per-item losses; `update` applies them. Between the two a caller may look at the loss (the
    training loop agrees on it across processes and checks for divergence)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, on_device: OnDevice, micro_batch: int | None = None,
                 on_oom: Callable[[int, int], None] | None = None, can_shrink: bool = True):
        self.model, self.loss_fn, self.on_device = model, loss_fn, on_device
        self.micro_batch = micro_batch  # images per forward pass once memory ran out (None: the whole batch)
        self.on_oom = on_oom or (lambda micro_batch, batch: None)
        self.can_shrink = can_shrink  # under DDP the other ranks wait in the gradient all-reduce: no retrying
        self.scaler = torch.amp.GradScaler(on_device.device.type, enabled=on_device.amp_dtype == torch.float16)

    def backward(self, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> torch.Tensor:
        x, y = self.on_device.batch(x, y, train=True)
        while True:
            try:
                return self._forward_backward(x, y, opt)
            except torch.OutOfMemoryError:
                self._shrink(len(x), opt)

    def update(self, opt: torch.optim.Optimizer) -> None:
        self.scaler.step(opt)
        self.scaler.update()

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> torch.Tensor:
        """Gradients of the batch's mean loss, in micro-batches when memory ran short: the same step, in pieces."""
        opt.zero_grad(set_to_none=True)
        chunk = self.micro_batch or len(x)
        pieces = []
        for start in range(0, len(x), chunk):
            with self.on_device.autocast():
                losses = per_item(self.loss_fn(self.model(x[start : start + chunk]), y[start : start + chunk]))
            self.scaler.scale(losses.sum() / len(x)).backward()
            pieces.append(losses.detach())
        return torch.cat(pieces)

    def _shrink(self, batch: int, opt: torch.optim.Optimizer) -> None:
        """Out of memory: halve the images per forward pass and retry the step (the batch size the schedule
        and the optimizer see stays the same); below two images BatchNorm cannot train, so give up clearly."""
        opt.zero_grad(set_to_none=True)
        if self.on_device.device.type == "cuda":
            torch.cuda.empty_cache()
        if not self.can_shrink:
            raise RuntimeError(
                f"Out of memory at batch size {batch} per process; shrinking the batch is not supported under "
                "DDP. Lower the batch size (it is per process), the image size, or choose a smaller architecture."
            )
        half = (self.micro_batch or batch) // 2
        if half < 2:
            raise RuntimeError(
                "Out of memory even at 2 images per step; lower the image size or choose a smaller architecture."
            )
        self.micro_batch = half
        self.on_oom(half, batch)


class SmoothedLoss:
    """Debiased exponential moving average of the loss, as fastai's recorder and LR finder use."""

    def __init__(self, beta: float = 0.98):
        self.beta, self.avg, self.count = beta, 0.0, 0

    def update(self, value: float) -> float:
        self.count += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * value
        return self.value

    @property
    def value(self) -> float:
        return self.avg / (1 - self.beta**self.count) if self.count else math.nan


# ---------------------------------------------------------------- inference


@dataclass
class Preds:
    """Outputs of one inference pass, in loader order."""

    logits: torch.Tensor  # [N, C] float32 on the CPU
    targets: torch.Tensor  # [N] class indices or [N, C] multi-hot
    losses: torch.Tensor  # [N] per-item loss
    ids: torch.Tensor  # [N] item indices in the data source


def get_preds(model: nn.Module, loader: DataLoader, device: OnDevice, loss_fn: nn.Module,
              augment_with: torch.Generator | None = None) -> Preds:
    """Logits, targets and per-item losses over a loader, in eval mode under inference_mode. The model must
    already be on the device (`OnDevice.place`). With `augment_with` (a seeded CPU generator) every batch gets
    the training augmentation drawn from it, the model still in eval mode: one pass of test-time augmentation."""
    model.eval()
    outs, targets, losses, ids = [], [], [], []
    with torch.inference_mode():
        for batch in loader:
            if batch is None:
                continue
            x, y = device.batch(batch[0], batch[1], train=augment_with is not None, generator=augment_with)
            with device.autocast():
                logits = model(x).float()
            outs.append(logits.cpu())
            targets.append(batch[1])
            losses.append(per_item(loss_fn(logits, y)).float().cpu())
            ids.append(batch[2])
    if not outs:
        n = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features  # the head's classes
        return Preds(torch.empty(0, n), torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long))
    return Preds(torch.cat(outs), torch.cat(targets), torch.cat(losses), torch.cat(ids))


def first_of_each(ids: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each id, in order of appearance."""
    first = np.unique(ids.cpu().numpy(), return_index=True)[1]  # sorted by id: sort again for appearance
    return torch.from_numpy(np.sort(first)).long()


def gather_preds(preds: Preds) -> Preds:
    """Every rank's predictions on its shard, on every rank, each item once (shard padding repeats a few):
    metrics over them equal those of one process evaluating the whole set. Alone: the predictions as they are."""
    if not distributed.active():
        return preds
    ids = distributed.all_gather_varlen(preds.ids)
    first = first_of_each(ids)
    parts = (preds.logits, preds.targets, preds.losses)
    logits, targets, losses = (distributed.all_gather_varlen(p)[first] for p in parts)
    return Preds(logits, targets, losses, ids[first])
