"""Finding planted label flips: each ranking at the same training budget, scored against the truth.

    python -m venv .venv/bench && .venv/bench/bin/pip install -r bench/requirements-bench.txt
    .venv/bench/bin/python bench/label_noise.py --data shapes --flips lookalike
    .venv/bench/bin/python bench/label_noise.py --data ../shared/data/bears --flips lookalike \\
        --pairs black:grizzly,grizzly:black
    .venv/bench/bin/python bench/label_noise.py --only loupe loupe-check --folds 5 --fold-epochs 3

The dataset (one folder per class; `shapes` generates the demo's five shapes with the square drawn in
the circle's colour and the cross in the star's: two look-alike pairs) is copied into a temporary folder
with known flips planted: `random` moves --frac of all images to a uniformly chosen other class,
`lookalike` moves --frac of each source class of --pairs to the class it resembles. Each contender then
trains on that copy in a child process of its own (same model, size, batch, epochs, learning rate, seed,
no augmentation unless --aug) and returns a score per file (higher = more likely mislabelled) and the files
it flags. This process prints, per contender and seed: recall@k (k = the number of flips: the share of
flips among the k highest scores), recall@2k, precision and recall of the flagged set (for the in-sample
rankings: the images whose prediction differs from their label; for the label check: cleanlab's
confident-learning issues), AUROC, the valid error (against the given, partly flipped labels; for the label
check: the out-of-sample error over all folds), the seconds it took and, when `loupe` (one training run of
the same config) ran for the seed, those seconds over its seconds ("x train"; --time-train adds `loupe`).

A contender is one function `(data_dir, args, work_dir) -> dict` in CONTENDERS returning
`{"scores": {file: score}, "flagged": [file, ...] or None, "valid_error": float, "extra": {name: {...}}}`,
files relative to data_dir as on disk; each entry of the optional "extra" is one more ranking of the same
training (its own table row): `loupe-check` (Loupe's K-fold label check) brings cleanlab's own
find_label_issues (`cleanlab-cl`), normalized margin (`check-margin`), the folds' training dynamics
(`check-dynamics`) and the mean rank percentile of score and dynamics (`check-combined`), all on the
check's out-of-sample probabilities.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = ("circle", "square", "triangle", "star", "cross")
DEFAULT_PAIRS = {"shapes": "circle:cross,star:square"}


# ---------------------------------------------------------------- the data and its planted flips


def make_shapes(root: Path, n_per_class: int, seed: int) -> Path:
    """The demo's five shapes with two look-alike pairs: a square in the circle's colour, a cross in the star's,
    so within a pair only the outline tells the classes apart (as a 1 and a 7 in handwriting)."""
    from core.demo import SHAPE_COLOURS, DemoSpec, make_demo_dataset

    colours = {"cross": SHAPE_COLOURS["circle"], "square": SHAPE_COLOURS["star"]}
    spec = DemoSpec(classes=SHAPES, n_per_class=n_per_class, size=64, mislabel_frac=0.0, seed=seed, colours=colours)
    return make_demo_dataset(root, spec)


def _class_files(src: Path) -> dict[str, list[Path]]:
    from core.listing import is_image_file

    classes = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    return {d.name: sorted(f for f in d.rglob("*") if is_image_file(f)) for d in classes}


def _parse_pairs(text: str, classes: list[str]) -> dict[str, str]:
    pairs = dict(p.split(":", 1) for p in text.split(",") if p)
    unknown = sorted((set(pairs) | set(pairs.values())) - set(classes))
    if unknown:
        raise SystemExit(f"--pairs names classes the data does not have: {unknown} (it has {classes}).")
    return pairs


def plant_flips(src: Path, dst: Path, a: argparse.Namespace) -> list[str]:
    """Copy `src` to `dst` with flips planted; returns the flipped files (relative to dst, posix).

    Every copy is named <true class>-<name>, so names stay unique when two class folders share one."""
    files = _class_files(src)
    classes = list(files)
    rng = np.random.default_rng(a.plant_seed)
    target: dict[Path, str] = {}
    if a.flips == "random":
        everything = [(c, f) for c in classes for f in files[c]]
        for i in rng.choice(len(everything), size=round(a.frac * len(everything)), replace=False):
            true, f = everything[i]
            target[f] = str(rng.choice([c for c in classes if c != true]))
    else:
        for source, look_alike in _parse_pairs(a.pairs, classes).items():
            own = files[source]
            for i in rng.choice(len(own), size=round(a.frac * len(own)), replace=False):
                target[own[i]] = look_alike
    flipped = []
    for true, own in files.items():
        for f in own:
            label = target.get(f, true)
            out = dst / label / f"{true}-{f.name}"
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, out)  # a fresh mtime: no decoded-cache entry of another copy can match
            if label != true:
                flipped.append(out.relative_to(dst).as_posix())
    return sorted(flipped)


# ---------------------------------------------------------------- contenders (each runs in a child process)


def _set(config: dict, assignment: str) -> None:
    """`data.flip=false` style override of a nested config dict; the value is JSON when it parses."""
    key, _, text = assignment.partition("=")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise SystemExit(f"--set {key}: no such config field.")
    node[leaf] = value


def loupe_config(data: Path, a: argparse.Namespace) -> dict:
    from core.data import DataConfig
    from core.model import ModelConfig
    from core.train import TrainConfig

    aug = {} if a.aug else {"min_scale": 1.0, "flip": False, "max_rotate": 0.0, "max_lighting": 0.0}
    cfg = TrainConfig(
        data=DataConfig(path=str(data), size=a.size, batch_size=a.bs, seed=a.seed, num_workers=0, **aug),
        model=ModelConfig(arch=a.arch, pretrained=False),
        schedule="one_cycle",
        epochs=a.epochs,
        lr=a.lr,
    ).to_dict()
    for assignment in a.set:
        _set(cfg, assignment)
    return cfg


def _quietly(log: Path, run) -> int:
    """run() with its printing (the epoch tables) sent to `log`, out of this process's output."""
    with open(log, "w") as out:
        saved, sys.stdout = sys.stdout, out
        try:
            return run()
        finally:
            sys.stdout = saved


