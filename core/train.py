"""Training: the whole run in one config, fastai's schedules on PyTorch's own optimizers and schedulers.

`Learner` holds data, model and device and runs a plan of phases (`fine_tune` is a frozen phase then
an unfrozen one; `fit_one_cycle` and `fit_plateau` are one phase each). Everything it does goes out
through one callback, `on_event(kind, **fields)`, which the run process writes to events.jsonl and
prints as fastai's epoch table; stopping is a callable checked between batches.
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
from torch.utils.data import DataLoader

from core import distributed, interpret, runs
from core.augment import BatchAugment, normalize, resize_batch
from core.data import DataConfig, DataLoaders, make_dataloaders, path_text
from core.env import resolve_device, seed_everything
from core.fileio import atomic_write
from core.model import (
    BundleMeta,
    ModelConfig,
    build_model,
    freeze,
    load_bundle,
    lrs_for_groups,
    param_groups,
    save_bundle,
    unfreeze,
)

SCHEDULES = ("fine_tune", "one_cycle", "plateau")
OPTIMIZERS = ("adamw", "sgd")
CHECKPOINT = "checkpoint.pt"
BEST_WEIGHTS = "best.pt"
BUNDLE = "model.safetensors"
DIVERGENCE_FACTOR = 1000.0  # a loss this many times the first one means training has blown up


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class StopRequested(Exception):
    """A cooperative stop (STOP file or SIGTERM) was seen between batches; a checkpoint was saved."""


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
    lr_min: float | None = None  # one_cycle/plateau: lowest group's rate; rates spread geometrically up to lr
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
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}."),
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


def plan(cfg: TrainConfig, n_groups: int = 3) -> list[Phase]:
    """The phases `cfg` trains through; fine_tune is fastai's recipe."""
    lr = (cfg.lr_min, cfg.lr) if cfg.lr_min else cfg.lr
    if cfg.schedule == "one_cycle":
        return [Phase(cfg.epochs, False, lrs_for_groups(lr, n_groups), pct_start=cfg.pct_start)]
    if cfg.schedule == "plateau":
        return [Phase(cfg.epochs, False, lrs_for_groups(lr, n_groups), kind="plateau")]
    phases = []
    if cfg.freeze_epochs:
        phases.append(Phase(cfg.freeze_epochs, True, lrs_for_groups(cfg.lr, n_groups), pct_start=0.99))
    base = cfg.lr / 2  # fastai halves the rate once the body is unfrozen
    phases.append(Phase(cfg.epochs, False, lrs_for_groups((base / 100, base), n_groups), pct_start=0.3, div=5.0))
    return phases


def make_optimizer(cfg: TrainConfig, groups: list[list[nn.Parameter]], lrs: list[float]) -> torch.optim.Optimizer:
    """AdamW (fastai's betas and eps) or SGD with momentum, one parameter group per model group."""
    param_groups_ = [{"params": g, "lr": lr} for g, lr in zip(groups, lrs)]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups_, lr=lrs[-1], momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(param_groups_, lr=lrs[-1], betas=(0.9, 0.99), eps=1e-5, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, phase: Phase, steps_per_epoch: int):
    """PyTorch's OneCycleLR with fastai's defaults (momentum 0.95 -> 0.85 -> 0.95), or ReduceLROnPlateau."""
    if phase.kind == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    total = max(1, phase.epochs * steps_per_epoch)
    # PyTorch divides by zero when the warm-up ends exactly on step 0 (e.g. 4 steps at 0.25): a run too short
    # to warm up skips the warm-up and only anneals.
    pct_start = phase.pct_start if phase.pct_start * total > 1.0 else 0.5 / total
    return torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=phase.lrs,
        total_steps=total,
        pct_start=pct_start,
        div_factor=phase.div,
        # PyTorch divides the *start* rate by final_div_factor; fastai divides the peak by div_final.
        final_div_factor=phase.div_final / phase.div,
        base_momentum=0.85,
        max_momentum=0.95,
    )


