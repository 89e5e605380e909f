"""The run-directory protocol, with real files and real processes: no mocks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from core import runs
from core.config import TrainConfig
from core.rundir import LR_FIND, TRAIN, RunDir, is_lr_find
from core.runlist import list_runs, training_runs
from core.stamps import fmt_duration, stamped_id

REPO_ROOT = Path(__file__).resolve().parent.parent
HAS_PROC = Path("/proc/self/cmdline").exists()

# A small real trainer-shaped program, launched by runs.start as `python -m loupe_fake_train train --run-dir D`.
FAKE_TRAINER = '''
import sys, time
from pathlib import Path
from core import runs

args = sys.argv[1:]
run_dir = Path(args[args.index("--run-dir") + 1])
with runs.acquire_compute_lock(run_dir.parent):
    runs.mark_running(run_dir)
    events = runs.EventWriter(run_dir)
    events.emit("start", argv=args)
    print("hello on stdout")
    print("hello on stderr", file=sys.stderr)
    epoch = 0
    while "--ignore-stop" in args or not runs.stop_requested(run_dir):
        events.emit("epoch", epoch=epoch, train_loss=1.0, valid_loss=2.0, accuracy=0.5)
        epoch += 1
        time.sleep(0.02)
    events.emit("done")
    runs.mark_finished(run_dir, runs.STOPPED)
'''


def _until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _python(code: str, *args: str) -> subprocess.Popen:
    """A real Python child that can import core."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env)


def _is_zombie(pid: int) -> bool:
    """Dead but not yet reaped by its parent (us); without /proc, give the kernel a moment instead."""
    if not HAS_PROC:
        time.sleep(0.5)
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _reject_constant(name: str) -> None:
    raise AssertionError(f"non-standard JSON constant {name} in events.jsonl")


# ---------------------------------------------------------------- create, ids, status


def test_create_writes_config_then_created_status(tmp_path: Path) -> None:
    run = runs.create({"arch": "resnet18", "lr": 1e-3}, root=tmp_path, name_hint="ResNet 18")
    assert run.parent == tmp_path
    assert re.fullmatch(r"\d{8}-\d{6}-resnet-18-[0-9a-f]{4}", run.name)
    assert json.loads((run / "config.json").read_text()) == {"arch": "resnet18", "lr": 1e-3}
    current = runs.status(run)
    assert current["state"] == runs.CREATED
    assert abs(current["created_at"] - time.time()) < 60


def test_run_ids_are_unique_sortable_and_safe(tmp_path: Path) -> None:
    made = [runs.create({}, root=tmp_path, name_hint="x").name for _ in range(30)]
    assert len(set(made)) == 30
    odd = stamped_id("../../Étrange name!")
    stamp_after = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    assert re.fullmatch(r"\d{8}-\d{6}-[a-z0-9-]+-[0-9a-f]{4}", odd) and "/" not in odd and ".." not in odd
    assert made[0][:15] <= odd[:15] <= stamp_after  # fixed-width UTC stamp first: string order is time order
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{4}", stamped_id())


def test_durations_read_as_a_clock() -> None:
    assert [fmt_duration(s) for s in (0, 4.6, 65, 3599.4, 3600, 3723, 90061)] == [
        "0:00", "0:05", "1:05", "59:59", "1:00:00", "1:02:03", "25:01:01"]
    assert fmt_duration(None) == fmt_duration(float("nan")) == fmt_duration(float("inf")) == "–"


def test_write_status_merges_and_stamps(tmp_path: Path) -> None:
    run = runs.create({}, root=tmp_path)
    before = runs.read_status(run)
    after = runs.write_status(run, state=runs.DONE, epochs=3)
    assert after["created_at"] == before["created_at"] and after["epochs"] == 3
    assert after["updated_at"] >= before["updated_at"]
    assert runs.read_status(run) == after


