"""The learning-rate finder: an exponential sweep over mini-batches, and suggestions as pure functions.

The suggestions follow fastai's definitions and are computed on the smoothed curve with the first
tenth and the last five points dropped, as fastai does, because both ends are noise.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from core.model import freeze, param_groups, unfreeze
from core.train import Learner, SmoothedLoss, make_optimizer, per_item

SUGGESTIONS = ("valley", "steep", "minimum", "slide")


@dataclass
class LRFindResult:
    lrs: list[float]  # learning rate of each step of the sweep
    losses: list[float]  # smoothed (debiased EMA) loss after that step
    suggestions: dict[str, float] = field(default_factory=dict)  # method name -> suggested learning rate

    def to_dict(self) -> dict:
        return {"lrs": self.lrs, "losses": self.losses, "suggestions": self.suggestions}


def _trim(lrs, losses) -> tuple[np.ndarray, np.ndarray]:
    n = len(lrs)
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    if n > 20:
        lrs, losses = lrs[n // 10 : -5], losses[n // 10 : -5]
    keep = np.isfinite(losses)
    return lrs[keep], losses[keep]


def valley(lrs, losses) -> float:
    """fastai's default: the middle of the longest stretch over which the loss keeps falling."""
    lrs, losses = _trim(lrs, losses)
    n = len(losses)
    run = [1] * n  # length of the longest decreasing subsequence ending at i
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[end] < run[i]:
            end, start = i, i - run[i]
    third = (end - start) / 3
    return float(lrs[max(0, start + int(third) + int(third / 2))])


def steep(lrs, losses) -> float:
    """Where the loss falls fastest per step in log learning rate."""
    lrs, losses = _trim(lrs, losses)
    grads = np.diff(losses) / np.diff(np.log(lrs))
    return float(lrs[int(np.argmin(grads))])


def minimum(lrs, losses) -> float:
    """A tenth of the rate with the lowest loss: the classic rule of thumb."""
    lrs, losses = _trim(lrs, losses)
    return float(lrs[int(np.argmin(losses))] / 10)


def slide(lrs, losses, lr_diff: int = 15, thresh: float = 0.005) -> float:
    """Walk left from the end until the loss gradient over `lr_diff` points flattens (fastai's `slide`)."""
    lrs, losses = _trim(lrs, losses)
    grad = np.gradient(losses)
    right, left = -1, -1 - lr_diff
    found = lrs[max(left, -len(lrs))]
    while left >= -len(losses) and abs(grad[right] - grad[left]) > thresh:
        found = lrs[left]
        right, left = right - 1, left - 1
    return float(found)


def suggest(lrs, losses) -> dict[str, float]:
    """Every suggestion for one sweep; a method that cannot decide on a short curve is left out."""
    methods: dict[str, Callable] = {"valley": valley, "steep": steep, "minimum": minimum, "slide": slide}
    out = {}
    for name, method in methods.items():
        try:
            value = method(lrs, losses)
        except (ValueError, IndexError):
            continue
        if math.isfinite(value):
            out[name] = value
    return out


def _batches(loader) -> Iterator:
    """Mini-batches for as long as the sweep wants them, cycling through the epoch order."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(10_000 + epoch)  # an order of its own, not one a training epoch uses
        for batch in loader:
            if batch is not None:
                yield batch
        epoch += 1


def lr_find(
    learner: Learner,
    num_it: int = 100,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    frozen: bool | None = None,
    on_step: Callable[[float, float], None] | None = None,
) -> LRFindResult:
    """Train with the learning rate growing exponentially from start_lr to end_lr over num_it batches,
    stop once the smoothed loss passes 4x its minimum, and put the model back exactly as it was.

    `frozen` None freezes the body when the config fine-tunes (as fastai's learner starts frozen).
    """
    if frozen is None:
        frozen = learner.cfg.schedule == "fine_tune" and learner.cfg.freeze_epochs > 0
    saved_model = copy.deepcopy(learner.model.state_dict())
    saved_grad = {n: p.requires_grad for n, p in learner.model.named_parameters()}
    (freeze if frozen else unfreeze)(learner.model)
    groups = param_groups(learner.model, learner.cfg.model.arch)
    opt = make_optimizer(learner.cfg, groups, [start_lr] * len(groups))
    smooth, best = SmoothedLoss(), math.inf
    lrs, losses = [], []
    learner.model.train()
    try:
        for i, (x, y, _) in zip(range(num_it), _batches(learner.dls.train)):
            lr = start_lr * (end_lr / start_lr) ** (i / max(num_it - 1, 1))
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = learner.to_device(x, y, train=True)
            with learner.autocast():
                loss = per_item(learner.loss_fn(learner.model(x), y)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = smooth.update(loss.item())
            lrs.append(lr)
            losses.append(value)
            if on_step:
                on_step(lr, value)
            best = min(best, value)
            if not math.isfinite(value) or value > 4 * best:
                break
    finally:
        learner.model.load_state_dict(saved_model)
        for name, p in learner.model.named_parameters():
            p.requires_grad_(saved_grad[name])
        learner.model.zero_grad(set_to_none=True)
    finite = [v if math.isfinite(v) else None for v in losses]
    return LRFindResult(lrs, [v for v in finite], suggest(lrs, losses))
