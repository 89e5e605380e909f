"""The run-directory protocol: the one contract between the app (parent) and a training process (child).

A run lives in `runs/<id>/`; the directory is the truth, so a browser reload or an app restart loses nothing.
Its files are named in core.rundir: here `create` writes config.json and status.json (with the run's task),
the child appends events.jsonl (core.runlog) and its output to train.log, and `request_stop` writes STOP.

Lifecycle: created -> queued (`start` launched the child, which may wait for the compute lock)
-> running (the child calls `mark_running`) -> done | failed | stopped (`mark_finished`).
If the child dies without saying so, `status` notices the dead pid and records `failed` on its behalf.

Every time is a Unix timestamp (float seconds), like the `time` of events, so durations are subtractions.
POSIX only (fcntl, process groups). This module deliberately imports neither torch nor streamlit:
processes that only speak the protocol (tests, the status poller) start in milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from core.fileio import atomic_write_json, atomic_write_text, file_lock, read_json
from core.rundir import (
    COMPUTE_LOCK_FILE,
    CONFIG_FILE,
    EVENTS_FILE,
    LOG_FILE,
    STATUS_FILE,
    STOP_FILE,
    TASKS,
    TRAIN,
    RunDir,
    task_of,
)

# The event log is part of the protocol; its writer and readers live in core.runlog, re-exported here.
from core.runlog import EventWriter, epoch_number, exported_epoch, load_events, read_events  # noqa: F401
from core.stamps import stamped_id

CREATED = "created"
QUEUED = "queued"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
STOPPED = "stopped"
UNREADABLE = "unreadable"  # never written to status.json: how `list_runs` marks a run whose files it cannot read
ACTIVE_STATES = frozenset({QUEUED, RUNNING})
FINAL_STATES = frozenset({DONE, FAILED, STOPPED})


DIED_MESSAGE = "The training process ended unexpectedly (killed or crashed); see train.log."
REPO_ROOT = Path(__file__).resolve().parent.parent

# Popen objects of the children this process launched, so `status` can reap them (a zombie looks alive to
# os.kill) and Python does not warn that a still-running child's Popen was garbage-collected.
_children: dict[int, subprocess.Popen] = {}

PathArg = str | os.PathLike


class ComputeBusy(RuntimeError):
    """Raised by `acquire_compute_lock(wait=False)` when another process holds the lock."""


# ---------------------------------------------------------------- creating runs


def runs_root(root: PathArg | None = None) -> Path:
    """The folder runs live in: `root` when given, else the workspace's (core.env.runs_dir)."""
    if root is not None:
        return Path(root)
    from core.env import runs_dir  # lazy: core.env imports torch, which costs seconds at startup

    return runs_dir()


def create(
    config: Mapping[str, Any] | object, root: PathArg | None = None, name_hint: str = "", task: str = TRAIN
) -> Path:
    """Make `root/<id>/` (root defaults to env.runs_dir()) holding config.json, then status.json (created).

    `config` is a dict or a dataclass such as TrainConfig; `task` ("train" or "lr-find") is recorded in
    status.json, so every page knows a sweep from a training run without guessing. Returns the new run directory.
    """
    base = runs_root(root)
    base.mkdir(parents=True, exist_ok=True)
    return create_in(_claim_dir(base, name_hint), config, task)


