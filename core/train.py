"""Training: the whole run in one config, fastai's schedules on PyTorch's own optimizers.

The caller builds the `Setup` (data, the model on its device, the process group: `setup_training`) and a
`Learner` runs the plan of phases on it (core.schedule: `fine_tune` is a frozen phase then an unfrozen one,
`fit_one_cycle` one phase). Each step is a core.step.TrainStep at the rate core.schedule.lr_at gives it.
Everything the learner does goes out through one callback, `on_event(kind, **fields)`, which the run
process writes to events.jsonl and prints as fastai's epoch table; stopping is a callable checked every step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core import distributed, interpret, runs
from core.bundle import BundleMeta, load_bundle, save_bundle
from core.config import OPTIMIZERS, SCHEDULES, TrainConfig  # noqa: F401 (torch-free there; re-exported here)
from core.data import DataLoaders, make_dataloaders
from core.env import resolve_device, seed_everything
from core.fileio import atomic_write
from core.listing import path_text
from core.model import build_model, freeze, param_groups, unfreeze
from core.rundir import BEST_WEIGHTS_FILE, CHECKPOINT_FILE, RunDir
from core.schedule import Phase, apply_rates, lr_at, momentum_of, peak_lrs, plan
from core.step import (
    OnDevice,
    Preds,
    SmoothedLoss,
    TrainStep,
    first_of_each,
    gather_preds,
    get_preds,
    make_loss,
    make_optimizer,
)

DIVERGENCE_FACTOR = 1000.0  # a loss this many times the first one means training has blown up


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class StopRequested(Exception):
    """A cooperative stop (STOP file or SIGTERM) was seen between batches; a checkpoint was saved."""


def valid_metrics(preds: Preds, multi_label: bool, cfg: TrainConfig) -> dict[str, float]:
    """Valid loss and the task's metrics over one inference pass (only the loss, nan, when it is empty)."""
    if len(preds.ids) == 0:
        return {"valid_loss": math.nan}
    row = {"valid_loss": float(preds.losses.mean())}
    if multi_label:
        row["accuracy_multi"] = interpret.accuracy_multi(preds.logits, preds.targets, thresh=cfg.threshold)
        fbeta = interpret.fbeta_multi(preds.logits, preds.targets, beta=cfg.fbeta, thresh=cfg.threshold)
        row[f"fbeta_{cfg.fbeta:g}"] = fbeta
    else:
        row["error_rate"] = interpret.error_rate(preds.logits, preds.targets)
        row["accuracy"] = interpret.accuracy(preds.logits, preds.targets)
    return row


@dataclass
class Setup:
    """What a Learner trains with, built by the caller (`setup_training` for a run): data, the model on its
    device, how batches reach that device, and this process's place in the group."""

    dls: DataLoaders
    model: nn.Module  # on the device, in its memory layout (`OnDevice.place`)
    on_device: OnDevice
    dist: distributed.DistInfo = field(default_factory=distributed.DistInfo)


def setup_training(cfg: TrainConfig, dls: DataLoaders | None = None) -> Setup:
    """Join the process group (under torchrun; a no-op alone), seed, check and load the data, and build the model
    on the device: from ImageNet weights, or from init_from's run when warm-starting. With `dls` given (a label
    check's fold, over data verified once) the data is not loaded again."""
    dist = distributed.DistInfo.from_env()
    device = distributed.setup(resolve_device(cfg.device))
    seed_everything(cfg.data.seed)
    dls = dls or make_dataloaders(cfg.data, device, dist.rank, dist.world_size)
    # Warm-started, the body comes from the run (init_from), so ImageNet weights would be fetched for nothing.
    start = replace(cfg.model, pretrained=False, weights_path=None) if cfg.init_from else cfg.model
    model = build_model(start, len(dls.vocab))
    if cfg.init_from:
        warm_start(model, cfg.init_from, dls.vocab)
    on_device = OnDevice.for_config(cfg, device)
    model = on_device.place(model)
    if dist.enabled and cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Setup(dls, model, on_device, dist)