def make_loss(cfg: TrainConfig, multi_label: bool) -> nn.Module:
    """Per-item losses (reduction='none'): their mean trains the model, each one is kept for top losses."""
    if multi_label:
        return nn.BCEWithLogitsLoss(reduction="none")
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="none")


def per_item(losses: torch.Tensor) -> torch.Tensor:
    """Multi-label losses come per item and label; an item's loss is their mean."""
    return losses.mean(dim=1) if losses.ndim == 2 else losses


class Learner:
    """Data, model, loss and device together; runs the phases of a TrainConfig."""

    def __init__(
        self,
        cfg: TrainConfig,
        dls: DataLoaders | None = None,
        model: nn.Module | None = None,
        on_event: Callable[..., Any] | None = None,
        should_stop: Callable[[], bool] | None = None,
        run_dir: str | Path | None = None,
    ):
        self.cfg = cfg
        self.dist = distributed.DistInfo.from_env()  # world_size 1 unless launched by torchrun with several processes
        self.device = distributed.setup(resolve_device(cfg.device))  # joins the group under torchrun, else a no-op
        seed_everything(cfg.data.seed)
        self.dls = dls or make_dataloaders(cfg.data, self.device, self.dist.rank, self.dist.world_size)
        # Warm-started, the body comes from the run (init_from), so ImageNet weights would be fetched for nothing.
        start = replace(cfg.model, pretrained=False, weights_path=None) if cfg.init_from else cfg.model
        self.model = model or build_model(start, len(self.dls.vocab))
        if cfg.init_from and model is None:
            warm_start(self.model, cfg.init_from, self.dls.vocab)
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.dist.enabled and cfg.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.train_model = self.model  # the DDP wrapper under DDP (rebuilt per phase); self.model stays the plain module
        self.group_stop = False  # under DDP: the stop all ranks agreed on at the last step
        self.loss_fn = make_loss(cfg, self.dls.multi_label)
        self.augment = BatchAugment.from_config(cfg.data)
        self.on_event = on_event or (lambda kind, **f: None)
        self.should_stop = should_stop or (lambda: False)
        self.run_dir = Path(run_dir) if run_dir else None
        self.step = 0
        self.smooth = SmoothedLoss()
        self.best_valid = math.inf
        self.epochs_since_best = 0
        self.first_loss: float | None = None
        self.micro_batch: int | None = None  # images per forward pass once memory ran out (None: whole batch)
        self.history: list[dict[str, Any]] = []
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    # ---------------------------------------------------------------- precision and layout

    @property
    def channels_last(self) -> bool:
        return self.cfg.channels_last and self.device.type in ("cuda", "cpu")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        if not (self.cfg.mixed_precision and self.device.type == "cuda"):
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def autocast(self):
        dtype = self.amp_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def to_device(self, x: torch.Tensor, y: torch.Tensor, train: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 batch in, normalised float batch out, on the device: augmented (train) or resized (eval).
        The bytes cross to the GPU before any float work, a quarter of the traffic of float images."""
        x = x.to(self.device, non_blocking=True)
        x = normalize(self.augment(x) if train else resize_batch(x, self.cfg.data.size))
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt), y.to(self.device, non_blocking=True)

    # ---------------------------------------------------------------- the public recipes

    def fit_one_cycle(self, epochs: int, lr_max: float | tuple[float, float], pct_start: float = 0.25) -> list[dict]:
        """Warm up then cosine-anneal the rate while momentum moves the other way (fastai's defaults)."""
        return self.run_phases([Phase(epochs, False, lrs_for_groups(lr_max, 3), pct_start=pct_start)])

    def fine_tune(self, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1) -> list[dict]:
        """fastai's transfer-learning recipe: frozen body for `freeze_epochs`, then all groups at base_lr/2 spread."""
        cfg = replace(self.cfg, schedule="fine_tune", epochs=epochs, lr=base_lr, freeze_epochs=freeze_epochs)
        return self.run_phases(plan(cfg))

    def fit(self, resume: dict | None = None) -> list[dict]:
        """Train through the phases of the config, from the start or from a checkpoint."""
        return self.run_phases(plan(self.cfg), resume)

    # ---------------------------------------------------------------- the loop

    def run_phases(self, phases: list[Phase], resume: dict | None = None) -> list[dict]:
        start_phase = resume["phase"] if resume else 0
        if resume:
            self.model.load_state_dict(resume["model"])
            self.step, self.best_valid = resume["step"], resume["best_valid"]
            self.epochs_since_best = resume.get("epochs_since_best", 0)
            self.micro_batch = resume.get("micro_batch")
            self.history = list(resume.get("history", []))
        epoch_offset = sum(p.epochs for p in phases[:start_phase])
        for index in range(start_phase, len(phases)):
            phase = phases[index]
            state = resume if (resume and index == start_phase) else None
            stopped_early = self._run_phase(index, phase, epoch_offset, state)
            epoch_offset += phase.epochs
            if stopped_early:
                break
        return self.history

    def _run_phase(self, index: int, phase: Phase, epoch_offset: int, resume: dict | None) -> bool:
        (freeze if phase.frozen else unfreeze)(self.model)
        self.train_model = distributed.wrap(self.model, self.device)  # after (un)freezing: DDP registers trainable params
        opt = make_optimizer(self.cfg, param_groups(self.model, self.cfg.model.arch), phase.lrs)
        sched = make_scheduler(self.cfg, opt, phase, len(self.dls.train))
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        first_epoch, skip = 0, 0
        if resume:
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            first_epoch, skip = resume["epoch"] - epoch_offset, resume["batch"]
            if resume.get("rng") is not None:
                torch.set_rng_state(resume["rng"])
        for e in range(first_epoch, phase.epochs):
            epoch = epoch_offset + e
            ctx = {"phase": index, "epoch": epoch, "opt": opt, "sched": sched, "scaler": scaler}
            started = time.perf_counter()
            train_loss = self._train_epoch(ctx, skip, resume if skip else None)
            skip = 0
            row = {"epoch": epoch, "train_loss": train_loss, **self.validate()}
            row["seconds"] = round(time.perf_counter() - started, 3)
            if phase.kind == "plateau":
                sched.step(row["valid_loss"])
            self._end_epoch(row, ctx)
            if self._early_stop():
                self.on_event("early_stop", epoch=epoch, best_valid_loss=self.best_valid)
                return True
        return False

    def _train_epoch(self, ctx: dict, skip: int, partial: dict | None) -> float:
        self.model.train()
        self.dls.train.sampler.set_epoch(ctx["epoch"])
        n_batches = len(self.dls.train)
        self.dls.train.sampler.set_epoch(ctx["epoch"], skip_batches=skip, batch_size=self.dls.train.batch_size)
        total, count = (partial["loss_sum"], partial["loss_count"]) if partial else (0.0, 0)
        item_ids, item_losses = (list(partial["item_ids"]), list(partial["item_losses"])) if partial else ([], [])
        seen: list[int] = []  # this pass's items, to report the ones that could not be read
        for batch_index, batch in enumerate(self.dls.train, start=skip):
            if batch is None:  # every file of the batch vanished since verification
                continue
            x, y, ids = batch
            seen.extend(ids.tolist())
            # the rate and momentum this step trains with: the scheduler moves them on inside _train_step
            lr, mom = ctx["opt"].param_groups[-1]["lr"], _momentum(ctx["opt"])
            loss = self._train_step(x, y, ids, ctx, item_ids, item_losses)
            n = len(ids) * self.dist.world_size  # under DDP the loss is the group's mean over every rank's batch
            total, count = total + loss * n, count + n
            self.on_event(
                "batch", step=self.step, epoch=ctx["epoch"], batch=batch_index + 1, n_batches=n_batches,
                loss=loss, smooth_loss=self.smooth.value, lr=lr, mom=mom,
            )
            if (self.group_stop if self.dist.enabled else self.should_stop()):
                distributed.broadcast_buffers(self.model)
                ids_all, losses_all = self._gather_items(item_ids, item_losses)
                partial = {"loss_sum": total, "loss_count": count, "item_ids": ids_all, "item_losses": losses_all}
                self.save_checkpoint(ctx, batch=batch_index + 1, partial=partial)
                raise StopRequested(f"Stopped at epoch {runs.epoch_number(ctx['epoch'])}, batch {batch_index + 1}.")
        self._report_skipped(ctx["epoch"], seen)
        distributed.broadcast_buffers(self.model)  # one model on every rank before it is evaluated and saved
        self._save_item_losses(ctx["epoch"], *self._gather_items(item_ids, item_losses))
        return total / max(count, 1)

    def _gather_items(self, ids: list[int], losses: list[float]) -> tuple[list[int], list[float]]:
        """Per-item training losses of every rank (the first of an item's duplicates from shard padding)."""
        if not self.dist.enabled:
            return ids, losses
        all_ids = distributed.all_gather_varlen(torch.tensor(ids, dtype=torch.long))
        all_losses = distributed.all_gather_varlen(torch.tensor(losses, dtype=torch.float32))
        first = _first_of_each(all_ids)
        return all_ids[first].tolist(), all_losses[first].tolist()

    def _report_skipped(self, epoch: int, seen: list[int]) -> None:
        """A 'skipped' event when files the epoch should have read were gone or unreadable (the loader
        leaves them out of their batch rather than failing the run)."""
        loader = self.dls.train
        order = list(loader.sampler)  # the same order the epoch drew: a pure function of seed and epoch
        if loader.drop_last:
            order = order[: len(order) // loader.batch_size * loader.batch_size]
        source_ids = loader.dataset.ids  # the sampler draws dataset positions; batches carry source indices
        missing = sorted({source_ids[k] for k in order} - set(seen))
        if missing:
            files = [path_text(self.dls.source.files[i]) for i in missing[:20]]
            self.on_event("skipped", epoch=epoch, split="train", count=len(missing), files=files,
                          reason="moved, deleted or unreadable since the dataset was checked")

    def _train_step(self, x, y, ids, ctx: dict, item_ids: list, item_losses: list) -> float:
        x, y = self.to_device(x, y, train=True)
        opt, scaler = ctx["opt"], ctx["scaler"]
        while True:
            try:
                losses = self._forward_backward(x, y, opt, scaler)
                break
            except torch.OutOfMemoryError:
                self._shrink_micro_batch(len(x), ctx)
        value = losses.mean().item()
        if self.dist.enabled:  # one loss and one stop decision for the whole group, so all ranks act together
            stop = 1.0 if self.should_stop() else 0.0
            summed = distributed.all_reduce(torch.tensor([losses.float().sum().item(), len(losses), stop]))
            value, self.group_stop = (summed[0] / summed[1]).item(), bool(summed[2] > 0)
        self._check_divergence(value, ctx)
        scaler.step(opt)
        scaler.update()
        if not isinstance(ctx["sched"], torch.optim.lr_scheduler.ReduceLROnPlateau):
            ctx["sched"].step()
        self.step += 1
        self.smooth.update(value)
        item_ids.extend(ids.tolist())
        item_losses.extend(losses.float().cpu().tolist())
        return value

    def _forward_backward(self, x, y, opt, scaler) -> torch.Tensor:
        """Gradients of the batch's mean loss, in micro-batches when memory ran short: the same step, in pieces."""
        opt.zero_grad(set_to_none=True)
        chunk = self.micro_batch or len(x)
        pieces = []
        for start in range(0, len(x), chunk):
            with self.autocast():
                losses = per_item(self.loss_fn(self.train_model(x[start : start + chunk]), y[start : start + chunk]))
            scaler.scale(losses.sum() / len(x)).backward()
            pieces.append(losses.detach())
        return torch.cat(pieces)

    def _shrink_micro_batch(self, batch: int, ctx: dict) -> None:
        """Out of memory: halve the images per forward pass and retry the step (the batch size the schedule
        and the optimizer see stays the same); below two images BatchNorm cannot train, so give up clearly."""
        ctx["opt"].zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.dist.enabled:  # the other ranks are already waiting in this step's gradient all-reduce
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
        self.on_event("oom", epoch=ctx["epoch"], step=self.step, micro_batch=half, batch_size=batch)

    def _check_divergence(self, loss: float, ctx: dict) -> None:
        """NaN or inf, or a thousand times the first loss: nothing useful comes after, so stop and say why."""
        self.first_loss = self.first_loss if self.first_loss is not None else loss
        if math.isfinite(loss) and loss <= DIVERGENCE_FACTOR * max(self.first_loss, 1.0):
            return
        raise TrainingDiverged(
            f"The loss became {loss:.4g} at step {self.step} (epoch {runs.epoch_number(ctx['epoch'])}); "
            f"the learning rate ({ctx['opt'].param_groups[-1]['lr']:.2e}) is probably too high. "
            "The last good checkpoint is kept."
        )

    def validate(self) -> dict[str, float]:
        """Valid loss and metrics on the validation set (nan when it is empty)."""
        preds = gather_preds(get_preds(self, self.dls.valid)) if self.dist.enabled else get_preds(self, self.dls.valid)
        if len(preds.ids) == 0:
            return {"valid_loss": math.nan}
        row = {"valid_loss": float(preds.losses.mean())}
        if self.dls.multi_label:
            row["accuracy_multi"] = interpret.accuracy_multi(preds.logits, preds.targets, thresh=self.cfg.threshold)
            row[f"fbeta_{self.cfg.fbeta:g}"] = interpret.fbeta_multi(
                preds.logits, preds.targets, beta=self.cfg.fbeta, thresh=self.cfg.threshold
            )
        else:
            row["error_rate"] = interpret.error_rate(preds.logits, preds.targets)
            row["accuracy"] = interpret.accuracy(preds.logits, preds.targets)
        return row

    def _end_epoch(self, row: dict, ctx: dict) -> None:
        improved = row["valid_loss"] < self.best_valid
        if improved:
            self.best_valid, self.epochs_since_best = row["valid_loss"], 0
        else:
            self.epochs_since_best += 1
        self.history.append(row)
        self.on_event("epoch", **row)
        self.save_checkpoint(ctx, batch=0, next_epoch=True)
        if improved and self.cfg.keep_best and self.run_dir and self.dist.main:
            weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            atomic_write(self.run_dir / BEST_WEIGHTS, lambda tmp: torch.save(weights, tmp))

    def _early_stop(self) -> bool:
        return bool(self.cfg.early_stopping) and self.epochs_since_best >= self.cfg.early_stopping

    # ---------------------------------------------------------------- checkpoints and files

    def save_checkpoint(self, ctx: dict, batch: int, partial: dict | None = None, next_epoch: bool = False) -> None:
        """Everything needed to resume, written atomically: a crash mid-write leaves the previous one intact."""
        if not self.run_dir or not self.dist.main:
            return
        epoch = ctx["epoch"] + 1 if next_epoch else ctx["epoch"]
        phase = ctx["phase"]
        state = {
            "model": self.model.state_dict(),
            "optimizer": ctx["opt"].state_dict(),
            "scheduler": ctx["sched"].state_dict(),
            "phase": phase,
            "epoch": epoch,
            "batch": batch,
            "step": self.step,
            "best_valid": self.best_valid,
            "epochs_since_best": self.epochs_since_best,
            "micro_batch": self.micro_batch,
            "history": self.history,
            "rng": torch.get_rng_state(),
            **(partial or {}),
        }
        atomic_write(self.run_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))
        self.on_event("checkpoint", epoch=epoch, batch=batch, step=self.step, file=CHECKPOINT)

    def _save_item_losses(self, epoch: int, ids: list[int], losses: list[float]) -> None:
        if not self.run_dir or not self.dist.main:
            return
        path = self.run_dir / "item_losses" / f"epoch_{epoch:03d}.npz"
        arrays = {"item": np.asarray(ids, dtype=np.int64), "loss": np.asarray(losses, dtype=np.float32)}
        atomic_write(path, lambda tmp: _savez(tmp, arrays))

    def export(self, path: str | Path) -> Path:
        """Save the model bundle: weights plus everything prediction needs."""
        meta = BundleMeta(
            arch=self.cfg.model.arch,
            head=self.cfg.model.head,
            dropout=self.cfg.model.dropout,
            vocab=list(self.dls.vocab),
            size=self.cfg.data.size,
            task="multi_label" if self.dls.multi_label else "single_label",
            threshold=self.cfg.threshold,
            config=self.cfg.to_dict(),
        )
        return save_bundle(path, self.model, meta)


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object, or numpy appends ".npz" to the temp name
        np.savez(f, **arrays)


def _momentum(opt: torch.optim.Optimizer) -> float:
    group = opt.param_groups[-1]
    return group["betas"][0] if "betas" in group else group.get("momentum", 0.0)


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


@dataclass
class Preds:
    """Outputs of one inference pass, in loader order."""

    logits: torch.Tensor  # [N, C] float32 on the CPU
    targets: torch.Tensor  # [N] class indices or [N, C] multi-hot
    losses: torch.Tensor  # [N] per-item loss
    ids: torch.Tensor  # [N] item indices in the data source


def get_preds(learner: Learner, loader: DataLoader) -> Preds:
    """Logits, targets and per-item losses over a loader, in eval mode under inference_mode."""
    learner.model.eval()
    outs, targets, losses, ids = [], [], [], []
    with torch.inference_mode():
        for batch in loader:
            if batch is None:
                continue
            x, y = learner.to_device(batch[0], batch[1])
            with learner.autocast():
                logits = learner.model(x).float()
            outs.append(logits.cpu())
            targets.append(batch[1])
            losses.append(per_item(learner.loss_fn(logits, y)).float().cpu())
            ids.append(batch[2])
    if not outs:
        n = len(learner.dls.vocab)
        return Preds(torch.empty(0, n), torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long))
    return Preds(torch.cat(outs), torch.cat(targets), torch.cat(losses), torch.cat(ids))


def _first_of_each(ids: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each id, in order of appearance."""
    first = np.unique(ids.cpu().numpy(), return_index=True)[1]  # sorted by id: sort again for appearance
    return torch.from_numpy(np.sort(first)).long()


def gather_preds(preds: Preds) -> Preds:
    """Every rank's predictions on its shard, on every rank, each item once (shard padding repeats a few):
    metrics over them equal those of one process evaluating the whole set."""
    ids = distributed.all_gather_varlen(preds.ids)
    first = _first_of_each(ids)
    parts = (preds.logits, preds.targets, preds.losses)
    logits, targets, losses = (distributed.all_gather_varlen(p)[first] for p in parts)
    return Preds(logits, targets, losses, ids[first])


def warm_start(model: nn.Module, source: str | Path, vocab: list[str]) -> None:
    """Start from another run's weights: all of them when the classes match, else the body only."""
    bundle = load_bundle(source, device=torch.device("cpu"))
    if list(bundle.meta.vocab) == list(vocab):
        model.load_state_dict(bundle.model.state_dict())
    else:
        model[0].load_state_dict(bundle.model[0].state_dict())


def load_checkpoint(run_dir: str | Path) -> dict:
    """The resumable state of a run; loaded without unpickling arbitrary objects."""
    return torch.load(Path(run_dir) / CHECKPOINT, map_location="cpu", weights_only=True)


def load_best_weights(learner: Learner, run_dir: str | Path) -> bool:
    path = Path(run_dir) / BEST_WEIGHTS
    if not path.exists():
        return False
    learner.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return True