def create_in(run_dir: PathArg, config: Mapping[str, Any] | object, task: str = TRAIN) -> Path:
    """Make `run_dir` (a directory chosen by hand, e.g. `--run-dir`) a run: config.json, then status.json.

    Refuses (FileExistsError) a directory that already holds a config.json, so no run is ever overwritten.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}.")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / CONFIG_FILE).exists():
        raise FileExistsError(f"{run_dir} already holds a run ({CONFIG_FILE}).")
    data = asdict(config) if is_dataclass(config) and not isinstance(config, type) else dict(config)
    atomic_write_json(run_dir / CONFIG_FILE, data)
    now = time.time()
    atomic_write_json(run_dir / STATUS_FILE, {"state": CREATED, "task": task, "created_at": now, "updated_at": now})
    return run_dir


def _claim_dir(base: Path, name_hint: str) -> Path:
    # mkdir is atomic and fails if the name exists, so two creators can never share a directory.
    for _ in range(100):
        run_dir = base / stamped_id(name_hint)
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"Could not find a free run id in {base}.")


# ---------------------------------------------------------------- status


def read_status(run_dir: PathArg) -> dict[str, Any]:
    """status.json as written, without checking that the recorded process is still alive."""
    data = read_json(Path(run_dir) / STATUS_FILE)
    if not isinstance(data, dict):
        raise ValueError(f"{Path(run_dir) / STATUS_FILE} does not hold a JSON object.")
    return data


def _update_status(run_dir: PathArg, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any]:
    """Read-modify-write status.json under a lock, so the parent and the child never lose each other's fields.

    `change(current)` returns the fields to merge, or None to leave the file alone.
    """
    run_dir = Path(run_dir)
    with file_lock(RunDir(run_dir).status_lock):
        try:
            current = read_status(run_dir)
        except (FileNotFoundError, ValueError):
            current = {}  # nothing worth keeping: rewrite it whole
        fields = change(current)
        if fields is None:
            return current
        merged = {**current, **fields, "updated_at": time.time()}
        atomic_write_json(run_dir / STATUS_FILE, merged)
        return merged


def write_status(run_dir: PathArg, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into status.json atomically, set `updated_at`, and return the new status."""
    return _update_status(run_dir, lambda current: fields)


def mark_running(run_dir: PathArg) -> dict[str, Any]:
    """For the child once it holds the compute lock: state running, `running_at`, and its pid if none is recorded.

    The pid recorded by `start` is kept: it leads the process group that `kill` signals (torchrun's launcher
    when several GPUs are used); a child launched by hand records its own.
    """

    def change(current: dict[str, Any]) -> dict[str, Any]:
        fields: dict[str, Any] = {"state": RUNNING, "running_at": time.time()}
        if not current.get("pid"):
            fields.update(pid=os.getpid(), pid_started=_process_start(os.getpid()))
        return fields

    return _update_status(run_dir, change)


def mark_finished(run_dir: PathArg, state: str, error: str | None = None, **fields: Any) -> dict[str, Any]:
    """For the child at the end: a final state (done, failed or stopped), `finished_at`, and the error if any."""
    if state not in FINAL_STATES:
        raise ValueError(f"{state!r} is not a final state; choose one of {sorted(FINAL_STATES)}.")
    return write_status(run_dir, state=state, error=error, finished_at=time.time(), **fields)


def status(run_dir: PathArg) -> dict[str, Any]:
    """status.json reconciled with reality: an active run whose process is gone is recorded as failed.

    "Gone" means the pid no longer exists, is a zombie, or now belongs to another program: on Linux, its start
    time differs from the recorded `pid_started`, or, when none is recorded, its /proc/<pid>/cmdline does not
    mention the run id. The verdict is written back, so it persists. A run
    stopped with `kill` ends as stopped instead of failed. An active run with no pid yet is left alone.
    """
    run_dir = Path(run_dir)
    current = read_status(run_dir)
    pid = current.get("pid")
    if current.get("state") not in ACTIVE_STATES or not isinstance(pid, int):
        return current
    alive, returncode = _probe(pid, run_dir, current.get("pid_started"))
    if alive:
        return current

    def verdict(now: dict[str, Any]) -> dict[str, Any] | None:
        # Re-checked under the lock: the child may have finished, or `start` relaunched it, meanwhile.
        if now.get("state") not in ACTIVE_STATES or now.get("pid") != pid:
            return None
        fields: dict[str, Any] = {"state": FAILED, "error": DIED_MESSAGE, "finished_at": _last_sign_of_life(run_dir)}
        if now.get("kill_signal"):
            fields.update(state=STOPPED, error=None, note=f"Stopped by force ({now['kill_signal']}).")
        if returncode is not None:
            fields["returncode"] = returncode
        return fields

    return _update_status(run_dir, verdict)


def _probe(pid: int, run_dir: Path, pid_started: object = None) -> tuple[bool, int | None]:
    """(is `pid` still this run's live process, its exit code when we happen to learn it)."""
    child = _children.get(pid)
    if child is not None:  # launched by this process: Popen knows for sure
        code = child.poll()
        if code is None:
            return True, None
        del _children[pid]
        return False, code
    try:  # our child through some other path (a test's Popen): reap it, or it stays a zombie that looks alive
        reaped, wait_status = os.waitpid(pid, os.WNOHANG)
        if reaped:
            return False, os.waitstatus_to_exitcode(wait_status)
    except ChildProcessError:
        pass  # not our child: its own parent reaps it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except PermissionError:
        pass  # exists, owned by another user: /proc decides
    return _is_same_process(pid, run_dir.name, pid_started), None


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19]) if fields[0] != "Z" else None  # fields[0] is field 3 (state), [19] is 22 (starttime)


