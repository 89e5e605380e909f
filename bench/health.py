"""Dataset health against planted problems: near-copies (half across the split) and off-topic images.

    python bench/health.py --data ../shared/data/bears                 # trains a model on the copy first
    python bench/health.py --data ../shared/data/bears --no-train      # no run: the embedding without a model
    python bench/health.py --scale 10000 --data ../shared/data/bears   # time on 10k images (warm cache)

The dataset is copied with its planted problems (bench/health_data.py: copies of 5% of the images,
re-encoded at JPEG quality 40-85, resized by 0.5-0.8, cropped by 10%, mirrored half the time; half of them
on the other side of the split; 20 off-topic images in one class folder). A run of resnet18 from scratch
(128 px, 5 epochs of one_cycle, like the Train page's offline default) is trained on it unless --no-train,
then `python -m core health` runs on it in its own process. Printed: for each match threshold, copies
found (recall over the planted pairs and the --known pairs of the source), false pairs among those
reported, leaks found; off-topic images among the top 40 outliers; seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from health_data import make_injected  # noqa: E402

# The bear photos' own duplicates, found by this check and confirmed by eye: a resized copy, three mirrored
# ones (one of them also cropped) and the same photo with its background cut out (black 5, 36 and 121).
BEARS_KNOWN = [("teddys/00000047.jpg", "teddys/00000049.jpg"), ("black/00000005.jpg", "black/00000036.jpg"),
               ("black/00000005.jpg", "black/00000121.jpg"), ("black/00000185.jpg", "black/00000016.jpg"),
               ("grizzly/00000078.jpg", "grizzly/00000100.jpg")]


def _python(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          check=False)


def _train(data: Path, work: Path, env: dict, epochs: int) -> Path:
    run = work / "runs" / "health"
    done = _python("train", str(data), "--no-pretrained", "--schedule", "one_cycle", "--size", "128", "--bs", "32",
                   "--epochs", str(epochs), "--lr", "3e-3", "--run-dir", str(run), env=env)
    if done.returncode:
        sys.exit(done.stderr)
    return run


def _truth_pairs(truth: dict, files: set[str], known: list[tuple[str, str]]) -> set[frozenset]:
    """Every pair of files that show the same photo: the planted copies, the source's own (wherever the split
    put them), and the pairs these imply (a copy of one of two duplicates is a copy of the other)."""
    links = [(c["original"], c["copy"]) for c in truth["copies"]]
    for a, b in known:
        fa = [f for f in files if f.endswith("/" + a) and "/copy_" not in f]
        fb = [f for f in files if f.endswith("/" + b) and "/copy_" not in f]
        if fa and fb:
            links.append((fa[0], fb[0]))
    groups: list[set[str]] = []
    for a, b in links:
        joined = [g for g in groups if a in g or b in g]
        merged = set().union({a, b}, *joined)
        groups = [g for g in groups if g not in joined] + [merged]
    return {frozenset((x, y)) for g in groups for x in g for y in g if x < y}


def _score(report: dict, truth: dict, known: list[tuple[str, str]], thresholds: list[float]) -> None:
    import pandas as pd

    pairs = pd.DataFrame(report["pairs"])
    files = set(report["files"])
    true = _truth_pairs(truth, files, known)
    exact = {frozenset((a, b)) for g in report["exact_duplicates"] for a in g for b in g if a != b}
    print(f"{len(true)} true pairs ({len(truth['copies'])} planted, {len(true) - len(truth['copies'])} of the source's"
          f" own); {len(pairs)} candidate pairs; {len(exact)} exact pairs")
    found_cand = sum(frozenset((a, b)) in true for a, b in zip(pairs["file_a"], pairs["file_b"]))
    print(f"candidates hold {found_cand + len(true & exact)} of the true pairs")
    print("| match >= | planted copies found | the source's own pairs found | reported pairs | false pairs | "
          "false share | planted leaks found |")
    print("|---|---|---|---|---|---|---|")
    planted = {frozenset((c["original"], c["copy"])) for c in truth["copies"]}
    planted_across = {frozenset((c["original"], c["copy"])) for c in truth["copies"] if c["across"]}
    for t in thresholds:
        near = pairs[pairs["match"] >= t]
        reported = {frozenset((a, b)) for a, b in zip(near["file_a"], near["file_b"])} | exact
        found, own = len(reported & planted), len((reported & true) - planted)
        false = len(reported - true)
        leaks = len(reported & planted_across)
        print(f"| {t:.2f} | {found}/{len(planted)} ({found / len(planted):.0%}) | {own}/{len(true - planted)} | "
              f"{len(reported)} | {false} | {false / max(len(reported), 1):.0%} | {leaks}/{len(planted_across)} |")
    for name, t in (("cosine >= 0.9: imagededup's CNN default, FiftyOne's distance 0.1", 0.9),
                    ("cosine >= 0.75: FiftyOne's distance 0.25", 0.75)):
        near = pairs[pairs["cosine"] >= t]  # among the candidates only: a lower bound on what they would report
        reported = {frozenset((a, b)) for a, b in zip(near["file_a"], near["file_b"])} | exact
        found, false = len(reported & planted), len(reported - true)
        print(f"| {name} (no pixel match) | {found}/{len(planted)} | | {len(reported)} | {false} | "
              f"{false / max(len(reported), 1):.0%} | |")
    near = pairs[pairs["match"] >= thresholds[0]]
    for a, b, m in zip(near["file_a"], near["file_b"], near["match"]):
        if frozenset((a, b)) not in true:
            print(f"  false at {thresholds[0]:.2f}: {a} {b} match {m:.3f}")
    scores = {frozenset((a, b)): m for a, b, m in zip(pairs["file_a"], pairs["file_b"], pairs["match"])}
    for pair in sorted(true - exact, key=sorted):
        if scores.get(pair, -1) < thresholds[-1]:
            print(f"  true pair {' '.join(sorted(pair))}: match {scores.get(pair, 'not a candidate')}")
    top = report["outliers"][:40]
    off = set(truth["off_topic"])
    print(f"off-topic in the top 40 outliers: {len(off & set(top))}/{len(off)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "bears")
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--no-train", action="store_true", help="no run: the check embeds without a model of the data")
    p.add_argument("--reuse", action="store_true", help="with --work: keep the data and run made there before")
    p.add_argument("--thresholds", default="0.6,0.65,0.68,0.7,0.72,0.75,0.8")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="loupe-health-"))
    data = work / "data"
    run = work / "runs" / "health"
    reuse = a.reuse and (work / "truth.json").exists() and (a.no_train or (run / "model.safetensors").exists())
    truth = json.loads((work / "truth.json").read_text()) if reuse else make_injected(a.data, data, seed=a.seed)
    env = {**os.environ, "LOUPE_HOME": str(work / "home"), "PYTHONUNBUFFERED": "1"}
    args = ["health", str(data), "--json", "--all-pairs"]
    if not a.no_train:
        if not reuse:
            started = time.monotonic()
            _train(data, work, env, a.epochs)
            print(f"trained in {time.monotonic() - started:.0f} s")
        args += ["--run-dir", str(run)]
    started = time.monotonic()
    done = _python(*args, env=env)
    if done.returncode:
        sys.exit(done.stderr)
    print(f"health check: {time.monotonic() - started:.1f} s (process)")
    report = json.loads(done.stdout)
    print(f"embedding: {report['embedding']}; check {report['seconds']} s")
    known = BEARS_KNOWN if a.data.name == "bears" else []
    _score(report, truth, known, [float(t) for t in a.thresholds.split(",")])


if __name__ == "__main__":
    main()
