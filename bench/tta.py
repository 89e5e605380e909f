"""What test-time augmentation gains on a finished run's validation images: error rate without and with TTA.

    LOUPE_HOME=/tmp/tta-home python -m core train ../shared/data/bears --no-pretrained --schedule one_cycle \
        --size 128 --bs 32 --epochs 5 --lr 3e-3 --run-dir /tmp/tta-bears
    python bench/tta.py /tmp/tta-bears [/tmp/another-run ...] [--n 4] [--beta 0.25]

The plain error is the run's own validation table (core.job.interpret_run); the TTA error is core.tta's
(fastai's tta: n augmented passes with the run's training augmentation, averaged, lerped with the plain
prediction by beta), cached in the run directory. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.job import interpret_run  # noqa: E402
from core.tta import BETA, N_AUG, interpret_run_tta  # noqa: E402


def error(table) -> float:
    return float((~table["correct"]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--n", type=int, default=N_AUG)
    p.add_argument("--beta", type=float, default=BETA)
    a = p.parse_args()
    for run in a.runs:
        plain = interpret_run(run, "valid")
        start = time.perf_counter()
        tta = interpret_run_tta(run, "valid", n=a.n, beta=a.beta)
        print(json.dumps({"run": str(run), "images": len(plain), "error": round(error(plain), 4),
                          "error_tta": round(error(tta), 4), "loss": round(float(plain["loss"].mean()), 4),
                          "loss_tta": round(float(tta["loss"].mean()), 4), "n": a.n, "beta": a.beta,
                          "tta_seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