def loupe(data: Path, a: argparse.Namespace, work: Path) -> dict:
    """Loupe's in-sample losses as the Clean page ranks them: a training run's train and valid tables."""
    from core import interpret, runs
    from core.job import run_training

    run_dir = work / "runs" / "loupe"
    runs.create_in(run_dir, loupe_config(data, a))
    if _quietly(work / "loupe.log", lambda: run_training(run_dir)) != 0:
        raise RuntimeError(f"Loupe's run failed: {(run_dir / 'status.json').read_text()}")
    tables = {s: interpret.load_table(interpret.table_path(run_dir, s)) for s in ("train", "valid")}
    both = pd.concat(tables.values(), ignore_index=True)
    files = [Path(f).relative_to(data).as_posix() for f in both["file"]]
    return {
        "scores": dict(zip(files, both["loss"].astype(float))),
        "flagged": [f for f, ok in zip(files, both["correct"]) if not ok],
        "valid_error": float(1 - tables["valid"]["correct"].mean()),
    }


def fastai(data: Path, a: argparse.Namespace, work: Path) -> dict:
    """fastai's in-sample top losses over train and valid, as ImageClassifierCleaner orders them."""
    from fastai.vision.all import (
        ImageDataLoaders,
        Resize,
        aug_transforms,
        error_rate,
        models,
        set_seed,
        vision_learner,
    )

    set_seed(a.seed)
    batch_tfms = aug_transforms(size=a.size, min_scale=0.35) if a.aug else None
    dls = ImageDataLoaders.from_folder(data, valid_pct=0.2, seed=a.seed, bs=a.bs, item_tfms=Resize(a.size),
                                       batch_tfms=batch_tfms, num_workers=0)
    learn = vision_learner(dls, getattr(models, a.arch), pretrained=False, metrics=error_rate)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(a.epochs, a.lr)
        scores, flagged = {}, []
        for ds_idx in (0, 1):  # ImageClassifierCleaner's _get_iw_info: every item, in order, model in eval mode
            dl = dls[ds_idx].new(shuffle=False, drop_last=False)
            _, targs, preds, losses = learn.get_preds(dl=dl, with_loss=True, with_decoded=True)
            for item, t, p, loss in zip(dl.dataset.items, targs.tolist(), preds.tolist(), losses.tolist()):
                file = Path(item).relative_to(data).as_posix()
                scores[file] = loss
                if t != p:
                    flagged.append(file)
        valid_error = float(learn.validate()[1])
    return {"scores": scores, "flagged": flagged, "valid_error": valid_error}


