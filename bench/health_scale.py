"""How long the health check takes on a large folder, decode cache warm.

    python bench/health_scale.py --data ../shared/data/bears --n 10000 --work /tmp/health10k

The folder is made of N distinct photos: each bear photo cut into a 5 x 4 grid of tiles (no two tiles
overlap, so they are no copies of each other), one folder per class. The check runs twice in its own
process: first with a cold decode cache (every JPEG decoded), then warm, which is what is timed; with
--train, also with the model of a 1-epoch run trained on the folder (resnet18 from scratch, 128 px).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.listing import list_images  # noqa: E402


def make_tiles(src: Path, dst: Path, n: int) -> int:
    made = 0
    for f in list_images(src):
        with Image.open(f) as im:
            img = ImageOps.exif_transpose(im).convert("RGB")
        w, h = img.width // 5, img.height // 4
        for r in range(4):
            for c in range(5):
                if made >= n:
                    return made
                out = dst / f.relative_to(src).parent / f"{f.stem}_{r}{c}.jpg"
                out.parent.mkdir(parents=True, exist_ok=True)
                img.crop((c * w, r * h, (c + 1) * w, (r + 1) * h)).save(out, quality=90)
                made += 1
    return made


def timed(args: list[str], env: dict) -> tuple[float, dict]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode:
        sys.exit(done.stderr)
    return time.monotonic() - started, json.loads(done.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "bears")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--train", action="store_true", help="also time the check with a run's model")
    a = p.parse_args()
    data = a.work / "data"
    if not data.exists():
        print(f"{make_tiles(a.data.resolve(), data, a.n)} tiles written")
    env = {**os.environ, "LOUPE_HOME": str(a.work / "home"), "PYTHONUNBUFFERED": "1"}
    base = ["health", str(data), "--size", "128", "--json"]
    cold, _ = timed(base, env)
    warm, report = timed(base, env)
    print(f"no run ({report['embedding']}): {report['images']} images, cold cache {cold:.0f} s, warm {warm:.0f} s "
          f"(check {report['seconds']} s); {len(report['duplicates'])} duplicate groups")
    if a.train:
        run = a.work / "runs" / "scale"
        if not (run / "model.safetensors").exists():
            subprocess.run([sys.executable, "-m", "core", "train", str(data), "--no-pretrained", "--schedule",
                            "one_cycle", "--size", "128", "--bs", "64", "--epochs", "1", "--lr", "3e-3",
                            "--run-dir", str(run)], cwd=REPO, env=env, check=True, capture_output=True)
        warm, report = timed([*base, "--run-dir", str(run)], env)
        print(f"with a run ({report['embedding']}): warm {warm:.0f} s (check {report['seconds']} s); "
              f"{len(report['duplicates'])} duplicate groups")


if __name__ == "__main__":
    main()