def test_status_reports_a_killed_process_as_failed(tmp_path: Path) -> None:
    run = runs.create({}, root=tmp_path)
    # The run dir on its command line makes it look like this run's trainer to the cmdline check.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(run)])
    try:
        runs.write_status(run, state=runs.RUNNING, pid=sleeper.pid)
        assert runs.status(run)["state"] == runs.RUNNING
        os.kill(sleeper.pid, signal.SIGKILL)  # not waited for: a zombie must count as dead
        _until(lambda: _is_zombie(sleeper.pid))
        assert runs.status(run)["state"] == runs.FAILED
    finally:
        sleeper.kill()
        sleeper.wait()
    persisted = runs.read_status(run)
    assert persisted["state"] == runs.FAILED and persisted["error"] == runs.DIED_MESSAGE
    assert persisted["returncode"] == -signal.SIGKILL


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to tell programs apart")
def test_a_child_launched_by_hand_is_known_by_its_start_time(tmp_path: Path) -> None:
    run = runs.create_in(tmp_path / "by-hand", {"arch": "x"})
    with pytest.raises(FileExistsError):
        runs.create_in(run, {})
    # The run dir travels in the environment, so the cmdline cannot vouch for it (like `core train DATA`).
    code = "import os, time\nfrom core import runs\nruns.mark_running(os.environ['RUN'])\ntime.sleep(30)\n"
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                                                                 "RUN": str(run)})
    try:
        _until(lambda: runs.read_status(run)["state"] == runs.RUNNING)
        recorded = runs.read_status(run)
        assert recorded["pid"] == child.pid and isinstance(recorded["pid_started"], int)
        assert runs.status(run)["state"] == runs.RUNNING
        runs.write_status(run, pid_started=recorded["pid_started"] + 1)  # as if the pid had been reused
        assert runs.status(run)["state"] == runs.FAILED
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to tell programs apart")
def test_status_rejects_a_pid_reused_by_another_program(tmp_path: Path) -> None:
    run = runs.create({}, root=tmp_path)
    runs.write_status(run, state=runs.QUEUED, pid=os.getpid())  # alive, but pytest's cmdline lacks the run id
    assert runs.status(run)["state"] == runs.FAILED
    assert runs.read_status(run)["error"] == runs.DIED_MESSAGE


# ---------------------------------------------------------------- events


def test_read_events_is_incremental_and_waits_for_whole_lines(tmp_path: Path) -> None:
    run = runs.create({}, root=tmp_path)
    assert runs.read_events(run) == ([], 0)
    with runs.EventWriter(run) as events:
        events.emit("start", epochs=2)
    first, offset = runs.read_events(run)
    assert [e["event"] for e in first] == ["start"] and first[0]["epochs"] == 2
    with open(run / runs.EVENTS_FILE, "ab") as f:
        f.write(b'not json at all\n{"event": "batch", "step": 1}\n{"event": "ba')
    middle, offset2 = runs.read_events(run, offset)
    assert middle == [{"event": "batch", "step": 1}]
    assert runs.read_events(run, offset2) == ([], offset2)  # the unfinished line is not returned
    with open(run / runs.EVENTS_FILE, "ab") as f:
        f.write(b'tch", "step": 2}\n')
    last, offset3 = runs.read_events(run, offset2)
    assert last == [{"event": "batch", "step": 2}]
    assert offset3 == (run / runs.EVENTS_FILE).stat().st_size
    assert [e["event"] for e in runs.load_events(run)] == ["start", "batch", "batch"]
    assert [e["step"] for e in runs.load_events(run, "batch")] == [1, 2]


def test_non_finite_and_numpy_values_keep_strict_json(tmp_path: Path) -> None:
    run = runs.create({}, root=tmp_path)
    with runs.EventWriter(run) as events:
        written = events.emit("epoch", loss=float("nan"), lr=float("inf"), low=-float("inf"), acc=np.float32(0.25),
                              step=np.int64(7), hist=np.array([1.0, np.nan]), nested={"x": (float("nan"), 2)},
                              where=tmp_path)
    lines = (run / runs.EVENTS_FILE).read_text().splitlines()
    assert len(lines) == 1
    parsed = json.loads(lines[0], parse_constant=_reject_constant)
    assert parsed == written
    assert parsed["loss"] is None and parsed["lr"] is None and parsed["low"] is None
    assert parsed["acc"] == 0.25 and parsed["step"] == 7 and parsed["hist"] == [1.0, None]
    assert parsed["nested"] == {"x": [None, 2]} and parsed["where"] == str(tmp_path)
    with pytest.raises(ValueError):
        runs.EventWriter(run).emit("x", time=1)


def test_reader_sees_only_whole_lines_from_a_concurrent_writer(tmp_path: Path) -> None:
    run = runs.create({}, root=tmp_path)
    writer = _python(
        "import sys\nfrom core.runs import EventWriter\nw = EventWriter(sys.argv[1])\n"
        "import time\nfor i in range(200):\n    w.emit('batch', step=i, payload='x' * 5000)\n    time.sleep(0.001)\n",
        str(run),
    )
    seen: list[dict] = []
    offset, partial_reads = 0, 0
    deadline = time.monotonic() + 15
    while len(seen) < 200 and time.monotonic() < deadline:
        batch, offset = runs.read_events(run, offset)
        seen += batch
        partial_reads += 0 < len(seen) < 200
    assert writer.wait(timeout=15) == 0
    assert [e["step"] for e in seen] == list(range(200))
    assert all(e["payload"] == "x" * 5000 for e in seen)
    assert partial_reads > 0  # it really read while the writer was writing


# ---------------------------------------------------------------- launching, stopping, killing