def _is_same_process(pid: int, run_id: str, pid_started: object) -> bool:
    # Pids are reused, so a live pid is ours only if it is the very process recorded: same start time when one
    # was recorded, else a command line that names the run (`--run-dir .../<id>`). A zombie has neither a
    # start time here nor a cmdline, so a zombie of another parent counts as dead too.
    proc = Path("/proc")
    if not proc.is_dir():
        return True  # no /proc (macOS): trust the pid alone
    if isinstance(pid_started, int):
        return _process_start(pid) == pid_started
    try:
        cmdline = (proc / str(pid) / "cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except PermissionError:
        return True
    return run_id.encode() in cmdline


def _last_sign_of_life(run_dir: Path) -> float:
    """When a dead child last wrote anything: a better `finished_at` than the moment we noticed."""
    times = [p.stat().st_mtime for p in (run_dir / EVENTS_FILE, run_dir / LOG_FILE) if p.exists()]
    return max(times, default=time.time())


# ---------------------------------------------------------------- launching, stopping, killing


def _command(run_dir: Path, extra_args: list[str], gpus: int, module: str, task: str) -> list[str]:
    train = ["-m", module, task, "--run-dir", str(run_dir), *extra_args]
    if gpus == 1:
        return [sys.executable, *train]
    # --standalone: a private rendezvous on a free port, so two multi-GPU runs never fight over port 29500.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus), *train]


BACKGROUND_NICENESS = 10  # the nice value of a run started from the app (0 is normal, 19 the lowest priority)


def launch_background(command: list[str], log: Path) -> tuple[int, int | None]:
    """Start `command` from the repo root in its own session (a Streamlit rerun, a reload or Ctrl-C of the app
    never kills it) at background priority, stdout and stderr to `log`; returns (pid, its start time) for
    `process_alive`. Runs (`start`) and other jobs (core.healthjob) alike.

    Background priority: the app (and the browser on the same machine) then stays quick while it trains, and
    training loses almost nothing, since it only yields when someone is using the app. The worker processes and
    threads the child starts later inherit it."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=_child_env(), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _children[proc.pid] = proc
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, proc.pid, BACKGROUND_NICENESS)
    return proc.pid, _process_start(proc.pid)


def process_alive(pid: int, pid_started: int | None, name: str) -> bool:
    """Whether `pid` is still the process `launch_background` started (`name`: a word its command line holds,
    checked where no start time was recorded)."""
    return _probe(pid, Path(name), pid_started)[0]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # train.log fills line by line, not in 8 KB gulps
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return env


def start(
    run_dir: PathArg, extra_args: list[str] | None = None, gpus: int = 1, *, module: str = "core",
    task: str | None = None,
) -> int:
    """Launch `python -m <module> <task> --run-dir RUN` (under torchrun when gpus > 1) and return its pid.

    `task` is "train" or "lr-find" (default: the task recorded when the run was created): the LR finder runs in
    the background the same way, streaming its curve.

    The child runs in its own session, so a Streamlit rerun, a reload or Ctrl-C of the app never kills it;
    its stdout and stderr are appended to train.log. status becomes queued with the pid; the child flips it
    to running. A leftover STOP file is cleared so a resumed run does not stop at once. `module` exists so
    tests can launch a small real program instead of the full trainer.
    """
    run_dir = Path(run_dir).absolute()  # the child's cwd is the repo root, not ours
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}.")
    current = status(run_dir)
    state = current.get("state")
    if state in ACTIVE_STATES:
        raise ValueError(f"Run {run_dir.name} is already {state}.")
    task = task or task_of(run_dir, current)
    command = _command(run_dir, list(extra_args or []), gpus, module, task)
    clear_stop(run_dir)
    # Queued before the launch and the pid after it: the second write merges only the pid, so a fast child's
    # "running" is never overwritten by the parent.
    write_status(run_dir, state=QUEUED, pid=None, started_at=time.time(), running_at=None, finished_at=None,
                 pid_started=None, error=None, note=None, returncode=None, kill_signal=None, command=command,
                 task=task)
    try:
        with open(run_dir / LOG_FILE, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- {stamp} launching: {shlex.join(command)}\n".encode())
        pid, pid_started = launch_background(command, run_dir / LOG_FILE)
    except OSError as exc:
        mark_finished(run_dir, FAILED, error=f"Could not launch the training process: {exc}")
        raise
    write_status(run_dir, pid=pid, pid_started=pid_started)
    return pid


def request_stop(run_dir: PathArg) -> None:
    """Ask the child to stop cooperatively: it checks `stop_requested` between batches, saves, and exits."""
    atomic_write_text(Path(run_dir) / STOP_FILE, f"{time.time()}\n")


def stop_requested(run_dir: PathArg) -> bool:
    """True once `request_stop` was called (cheap: one stat, fine to call every batch)."""
    return (Path(run_dir) / STOP_FILE).exists()


def clear_stop(run_dir: PathArg) -> None:
    """Forget a stop request (done by `start`, so a resumed run does not stop at once)."""
    (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)


def kill(run_dir: PathArg, sig: int = signal.SIGTERM) -> bool:
    """Hard stop: signal the process group of the run's recorded pid (its DataLoader and torchrun workers too).

    Does nothing, and returns False, when the run is not active or its process is gone. The signal is
    recorded so `status` reports the run as stopped by force rather than crashed.
    """
    run_dir = Path(run_dir)
    current = read_status(run_dir)
    pid = current.get("pid")
    if current.get("state") not in ACTIVE_STATES or not isinstance(pid, int):
        return False
    if not _probe(pid, run_dir, current.get("pid_started"))[0]:
        return False
    write_status(run_dir, kill_signal=signal.Signals(sig).name)
    try:
        group = os.getpgid(pid)
        if group != os.getpgid(0):
            os.killpg(group, sig)
        else:  # launched by hand from our own process group: never signal ourselves
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
    return True


def wait(run_dir: PathArg, timeout: float, poll: float = 0.1) -> dict[str, Any]:
    """Poll `status` until the run reaches a final state or `timeout` seconds pass; return the last status."""
    deadline = time.monotonic() + timeout
    while True:
        current = status(run_dir)
        if current.get("state") in FINAL_STATES or time.monotonic() >= deadline:
            return current
        time.sleep(poll)


@contextlib.contextmanager
def acquire_compute_lock(root: PathArg | None = None, wait: bool = True) -> Iterator[Path]:
    """Hold the compute lock (an exclusive flock on root/.compute.lock) so one run trains at a time.

    The child takes it before training, while its status is still queued; `wait=False` raises ComputeBusy
    instead of blocking. flock rather than a lock file with a pid in it: the kernel releases it when the
    holder exits or is killed, so a crash can never leave a stale lock. Forked children (DataLoader workers)
    share it until they exit. Under torchrun take it in one rank only (e.g. local rank 0 before
    init_process_group), or the ranks would queue behind each other. Pass the run directory's parent as
    `root` so every run under one runs root shares one lock.
    """
    base = runs_root(root)
    base.mkdir(parents=True, exist_ok=True)
    path = base / COMPUTE_LOCK_FILE
    with contextlib.ExitStack() as held:
        try:
            fd = held.enter_context(file_lock(path, wait=wait))
        except BlockingIOError:
            raise ComputeBusy(f"Another process holds the compute lock {path}.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a human reading the file
        yield path


# ---------------------------------------------------------------- deleting


def disk_usage(run_dir: PathArg) -> int:
    """Bytes the files of a run directory take (symlinks counted as links, not followed)."""
    total = 0
    for folder, _, names in os.walk(run_dir):
        for name in names:
            with contextlib.suppress(OSError):  # a file removed while we count
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def delete_run(run_dir: PathArg, root: PathArg | None = None) -> None:
    """Remove a run directory. Refuses (ValueError) a path that is not directly inside the runs root, or an
    active run (stop it first). A run whose status is unreadable can be deleted."""
    base = runs_root(root).resolve()
    target = Path(run_dir).resolve()  # resolves "..", and a symlink pointing out of the root
    if target.parent != base or target.name.startswith(".") or not target.is_dir():
        raise ValueError(f"{run_dir} is not a run directory inside {base}; refusing to delete it.")
    try:
        state = status(target).get("state")
    except (OSError, ValueError):
        state = None
    if state in ACTIVE_STATES:
        raise ValueError(f"Run {target.name} is {state}; stop it before deleting it.")
    shutil.rmtree(target)