def loupe_check(data: Path, a: argparse.Namespace, work: Path) -> dict:
    """Loupe's label check (check-labels): --folds folds of loupe_config (at --fold-epochs), ranked by
    label_issues.csv's score, flagged where its `issue` is true; other rankings of the same folds as extras."""
    from core.config import TrainConfig
    from core.labelcheck import CheckSettings, create_check, out_of_sample_table, read_issues, run_label_check

    run_dir = work / "runs" / "check"
    create_check(TrainConfig.from_dict(loupe_config(data, a)), CheckSettings(a.folds, a.fold_epochs), run_dir)
    if _quietly(work / "check.log", lambda: run_label_check(run_dir)) != 0:
        raise RuntimeError(f"Loupe's label check failed: {(run_dir / 'status.json').read_text()}")
    issues, table = read_issues(run_dir), out_of_sample_table(run_dir)
    return {
        "scores": dict(zip(issues["file"], issues["score"].astype(float))),
        "flagged": list(issues["file"][issues["issue"]]),
        "valid_error": float(1 - table["correct"].mean()),
        "extra": check_rankings(data, issues, table),
    }


def check_rankings(data: Path, issues: pd.DataFrame, table: pd.DataFrame) -> dict:
    """The check's out-of-sample probabilities ranked other ways: cleanlab's own find_label_issues (Loupe's
    wiring checked against it), normalized margin, training dynamics, and score and dynamics combined."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from core.interpret import table_probs

    vocab = list(table.attrs["vocab"])
    probs = table_probs(table, vocab)
    probs = probs / probs.sum(axis=1, keepdims=True)
    labels = np.array([vocab.index(c) for c in table["actual"]])
    files = [Path(f).relative_to(data).as_posix() for f in table["file"]]
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    dynamics = issues.set_index("file").loc[files, "dynamics"].to_numpy(dtype=float)
    score = 1 - get_label_quality_scores(labels, probs, method="self_confidence")
    combined = (pd.Series(score).rank(pct=True) + pd.Series(dynamics).rank(pct=True)) / 2

    def ranking(scores, flagged=None) -> dict:
        return {"scores": dict(zip(files, map(float, scores))), "flagged": flagged}

    return {
        "cleanlab-cl": ranking(score, [files[i] for i in ranked]),
        "check-margin": ranking(1 - get_label_quality_scores(labels, probs, method="normalized_margin")),
        "check-dynamics": ranking(dynamics),
        "check-combined": ranking(combined),
    }


CONTENDERS = {"loupe": loupe, "fastai": fastai, "loupe-check": loupe_check}


# ---------------------------------------------------------------- scoring


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a flipped file outscores a clean one (ties count half): Mann-Whitney U / (n1 n0)."""
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    n1, n0 = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def evaluate(result: dict, flipped: list[str]) -> dict:
    files = sorted(result["scores"])
    truth = set(flipped)
    missing = truth - set(files)
    if missing:
        raise RuntimeError(f"{len(missing)} flipped files got no score, e.g. {sorted(missing)[:3]}")
    scores = np.array([result["scores"][f] for f in files], dtype=float)
    positive = np.array([f in truth for f in files])
    order = np.argsort(-scores, kind="stable")
    k = len(truth)
    flagged = set(result["flagged"] or ())
    flags = result["flagged"] is not None  # a score without a flagged set (dynamics): no flag columns
    return {
        "recall@k": positive[order[:k]].mean(),
        "recall@2k": positive[order[: 2 * k]].sum() / k,
        "precision": len(flagged & truth) / max(len(flagged), 1) if flags else float("nan"),
        "flag_recall": len(flagged & truth) / k if flags else float("nan"),
        "flagged": len(flagged) if flags else float("nan"),
        "auroc": auroc(scores, positive),
        "valid_error": result.get("valid_error", float("nan")),
        "seconds": result["seconds"],
    }


# ---------------------------------------------------------------- main


