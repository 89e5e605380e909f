"""A run's model as an ONNX file another program can use without Loupe, with a parity check.

The ONNX graph takes what validation feeds the model (float32 [N, 3, size, size], RGB, 0-1 then normalised
with the bundle's mean and std; N is dynamic) and returns probabilities (softmax, or sigmoid for multi-label):
what Predict shows, so a consumer needs no activation of its own. `<out>.json` beside it says how to make
that input. The file is written only after ONNX Runtime and PyTorch agree on the same batches.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from core.augment import normalize, presize_side, resize_batch
from core.bundle import Bundle, bundle_file, load_bundle, preprocess
from core.fileio import atomic_write, atomic_write_json, create_file, read_json
from core.rundir import DATASET_RECORD_FILE

INPUT_NAME, OUTPUT_NAME = "input", "probs"
PARITY_TOLERANCE = 1e-4  # max absolute probability difference allowed between ONNX Runtime and PyTorch
PARITY_IMAGES = 256  # at most this many images are compared (a bounded wait on the Runs page)
BATCH = 32


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond PARITY_TOLERANCE: the file is not written."""


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float  # max |p_onnx - p_torch| over every image and class
    images: int  # images compared
    on: str  # which images: "validation images of the run", "given images" or "random images"


@dataclass(frozen=True)
class ExportReport:
    onnx: Path
    meta: Path
    opset: int
    input_shape: tuple  # ("batch", 3, size, size)
    seconds: float  # export plus parity check
    parity: Parity


class _Probabilities(nn.Module):
    """The model with its activation, so the graph's output is what Predict shows."""

    def __init__(self, model: nn.Module, multi_label: bool) -> None:
        super().__init__()
        self.model, self.multi_label = model, multi_label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x).float()
        return logits.sigmoid() if self.multi_label else logits.softmax(dim=1)


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def _run_batches(run_dir: Path, bundle: Bundle) -> Iterator[torch.Tensor]:
    """The run's validation images, read from its dataset record through the decode cache (as interpret_run
    does), made into normalised float batches as validation makes them."""
    from core.data import make_loader
    from core.job import load_config
    from core.split import source_from_record

    source, split = source_from_record(read_json(run_dir / DATASET_RECORD_FILE))
    data = replace(load_config(run_dir).data, num_workers=0, batch_size=BATCH)
    loader = make_loader(source, split.valid[:PARITY_IMAGES], data, train=False)
    for batch in loader:
        if batch is not None:
            yield normalize(resize_batch(batch[0], bundle.meta.size), bundle.meta.mean, bundle.meta.std)


def _image_batches(bundle: Bundle, images: Sequence[Image.Image]) -> Iterator[torch.Tensor]:
    images = list(images)[:PARITY_IMAGES]
    for start in range(0, len(images), BATCH):
        yield preprocess(bundle, images[start : start + BATCH]).cpu()


def _random_batches(bundle: Bundle, n: int = 16) -> Iterator[torch.Tensor]:
    side = presize_side(bundle.meta.size)
    raw = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    yield normalize(resize_batch(raw, bundle.meta.size), bundle.meta.mean, bundle.meta.std)


def parity_batches(source: Path, bundle: Bundle, images: Sequence[Image.Image] | None) -> tuple[str, list]:
    """Which images the parity check uses: the run's validation images when they are there, else the images
    given, else seeded random pixels (a bundle file alone)."""
    run_dir = source if source.is_dir() else source.parent
    if (run_dir / DATASET_RECORD_FILE).is_file():
        with contextlib.suppress(OSError, KeyError, ValueError):
            batches = list(_run_batches(run_dir, bundle))
            if batches:
                return "validation images of the run", batches
    if images:
        return "given images", list(_image_batches(bundle, images))
    return "random images", list(_random_batches(bundle))


