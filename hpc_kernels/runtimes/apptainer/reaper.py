"""A shared instance's reaper: a detached process (own session) that prunes attachments whose process is
gone, kills what their kernels left in the container, ends kernels whose Jupyter process died, and stops
the instance once it has been idle for ``idle_timeout`` seconds.

``python -I -S -m hpc_kernels.runtimes.apptainer.reaper reap DIR`` (selfexec.module_argv).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import sys
import time
from pathlib import Path

import hpc_kernels.runtimes.apptainer.cli as apptainer
from hpc_kernels import paths, procfs, selfexec
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.fsutil import atomic_write
from hpc_kernels.procfs import ProcRef
from hpc_kernels.runtimes.apptainer.instance import IDLE, KERNELS, ORPHAN_GRACE, STOP_TIMEOUT, root
from hpc_kernels.runtimes.apptainer.records import (
    Attachment,
    _lock,
    attachments,
    clear_leftovers,
    forget,
    kill_marked,
    read_record,
    reaper_running,
    record_problem,
)
from hpc_kernels.runtimes.apptainer.status import _stop_locked

# ----------------------------------------------------------------------------- reaper


def ensure_reaper(d: Path) -> bool:
    """Start the reaper of ``d`` unless one runs; True when one was started."""
    if reaper_running(d):
        return False
    spawn_reaper(d)
    return True


def spawn_reaper(d: Path) -> None:
    """Start the reaper (``python -m hpc_kernels.runtimes.apptainer.reaper reap DIR``, run as selfexec.module_argv does)
    fully detached (selfexec.spawn_detached: its own session keeps it out of the launcher's process
    group, which jupyter_client kills; the double fork keeps it from lingering as a zombie child of the
    kernel's runtime process). Its log is private, like the rest of the per-user state."""
    log = paths.private(root()) / "reaper.log"
    selfexec.spawn_detached(selfexec.module_argv("hpc_kernels.runtimes.apptainer.reaper", "reap", str(d)), str(log))


def _take_reaper_lock(d: Path, attempts: int = 10) -> int | None:
    """The reaper's lifetime lock (an open fd holding ``flock``), or None if another reaper has it.

    A launch checking "is a reaper running?" holds it for an instant; retrying briefly keeps a
    reaper that starts at that very instant from giving up.
    """
    path = d / "reaper.lock"
    for _attempt in range(attempts):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:  # the instance was forgotten before this reaper started
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            time.sleep(0.05)
            continue
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the file was removed or replaced under us: look again
    return None


def poll_interval(idle_timeout: float) -> float:
    """How often the reaper looks: often enough for the timeout, never a busy loop."""
    return min(max(idle_timeout / 4, 0.25), 2.0)


def prune(d: Path, name: str) -> list[Attachment]:
    """Drop attachments whose kernel is gone, kill what those kernels left behind; the live ones."""
    live: list[Attachment] = []
    dead: list[Attachment] = []
    for att in attachments(d):
        if att.alive() and att.orphaned():
            end_orphan(att)
            _log(f"kernel {att.id} of {name}: the process that started it ({att.parent_pid}) is gone; ended it")
        (live if att.alive() else dead).append(att)
    if dead:
        # A kernel whose runtime process died may have left processes in the container
        # (a daemonised child, or a kernel that outlived a SIGKILLed runtime): they carry its id.
        kill_marked(name, {a.id for a in dead})
        for att in dead:
            with contextlib.suppress(FileNotFoundError):
                (d / KERNELS / f"{att.id}.json").unlink()
    return live


def end_orphan(att: Attachment, grace: float = ORPHAN_GRACE) -> None:
    """End a kernel whose Jupyter process died without shutting it down: SIGTERM to its runtime process
    (Apptainer passes it on to the kernel), SIGKILL after ``grace`` seconds."""
    proc = ProcRef(att.pid, att.pid_start)
    procfs.kill([proc], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    procfs.kill([proc])


def reap(d: Path) -> int:
    """The reaper loop of instance dir ``d``: returns when the instance is stopped or gone.

    Every decision to exit is re-checked under the instance lock, and the reaper lock is released
    *before* the instance lock: a launch that starts a new instance after that sees no reaper and
    starts one, and a launch that came before is visible in the record we re-checked.
    """
    fd = _take_reaper_lock(d)
    if fd is None:
        return 0  # another reaper serves this instance
    try:
        idle_since: float | None = None
        seen_pid = 0
        while True:
            record = read_record(d)
            if record is None or not record.running():
                with _lock(d / "lock"):
                    again = read_record(d)
                    if again is None or (record is not None and again.pid == record.pid):
                        if again is not None:  # died behind our back: clear what it left
                            clear_leftovers(again)
                            _log(f"instance {again.name} is gone; state cleared")
                        else:
                            problem = record_problem(d)
                            if problem:
                                _log(f"{problem}; stopping instance {d.name}: {_stop_damaged(d)}")
                        forget(d)
                        os.close(fd)
                        fd = -1
                        return 0
                continue  # a launch started a new instance meanwhile: serve it
            if record.pid != seen_pid:  # a new instance under the same name: start over
                seen_pid, idle_since = record.pid, None
            live = prune(d, record.name)
            now = time.time()
            if live:
                idle_since = None
            elif idle_since is None:
                idle_since = now
                atomic_write(d / IDLE, f"{now}\n", private=True)
            if idle_since is not None and now - idle_since >= record.idle_timeout:
                with _lock(d / "lock"):
                    # A launch may have attached while we waited for the lock: it holds it while it writes.
                    again = read_record(d)
                    if again is not None and again.pid == record.pid and not prune(d, record.name):
                        _stop_locked(d, again)
                        _log(f"instance {record.name} idle for {record.idle_timeout:g} s: stopped")
                        os.close(fd)
                        fd = -1
                        return 0
                idle_since = None
            time.sleep(poll_interval(record.idle_timeout))
    finally:
        if fd >= 0:
            os.close(fd)


def _stop_damaged(d: Path) -> str:
    """Stop the instance of ``d`` by its name (we hold its lock), whose record is damaged: without the
    record nothing can tell when it is idle, and nothing would ever stop it. Says what happened."""
    name = d.name
    kill_marked(name)
    try:
        binary = apptainer.find_binary()
        if not apptainer.list_instances(binary, name):
            return "it was not running"
        stopped = apptainer.stop_instance(binary, name, force=True, timeout=STOP_TIMEOUT)
    except HpcKernelsError as exc:
        return f"could not stop it ({exc})"
    return "stopped" if stopped else "Apptainer refused to stop it"


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} hpc-kernels reaper[{os.getpid()}]: {message}", flush=True)


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """``python -m hpc_kernels.runtimes.apptainer.reaper reap DIR``: the detached reaper."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "reap":
        print("usage: python -m hpc_kernels.runtimes.apptainer.reaper reap INSTANCE_DIR", file=sys.stderr)
        return 2
    # A reaper outlives terminals and kernels; only an explicit SIGTERM/SIGKILL should end it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return reap(Path(args[1]))
    except HpcKernelsError as exc:
        _log(f"error: {exc}")
        return 1
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return 0
        _log(f"error: {exc}")
        return 1



if __name__ == "__main__":
    raise SystemExit(main())
