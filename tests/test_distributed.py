"""DDP through torchrun on the CPU (gloo, 2 processes): one run, two ranks, one run directory written once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core import runs
from core.bundle import load_bundle
from core.data import DataConfig, EpochSampler, ShardSampler, make_loader, shard
from core.demo import DemoSpec, make_demo_dataset
from core.fileio import read_json
from core.model import ModelConfig
from core.rundir import BUNDLE_FILE, CHECKPOINT_FILE, DATASET_RECORD_FILE
from core.split import source_from_record
from core.step import OnDevice, get_preds, make_loss
from core.train import TrainConfig, valid_metrics

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240


def torchrun(run_dir: Path, home: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "LOUPE_HOME": str(home), "OMP_NUM_THREADS": "1", "LOUPE_DIST_TIMEOUT": "60",
           "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "core", "train", "--run-dir", str(run_dir)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def tiny_config(data: Path, epochs: int = 2) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(path=str(data), size=32, batch_size=8, num_workers=0),
        model=ModelConfig(arch="resnet18", pretrained=False),
        schedule="one_cycle",
        epochs=epochs,
        lr=1e-2,
    )


def events(run_dir: Path) -> list[dict]:
    return runs.read_events(run_dir)[0]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddp-home")


@pytest.fixture(scope="module")
def demo(home) -> Path:
    return make_demo_dataset(home / "demo", DemoSpec(n_per_class=20, size=32, seed=3))


@pytest.fixture(scope="module")
def ddp_run(home, demo) -> tuple[Path, str]:
    run_dir = runs.create(tiny_config(demo).to_dict(), root=home / "runs", name_hint="ddp")
    log = home / "ddp.log"
    proc = torchrun(run_dir, home, log)
    assert proc.wait(timeout=TIMEOUT) == 0, log.read_text()
    return run_dir, log.read_text()


def test_sharding_gives_every_rank_the_same_count_and_covers_every_item():
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    parts = [shard(order, r, 3) for r in range(3)]
    assert {len(p) for p in parts} == {4}
    assert set(torch.cat(parts).tolist()) == set(range(11))
    assert torch.equal(shard(order, 0, 1), order)  # alone: the order itself
    alone, first = EpochSampler(11, seed=5), EpochSampler(11, seed=5, rank=0, world_size=2)
    alone.set_epoch(2), first.set_epoch(2)
    assert list(first) == list(alone)[0::2] and len(first) == 6
    assert list(ShardSampler(5, 1, 2)) == [1, 3, 0] and len(ShardSampler(5, 1, 2)) == 3


def test_ddp_run_is_done_and_its_directory_written_once(ddp_run):
    run_dir, _ = ddp_run
    assert runs.status(run_dir)["state"] == runs.DONE
    for name in (BUNDLE_FILE, DATASET_RECORD_FILE, "interpret_valid.parquet", "interpret_train.parquet"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / CHECKPOINT_FILE).exists()  # a finished run cannot be resumed: no checkpoint kept
    evs = events(run_dir)
    kinds = [e["event"] for e in evs]
    assert kinds.count("start") == 1 and kinds.count("done") == 1 and kinds.count("exported") == 1
    assert [e["epoch"] for e in evs if e["event"] == "epoch"] == [0, 1]
    # each step is reported once, by rank 0, and the batch numbers count this rank's share of the epoch
    steps = [e["step"] for e in evs if e["event"] == "batch"]
    assert steps == sorted(set(steps))
    # per-item losses gathered from both ranks: every training item, once
    record = read_json(run_dir / DATASET_RECORD_FILE)
    train_ids = {i for i, item in enumerate(record["items"]) if item["split"] == "train"}
    for epoch in (0, 1):
        saved = np.load(run_dir / "item_losses" / f"epoch_{epoch:03d}.npz")
        assert len(saved["item"]) == len(set(saved["item"].tolist()))
        assert set(saved["item"].tolist()) <= train_ids
        assert len(saved["item"]) >= len(train_ids) - 2 * 8  # drop_last leaves out at most a batch per rank


def test_both_ranks_end_with_identical_weights(ddp_run):
    _, log = ddp_run
    prints = dict(re.findall(r"rank (\d) weights sha256=([0-9a-f]{64})", log))
    assert set(prints) == {"0", "1"}, log
    assert prints["0"] == prints["1"]


def test_validation_metrics_equal_one_process_evaluating_the_saved_model(ddp_run):
    run_dir, _ = ddp_run
    last = [e for e in events(run_dir) if e["event"] == "epoch"][-1]
    cfg = TrainConfig.from_dict(read_json(run_dir / runs.CONFIG_FILE))
    source, split = source_from_record(read_json(run_dir / DATASET_RECORD_FILE))
    valid = make_loader(source, split.valid, cfg.data, train=False)
    on_device = OnDevice.for_config(cfg, torch.device("cpu"))
    model = on_device.place(load_bundle(run_dir / BUNDLE_FILE, device="cpu").model)
    row = valid_metrics(get_preds(model, valid, on_device, make_loss(cfg, source.multi_label)), source.multi_label, cfg)
    assert abs(row["valid_loss"] - last["valid_loss"]) < 1e-4
    assert abs(row["error_rate"] - last["error_rate"]) < 1e-4


def test_killing_one_rank_fails_the_run_without_hanging(home, demo):
    run_dir = runs.create(tiny_config(demo, epochs=40).to_dict(), root=home / "runs", name_hint="ddp-kill")
    log = home / "kill.log"
    started = time.monotonic()
    proc = torchrun(run_dir, home, log)
    victim = None
    while time.monotonic() - started < TIMEOUT and proc.poll() is None:
        found = re.search(r"rank 1 pid (\d+)", log.read_text())
        events = run_dir / runs.EVENTS_FILE
        batches = events.exists() and '"event":"batch"' in events.read_text()
        if found and batches:
            victim = int(found.group(1))
            break
        time.sleep(0.1)
    assert victim is not None, log.read_text()
    os.kill(victim, signal.SIGKILL)
    returncode = proc.wait(timeout=TIMEOUT - (time.monotonic() - started))
    assert returncode != 0
    assert runs.status(run_dir)["state"] == runs.FAILED, log.read_text()


def test_a_stopped_ddp_run_resumes_for_the_whole_group(home, demo):
    run_dir = runs.create(tiny_config(demo, epochs=3).to_dict(), root=home / "runs", name_hint="ddp-stop")
    log = home / "stop.log"
    started = time.monotonic()
    proc = torchrun(run_dir, home, log)
    while time.monotonic() - started < TIMEOUT and proc.poll() is None:
        if (run_dir / runs.EVENTS_FILE).exists() and '"event":"batch"' in (run_dir / runs.EVENTS_FILE).read_text():
            break
        time.sleep(0.1)
    (run_dir / "STOP").touch()  # what the Stop button writes; rank 0 reads it, the group agrees
    assert proc.wait(timeout=TIMEOUT) == 0, log.read_text()
    assert runs.status(run_dir)["state"] == runs.STOPPED, log.read_text()
    stopped = dict(re.findall(r"rank (\d) weights sha256=([0-9a-f]{64})", log.read_text()))
    assert stopped["0"] == stopped["1"]
    env = {**os.environ, "LOUPE_HOME": str(home), "OMP_NUM_THREADS": "1", "LOUPE_DIST_TIMEOUT": "60"}
    done = subprocess.run([sys.executable, "-m", "core", "train", "--run-dir", str(run_dir), "--gpus", "2", "--resume"],
                          check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert runs.status(run_dir)["state"] == runs.DONE
    assert [e["epoch"] for e in events(run_dir) if e["event"] == "epoch"] == [0, 1, 2]
    resumed = dict(re.findall(r"rank (\d) weights sha256=([0-9a-f]{64})", done.stdout))
    assert resumed["0"] == resumed["1"]