def run_worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    started = time.perf_counter()
    result = CONTENDERS[a.worker](Path(a.data), a, Path(a.work))
    result["seconds"] = time.perf_counter() - started
    Path(a.out).write_text(json.dumps(result))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="shapes", help="a folder with one subfolder per class, or 'shapes'")
    p.add_argument("--n-per-class", type=int, default=300, help="shapes: images per class")
    p.add_argument("--flips", choices=("random", "lookalike"), default="lookalike")
    p.add_argument("--frac", type=float, default=0.3, help="share of the (source classes') images flipped")
    p.add_argument("--pairs", help="lookalike: source:look-alike class pairs, comma-separated "
                                   f"(shapes default: {DEFAULT_PAIRS['shapes']})")
    p.add_argument("--plant-seed", type=int, default=0, help="which images are flipped")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (split, order, init)")
    p.add_argument("--only", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aug", action="store_true", help="each tool's default augmentation (default: none)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of Loupe's TrainConfig, e.g. data.flip=false (repeatable)")
    p.add_argument("--folds", type=int, default=5, help="loupe-check: K")
    p.add_argument("--fold-epochs", type=int, help="loupe-check: epochs each fold trains (default: --epochs)")
    p.add_argument("--time-train", action="store_true",
                   help="also run `loupe` (one training run) when --only leaves it out, for the time ratio")
    p.add_argument("--threads", type=int, default=1, help="torch threads per contender")
    p.add_argument("--json", type=Path, help="also write every result here")
    for hidden in ("--worker", "--seed", "--work", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.seed = int(a.seed)
        run_worker(a)
        return 0

    if a.time_train and "loupe" not in a.only:
        a.only.insert(0, "loupe")
    work = Path(tempfile.mkdtemp(prefix="loupe-label-noise-"))
    try:
        if a.data == "shapes":
            src = make_shapes(work / "shapes-clean", a.n_per_class, a.plant_seed)
            a.pairs = a.pairs or DEFAULT_PAIRS["shapes"]
        else:
            src = Path(a.data).resolve()
        if a.flips == "lookalike" and not a.pairs:
            raise SystemExit("--flips lookalike needs --pairs, e.g. black:grizzly,grizzly:black")
        data = work / "data"
        flipped = plant_flips(src, data, a)
        n = sum(len(v) for v in _class_files(data).values())
        print(f"data: {n} images, {len(flipped)} planted flips ({a.flips}"
              f"{', ' + a.pairs if a.flips == 'lookalike' else ''}); {a.arch} from scratch, {a.size} px, "
              f"batch {a.bs}, {a.epochs} epochs one-cycle at {a.lr:g}, augmentation {'on' if a.aug else 'off'}"
              f"{', loupe overrides ' + ' '.join(a.set) if a.set else ''}; label check {a.folds} folds of "
              f"{a.fold_epochs or a.epochs} epochs", flush=True)
        rows = []
        for seed in a.seeds:
            for name in a.only:
                out, run_work = work / f"{name}-{seed}.json", work / f"{name}-{seed}"
                run_work.mkdir()
                args = [sys.executable, __file__, *sys.argv[1:], "--worker", name, "--seed", str(seed),
                        "--work", str(run_work), "--out", str(out), "--data", str(data)]
                # a workspace per child: no contender reads a decode cache another one filled
                env = {**os.environ, "LOUPE_HOME": str(run_work / "home"), "OMP_NUM_THREADS": str(a.threads)}
                done = subprocess.run(args, check=False, capture_output=True, text=True, cwd=REPO, env=env)
                if done.returncode != 0:
                    print(f"{name} (seed {seed}) failed:\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
                    continue
                result = json.loads(out.read_text())
                extra = result.pop("extra", {})
                for ranking, r in [(name, result), *((k, {**result, **v}) for k, v in extra.items())]:
                    rows.append({"ranking": ranking, "seed": seed, **evaluate(r, flipped)})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        add_time_ratio(rows)
        if rows:
            print(table(rows))
        if a.json:
            a.json.write_text(json.dumps({"flipped": len(flipped), "rows": rows}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def add_time_ratio(rows: list[dict]) -> None:
    """Each row's seconds over the seconds of `loupe` (one training run of the same config) on its seed."""
    train = {r["seed"]: r["seconds"] for r in rows if r["ranking"] == "loupe"}
    for r in rows:
        r["x_train"] = r["seconds"] / train[r["seed"]] if r["seed"] in train else float("nan")


def table(rows: list[dict]) -> str:
    df = pd.DataFrame(rows)
    cols = ["recall@k", "recall@2k", "precision", "flag_recall", "flagged", "auroc", "valid_error", "seconds",
            "x_train"]
    mean = df.groupby("ranking", sort=False)[cols].mean().reset_index().assign(seed="mean")
    df = pd.concat([df, mean], ignore_index=True) if df["seed"].nunique() > 1 else df
    lines = ["| ranking | seed | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for _, r in df.iterrows():
        cells = ["–" if pd.isna(r[c]) else f"{r[c]:.0f}" if c in ("flagged", "seconds")
                 else f"{r[c]:.2f}" if c == "x_train" else f"{r[c]:.3f}" for c in cols]
        lines.append(f"| {r['ranking']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