@dataclass
class EpochState:
    """Where one epoch stands: what a checkpoint saves (mid-epoch when stopped) and a resume continues from."""

    phase: int  # index of the phase in the plan
    epoch: int  # counted over the whole run, from 0
    batch: int = 0  # batches done this epoch: a resume skips them
    loss_sum: float = 0.0  # the epoch's training loss so far, summed over items
    loss_count: int = 0
    item_ids: list[int] = field(default_factory=list)  # per-item training losses so far (for top losses)
    item_losses: list[float] = field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, state: dict) -> EpochState:
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})

    def add(self, ids: torch.Tensor, losses: torch.Tensor, mean_loss: float, count: int) -> None:
        """One step's items, and its loss (the group's mean over `count` items under DDP)."""
        self.loss_sum, self.loss_count = self.loss_sum + mean_loss * count, self.loss_count + count
        self.item_ids.extend(ids.tolist())
        self.item_losses.extend(losses.float().cpu().tolist())

    @property
    def train_loss(self) -> float:
        return self.loss_sum / max(self.loss_count, 1)

    def gathered(self) -> EpochState:
        """This state with the item losses of every rank (the first of an item's duplicates from shard padding)."""
        ids = distributed.all_gather_varlen(torch.tensor(self.item_ids, dtype=torch.long))
        losses = distributed.all_gather_varlen(torch.tensor(self.item_losses, dtype=torch.float32))
        first = first_of_each(ids)
        return replace(self, item_ids=ids[first].tolist(), item_losses=losses[first].tolist())