def check_parity(onnx_file: Path, bundle: Bundle, batches: Sequence[torch.Tensor], on: str = "given") -> Parity:
    """Run the ONNX file (ONNX Runtime, CPU) and the PyTorch model on the same batches; the max difference."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    wrapped = _Probabilities(bundle.model.to("cpu").float().eval(), bundle.meta.task == "multi_label")
    worst, count = 0.0, 0
    with torch.inference_mode():
        for x in batches:
            x = x.float().cpu().contiguous()
            ours = wrapped(x).numpy()
            theirs = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
            worst, count = max(worst, float(np.abs(ours - theirs).max())), count + len(x)
    return Parity(worst, count, on)


def _metadata(bundle: Bundle, opset: int, parity: Parity, onnx_name: str) -> dict:
    """Everything another program needs to feed the graph and read its output."""
    import onnx
    import onnxruntime

    m, side = bundle.meta, presize_side(bundle.meta.size)
    return {
        "model": onnx_name,
        "classes": m.vocab,  # output i is classes[i]
        "task": m.task,
        "threshold": m.threshold,  # multi-label: a class is predicted above it
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, m.size, m.size], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", m.n_out], "dtype": "float32",
                   "values": "sigmoid probabilities" if m.task == "multi_label" else "softmax probabilities"},
        "preprocessing": {
            "orientation": "apply the EXIF orientation, convert to RGB",
            "presize": {"side": side, "method": "centre square crop resized to side x side, bilinear "
                        "(PIL ImageOps.fit, centering 0.5)"},
            "resize": {"size": m.size, "method": "bilinear with antialias, align_corners=False "
                       "(torch.nn.functional.interpolate); none when side == size"},
            "channel_order": "RGB",
            "value_range": [0.0, 1.0],  # uint8 / 255, before normalisation
            "mean": list(m.mean),
            "std": list(m.std),  # (x - mean) / std per channel
        },
        "opset": opset,
        "parity": asdict(parity) | {"tolerance": PARITY_TOLERANCE},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def export_onnx(run_or_bundle: Path, out: Path, opset: int | None = None, *, force: bool = False,
                images: Sequence[Image.Image] | None = None) -> ExportReport:
    """Export a run's (or a bundle file's) model to `out` and its preprocessing to `<out>.json`; never replaces
    an existing file unless `force`. The ONNX file is checked against PyTorch before it is put in place."""
    import onnx

    source, out = Path(run_or_bundle), Path(out)
    meta_file = meta_path(out)
    if not force:
        for path in (out, meta_file):
            if path.exists():
                raise FileExistsError(f"{path} already exists; choose another file or replace it with --force.")
    if not bundle_file(source).is_file():
        raise FileNotFoundError(f"{source} has no model to export (no {bundle_file(source).name}).")
    started = time.perf_counter()
    bundle = load_bundle(source, device="cpu")
    wrapped = _Probabilities(bundle.model.float().eval(), bundle.meta.task == "multi_label").eval()
    example = torch.zeros(2, 3, bundle.meta.size, bundle.meta.size)  # 2, not 1: export specialises size-1 dims
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates its steps on stdout
            program = torch.onnx.export(
                wrapped, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=opset, dynamo=True, external_data=False,
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            )
    except Exception as err:  # the exporter raises many types; one line for the command line and the page
        raise RuntimeError(f"ONNX export failed: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    on, batches = parity_batches(source, bundle, images)
    box: dict = {}

    def write(tmp: Path) -> None:
        program.save(str(tmp), external_data=False)  # one self-contained file
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # a file for other programs: readable as any new file, not the temp file's 0600
        parity = check_parity(tmp, bundle, batches, on)
        if not parity.max_abs_diff < PARITY_TOLERANCE:
            raise ParityError(f"ONNX Runtime and PyTorch differ by {parity.max_abs_diff:.2e} (allowed "
                              f"{PARITY_TOLERANCE:g}) on {parity.images} {on}; nothing written.")
        box["parity"] = parity
        box["opset"] = next(o.version for o in onnx.load(str(tmp), load_external_data=False).opset_import
                            if o.domain in ("", "ai.onnx"))

    (atomic_write if force else create_file)(out, write)
    meta = _metadata(bundle, box["opset"], box["parity"], out.name)
    text = json.dumps(meta, indent=2) + "\n"
    if force:
        atomic_write_json(meta_file, meta)
    else:
        create_file(meta_file, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return ExportReport(out, meta_file, box["opset"], ("batch", 3, bundle.meta.size, bundle.meta.size),
                        time.perf_counter() - started, box["parity"])
