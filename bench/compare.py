"""Loupe vs fastai vs the compute limit, side by side on the same data, model, size, batch, epochs and seed.

    pip install -r bench/requirements-bench.txt
    python bench/compare.py --data ../shared/data/bears --size 128 --bs 32 --epochs 4

Each contender runs in a child process of this one (so peak memory is its own), one after the other on
an idle machine, and prints one JSON line; this process prints the table and the ratios. The compute
limit is the same model (fastai-style head, channels_last) stepping on random tensors already in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _throughput(batch_times: list[list[float]], bs: int) -> tuple[float, list[float]]:
    """Images/s per epoch from the end times of its batches (the first batch of an epoch only starts the clock);
    the median over epochs after the first, which pays for decoding and warm-up."""
    per_epoch = [(len(t) - 1) * bs / (t[-1] - t[0]) for t in batch_times if len(t) > 2]
    later = per_epoch[1:] or per_epoch
    return statistics.median(later), per_epoch


def _latency(predict_once, n: int = 30) -> tuple[float, float]:
    predict_once()  # warm-up
    times = []
    for _ in range(n):
        start = time.perf_counter()
        predict_once()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1000, times[int(len(times) * 0.95) - 1] * 1000


def run_loupe(a: argparse.Namespace) -> dict:
    os.environ["LOUPE_HOME"] = tempfile.mkdtemp(prefix="loupe-bench-")  # a cold decode cache
    from PIL import Image

    from core import interpret
    from core.bundle import load_bundle, predict
    from core.data import DataConfig
    from core.job import split_table
    from core.lrfind import lr_find
    from core.model import ModelConfig
    from core.step import get_preds
    from core.train import Learner, TrainConfig, setup_training

    cfg = TrainConfig(
        data=DataConfig(path=a.data, size=a.size, batch_size=a.bs, seed=a.seed, num_workers=a.workers),
        model=ModelConfig(arch="resnet18", pretrained=False),
        schedule="one_cycle",
        epochs=a.epochs,
        lr=a.lr,
    )
    batch_times: list[list[float]] = []

    def on_event(kind, **f):
        if kind == "batch":
            if f["batch"] == 1:
                batch_times.append([])
            batch_times[-1].append(time.perf_counter())

    learner = Learner(cfg, setup_training(cfg), on_event=on_event)
    history = learner.fit()
    ips, per_epoch = _throughput(batch_times, a.bs)

    start = time.perf_counter()
    lr_find(Learner(cfg, setup_training(cfg)), num_it=100)
    lr_find_s = time.perf_counter() - start

    start = time.perf_counter()
    get_preds(learner.model, learner.dls.valid, learner.on_device, learner.loss_fn)
    one_pass_s = time.perf_counter() - start
    start = time.perf_counter()
    dls = learner.dls
    table = split_table(learner.model, dls.source, dls.split, "valid", cfg, learner.on_device, dls.valid)
    interpret.top_losses(table, 9)
    interpret_s = time.perf_counter() - start

    bundle_path = learner.export(Path(os.environ["LOUPE_HOME"]) / "model.safetensors")
    bundle = load_bundle(bundle_path)
    image_bytes = learner.dls.source.files[learner.dls.split.valid[0]].read_bytes()

    def predict_once():  # what the Predict page does with an upload
        import io

        predict(bundle, [Image.open(io.BytesIO(image_bytes))], top_k=3)

    p50, p95 = _latency(predict_once)
    return dict(
        images_per_s=ips, epochs_images_per_s=per_epoch, lr_find_s=lr_find_s, interpret_s=interpret_s,
        one_inference_pass_s=one_pass_s, predict_p50_ms=p50, predict_p95_ms=p95,
        error_rate=history[-1]["error_rate"], peak_mb=_peak_mb(), workers=learner.dls.train.num_workers,
    )


def run_fastai(a: argparse.Namespace) -> dict:
    from fastai.vision.all import (
        Callback,
        ClassificationInterpretation,
        ImageDataLoaders,
        PILImage,
        Resize,
        aug_transforms,
        error_rate,
        resnet18,
        vision_learner,
    )

    from core.augment import presize_side

    batch_times: list[list[float]] = []

    class Timer(Callback):
        def before_epoch(self):
            batch_times.append([])

        def after_batch(self):
            if self.training:
                batch_times[-1].append(time.perf_counter())

    kwargs = {} if a.workers is None else {"num_workers": a.workers}
    dls = ImageDataLoaders.from_folder(
        a.data, valid_pct=0.2, seed=a.seed, bs=a.bs, item_tfms=Resize(presize_side(a.size)),
        batch_tfms=aug_transforms(size=a.size, min_scale=0.35), **kwargs,
    )
    learn = vision_learner(dls, resnet18, pretrained=False, metrics=error_rate, cbs=[Timer()])
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(a.epochs, a.lr)
        final_error = float(learn.recorder.values[-1][2])
        ips, per_epoch = _throughput(batch_times, a.bs)
        learn.remove_cb(Timer)
        start = time.perf_counter()
        learn.lr_find(num_it=100, show_plot=False)
        lr_find_s = time.perf_counter() - start
        start = time.perf_counter()
        learn.get_preds(dl=dls.valid)
        one_pass_s = time.perf_counter() - start
        start = time.perf_counter()
        ClassificationInterpretation.from_learner(learn).top_losses(9)
        interpret_s = time.perf_counter() - start
        image = dls.valid_ds.items[0]
        p50, p95 = _latency(lambda: learn.predict(PILImage.create(image)))
    return dict(
        images_per_s=ips, epochs_images_per_s=per_epoch, lr_find_s=lr_find_s, interpret_s=interpret_s,
        one_inference_pass_s=one_pass_s, predict_p50_ms=p50, predict_p95_ms=p95, error_rate=final_error,
        peak_mb=_peak_mb(), workers=dls.train.num_workers,
    )


def run_limit(a: argparse.Namespace) -> dict:
    """The same model stepping on in-memory tensors: what the machine can do with no input pipeline at all."""
    import torch

    from core.model import ModelConfig, build_model

    torch.manual_seed(a.seed)
    result = {}
    for layout in ("channels_last", "contiguous"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        model = build_model(ModelConfig(arch="resnet18", pretrained=False), 2).to(memory_format=fmt).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(a.bs, 3, a.size, a.size).contiguous(memory_format=fmt)
        y = torch.randint(0, 2, (a.bs,))
        steps, times = 12, []
        for i in range(steps + 2):
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 2:
                times.append(time.perf_counter() - start)
        result[f"images_per_s_{layout}"] = a.bs / statistics.median(times)
    result["images_per_s"] = max(result.values())
    result["peak_mb"] = _peak_mb()
    return result


WORKERS = {"loupe": run_loupe, "fastai": run_fastai, "limit": run_limit}


def table(results: dict[str, dict]) -> str:
    loupe, fastai, limit = results.get("loupe", {}), results.get("fastai", {}), results.get("limit", {})
    rows = [
        ("training images/s (median, epochs 2+)", "images_per_s", "{:.1f}"),
        ("lr_find seconds (num_it=100)", "lr_find_s", "{:.1f}"),
        ("one inference pass over valid (s)", "one_inference_pass_s", "{:.2f}"),
        ("top-losses interpretation (s)", "interpret_s", "{:.2f}"),
        ("single-image predict p50 (ms)", "predict_p50_ms", "{:.1f}"),
        ("single-image predict p95 (ms)", "predict_p95_ms", "{:.1f}"),
        ("final error rate", "error_rate", "{:.3f}"),
        ("peak memory (MB RSS)", "peak_mb", "{:.0f}"),
    ]
    fmt = lambda d, k, f: f.format(d[k]) if k in d else "-"  # noqa: E731
    lines = ["| measure | Loupe | fastai | compute limit |", "|---|---|---|---|"]
    lines += [f"| {name} | {fmt(loupe, k, f)} | {fmt(fastai, k, f)} | {fmt(limit, k, f)} |" for name, k, f in rows]
    ratios = []
    if loupe and limit:
        share = loupe["images_per_s"] / limit["images_per_s"]
        ratios.append(f"Loupe / compute limit, training throughput: {share:.2f}")
    if loupe and fastai:
        ratios.append(f"Loupe / fastai, training throughput: {loupe['images_per_s'] / fastai['images_per_s']:.2f}x")
        ratios.append(f"fastai / Loupe, lr_find time: {fastai['lr_find_s'] / loupe['lr_find_s']:.2f}x faster")
        passes = loupe["interpret_s"] / loupe["one_inference_pass_s"]
        ratios.append(f"Loupe interpretation / one inference pass: {passes:.2f}")
    return "\n".join(lines + [""] + [f"- {r}" for r in ratios])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="an image folder, one subfolder per class")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workers", type=int, help="DataLoader workers for both (default: each tool's own default)")
    p.add_argument("--only", nargs="+", choices=list(WORKERS), default=list(WORKERS))
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    a = p.parse_args()
    a.data = str(Path(a.data).resolve())
    if a.worker:
        print(json.dumps(WORKERS[a.worker](a)))
        return 0
    results = {}
    for name in a.only:
        args = [sys.executable, __file__, "--worker", name, *sys.argv[1:]]
        done = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            print(f"{name} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr)
    print(table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
