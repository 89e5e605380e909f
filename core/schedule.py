"""The learning rate of every step, as pure functions: `lr_at` is the one place it is computed.

A run is a plan of phases (`plan`: fine_tune is a frozen phase then an unfrozen one, one_cycle and plateau are
one phase each). Within a phase the rate of step t is `lr_at(phase, t, ...)`: fastai's one-cycle curve (the
same numbers as PyTorch's OneCycleLR with fastai's defaults), or for plateau the start rate cut by a factor
each time the valid loss stalled (the same cuts as PyTorch's ReduceLROnPlateau). The training loop writes it
into the optimizer before each step (`apply_rates`), so a resume needs only the step, not a scheduler's state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from core.model import lrs_for_groups

if TYPE_CHECKING:
    from core.train import TrainConfig

MAX_MOMENTUM, BASE_MOMENTUM = 0.95, 0.85  # one-cycle moves momentum (AdamW's beta1) against the rate
PLATEAU_THRESHOLD = 1e-4  # plateau: a valid loss must beat the best by this share to count as better
MIN_CUT = 1e-8  # plateau: a cut smaller than this is not made (as PyTorch's eps)


@dataclass
class Phase:
    """One stretch of training under one optimizer and schedule."""

    epochs: int
    frozen: bool
    lrs: list[float]  # peak rate per parameter group (body part 1, body part 2, head)
    kind: str = "one_cycle"  # one_cycle or plateau
    pct_start: float = 0.25
    div: float = 25.0  # one_cycle: start rate = peak / div
    div_final: float = 1e5  # one_cycle: final rate = peak / div_final
    factor: float = 0.2  # plateau: the rate is multiplied by this at each cut
    patience: int = 1  # plateau: epochs without improvement before a cut


def plan(cfg: TrainConfig, n_groups: int = 3) -> list[Phase]:
    """The phases `cfg` trains through; fine_tune is fastai's recipe."""
    lrs = peak_lrs((cfg.lr_min, cfg.lr) if cfg.lr_min else cfg.lr, n_groups)
    if cfg.schedule == "one_cycle":
        return [Phase(cfg.epochs, False, lrs, pct_start=cfg.pct_start)]
    if cfg.schedule == "plateau":
        return [Phase(cfg.epochs, False, lrs, kind="plateau", factor=cfg.plateau_factor, patience=cfg.plateau_patience)]
    phases = []
    if cfg.freeze_epochs:
        phases.append(Phase(cfg.freeze_epochs, True, lrs_for_groups(cfg.lr, n_groups), pct_start=0.99))
    base = cfg.lr / 2  # fastai halves the rate once the body is unfrozen
    phases.append(Phase(cfg.epochs, False, lrs_for_groups((base / 100, base), n_groups), pct_start=0.3, div=5.0))
    return phases


def peak_lrs(lr: float | tuple[float, float], n_groups: int) -> list[float]:
    """Rates per group for one_cycle and plateau, as fastai's fit_one_cycle(lr_max) reads lr_max: one rate
    sets every group to it, (lo, hi) spreads like slice(lo, hi). Not slice(lr)'s lr/10 for the body: a body
    trained from scratch would learn at a tenth of the rate, and underfit (docs/benchmarks.md, label noise)."""
    return lrs_for_groups(lr if isinstance(lr, tuple) else (lr, lr), n_groups)


def lr_at(
    phase: Phase, t: int, steps_per_epoch: int, valid_losses: Sequence[float] = ()
) -> tuple[list[float], float | None]:
    """The rate of every parameter group at step `t` of `phase` (counted from 0), and the momentum (None: the
    optimizer's own). Plateau rates depend on the valid losses of the phase's finished epochs only."""
    if phase.kind == "plateau":
        return [lr * phase.factor ** cuts for lr, cuts in zip(phase.lrs, plateau_cuts(phase, valid_losses))], None
    return one_cycle(phase, t, steps_per_epoch)


def one_cycle(phase: Phase, t: int, steps_per_epoch: int) -> tuple[list[float], float]:
    """Warm up from peak/div to the peak over pct_start of the steps, then anneal to peak/div_final, both on a
    cosine; momentum goes the other way (0.95 -> 0.85 -> 0.95). PyTorch's OneCycleLR, step for step."""
    total = max(1, phase.epochs * steps_per_epoch)
    # A run too short to warm up (e.g. 4 steps at 0.25: the warm-up would end on step 0) only anneals.
    pct_start = phase.pct_start if phase.pct_start * total > 1.0 else 0.5 / total
    warm_end, end = float(pct_start * total) - 1, total - 1
    if t <= warm_end:
        pct = t / warm_end
        lrs = [_cos(peak / phase.div, peak, pct) for peak in phase.lrs]
        return lrs, _cos(MAX_MOMENTUM, BASE_MOMENTUM, pct)
    pct = (t - warm_end) / (end - warm_end)
    lrs = [_cos(peak, peak / phase.div / (phase.div_final / phase.div), pct) for peak in phase.lrs]
    return lrs, _cos(BASE_MOMENTUM, MAX_MOMENTUM, pct)


def _cos(start: float, end: float, pct: float) -> float:
    # PyTorch's _annealing_cos, operation for operation: the same floats as OneCycleLR
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def plateau_cuts(phase: Phase, valid_losses: Sequence[float]) -> list[int]:
    """How often each group's rate has been cut after these epochs' valid losses: once more each time the
    loss has not beaten the best by PLATEAU_THRESHOLD for more than `patience` epochs in a row."""
    best, bad, cuts = math.inf, 0, 0
    for loss in valid_losses:
        if loss < best * (1 - PLATEAU_THRESHOLD):
            best, bad = loss, 0
        else:
            bad += 1
        if bad > phase.patience:
            cuts, bad = cuts + 1, 0
    return [_cuts_made(lr, phase.factor, cuts) for lr in phase.lrs]


def _cuts_made(lr: float, factor: float, cuts: int) -> int:
    made = 0
    while made < cuts and lr * factor**made * (1 - factor) > MIN_CUT:
        made += 1
    return made


def sweep_lr(i: int, steps: int, start_lr: float, end_lr: float) -> float:
    """The LR finder's rate at step `i`: exponential from start_lr to end_lr over `steps` steps."""
    return start_lr * (end_lr / start_lr) ** (i / max(steps - 1, 1))


def apply_rates(opt: torch.optim.Optimizer, lrs: Sequence[float], momentum: float | None = None) -> None:
    """Write one rate per parameter group (and the momentum, AdamW's beta1 or SGD's) into the optimizer."""
    for group, lr in zip(opt.param_groups, lrs, strict=True):
        group["lr"] = lr
        if momentum is None:
            continue
        if "betas" in group:
            group["betas"] = (momentum, *group["betas"][1:])
        else:
            group["momentum"] = momentum


def momentum_of(opt: torch.optim.Optimizer) -> float:
    """The momentum the last group trains with (AdamW's beta1, SGD's momentum)."""
    group = opt.param_groups[-1]
    return group["betas"][0] if "betas" in group else group.get("momentum", 0.0)
