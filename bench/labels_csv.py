"""How long, and how much memory, reading a big labels.csv takes: core.data.prepare, as the Data page calls it.

    python bench/labels_csv.py                      # 2,000,000 rows (about 60 MB), 2,000 images on disk
    python bench/labels_csv.py --rows 200000

A careless folder: the CSV lists two million files with a label each, and the folder holds the first 2,000
of them (tiny PNGs), so every other row is reported as "listed in the CSV but not found". The folder lives in
a temporary directory, removed at the end. Each measure runs in a fresh child process, so the memory figure
is that process's peak resident size above what it held before the call. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]

MEASURE = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from core.data import DataConfig, prepare
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
before = rss_mb()
start = time.perf_counter()
source, bad, split = prepare(DataConfig(path={root!r}))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"seconds": round(seconds, 2), "peak_mb_above_start": round(peak - before),
                  "images": len(source), "left_out": len(source.unlabelled) + len(bad)}}))
"""


def make_dataset(root: Path, rows: int, present: int, classes: int) -> int:
    """`present` tiny PNGs under root/images and root/labels.csv listing `rows` files; returns the CSV's bytes."""
    (root / "images").mkdir(parents=True)
    for i in range(present):
        Image.new("RGB", (8, 8), (i % 256, 80, 160)).save(root / "images" / f"img_{i:07d}.png")
    with open(root / "labels.csv", "w") as f:
        f.write("fname,label\n")
        f.writelines(f"images/img_{i:07d}.png,class_{i % classes:02d}\n" for i in range(rows))
    return (root / "labels.csv").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--present", type=int, default=2_000)
    parser.add_argument("--classes", type=int, default=10)
    a = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="loupe-bench-csv-"))
    try:
        size = make_dataset(base / "data", a.rows, a.present, a.classes)
        out = subprocess.run([sys.executable, "-c", MEASURE.format(repo=str(REPO), root=str(base / "data"))],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps({"rows": a.rows, "csv_mb": round(size / 2**20, 1), **result}))


if __name__ == "__main__":
    main()
