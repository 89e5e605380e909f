"""Test-time augmentation, as fastai's `Learner.tta` defines it, on Loupe's own pieces.

fastai predicts `n` times (default 4) with the training augmentation, averages those probabilities (the loss's
activation: softmax, or sigmoid for multi-label; not logits), and blends the mean with the plain prediction:
`torch.lerp(aug_mean, plain, beta)` = (1 - beta) * aug_mean + beta * plain, beta 0.25 by default. `use_max`
takes the maximum over the augmented passes and then over (plain, that maximum) instead, with no blend (its
rows no longer sum to 1).

Here the plain pass is exactly validation's (core.step.get_preds over a validation loader, or
core.bundle.predict_probs), and the augmented passes are core.augment.BatchAugment with the run's settings,
drawn from a CPU generator seeded once per call, so the same images give the same answer every time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from core import interpret
from core.augment import BatchAugment, normalize, presize, presize_side
from core.bundle import Bundle, predict_probs
from core.config import TrainConfig
from core.images import upright_rgb
from core.listing import path_text
from core.rundir import RunDir

N_AUG = 4  # fastai's n
BETA = 0.25  # fastai's beta: the plain prediction's share of the blend
SEED = 0  # augmentation draws are fixed: a page's rerun or the CLI gives the same numbers


def blend(plain: torch.Tensor, augmented: Sequence[torch.Tensor], beta: float = BETA,
          use_max: bool = False) -> torch.Tensor:
    """fastai's combination of one plain and n augmented [N, C] probability tensors."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], not {beta}.")
    if not augmented:
        return plain
    aug = torch.stack(list(augmented))
    if use_max:
        return torch.maximum(plain, aug.max(0).values)
    # torch.lerp computes end - (end - start) * (1 - weight) for weight >= 0.5: beta = 1 gives `plain` exactly
    return torch.lerp(aug.mean(0), plain, beta)


def _generator(seed: int) -> torch.Generator:
    # BatchAugment draws on the CPU and moves the matrices to the batch's device: one CPU generator serves all
    return torch.Generator().manual_seed(seed)


def _activation(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    return logits.sigmoid() if multi_label else logits.softmax(dim=1)


# ---------------------------------------------------------------------------------------------- a run's split


def split_probs_tta(model: torch.nn.Module, loader, on_device, loss_fn: torch.nn.Module, multi_label: bool,
                    n: int = N_AUG, beta: float = BETA, seed: int = SEED):
    """(plain Preds, TTA probabilities [N, C]) over a validation-style loader (unshuffled: every pass sees the
    items in the same order)."""
    from core.step import get_preds  # core.step imports core.distributed; kept off the bundle-only path

    plain = get_preds(model, loader, on_device, loss_fn)
    gen = _generator(seed)
    augmented = []
    for _ in range(n):
        preds = get_preds(model, loader, on_device, loss_fn, augment_with=gen)
        if not torch.equal(preds.ids, plain.ids):
            raise RuntimeError("The loader gave the items in another order on a second pass; TTA needs a fixed order.")
        augmented.append(_activation(preds.logits, multi_label))
    return plain, blend(_activation(plain.logits, multi_label), augmented, beta)


def interpret_run_tta(run_dir: str | Path, split: str = "valid", n: int = N_AUG, beta: float = BETA,
                      seed: int = SEED) -> pd.DataFrame:
    """core.job.interpret_run's table with TTA probabilities (predicted, correct and loss follow from them;
    the loss is the plain cross-entropy of those probabilities, without label smoothing). Cached on disk in
    RunDir.table_tta(split), remade when the model is newer or n, beta or seed differ."""
    from core.data import make_loader
    from core.job import run_model
    from core.step import make_loss

    run = RunDir(run_dir)
    path, settings = run.table_tta(split), {"n": n, "beta": beta, "seed": seed}
    if path.exists() and path.stat().st_mtime >= run.bundle.stat().st_mtime:
        cached = interpret.load_table(path)
        if cached.attrs.get("tta") == settings:
            return cached
    cfg, source, item_split, on_device, model = run_model(run.path)
    loader = make_loader(source, getattr(item_split, split), cfg.data, train=False, device=on_device.device)
    plain, probs = split_probs_tta(model, loader, on_device, make_loss(cfg, source.multi_label), source.multi_label,
                                   n, beta, seed)
    table = interpret.item_table(
        probs.clamp(0, 1),  # lerp's rounding may step a hair outside [0, 1]
        plain.targets,
        [path_text(source.files[i]) for i in plain.ids.tolist()],
        source.vocab,
        multi_label=source.multi_label,
        split=split,
        item_ids=plain.ids.numpy(),
        threshold=cfg.threshold,
    )
    table.attrs["tta"] = settings
    interpret.save_table(table, path)
    return table


# ---------------------------------------------------------------------------------------------- new images


def bundle_augment(bundle: Bundle) -> BatchAugment:
    """The augmentation the bundle's model was trained with (its recorded config), else BatchAugment's defaults
    (a bundle without a readable config)."""
    try:
        return BatchAugment.from_config(TrainConfig.from_dict(bundle.meta.config).data)
    except (TypeError, ValueError, AttributeError):
        return BatchAugment(bundle.meta.size)


def predict_probs_tta(bundle: Bundle, images: Sequence[Image.Image], n: int = N_AUG, beta: float = BETA,
                      seed: int = SEED, batch_size: int = 64) -> torch.Tensor:
    """core.bundle.predict_probs with test-time augmentation: [N, n_out] on the CPU."""
    plain = predict_probs(bundle, images, batch_size)
    meta, model = bundle.meta, bundle.model.eval()
    augment = replace(bundle_augment(bundle), size=meta.size)  # the size the model is fed, whatever the config says
    side, gen = presize_side(meta.size), _generator(seed)
    # The uint8 squares preprocess makes, kept as bytes: the augmentation starts where validation resizes
    raw = [torch.stack([torch.from_numpy(presize(upright_rgb(im), side)) for im in images[s : s + batch_size]])
           for s in range(0, len(images), batch_size)]
    augmented = []
    with torch.inference_mode():
        for _ in range(n):
            outs = [model(normalize(augment(x.to(bundle.device), gen), meta.mean, meta.std)).float() for x in raw]
            logits = torch.cat(outs).cpu() if outs else torch.empty(0, meta.n_out)
            augmented.append(_activation(logits, meta.task == "multi_label"))
    return blend(plain, augmented, beta)
