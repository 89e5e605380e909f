"""The training engine, for real on CPU: tiny generated images, a few steps, files asserted afterwards."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core import interpret, runs
from core.bundle import load_bundle
from core.data import DataConfig
from core.demo import DemoSpec, make_demo_dataset, mislabelled_files
from core.job import interpret_run, run_training
from core.lrfind import lr_find, minimum, slide, steep, suggest, valley
from core.model import ModelConfig
from core.rundir import BUNDLE_FILE, CHECKPOINT_FILE, DATASET_RECORD_FILE
from core.schedule import Phase, apply_rates, lr_at, plan
from core.step import make_optimizer
from core.train import (
    Learner,
    StopRequested,
    TrainConfig,
    TrainingDiverged,
    setup_training,
)


def tiny_config(path: Path, **overrides) -> TrainConfig:
    """resnet18 from scratch at 32 px: a few seconds per epoch on two cores."""
    data_options = {"size": 32, "batch_size": 16, "num_workers": 0, "max_rotate": 0, "min_scale": 0.75}
    data_options |= overrides.pop("data", {})
    data = DataConfig(path=str(path), **data_options)
    model = ModelConfig(arch="resnet18", pretrained=False)
    defaults = {"schedule": "one_cycle", "epochs": 2, "lr": 5e-3}
    return TrainConfig(data=data, model=model, **{**defaults, **overrides})


def make_learner(cfg: TrainConfig, **options) -> Learner:
    return Learner(cfg, setup_training(cfg), **options)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """The demo dataset: three colour-coded shapes, 5% deliberately in the wrong folder."""
    return make_demo_dataset(tmp_path_factory.mktemp("shapes") / "demo", DemoSpec(n_per_class=40, size=32, seed=1))


FINISHED_RUN_LR = 3e-3


@pytest.fixture(scope="module")
def finished_run(shapes, tmp_path_factory) -> Path:
    """One complete run (through the same entry point the background process uses), shared by several tests."""
    # 3e-3: one_cycle trains every group at the given rate (as fastai's fit_one_cycle), so 1e-2 is too hot here
    cfg = tiny_config(shapes, epochs=6, lr=FINISHED_RUN_LR, data={"batch_size": 8})
    run_dir = runs.create(cfg.to_dict(), root=tmp_path_factory.mktemp("runs"))
    assert run_training(run_dir) == 0
    return run_dir


# ---------------------------------------------------------------- config and schedules


def test_config_round_trips_and_refuses_bad_values(tmp_path):
    cfg = tiny_config(tmp_path)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="cosine")
    with pytest.raises(ValueError, match="lr must be"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="Unknown TrainConfig fields: epoch"):
        TrainConfig.from_dict({"epoch": 3})


def test_fine_tune_plan_is_fastais_recipe():
    frozen, unfrozen = plan(TrainConfig(lr=2e-3, epochs=4, freeze_epochs=1))
    assert frozen.frozen and frozen.epochs == 1 and frozen.pct_start == 0.99
    assert frozen.lrs[-1] == pytest.approx(2e-3)
    assert not unfrozen.frozen and unfrozen.epochs == 4 and unfrozen.pct_start == 0.3 and unfrozen.div == 5
    # base_lr halved, then spread geometrically from base/100 to base over the three groups
    assert unfrozen.lrs == pytest.approx([1e-5, 1e-4, 1e-3])


def test_one_rate_trains_every_group_at_it_as_fastais_fit_one_cycle(shapes):
    # fastai's fit_one_cycle(n, 3e-3) sets every group to 3e-3 (a body trained from scratch at a tenth of the
    # rate underfits); only slice(lo, hi), lr_min here, spreads them
    for schedule in ("one_cycle", "plateau"):
        assert plan(TrainConfig(schedule=schedule, lr=3e-3))[0].lrs == pytest.approx([3e-3] * 3)
        assert plan(TrainConfig(schedule=schedule, lr=3e-3, lr_min=3e-5))[0].lrs == pytest.approx([3e-5, 3e-4, 3e-3])
    learner, phases = make_learner(tiny_config(shapes)), []
    learner.run_phases = lambda planned, resume=None: phases.extend(planned)
    learner.fit_one_cycle(1, 3e-3)
    assert phases[0].lrs == pytest.approx([3e-3] * 3)


def _annealing_cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (1 + math.cos(math.pi * pct))


def test_one_cycle_follows_the_documented_curve():
    """Rate: lr_max/25 up to lr_max over 25% of the steps, down to lr_max/1e5; beta1 mirrors it 0.95-0.85-0.95."""
    total, lr_max = 100, 1e-2
    phase = plan(TrainConfig(schedule="one_cycle", epochs=1, lr=lr_max))[0]
    warm_end = 0.25 * total - 1
    for step in (0, 10, 24, 50, 99):
        if step <= warm_end:
            pct = step / warm_end
            lr, mom = _annealing_cos(lr_max / 25, lr_max, pct), _annealing_cos(0.95, 0.85, pct)
        else:
            pct = (step - warm_end) / (total - 1 - warm_end)
            lr, mom = _annealing_cos(lr_max, lr_max / 1e5, pct), _annealing_cos(0.85, 0.95, pct)
        lrs, momentum = lr_at(phase, step, steps_per_epoch=total)
        assert lrs[-1] == pytest.approx(lr, rel=1e-6), step
        assert momentum == pytest.approx(mom, rel=1e-6), step
    assert lr_at(phase, 0, total)[0][-1] == pytest.approx(lr_max / 25)
    assert lr_at(phase, 99, total)[0][-1] == pytest.approx(lr_max / 1e5)


def _optimizer(lrs: list[float]) -> torch.optim.Optimizer:
    return make_optimizer(TrainConfig(), [[torch.nn.Parameter(torch.zeros(1))] for _ in lrs], lrs)


@pytest.mark.parametrize("steps", [1, 4, 7, 40])
@pytest.mark.parametrize("phase", [Phase(1, False, [1e-4, 1e-3, 1e-2]), Phase(1, True, [1e-3] * 3, pct_start=0.99),
                                   Phase(1, False, [1e-5, 1e-4, 1e-3], pct_start=0.3, div=5.0)])
def test_the_pure_one_cycle_is_pytorchs_onecyclelr_step_for_step(phase, steps):
    """lr_at replaced PyTorch's OneCycleLR (fastai's settings): the same rate and momentum at every step,
    including runs too short to warm up (PyTorch divides by zero there; the warm-up is skipped)."""
    ours, theirs = _optimizer(phase.lrs), _optimizer(phase.lrs)
    pct_start = phase.pct_start if phase.pct_start * steps > 1.0 else 0.5 / steps
    sched = torch.optim.lr_scheduler.OneCycleLR(
        theirs, max_lr=phase.lrs, total_steps=steps, pct_start=pct_start, div_factor=phase.div,
        final_div_factor=phase.div_final / phase.div, base_momentum=0.85, max_momentum=0.95,
    )
    for t in range(steps):
        apply_rates(ours, *lr_at(phase, t, steps))
        for mine, torchs in zip(ours.param_groups, theirs.param_groups):
            assert mine["lr"] == pytest.approx(torchs["lr"], rel=1e-12, abs=0), t
            assert mine["betas"] == pytest.approx(torchs["betas"], rel=1e-12), t
        theirs.step()
        sched.step()


def test_plateau_cuts_the_rate_as_pytorchs_reduce_on_plateau():
    phase = plan(TrainConfig(schedule="plateau", lr=1e-3, plateau_patience=1, plateau_factor=0.2))[0]
    valid_losses = [1.0, 0.9, 0.95, 0.91, 0.89999, 0.92, float("nan"), 0.5, 0.6, 0.7, 0.8]
    opt = _optimizer(phase.lrs)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.2, patience=1)
    for epoch in range(len(valid_losses) + 1):
        lrs, momentum = lr_at(phase, epoch * 10, 10, valid_losses[:epoch])
        assert momentum is None  # plateau leaves momentum to the optimizer
        assert lrs == pytest.approx([g["lr"] for g in opt.param_groups], rel=1e-12), epoch
        if epoch < len(valid_losses):
            sched.step(valid_losses[epoch])
    assert lrs[-1] < 1e-3 / 25  # it did cut, more than once


# ---------------------------------------------------------------- training


def test_a_run_writes_every_file_and_event(finished_run):
    for name in ("config.json", "status.json", "events.jsonl", BUNDLE_FILE, DATASET_RECORD_FILE):
        assert (finished_run / name).exists(), name
    assert not (finished_run / CHECKPOINT_FILE).exists()  # only a run that can be resumed keeps one (~1.5x the model)
    assert runs.status(finished_run)["state"] == runs.DONE
    kinds = [e["event"] for e in runs.load_events(finished_run)]
    assert kinds[0] == "start" and kinds[-1] == "done"
    for kind in ("cache", "batch", "epoch", "checkpoint", "exported", "interpreted"):
        assert kind in kinds, kind
    epochs = runs.load_events(finished_run, "epoch")
    assert [e["epoch"] for e in epochs] == list(range(6))
    assert runs.exported_epoch(runs.load_events(finished_run)) == (5, "last")  # the model after the last epoch
    assert set(epochs[0]) >= {"train_loss", "valid_loss", "error_rate", "accuracy", "seconds"}
    batch = runs.load_events(finished_run, "batch")[0]
    assert set(batch) >= {"step", "loss", "smooth_loss", "lr", "mom", "batch", "n_batches"}


def test_batch_events_carry_the_rate_each_step_trained_with(finished_run):
    """One-cycle: the first step trains at peak / 25, the last at peak / 1e5, momentum 0.95 at both
    ends; a rate logged after the scheduler stepped would miss the first value and rise again at the end."""
    batches = runs.load_events(finished_run, "batch")
    lrs, moms = [b["lr"] for b in batches], [b["mom"] for b in batches]
    peak = FINISHED_RUN_LR
    assert lrs[0] == pytest.approx(peak / 25, rel=1e-6)
    assert lrs[-1] == pytest.approx(peak / 1e5, rel=1e-6)
    assert max(lrs) == pytest.approx(peak, rel=1e-3)
    assert lrs[-1] == min(lrs)
    assert moms[0] == pytest.approx(0.95) and moms[-1] == pytest.approx(0.95)
    assert min(moms) == pytest.approx(0.85, abs=1e-3)


def test_loss_goes_down_and_beats_chance(finished_run):
    epochs = runs.load_events(finished_run, "epoch")
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["valid_loss"] < math.log(3)  # below a uniform guess over 3 classes
    assert epochs[-1]["error_rate"] < 0.35  # chance is 0.67


def test_per_item_losses_cover_every_training_item_each_epoch(finished_run):
    record = runs.load_events(finished_run, "start")[0]
    for epoch in range(6):
        saved = np.load(finished_run / "item_losses" / f"epoch_{epoch:03d}.npz")
        assert len(saved["item"]) == len(set(saved["item"].tolist()))
        # drop_last leaves out at most one batch's worth of items
        assert record["n_train"] - 8 < len(saved["item"]) <= record["n_train"]
        assert np.isfinite(saved["loss"]).all()


def test_mislabelled_files_rank_near_the_top(finished_run, shapes):
    table = interpret_run(finished_run, "train")
    ranked = interpret.top_losses(table)["file"].tolist()
    wrong = [str(p.resolve()) for p in mislabelled_files(shapes)]
    in_train = [f for f in wrong if f in ranked]
    assert in_train, "the demo should put some mislabelled files in the training set"
    ranks = [ranked.index(f) / len(ranked) for f in in_train]
    assert np.median(ranks) < 0.15, ranks


def test_exported_bundle_predicts_like_the_interpretation_table(finished_run):
    from core.bundle import predict_probs
    from core.images import open_image

    table = interpret.load_table(interpret.table_path(finished_run, "valid"))
    bundle = load_bundle(finished_run / BUNDLE_FILE, device="cpu")
    rows = table.head(5)
    probs = predict_probs(bundle, [open_image(f) for f in rows["file"]]).numpy()
    assert np.allclose(probs, interpret.table_probs(rows, bundle.meta.vocab), atol=1e-4)
    assert bundle.meta.config["epochs"] == 6  # the config travels with the model


def test_stop_then_resume_matches_an_uninterrupted_run(shapes, tmp_path):
    cfg = tiny_config(shapes, epochs=2)
    whole = make_learner(cfg)
    whole.fit()

    calls = {"n": 0}

    def stop_after_seven_batches() -> bool:
        calls["n"] += 1
        return calls["n"] == 7  # mid-way through the second epoch

    first = make_learner(cfg, run_dir=tmp_path, should_stop=stop_after_seven_batches)
    with pytest.raises(StopRequested):
        first.fit()
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert (state["epoch"], state["batch"]) == (1, 1)
    resumed = make_learner(cfg, run_dir=tmp_path)
    resumed.fit(state)
    assert [r["epoch"] for r in resumed.history] == [0, 1]
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    assert resumed.history[-1]["valid_loss"] == pytest.approx(whole.history[-1]["valid_loss"], rel=1e-4)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(shapes, tmp_path):
    run_dir = runs.create(tiny_config(shapes, epochs=3, lr=1e-2).to_dict(), root=tmp_path)
    learner = make_learner(tiny_config(shapes, epochs=3, lr=1e-2), run_dir=run_dir)
    learner.fit_one_cycle(1, 1e-2)
    good = (run_dir / CHECKPOINT_FILE).read_bytes()
    with pytest.raises(TrainingDiverged, match="learning rate .* too high"):
        learner.fit_one_cycle(2, 1e6)
    assert (run_dir / CHECKPOINT_FILE).read_bytes() == good


def test_a_diverging_run_ends_failed_with_the_reason(shapes, tmp_path):
    run_dir = runs.create(tiny_config(shapes, epochs=1, lr=1e3, optimizer="sgd").to_dict(), root=tmp_path)
    assert run_training(run_dir) == 1
    status = runs.status(run_dir)
    assert status["state"] == runs.FAILED and "TrainingDiverged" in status["error"]
    error = runs.load_events(run_dir, "error")[0]
    assert "too high" in error["message"] and "Traceback" in error["traceback"]


def test_fine_tune_freezes_then_trains_everything(shapes):
    cfg = tiny_config(shapes, schedule="fine_tune", epochs=1, freeze_epochs=1)
    learner = make_learner(cfg)
    body_before = [p.detach().clone() for n, p in learner.model[0].named_parameters() if "bn" not in n]
    history = learner.fine_tune(1, base_lr=2e-3, freeze_epochs=1)
    assert len(history) == 2
    body_after = [p for n, p in learner.model[0].named_parameters() if "bn" not in n]
    changed = [not torch.equal(a, b) for a, b in zip(body_before, body_after)]
    assert all(changed)  # the unfrozen epoch moved the convolutions too


def test_progressive_resizing_starts_from_the_previous_run(finished_run, shapes):
    cfg = tiny_config(shapes, epochs=1, init_from=str(finished_run), data={"size": 48})
    learner = make_learner(cfg)
    source = load_bundle(finished_run / BUNDLE_FILE, device="cpu").model.state_dict()
    for key, value in learner.model.state_dict().items():
        assert torch.equal(value.cpu(), source[key]), key
    x, y, _ = next(iter(learner.dls.train))
    assert learner.on_device.batch(x, y, train=True)[0].shape[-2:] == (48, 48)


def test_continuing_from_a_run_needs_no_imagenet_weights(finished_run, shapes, tmp_path, monkeypatch):
    # The Train page keeps Pretrained ticked when it continues a pretrained run; offline, with an empty hub cache
    # and every download routed to a closed port, the run's own weights are all it needs.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    cfg = tiny_config(shapes, epochs=1, init_from=str(finished_run))
    cfg.model.pretrained = True
    learner = make_learner(cfg)
    source = load_bundle(finished_run / BUNDLE_FILE, device="cpu").model.state_dict()
    assert all(torch.equal(v.cpu(), source[k]) for k, v in learner.model.state_dict().items())


def test_results_do_not_depend_on_a_warm_cache(shapes, tmp_path, monkeypatch):
    cfg = tiny_config(shapes, epochs=1)
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path / "cold"))
    cold = make_learner(cfg)
    cold.fit()
    warm = make_learner(cfg)  # same workspace: every image now comes from the decoded cache
    warm.fit()
    assert cold.history[-1]["valid_loss"] == warm.history[-1]["valid_loss"]
    for a, b in zip(cold.model.state_dict().values(), warm.model.state_dict().values()):
        assert torch.equal(a, b)


def test_early_stopping_and_keep_best(shapes, tmp_path):
    cfg = tiny_config(shapes, schedule="plateau", epochs=6, lr=1e-6, early_stopping=1, keep_best=True)
    run_dir = runs.create(cfg.to_dict(), root=tmp_path)
    assert run_training(run_dir) == 0
    epochs = runs.load_events(run_dir, "epoch")
    assert len(epochs) < 6 and runs.load_events(run_dir, "early_stop")
    assert "best_weights" in [e["event"] for e in runs.load_events(run_dir)]
    assert not (run_dir / "best.pt").exists() and not (run_dir / CHECKPOINT_FILE).exists()  # done: nothing to resume
    first_lowest = min(range(len(epochs)), key=lambda i: epochs[i]["valid_loss"])
    assert runs.exported_epoch(runs.load_events(run_dir)) == (first_lowest, "best")


# ---------------------------------------------------------------- multi-label


@pytest.fixture(scope="module")
def multi_label_data(tmp_path_factory) -> Path:
    """A Planet-style CSV: each image has a red and/or a blue bar; labels are space-separated."""
    root = tmp_path_factory.mktemp("planet")
    rng = np.random.default_rng(0)
    rows = ["image_name,tags"]
    for i in range(90):
        red, blue = [(True, False), (False, True), (True, True)][i % 3]
        pixels = rng.integers(0, 40, size=(32, 32, 3), dtype=np.uint8)
        if red:
            pixels[2:12, :, 0] = 230
        if blue:
            pixels[20:30, :, 2] = 230
        from PIL import Image

        Image.fromarray(pixels).save(root / f"train_{i}.png")
        rows.append(f"train_{i}," + " ".join(t for t, on in (("red", red), ("blue", blue)) if on))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_multi_label_run_reports_fbeta(multi_label_data, tmp_path):
    # Every group trains at lr under one_cycle (as fastai's fit_one_cycle(lr_max)): 1e-2 throughout is too hot here.
    cfg = tiny_config(multi_label_data, epochs=3, lr=3e-3, data={"flip": False})
    run_dir = runs.create(cfg.to_dict(), root=tmp_path)
    assert run_training(run_dir) == 0
    last = runs.load_events(run_dir, "epoch")[-1]
    assert "fbeta_2" in last and "accuracy_multi" in last
    assert last["fbeta_2"] > 0.8, last
    table = interpret.load_table(interpret.table_path(run_dir, "valid"))
    assert interpret.is_multi_label(table)
    assert load_bundle(run_dir / BUNDLE_FILE, device="cpu").meta.task == "multi_label"


# ---------------------------------------------------------------- LR finder


def test_lr_find_restores_weights_exactly_and_suggests_rates_inside_the_sweep(shapes):
    learner = make_learner(tiny_config(shapes, schedule="fine_tune"))
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    grads_before = {n: p.requires_grad for n, p in learner.model.named_parameters()}
    result = lr_find(learner, num_it=40, start_lr=1e-6, end_lr=10)
    after = learner.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert grads_before == {n: p.requires_grad for n, p in learner.model.named_parameters()}
    assert 5 < len(result.lrs) <= 40
    assert result.lrs == sorted(result.lrs)
    assert set(result.suggestions) >= {"valley", "minimum"}
    for lr in result.suggestions.values():
        assert math.isfinite(lr) and 1e-7 <= lr <= 10


def test_lr_find_trains_with_the_training_step(shapes):
    """The sweep runs the training loop's TrainStep: out of memory above 4 images halves its micro-batch (the
    GradScaler of fp16 comes with the same step) instead of ending the sweep."""
    learner = make_learner(tiny_config(shapes))

    def run_out_of_memory(module, args):
        if module.training and args[0].shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (raised by the test)")

    learner.model.register_forward_pre_hook(run_out_of_memory)
    result = lr_find(learner, num_it=8, frozen=False)
    assert len(result.lrs) == 8 and all(math.isfinite(v) for v in result.losses)


def test_lr_find_works_unfrozen(shapes):
    learner = make_learner(tiny_config(shapes))
    result = lr_find(learner, num_it=20, frozen=False)
    assert len(result.lrs) >= 5


def _synthetic_curve(n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Flat, then falling steadily between 1e-4 and 1e-2, then exploding."""
    lrs = np.logspace(-7, 1, n)
    x = np.log10(lrs)
    losses = np.where(x < -4, 2.0, np.where(x < -2, 2.0 - 0.7 * (x + 4), 0.6 + 3 * (x + 2) ** 2))
    return lrs, losses


def test_suggestions_are_pure_functions_of_the_curve():
    lrs, losses = _synthetic_curve()
    assert 1e-4 <= valley(lrs, losses) <= 1e-2
    assert 1e-4 <= steep(lrs, losses) <= 1e-2
    best = lrs[np.argmin(losses)]
    assert minimum(lrs, losses) == pytest.approx(best / 10)
    assert 1e-7 <= slide(lrs, losses) <= 10
    assert suggest(lrs, losses).keys() == {"valley", "steep", "minimum", "slide"}


def test_out_of_memory_halves_the_micro_batch_and_training_goes_on(shapes):
    """The CUDA OOM path on CPU: a forward pre-hook raises torch's real OutOfMemoryError above 4 images."""
    events = []
    learner = make_learner(tiny_config(shapes, epochs=1), on_event=lambda kind, **f: events.append((kind, f)))

    def run_out_of_memory(module, args):
        if module.training and args[0].shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (raised by the test)")

    learner.model.register_forward_pre_hook(run_out_of_memory)
    history = learner.fit()
    ooms = [f for kind, f in events if kind == "oom"]
    assert [o["micro_batch"] for o in ooms] == [8, 4]  # 16 -> 8 -> 4, then it fits
    assert learner.micro_batch == 4
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
