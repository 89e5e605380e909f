"""The command line: python -m core train|lr-find|check-labels|health|interpret|predict|explain|export|demo ...

Exit codes: 0 done (or stopped on request), 1 the run failed, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core import runs
from core.data import LAYOUTS, DataConfig
from core.images import DataError
from core.layouts import detect_layout
from core.model import ARCHS, ModelConfig
from core.rundir import CHECK_LABELS, LR_FIND, TRAIN, RunDir
from core.train import SCHEDULES, TrainConfig


def _data_and_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", help="dataset folder (omit to reuse the config already in --run-dir)")
    p.add_argument("--run-dir", type=Path, help="run directory (default: a new one under <workspace>/runs)")
    p.add_argument("--layout", default="auto", choices=LAYOUTS)
    p.add_argument("--label-regex", help="filename_regex layout: the first group is the label")
    p.add_argument("--csv", dest="csv_file", help="csv layout: CSV file name inside the dataset folder")
    p.add_argument("--arch", default="resnet18", choices=sorted(ARCHS))
    p.add_argument("--no-pretrained", action="store_true", help="train from random weights (no download)")
    p.add_argument("--weights", dest="weights_path", help="local pretrained weights file (.pth or .safetensors)")
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--bs", type=int, default=64, help="batch size")
    p.add_argument("--valid-pct", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--group-regex", help="keep items whose paths share this match on one side of the split")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: from the cores available)")
    p.add_argument("--extra-train", action="append", default=[], metavar="FOLDER",
                   help="a one-folder-per-class dataset added to training only, e.g. Predict's feedback (repeatable)")
    p.add_argument("--schedule", default="fine_tune", choices=SCHEDULES)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--freeze-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-min", type=float, help="lowest group's rate; rates spread geometrically up to --lr")
    p.add_argument("--wd", type=float, default=0.01, help="weight decay")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--threshold", type=float, default=0.5, help="multi-label decision threshold")
    p.add_argument("--early-stopping", type=int, default=0, help="patience in epochs (0 = off)")
    p.add_argument("--keep-best", action="store_true", help="export the epoch with the lowest valid loss")
    p.add_argument("--init-from", help="run dir or bundle to start from (progressive resizing, more data)")
    p.add_argument("--no-mixed-precision", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--sync-bn", action="store_true", help="DDP: BatchNorm statistics across all processes")


def _config_from_args(a: argparse.Namespace) -> TrainConfig:
    data = DataConfig(
        path=str(Path(a.data).expanduser().resolve()),
        layout=a.layout,
        csv_file=a.csv_file,
        size=a.size,
        batch_size=a.bs,
        valid_pct=a.valid_pct,
        seed=a.seed,
        group_regex=a.group_regex,
        num_workers=a.workers,
        extra_train=[str(Path(f).expanduser().resolve()) for f in a.extra_train],
        **({"label_regex": a.label_regex} if a.label_regex else {}),
    )
    model = ModelConfig(arch=a.arch, pretrained=not a.no_pretrained, weights_path=a.weights_path)
    return TrainConfig(
        data=data,
        model=model,
        schedule=a.schedule,
        epochs=a.epochs,
        freeze_epochs=a.freeze_epochs,
        lr=a.lr,
        lr_min=a.lr_min,
        weight_decay=a.wd,
        label_smoothing=a.label_smoothing,
        threshold=a.threshold,
        early_stopping=a.early_stopping,
        keep_best=a.keep_best,
        init_from=a.init_from,
        mixed_precision=not a.no_mixed_precision,
        device=a.device,
        sync_bn=a.sync_bn,
    )


def _prepare_run_dir(a: argparse.Namespace, task: str = TRAIN) -> Path:
    """A run dir holding config.json: the one given (reusing its config when no DATA), or a new one for `task`."""
    if a.data is None:
        if a.run_dir is None or not (a.run_dir / runs.CONFIG_FILE).exists():
            raise DataError("Give a dataset folder, or a --run-dir that already holds a config.json.")
        return a.run_dir
    cfg = _config_from_args(a)
    detect_layout(cfg.data)  # a missing or empty folder fails here, before a run directory is made
    if a.run_dir is None:
        return runs.create(cfg.to_dict(), name_hint=cfg.model.arch, task=task)
    if (a.run_dir / runs.CONFIG_FILE).exists():
        raise DataError(f"{a.run_dir} already holds a run; choose a new --run-dir or omit DATA to continue it.")
    if a.run_dir.exists() and not a.run_dir.is_dir():
        raise DataError(f"--run-dir {a.run_dir} is a file, not a folder; choose a new --run-dir.")
    try:
        a.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, a read-only or missing mount: one line, not a traceback
        raise DataError(f"Cannot create the run directory {a.run_dir}: {e.strerror or e}.") from None
    from core.job import check_run_dir

    check_run_dir(a.run_dir)  # not writable, or a full disk: refused before any file of the run is written
    return runs.create_in(a.run_dir, cfg.to_dict(), task)


def cmd_train(a: argparse.Namespace) -> int:
    from core import distributed
    from core.job import has_checkpoint, run_training

    info = distributed.DistInfo.from_env()
    if info.enabled:  # already under torchrun: one rank makes the run dir, every rank trains in it
        return run_training(_shared_run_dir(a, info), resume=a.resume)
    run_dir = _prepare_run_dir(a)
    if a.resume and not has_checkpoint(run_dir):  # refused before the run's finished state is touched
        raise DataError(f"{run_dir} has no checkpoint to resume from: a finished run keeps none (it has nothing "
                        "left to train); start a new run, or continue from this one with --init-from.")
    if a.create_only:  # e.g. a run for several machines, created once on the shared filesystem
        print(run_dir)
        return 0
    if a.gpus > 1:  # relaunch under torchrun, as core.runs.start does, and wait for the whole group
        import os
        import subprocess

        command = runs._command(Path(run_dir).absolute(), ["--resume"] if a.resume else [], a.gpus, "core", "train")
        return subprocess.run(command, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    return run_training(run_dir, resume=a.resume)


def _shared_run_dir(a: argparse.Namespace, info) -> Path:
    """Under torchrun with DATA: rank 0 creates the run dir and tells the others where (through the process
    group, which run_training then reuses); with --run-dir and no DATA every rank already knows it."""
    if a.data is None:
        return _prepare_run_dir(a)
    import torch.distributed as dist

    from core import distributed
    from core.env import resolve_device

    distributed.setup(resolve_device(a.device))
    box: list = [None]
    if info.main:
        try:
            box = [("ok", str(_prepare_run_dir(a)))]
        except (DataError, ValueError, OSError) as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)  # the others learn the path, or the error that ends every rank
    outcome, value = box[0]
    if outcome == "error":
        distributed.cleanup()
        raise DataError(value)
    return Path(value)


def cmd_lr_find(a: argparse.Namespace) -> int:
    from core.job import run_lr_find

    run_dir = _prepare_run_dir(a, LR_FIND)
    result = run_lr_find(run_dir, num_it=a.num_it, start_lr=a.start_lr, end_lr=a.end_lr)
    print(f"LR finder: {len(result.lrs)} of {result.planned} steps, curve in {RunDir(run_dir).lr_find}")
    for name, lr in result.suggestions.items():
        print(f"  {name:<8} {lr:.2e}")
    return 0


def cmd_check_labels(a: argparse.Namespace) -> int:
    from core import distributed
    from core.labelcheck import CheckSettings, print_top, read_issues, run_label_check, write_settings

    settings = CheckSettings(folds=a.folds, epochs=a.fold_epochs)  # refused before any directory is made
    if distributed.DistInfo.from_env().enabled:
        if a.data is not None:
            raise DataError("Under torchrun, give only --run-dir of a check made with --create-only (or use --gpus).")
        return run_label_check(a.run_dir, resume=a.resume)
    run_dir = RunDir(_prepare_run_dir(a, CHECK_LABELS))
    if a.data is not None:
        write_settings(run_dir, settings)
    elif not run_dir.label_check.exists():
        raise DataError(f"{run_dir.path} is not a label check (it has no {run_dir.label_check.name}).")
    if a.create_only:
        print(run_dir.path)
        return 0
    if a.gpus > 1:
        import os
        import subprocess

        command = runs._command(run_dir.path.absolute(), ["--resume"] if a.resume else [], a.gpus, "core",
                                CHECK_LABELS)
        code = subprocess.run(command, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    else:
        code = run_label_check(run_dir.path, resume=a.resume)
    if code == 0 and run_dir.label_issues.exists() and runs.read_status(run_dir).get("state") == runs.DONE:
        print_top(read_issues(run_dir))
    return code


def cmd_health(a: argparse.Namespace) -> int:
    from core.health import DEFAULT_MATCH, check_health
    from core.healthjob import print_report, save_report, write_progress

    cfg = DataConfig(path=str(Path(a.data).expanduser().resolve()), layout=a.layout, csv_file=a.csv_file,
                     size=a.size, valid_pct=a.valid_pct, seed=a.seed, group_regex=a.group_regex,
                     **({"label_regex": a.label_regex} if a.label_regex else {}))
    progress = (lambda stage, done, total: write_progress(a.out, stage, done, total)) if a.out else None
    threshold = DEFAULT_MATCH if a.threshold is None else a.threshold
    report = check_health(cfg, a.run_dir, progress)
    if a.out:
        save_report(report, a.out)
    if a.json:
        summary = report.summary(threshold)
        if a.all_pairs:  # every candidate pair with its scores, and every file: what bench/health.py scores
            summary["pairs"] = report.near_pairs(-1.0).to_dict(orient="list")
            summary["files"] = report.items["file"].tolist()
        print(json.dumps(summary))
    else:
        print_report(report, threshold)
    return 0


def cmd_interpret(a: argparse.Namespace) -> int:
    from core import interpret
    from core.job import interpret_run

    table = interpret_run(a.run_dir, a.split)
    vocab = table.attrs["vocab"]
    print(f"Top {a.top} losses ({a.split}):")
    columns = ["file", "actual", "predicted", "prob_pred", "loss"]
    print(interpret.top_losses(table, a.top)[columns].to_string(index=False))
    if not interpret.is_multi_label(table):
        print("\nMost confused (actual -> predicted):")
        print(interpret.most_confused(table, vocab, min_val=1).to_string(index=False))
    print(f"\nTable: {interpret.table_path(a.run_dir, a.split)}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from core.bundle import load_bundle, predict_probs
    from core.images import open_image
    from core.listing import list_images
    from core.tta import predict_probs_tta

    if a.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {a.top_k}.")
    bundle = load_bundle(a.model)
    probs_of = predict_probs_tta if a.tta else predict_probs
    status = 0
    # a folder stands for its images, found by the one walk every dataset uses (hidden files skipped)
    paths = [p for path in a.images for p in (list_images(path) if path.is_dir() else [path])]
    for path in paths:
        try:
            image = open_image(path)
        except (OSError, ValueError) as e:
            print(json.dumps({"file": str(path), "error": str(e)}))
            status = 2
            continue
        values, indices = probs_of(bundle, [image])[0].topk(min(a.top_k, bundle.meta.n_out))
        top = [{"label": bundle.meta.vocab[i], "prob": round(p, 6)} for p, i in zip(values.tolist(), indices.tolist())]
        print(json.dumps({"file": str(path), "top": top}))
    return status


def cmd_explain(a: argparse.Namespace) -> int:
    from core.bundle import load_bundle
    from core.explain import gradcam, overlay
    from core.fileio import create_file
    from core.images import open_image

    if a.out.exists():  # checked before the model loads: refusing takes no seconds
        raise FileExistsError(f"{a.out} already exists; choose another --out.")
    bundle = load_bundle(a.model)
    vocab = bundle.meta.vocab
    if a.class_name is not None and a.class_name not in vocab:
        raise DataError(f"Unknown class {a.class_name!r}; the model's classes are {', '.join(vocab)}.")
    try:
        image = open_image(a.image)
    except OSError as e:
        raise DataError(f"Cannot read {a.image}: {e}") from None
    index = None if a.class_name is None else vocab.index(a.class_name)
    picture = overlay(image, gradcam(bundle, image, index))
    create_file(a.out, lambda tmp: picture.save(tmp, format="PNG"))
    print(a.out)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from core.export import export_onnx

    r = export_onnx(a.model, a.out, a.opset, force=a.force)
    print(f"ONNX file: {r.onnx} (opset {r.opset}, input {list(r.input_shape)} float32, output probabilities)")
    print(f"preprocessing: {r.meta}")
    print(f"parity: max probability difference {r.parity.max_abs_diff:.2e} on {r.parity.images} "
          f"{r.parity.on} (ONNX Runtime vs PyTorch); {r.seconds:.1f} s")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from core.demo import DemoSpec, make_demo_dataset

    root = make_demo_dataset(a.folder, DemoSpec(n_per_class=a.n_per_class, size=a.size))
    print(root)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core", description="Loupe: image classifiers the fast.ai way.")
    sub = p.add_subparsers(dest="command", required=True)

    train = sub.add_parser(TRAIN, help="train a model and leave a complete run directory")
    _data_and_model_args(train)
    train.add_argument("--resume", action="store_true", help="continue a stopped or crashed run from its checkpoint")
    train.add_argument("--gpus", type=int, default=1,
                       help="processes (GPUs) to train on: above 1 the run relaunches itself under torchrun (DDP); "
                       "--bs is per process")
    train.add_argument("--create-only", action="store_true",
                       help="write the run directory and its config.json, print its path, train nothing")
    train.set_defaults(func=cmd_train)

    lrf = sub.add_parser(LR_FIND, help="sweep learning rates and print suggestions")
    _data_and_model_args(lrf)
    lrf.add_argument("--num-it", type=int, default=None,
                     help="steps of the sweep (default: sized to the data, 40 to 100; it stops once the loss diverges)")
    lrf.add_argument("--start-lr", type=float, default=1e-7)
    lrf.add_argument("--end-lr", type=float, default=10.0)
    lrf.set_defaults(func=cmd_lr_find, resume=False)

    check = sub.add_parser(CHECK_LABELS, help="K-fold out-of-sample predictions scored for label issues; writes "
                           "label_issues.csv in the run directory")
    _data_and_model_args(check)
    check.add_argument("--folds", type=int, default=5, help="K: every image is predicted by a model trained on "
                       "the other K-1 folds (2-10)")
    check.add_argument("--fold-epochs", type=int, help="epochs each fold trains (default: --epochs)")
    check.add_argument("--resume", action="store_true", help="continue a stopped check (folds done are kept)")
    check.add_argument("--gpus", type=int, default=1, help="processes (GPUs): above 1 under torchrun (DDP)")
    check.add_argument("--create-only", action="store_true", help="write the run directory, print it, run nothing")
    check.set_defaults(func=cmd_check_labels)

    health = sub.add_parser("health", help="duplicates, leaks across the split and outliers of a dataset")
    health.add_argument("data", help="dataset folder")
    health.add_argument("--run-dir", type=Path, help="a finished run: its model embeds the images, its split "
                        "tells the leaks (default: no model; the split Loupe would draw)")
    health.add_argument("--layout", default="auto", choices=LAYOUTS)
    health.add_argument("--label-regex", help="filename_regex layout: the first group is the label")
    health.add_argument("--csv", dest="csv_file", help="csv layout: CSV file name inside the dataset folder")
    health.add_argument("--size", type=int, default=224, help="image side without a run (the decode cache's key)")
    health.add_argument("--valid-pct", type=float, default=0.2)
    health.add_argument("--seed", type=int, default=42)
    health.add_argument("--group-regex", help="keep items whose paths share this match on one side of the split")
    health.add_argument("--threshold", type=float, default=None,
                        help="pixel match (0-1) above which a pair is a near duplicate (default: measured)")
    health.add_argument("--json", action="store_true", help="print one JSON object (duplicates, leaks, outliers)")
    health.add_argument("--all-pairs", action="store_true", help="with --json: every candidate pair and file too")
    health.add_argument("--out", type=Path, help="also save the report (and progress while it runs) in this folder")
    health.set_defaults(func=cmd_health)

    interp = sub.add_parser("interpret", help="top losses and most-confused pairs of a finished run")
    interp.add_argument("--run-dir", type=Path, required=True)
    interp.add_argument("--split", default="valid", choices=("valid", "train"))
    interp.add_argument("--top", type=int, default=20)
    interp.set_defaults(func=cmd_interpret)

    pred = sub.add_parser("predict", help="top-k classes for images, one JSON object per image")
    pred.add_argument("model", type=Path, help="a run directory or a model.safetensors bundle")
    pred.add_argument("images", nargs="+", type=Path, metavar="PATH",
                      help="image files, or folders (their images, recursively; hidden files skipped)")
    pred.add_argument("--top-k", type=int, default=3)
    pred.add_argument("--tta", action="store_true", help="test-time augmentation: the plain prediction blended "
                      "with 4 augmented ones, as fastai's tta (5 passes per image)")
    pred.set_defaults(func=cmd_predict)

    expl = sub.add_parser("explain", help="a Grad-CAM heatmap of one image over it, written as a PNG")
    expl.add_argument("model", type=Path, help="a run directory or a model.safetensors bundle")
    expl.add_argument("image", type=Path)
    expl.add_argument("--out", type=Path, required=True, help="PNG to write (never overwritten)")
    expl.add_argument("--class", dest="class_name", help="the class to explain (default: the predicted one)")
    expl.set_defaults(func=cmd_explain)

    exp = sub.add_parser("export", help="the model as an ONNX file (probabilities out) checked against PyTorch")
    exp.add_argument("model", type=Path, help="a run directory or a model.safetensors bundle")
    exp.add_argument("--format", default="onnx", choices=("onnx",))
    exp.add_argument("--out", type=Path, required=True, help="the .onnx file; its preprocessing goes to <out>.json")
    exp.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    exp.add_argument("--force", action="store_true", help="replace an existing --out")
    exp.set_defaults(func=cmd_export)

    demo = sub.add_parser("demo", help="write the demo dataset (drawn shapes, a few mislabelled)")
    demo.add_argument("folder", type=Path)
    demo.add_argument("--n-per-class", type=int, default=40)
    demo.add_argument("--size", type=int, default=64)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
