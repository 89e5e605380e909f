"""The learning-rate finder: an exponential sweep over mini-batches, and suggestions as pure functions.

The suggestions follow fastai's definitions on the smoothed curve with both ends dropped, because both
are noise: the last five points (as fastai) and the first fifth (fastai drops a tenth). At the first
fifth's rates (1e-7 to 4e-6 on the default range) the weights barely move while the smoothed curve still
averages its first few batches, and a "steep" suggestion of 2e-6 from that wiggle trains nothing. Only
suggestions inside the stretch where the loss really falls are offered (`descent`): not from a flat
start, not past the minimum, where training diverges.

The sweep is sized to the data and stops once the answer is clear (see `sweep_steps` and `diverged`),
and `estimate_seconds` says before it starts how long it will take.
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from torchvision.models import get_model_weights

from core.model import freeze, param_groups, unfreeze
from core.schedule import apply_rates, sweep_lr
from core.step import SmoothedLoss, TrainStep, make_optimizer
from core.train import Learner

SUGGESTIONS = ("valley", "steep", "minimum", "slide")
MIN_SWEEP_STEPS = 40  # five points per decade from 1e-7 to 10: the fewest that still show the curve's shape
STEPS_PER_BATCH = 4  # a sweep of at most this many passes over the training data, unless that is under the minimum
DIVERGENCE = 4.0  # fastai's stop: the loss past four times its lowest value
WARM_UP = 5  # the first 1/WARM_UP of a sweep is noise, never a suggestion
MIN_USEFUL_LR = 1e-5  # below this a few epochs barely move the weights: never a suggestion
MIN_DROP = 0.1  # a sweep whose loss falls by less than this share of its peak found nothing to suggest


@dataclass
class LRFindResult:
    lrs: list[float]  # learning rate of each step of the sweep
    losses: list[float]  # smoothed (debiased EMA) loss after that step
    suggestions: dict[str, float] = field(default_factory=dict)  # method name -> suggested learning rate
    planned: int = 0  # steps the sweep was sized for (it stops earlier once the loss diverges)

    def to_dict(self) -> dict:
        return {"lrs": self.lrs, "losses": self.losses, "suggestions": self.suggestions, "planned": self.planned}


def _trim(lrs, losses) -> tuple[np.ndarray, np.ndarray]:
    """The curve without its first fifth and its last five points (see the module docstring)."""
    n = len(lrs)
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    if n > 20:
        lrs, losses = lrs[n // WARM_UP : -5], losses[n // WARM_UP : -5]
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
    """Where the loss falls fastest per unit of log learning rate, measured over a few points on each side:
    a slope between neighbours only would pick the biggest wiggle of the noisy start."""
    lrs, losses = _trim(lrs, losses)
    half = max(1, len(lrs) // 20)
    if len(lrs) <= 2 * half:
        raise ValueError("too few points for a slope")
    log_lrs = np.log(lrs)
    slopes = (losses[2 * half :] - losses[: -2 * half]) / (log_lrs[2 * half :] - log_lrs[: -2 * half])
    return float(lrs[half + int(np.argmin(slopes))])


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


def descent(lrs, losses) -> tuple[float, float] | None:
    """The learning rates over which the loss really falls: from the last point still within a tenth of the
    way down from the highest loss before the minimum, to the minimum. None when the loss never falls by a
    tenth of that highest loss."""
    lrs, losses = _trim(lrs, losses)
    if len(losses) < 3:
        return None
    lowest = int(np.argmin(losses))
    top = float(np.max(losses[: lowest + 1]))  # from scratch the loss often rises first: fall from that peak
    drop = top - float(losses[lowest])
    if drop < MIN_DROP * abs(top):
        return None
    still_high = np.flatnonzero(losses[:lowest] >= losses[lowest] + 0.9 * drop)
    begin = int(still_high[-1]) if len(still_high) else 0
    return float(lrs[begin]), float(lrs[lowest])


def suggest(lrs, losses) -> dict[str, float]:
    """The usable suggestions for one sweep: those inside the descent and not below MIN_USEFUL_LR; a method
    that cannot decide is left out."""
    span = descent(lrs, losses)
    if span is None:
        return {}
    methods: dict[str, Callable] = {"valley": valley, "steep": steep, "minimum": minimum, "slide": slide}
    out = {}
    for name, method in methods.items():
        try:
            value = method(lrs, losses)
        except (ValueError, IndexError):
            continue
        if math.isfinite(value) and max(span[0], MIN_USEFUL_LR) * (1 - 1e-9) <= value <= span[1] * (1 + 1e-9):
            out[name] = value
    return out


# ---------------------------------------------------------------- sizing and stopping the sweep


def sweep_steps(n_batches: int, num_it: int = 100) -> int:
    """Steps for a sweep over data of `n_batches` batches per epoch: at most `num_it` (fastai's 100), fewer for
    small data so the sweep costs a few passes over it, not dozens, but never under MIN_SWEEP_STEPS."""
    return min(num_it, max(MIN_SWEEP_STEPS, STEPS_PER_BATCH * n_batches))


def smoothing_beta(steps: int) -> float:
    """EMA factor that averages over the same share of any sweep: fastai's 0.98 at 100 steps, 0.95 at 40.
    A fixed 0.98 on a short sweep lags by a large share of it and pushes every suggestion too high."""
    return min(0.98, max(0.5, 1 - 2 / max(steps, 1)))


def diverged(raw: Sequence[float], smoothed: Sequence[float], patience: int = 3) -> bool:
    """The sweep has its answer once the loss blows up: a loss that is not finite, fastai's smoothed loss past
    four times its minimum, or the last `patience` raw losses all above four times that minimum and above
    where the sweep started (the smoothed curve lags a few steps behind a blow-up; the raw loss does not)."""
    if not raw or not math.isfinite(raw[-1]) or not math.isfinite(smoothed[-1]):
        return bool(raw)
    best = min(smoothed)
    if smoothed[-1] > DIVERGENCE * best:
        return True
    recent = raw[-patience:]
    return len(raw) > patience and all(v > max(DIVERGENCE * best, smoothed[0]) for v in recent)


# ---------------------------------------------------------------- how long a sweep will take


def forward_gflops(arch: str) -> float:
    """GFLOPs of one forward pass of `arch` on one 224-px image (torchvision's figure for its weights)."""
    return float(get_model_weights(arch).DEFAULT.meta["_ops"])


def step_work(config: dict, frozen: bool) -> float:
    """GFLOPs of one training step of `config` (a config.json dict): a forward pass, and a backward pass that
    costs about one forward with the body frozen (gradients of its norm layers only) and two without."""
    data, model = config.get("data", {}), config.get("model", {})
    size, batch = int(data.get("size", 224)), int(data.get("batch_size", 64))
    return forward_gflops(model.get("arch", "resnet18")) * (size / 224) ** 2 * batch * (2 if frozen else 3)


def sweep_frozen(config: dict) -> bool:
    """Whether a sweep for `config` freezes the body, as `lr_find` does for fine-tuning."""
    return config.get("schedule") == "fine_tune" and int(config.get("freeze_epochs") or 0) > 0


def step_frozen(config: dict, event: dict) -> bool:
    """Whether the step an event reports trained with the body frozen."""
    if event.get("event") == "lr_find":
        return sweep_frozen(config)
    return sweep_frozen(config) and int(event.get("epoch", 0)) < int(config.get("freeze_epochs") or 0)


def measured_speed(config: dict, events: Sequence[dict]) -> float | None:
    """GFLOP/s this machine trained a run's steps at (the median over its steps), from the times of its
    batch or lr_find events; None when it has fewer than three timed steps."""
    steps = [e for e in events if e.get("event") in ("batch", "lr_find") and isinstance(e.get("time"), (int, float))]
    speeds = []
    for before, after in itertools.pairwise(steps):
        gap = after["time"] - before["time"]
        same_epoch = after.get("event") == "lr_find" or after.get("epoch") == before.get("epoch")
        if gap > 0 and same_epoch and after.get("event") == before.get("event"):
            speeds.append(step_work(config, step_frozen(config, after)) / gap)
    return statistics.median(speeds) if len(speeds) >= 2 else None


def estimate_seconds(config: dict, steps: int, speed: float, startup: float) -> float:
    """Seconds a sweep of `steps` steps for `config` takes at `speed` GFLOP/s, after `startup` seconds."""
    return startup + steps * step_work(config, sweep_frozen(config)) / speed


# ---------------------------------------------------------------- the sweep


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
    stop once the loss diverges (`diverged`), and put the model back exactly as it was.

    `frozen` None freezes the body when the config fine-tunes (as fastai's learner starts frozen).
    """
    if frozen is None:
        frozen = sweep_frozen(learner.cfg.to_dict())
    model = learner.model
    saved_model = copy.deepcopy(model.state_dict())
    saved_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    (freeze if frozen else unfreeze)(model)
    groups = param_groups(model, learner.cfg.model.arch)
    opt = make_optimizer(learner.cfg, groups, [start_lr] * len(groups))
    step = TrainStep(model, learner.loss_fn, learner.on_device)  # the training loop's step, gradient scaler included
    smooth = SmoothedLoss(beta=smoothing_beta(num_it))
    lrs, raw, losses = [], [], []
    model.train()
    try:
        for i, (x, y, _) in zip(range(num_it), _batches(learner.dls.train)):
            lr = sweep_lr(i, num_it, start_lr, end_lr)
            apply_rates(opt, [lr] * len(opt.param_groups))
            raw.append(step.backward(x, y, opt).mean().item())
            step.update(opt)
            lrs.append(lr)
            losses.append(smooth.update(raw[-1]))
            if on_step:
                on_step(lr, losses[-1])
            if diverged(raw, losses):
                break
    finally:
        model.load_state_dict(saved_model)
        for name, p in model.named_parameters():
            p.requires_grad_(saved_grad[name])
        model.zero_grad(set_to_none=True)
    finite = [v if math.isfinite(v) else None for v in losses]  # JSON has no NaN
    return LRFindResult(lrs, finite, suggest(lrs, losses), planned=num_it)