class Learner:
    """Runs the phases of a TrainConfig on a Setup; everything it does goes out through `on_event`."""

    def __init__(
        self,
        cfg: TrainConfig,
        setup: Setup,
        on_event: Callable[..., Any] | None = None,
        should_stop: Callable[[], bool] | None = None,
        run_dir: str | Path | None = None,
    ):
        self.cfg, self.dls, self.model = cfg, setup.dls, setup.model
        self.on_device, self.dist = setup.on_device, setup.dist
        self.device = self.on_device.device
        self.loss_fn = make_loss(cfg, self.dls.multi_label)
        self.on_event = on_event or (lambda kind, **f: None)
        self.should_stop = should_stop or (lambda: False)
        self.run_dir = Path(run_dir) if run_dir else None
        self.step = 0  # optimizer steps over the whole run
        self.smooth = SmoothedLoss()
        self.best_valid = math.inf
        self.epochs_since_best = 0
        self.first_loss: float | None = None
        self.micro_batch: int | None = None  # images per forward pass once memory ran out (None: whole batch)
        self.history: list[dict[str, Any]] = []
        self.group_stop = False  # the stop every process agreed on at the last step

    # ---------------------------------------------------------------- the public recipes

    def fit_one_cycle(self, epochs: int, lr_max: float | tuple[float, float], pct_start: float = 0.25) -> list[dict]:
        """Warm up then cosine-anneal the rate while momentum moves the other way (fastai's defaults)."""
        return self.run_phases([Phase(epochs, False, peak_lrs(lr_max, 3), pct_start=pct_start)])

    def fine_tune(self, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1) -> list[dict]:
        """fastai's transfer-learning recipe: frozen body for `freeze_epochs`, then all groups at base_lr/2 spread."""
        cfg = replace(self.cfg, schedule="fine_tune", epochs=epochs, lr=base_lr, freeze_epochs=freeze_epochs)
        return self.run_phases(plan(cfg))

    def fit(self, resume: dict | None = None) -> list[dict]:
        """Train through the phases of the config, from the start or from a checkpoint (`load_checkpoint`)."""
        return self.run_phases(plan(self.cfg), resume)

    # ---------------------------------------------------------------- the loop

    def run_phases(self, phases: list[Phase], resume: dict | None = None) -> list[dict]:
        at = EpochState.from_checkpoint(resume) if resume else EpochState(phase=0, epoch=0)
        if resume:
            self.model.load_state_dict(resume["model"])
            self.step, self.best_valid = resume["step"], resume["best_valid"]
            self.epochs_since_best = resume.get("epochs_since_best", 0)
            self.micro_batch = resume.get("micro_batch")
            self.history = list(resume.get("history", []))
        offset = sum(p.epochs for p in phases[: at.phase])
        for index in range(at.phase, len(phases)):
            start = at if index == at.phase else EpochState(phase=index, epoch=offset)
            if self._run_phase(phases[index], offset, start, resume if index == at.phase else None):
                break
            offset += phases[index].epochs
        return self.history

    def _run_phase(self, phase: Phase, offset: int, at: EpochState, resume: dict | None) -> bool:
        """The phase's epochs from `at`; True when early stopping ended the run."""
        (freeze if phase.frozen else unfreeze)(self.model)
        self.phase, self.opt = phase, make_optimizer(self.cfg, param_groups(self.model, self.cfg.model.arch), phase.lrs)
        trained = distributed.wrap(self.model, self.device)  # after (un)freezing: DDP registers trainable params
        self.stepper = TrainStep(trained, self.loss_fn, self.on_device, self.micro_batch, self._on_oom,
                                 can_shrink=not self.dist.enabled)
        self.phase_start = self.step  # the run's step at this phase's step 0
        if resume:
            self.opt.load_state_dict(resume["optimizer"])
            self.phase_start = self.step - phase_step(resume)
            if resume.get("rng") is not None:
                torch.set_rng_state(resume["rng"])
        self.phase_losses = [r["valid_loss"] for r in self.history if offset <= r["epoch"] < at.epoch]
        for epoch in range(at.epoch, offset + phase.epochs):
            state = at if epoch == at.epoch else EpochState(at.phase, epoch)
            started = time.perf_counter()
            self._train_epoch(state)
            row = {"epoch": epoch, "train_loss": state.train_loss, **self.validate()}
            row["seconds"] = round(time.perf_counter() - started, 3)
            self.phase_losses.append(row["valid_loss"])
            self._end_epoch(row, EpochState(at.phase, epoch + 1))
            if self.cfg.early_stopping and self.epochs_since_best >= self.cfg.early_stopping:
                self.on_event("early_stop", epoch=epoch, best_valid_loss=self.best_valid)
                return True
        return False

    def _train_epoch(self, state: EpochState) -> None:
        self.model.train()
        self.epoch, loader = state.epoch, self.dls.train
        loader.sampler.set_epoch(state.epoch, skip_batches=state.batch, batch_size=loader.batch_size)
        self.steps_per_epoch = state.batch + len(loader)  # the loader's length counts the batches left
        seen: list[int] = []  # this pass's items, to report the ones that could not be read
        for batch_index, batch in enumerate(loader, start=state.batch):
            if batch is None:  # every file of the batch vanished since verification
                continue
            x, y, ids = batch
            seen.extend(ids.tolist())
            apply_rates(self.opt, *lr_at(self.phase, self.step - self.phase_start, self.steps_per_epoch,
                                         self.phase_losses))
            lr, mom = self.opt.param_groups[-1]["lr"], momentum_of(self.opt)  # what this step trains with
            loss = self._train_step(x, y, ids, state)
            self.on_event(
                "batch", step=self.step, epoch=state.epoch, batch=batch_index + 1, n_batches=self.steps_per_epoch,
                loss=loss, smooth_loss=self.smooth.value, lr=lr, mom=mom,
            )
            if self.group_stop:
                distributed.broadcast_buffers(self.model)
                self.save_checkpoint(replace(state.gathered(), batch=batch_index + 1))
                raise StopRequested(f"Stopped at epoch {runs.epoch_number(state.epoch)}, batch {batch_index + 1}.")
        report_skipped(self.dls, state.epoch, seen, self.on_event)
        distributed.broadcast_buffers(self.model)  # one model on every rank before it is evaluated and saved
        gathered = state.gathered()
        self._save_item_losses(state.epoch, gathered.item_ids, gathered.item_losses)

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, state: EpochState) -> float:
        losses = self.stepper.backward(x, y, self.opt)
        # one loss and one stop decision for the whole group (the sums as they are when alone)
        stop = 1.0 if self.should_stop() else 0.0
        summed = distributed.all_reduce(torch.tensor([losses.float().sum().item(), len(losses), stop]))
        value, self.group_stop = (summed[0] / summed[1]).item(), bool(summed[2] > 0)
        self._check_divergence(value, state.epoch)
        self.stepper.update(self.opt)
        self.step += 1
        self.smooth.update(value)
        state.add(ids, losses, value, len(ids) * self.dist.world_size)
        return value

    def _on_oom(self, micro_batch: int, batch: int) -> None:
        self.micro_batch = micro_batch
        self.on_event("oom", epoch=self.epoch, step=self.step, micro_batch=micro_batch, batch_size=batch)

    def _check_divergence(self, loss: float, epoch: int) -> None:
        """NaN or inf, or a thousand times the first loss: nothing useful comes after, so stop and say why."""
        self.first_loss = self.first_loss if self.first_loss is not None else loss
        if math.isfinite(loss) and loss <= DIVERGENCE_FACTOR * max(self.first_loss, 1.0):
            return
        raise TrainingDiverged(
            f"The loss became {loss:.4g} at step {self.step} (epoch {runs.epoch_number(epoch)}); "
            f"the learning rate ({self.opt.param_groups[-1]['lr']:.2e}) is probably too high. "
            "The last good checkpoint is kept."
        )

    def validate(self) -> dict[str, float]:
        """Valid loss and metrics on the validation set, over every process's shard (nan when it is empty)."""
        preds = gather_preds(get_preds(self.model, self.dls.valid, self.on_device, self.loss_fn))
        return valid_metrics(preds, self.dls.multi_label, self.cfg)

    def _end_epoch(self, row: dict, next_epoch: EpochState) -> None:
        improved = row["valid_loss"] < self.best_valid
        if improved:
            self.best_valid, self.epochs_since_best = row["valid_loss"], 0
        else:
            self.epochs_since_best += 1
        self.history.append(row)
        self.on_event("epoch", **row)
        self.save_checkpoint(next_epoch)
        if improved and self.cfg.keep_best and self.run_dir and self.dist.main:
            weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            atomic_write(self.run_dir / BEST_WEIGHTS_FILE, lambda tmp: torch.save(weights, tmp))

    # ---------------------------------------------------------------- checkpoints and files

    def save_checkpoint(self, at: EpochState) -> None:
        """Everything needed to resume at `at`, written atomically: a crash mid-write leaves the previous one."""
        if not self.run_dir or not self.dist.main:
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "phase_step": self.step - self.phase_start,
            "step": self.step,
            "best_valid": self.best_valid,
            "epochs_since_best": self.epochs_since_best,
            "micro_batch": self.micro_batch,
            "history": self.history,
            "rng": torch.get_rng_state(),
            **asdict(at),
        }
        atomic_write(self.run_dir / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))
        self.on_event("checkpoint", epoch=at.epoch, batch=at.batch, step=self.step, file=CHECKPOINT_FILE)

    def _save_item_losses(self, epoch: int, ids: list[int], losses: list[float]) -> None:
        if not self.run_dir or not self.dist.main:
            return
        path = RunDir(self.run_dir).item_losses(epoch)
        arrays = {"item": np.asarray(ids, dtype=np.int64), "loss": np.asarray(losses, dtype=np.float32)}
        atomic_write(path, lambda tmp: _savez(tmp, arrays))

    def export(self, path: str | Path) -> Path:
        """Save the model bundle: weights plus everything prediction needs."""
        model, task = self.cfg.model, "multi_label" if self.dls.multi_label else "single_label"
        meta = BundleMeta(arch=model.arch, head=model.head, dropout=model.dropout, vocab=list(self.dls.vocab),
                          size=self.cfg.data.size, task=task, threshold=self.cfg.threshold, config=self.cfg.to_dict())
        return save_bundle(path, self.model, meta)


