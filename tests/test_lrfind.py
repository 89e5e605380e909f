"""The LR finder's pure parts (suggestions, stopping, sizing, timing) on made-up curves, and one real sweep."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from core import runs
from core.job import DEFAULT_STARTUP, LR_FIND_FILE, estimate_sweep, run_lr_find
from core.lrfind import (
    MIN_SWEEP_STEPS,
    descent,
    diverged,
    estimate_seconds,
    lr_find,
    measured_speed,
    smoothing_beta,
    steep,
    step_work,
    suggest,
    sweep_steps,
)
from core.step import SmoothedLoss
from core.train import Learner, setup_training
from tests.conftest import tiny_config


def _sweep(n: int = 100, dip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A smoothed sweep from 1e-7 to 10: flat at 1.1 with a sharp one-step dip early on (the noise a few images
    give the smoothed curve's first points), falling from 1e-4 to 1e-2, then blowing up."""
    lrs = np.logspace(-7, 1, n)
    x = np.log10(lrs)
    losses = np.where(x < -4, 1.1, np.where(x < -2, 1.1 - 0.4 * (x + 4), 0.3 + 2 * (x + 2) ** 2))
    if dip:
        losses[16] -= 0.3  # at 2.8e-6: inside what fastai keeps after dropping the first tenth
    return lrs, losses


def test_suggestions_lie_where_the_loss_really_falls():
    lrs, losses = _sweep()
    span = descent(lrs, losses)
    assert span is not None and 5e-5 <= span[0] <= 1.5e-4 and 5e-3 <= span[1] <= 2e-2
    found = suggest(lrs, losses)
    assert {"valley", "steep"} <= found.keys()
    for name, lr in found.items():
        assert span[0] <= lr <= span[1], (name, lr)
    # the noisy dip at 2.8e-6 is the biggest step-to-step drop of the curve, yet not its steepest stretch
    assert np.argmin(np.diff(losses[10:-5])) + 10 in (15, 16)
    assert steep(lrs, losses) > 1e-4


def test_a_curve_that_never_falls_suggests_nothing():
    lrs, _ = _sweep()
    flat = 1.1 + 0.02 * np.sin(np.arange(len(lrs)))  # wiggles, no descent
    assert descent(lrs, flat) is None
    assert suggest(lrs, flat) == {}


def test_the_sweep_stops_once_the_loss_has_clearly_diverged():
    smoothed, raw = [], []
    smooth = SmoothedLoss(beta=smoothing_beta(100))
    for value in [1.1, 1.0, 0.8, 0.5, 0.4, 0.45, 0.6]:  # falling, then rising but still below where it began
        raw.append(value)
        smoothed.append(smooth.update(value))
        assert not diverged(raw, smoothed)
    for value in [3.0, 5.0]:  # above four times the best and above the start: two steps could still be noise
        raw.append(value)
        smoothed.append(smooth.update(value))
        assert not diverged(raw, smoothed)
    raw.append(9.0)
    smoothed.append(smooth.update(9.0))
    assert smoothed[-1] < 4 * min(smoothed)  # fastai's smoothed rule would go on for many more steps
    assert diverged(raw, smoothed)
    assert diverged([1.0, math.nan], [1.0, math.nan])
    assert diverged([1.0, 1.0, 1.0], [1.0, 0.2, 0.9])  # fastai's rule: smoothed past four times its minimum


def test_sweeps_are_sized_to_the_data():
    assert sweep_steps(1) == MIN_SWEEP_STEPS  # a tiny dataset: enough points for a curve, not 100 passes over it
    assert sweep_steps(12) == 48
    assert sweep_steps(1000) == 100  # never more than fastai's 100
    assert sweep_steps(1000, num_it=30) == 30
    assert smoothing_beta(100) == pytest.approx(0.98)  # fastai's
    assert smoothing_beta(40) < smoothing_beta(100)  # a short sweep averages over as large a share of itself


def test_step_times_of_a_run_give_the_speed_that_estimates_a_sweep():
    config = tiny_config(Path("unused")).to_dict()
    events = [{"event": "lr_find", "time": 100.0 + 0.5 * i, "lr": 1e-7, "loss": 1.0} for i in range(6)]
    speed = measured_speed(config, events)
    assert speed == pytest.approx(step_work(config, frozen=False) / 0.5)
    assert estimate_seconds(config, 40, speed, startup=7.0) == pytest.approx(7.0 + 40 * 0.5)
    # training batches: the gap across an epoch boundary (validation) is not a step; a frozen step costs less
    batches = [{"event": "batch", "epoch": e, "time": t} for e, t in [(0, 0.0), (0, 1.0), (0, 2.0), (1, 30.0),
                                                                       (1, 31.0), (1, 32.0)]]
    assert measured_speed(config, batches) == pytest.approx(step_work(config, frozen=False) / 1.0)
    fine_tune = {**config, "schedule": "fine_tune", "freeze_epochs": 1}
    assert step_work(fine_tune, frozen=True) < step_work(fine_tune, frozen=False)
    assert measured_speed(config, events[:2]) is None  # one gap is no measurement


def test_estimate_comes_from_the_newest_timed_run_else_a_rough_guess(tmp_path: Path, demo_dataset: Path):
    cfg = tiny_config(demo_dataset)
    guess = estimate_sweep(cfg, n_train=20, runs_root=tmp_path)
    assert guess.measured_on is None and guess.steps == MIN_SWEEP_STEPS and guess.seconds > 0
    run_dir = runs.create(cfg.to_dict(), root=tmp_path)
    with runs.EventWriter(run_dir, fsync=False) as writer:
        for _ in range(5):
            writer.emit("lr_find", lr=1e-3, loss=1.0)
            time.sleep(0.05)
    estimate = estimate_sweep(cfg, n_train=20, runs_root=tmp_path)
    assert estimate.measured_on == run_dir.name
    times = [e["time"] for e in runs.load_events(run_dir, "lr_find")]
    per_step = float(np.median(np.diff(times)))
    assert estimate.seconds - 40 * per_step == pytest.approx(DEFAULT_STARTUP, abs=1.0)  # no sweep start-up timed


def test_a_real_sweep_stops_when_the_loss_blows_up_and_records_its_plan(tmp_path: Path, demo_dataset: Path):
    cfg = tiny_config(demo_dataset, data={"size": 16})
    learner = Learner(cfg, setup_training(cfg))
    result = lr_find(learner, num_it=60, frozen=False)
    assert len(result.lrs) < 60 and result.lrs[-1] < 10  # stopped before the end of the range
    assert result.planned == 60
    run_dir = runs.create(tiny_config(demo_dataset, data={"size": 16}).to_dict(), root=tmp_path)
    result = run_lr_find(run_dir)  # no step count given: sized to the data
    [start] = runs.load_events(run_dir, "lr_find_start")
    assert start["steps"] == sweep_steps(start["n_batches"]) == result.planned
    assert json.loads((run_dir / LR_FIND_FILE).read_text())["planned"] == result.planned
    assert runs.load_events(run_dir, "cache")  # the images were decoded once, for the run that follows