def test_start_launches_a_detached_child_that_reports_and_stops(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "loupe_fake_train.py").write_text(FAKE_TRAINER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # start must keep it and add the repo root
    monkeypatch.chdir(tmp_path)
    run = runs.create({"arch": "fake"}, root="runs")  # relative: start must not depend on our cwd
    runs.request_stop(run)  # a leftover request that start must clear
    pid = runs.start(run, extra_args=["--flag"], module="loupe_fake_train")
    assert runs.read_status(run)["pid"] == pid
    _until(lambda: runs.status(run)["state"] == runs.RUNNING)
    assert os.getsid(pid) == pid != os.getsid(0)  # its own session: the app's Ctrl-C cannot reach it
    # a lower CPU priority than the app's, so pages stay quick while it trains (never higher than ours already was)
    assert os.getpriority(os.PRIO_PROCESS, pid) == max(runs.BACKGROUND_NICENESS, os.getpriority(os.PRIO_PROCESS, 0))
    with pytest.raises(ValueError, match="already running"):
        runs.start(run, module="loupe_fake_train")

    _until(lambda: runs.load_events(run, "epoch"))
    runs.request_stop(run)
    final = runs.wait(run, timeout=10)
    assert final["state"] == runs.STOPPED and final["finished_at"] >= final["running_at"] >= final["started_at"]
    log = (run / runs.LOG_FILE).read_text()
    assert "hello on stdout" in log and "hello on stderr" in log and "launching" in log
    events = runs.load_events(run)
    assert events[0]["event"] == "start" and events[0]["argv"][-1] == "--flag"
    assert events[-1]["event"] == "done"

    # Resume, then a hard stop of a child that ignores STOP: recorded as stopped by force, not crashed.
    runs.start(run, extra_args=["--ignore-stop"], module="loupe_fake_train")
    _until(lambda: runs.status(run)["state"] == runs.RUNNING)
    assert not runs.stop_requested(run)
    assert runs.kill(run, signal.SIGKILL)
    final = runs.wait(run, timeout=10)
    assert final["state"] == runs.STOPPED and final["note"] == "Stopped by force (SIGKILL)."
    assert final["error"] is None and final["returncode"] == -signal.SIGKILL
    assert not runs.kill(run)


def test_stop_request_round_trip(tmp_path: Path) -> None:
    run = runs.create({}, root=tmp_path)
    assert not runs.stop_requested(run)
    runs.request_stop(run)
    assert runs.stop_requested(run)
    runs.clear_stop(run)
    runs.clear_stop(run)  # idempotent
    assert not runs.stop_requested(run)


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from core.runs import acquire_compute_lock
root, name, hold = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
with acquire_compute_lock(root):
    (root / (name + ".acquired")).write_text(repr(time.time()))
    time.sleep(hold)
    (root / (name + ".released")).write_text(repr(time.time()))
"""


def test_compute_lock_makes_the_second_process_wait(tmp_path: Path) -> None:
    first = _python(LOCK_HOLDER, str(tmp_path), "first", "0.5")
    _until(lambda: (tmp_path / "first.acquired").exists())
    second = _python(LOCK_HOLDER, str(tmp_path), "second", "0")
    assert first.wait(timeout=15) == 0 and second.wait(timeout=15) == 0
    released = float((tmp_path / "first.released").read_text())
    assert float((tmp_path / "second.acquired").read_text()) >= released


def test_compute_lock_is_released_when_its_holder_is_killed(tmp_path: Path) -> None:
    holder = _python(LOCK_HOLDER, str(tmp_path), "holder", "60")
    try:
        _until(lambda: (tmp_path / "holder.acquired").exists())
        with pytest.raises(runs.ComputeBusy):
            with runs.acquire_compute_lock(tmp_path, wait=False):
                pass
    finally:
        holder.kill()
        holder.wait()
    with runs.acquire_compute_lock(tmp_path, wait=False) as path:
        assert path.read_text() == f"{os.getpid()}\n"


# ---------------------------------------------------------------- listing and deleting


def test_list_runs_newest_first_with_summaries_and_bad_runs(tmp_path: Path) -> None:
    old = runs.create(TrainConfig(epochs=2), root=tmp_path)
    with runs.EventWriter(old, fsync=False) as events:
        events.emit("epoch", epoch=0, train_loss=1.0, valid_loss=1.5, accuracy=0.5, seconds=2.0)
        events.emit("epoch", epoch=1, train_loss=0.5, valid_loss=0.7, accuracy=0.9, seconds=2.0)
        for step in range(1500):  # > 64 KB after the last epoch: the tail window must grow to find it
            events.emit("batch", step=step, loss=0.5, lr=1e-3, mom=0.9)
    assert (old / runs.EVENTS_FILE).stat().st_size > 64 * 1024
    runs.write_status(old, state=runs.DONE, started_at=100.0, finished_at=160.0)
    middle = [runs.create({}, root=tmp_path).name for _ in range(4)]
    new = runs.create(TrainConfig(epochs=3), root=tmp_path)
    broken = tmp_path / "20000101-000000-broken-0000"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "stray.txt").write_text("not a run")

    listed = list_runs(tmp_path)
    assert [r.id for r in listed if r.state != runs.UNREADABLE] == [new.name, *middle[::-1], old.name]
    by_id = {r.id: r for r in listed}
    assert set(by_id) == {new.name, *middle, old.name, broken.name}
    done = by_id[old.name]
    assert done.config == TrainConfig(epochs=2) and done.path == old and done.state == runs.DONE
    assert done.task == "train" and not done.is_lr_find
    assert done.last_epoch == {"epoch": 1, "train_loss": 0.5, "valid_loss": 0.7, "seconds": 2.0,
                               "metrics": {"accuracy": 0.9}}
    assert done.duration == 60.0
    assert by_id[new.name].last_epoch == {} and by_id[new.name].state == runs.CREATED
    assert by_id[new.name].duration is None
    bad = by_id[broken.name]
    assert bad.state == runs.UNREADABLE == bad.status["state"] and bad.config is None
    assert "config.json" in bad.error and "status.json" in bad.error
    assert list_runs(tmp_path / "missing") == []


def test_the_task_is_recorded_when_the_run_is_created_and_decides_what_it_is(tmp_path: Path) -> None:
    sweep = runs.create(TrainConfig(), root=tmp_path, task=LR_FIND)
    training = runs.create(TrainConfig(), root=tmp_path)
    assert runs.read_status(sweep)["task"] == LR_FIND and runs.read_status(training)["task"] == TRAIN
    assert is_lr_find(sweep, runs.read_status(sweep)) and not is_lr_find(training, runs.read_status(training))
    assert [info.id for info in training_runs(tmp_path)] == [training.name]  # not by a folder name's look
    older = runs.create(TrainConfig(), root=tmp_path, name_hint="lr-find")
    runs.write_status(older, task=None)  # a sweep made before the task was recorded: known by its curve
    assert not is_lr_find(older, runs.read_status(older))
    RunDir(older).lr_find.write_text("{}")
    assert is_lr_find(older, runs.read_status(older))
    with pytest.raises(ValueError, match="task"):
        runs.create(TrainConfig(), root=tmp_path, task="predict")


def test_a_config_that_is_no_train_config_is_listed_as_unreadable(tmp_path: Path) -> None:
    odd = runs.create({**TrainConfig().to_dict(), "epochs": 0}, root=tmp_path)  # right type, impossible value
    (info,) = list_runs(tmp_path)
    assert info.id == odd.name and info.state == runs.UNREADABLE and info.config is None
    assert "epochs must be at least 1" in info.error


def test_delete_run_refuses_active_runs_and_foreign_paths(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    active = runs.create({}, root=root)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(active)])
    try:
        runs.write_status(active, state=runs.RUNNING, pid=sleeper.pid)
        with pytest.raises(ValueError, match="running"):
            runs.delete_run(active, root=root)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert active.is_dir()

    outside = tmp_path / "precious"
    outside.mkdir()
    for path in (outside, root, root / ".." / "precious", root / "nope"):
        with pytest.raises(ValueError, match="not a run directory"):
            runs.delete_run(path, root=root)
    assert outside.is_dir()

    runs.delete_run(active, root=root)  # its process is gone now: reconciled to failed, so deletable
    assert not active.exists()


def test_exported_epoch_is_told_from_the_events_a_run_wrote() -> None:
    def epoch(n: int, valid_loss: float) -> dict:
        return {"event": "epoch", "epoch": n, "train_loss": 1.0, "valid_loss": valid_loss}

    trained = [{"event": "start"}, epoch(0, 0.9), epoch(1, 0.7), epoch(2, 0.8)]
    assert runs.exported_epoch(trained) == (None, None)  # still training, or failed: no model
    assert runs.exported_epoch([*trained, {"event": "exported"}, {"event": "done"}]) == (2, "last")
    best = [*trained, {"event": "best_weights"}, {"event": "exported"}, {"event": "done"}]
    assert runs.exported_epoch(best) == (1, "best")
    stopped = [*trained, {"event": "exported"}, {"event": "stopped"}]
    assert runs.exported_epoch(stopped) == (2, "stopped")
    # Resumed after the stop and finished: the last export is the one that counts.
    resumed = [*stopped, {"event": "start"}, epoch(3, 0.6), {"event": "exported"}, {"event": "done"}]
    assert runs.exported_epoch(resumed) == (3, "last")
    assert runs.exported_epoch([{"event": "start"}, {"event": "exported"}, {"event": "stopped"}]) == (None, "stopped")