def phase_step(checkpoint: dict) -> int:
    """Steps the checkpoint's phase had taken (older checkpoints kept it as their scheduler's last step)."""
    if "phase_step" in checkpoint:
        return checkpoint["phase_step"]
    return checkpoint.get("scheduler", {}).get("last_epoch", 0)


def report_skipped(dls: DataLoaders, epoch: int, seen: list[int], on_event: Callable[..., Any]) -> None:
    """A 'skipped' event when files the epoch should have read were gone or unreadable (the loader
    leaves them out of their batch rather than failing the run)."""
    loader = dls.train
    order = list(loader.sampler)  # the same order the epoch drew: a pure function of seed and epoch
    if loader.drop_last:
        order = order[: len(order) // loader.batch_size * loader.batch_size]
    source_ids = loader.dataset.ids  # the sampler draws dataset positions; batches carry source indices
    missing = sorted({source_ids[k] for k in order} - set(seen))
    if missing:
        files = [path_text(dls.source.files[i]) for i in missing[:20]]
        on_event("skipped", epoch=epoch, split="train", count=len(missing), files=files,
                 reason="moved, deleted or unreadable since the dataset was checked")


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object, or numpy appends ".npz" to the temp name
        np.savez(f, **arrays)


def warm_start(model: nn.Module, source: str | Path, vocab: list[str]) -> None:
    """Start from another run's weights: all of them when the classes match, else the body only."""
    bundle = load_bundle(source, device=torch.device("cpu"))
    if list(bundle.meta.vocab) == list(vocab):
        model.load_state_dict(bundle.model.state_dict())
    else:
        model[0].load_state_dict(bundle.model[0].state_dict())


def load_checkpoint(run_dir: str | Path) -> dict:
    """The resumable state of a run; loaded without unpickling arbitrary objects."""
    return torch.load(Path(run_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def load_best_weights(model: nn.Module, run_dir: str | Path) -> bool:
    path = Path(run_dir) / BEST_WEIGHTS_FILE
    if not path.exists():
        return False
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return True
