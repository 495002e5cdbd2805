"""The guard of one image build: the build's processes die with the hpc-kernels process that started them.

spython runs ``singularity build ...``; our ``singularity`` shim runs this guard, which runs the real
runtime. Without it, killing hpc-kernels (its pid) left ``apptainer build`` running on, and ~40 s later it
wrote its image into the images directory; killing the whole process group left hundreds of MB in
Apptainer's temporary directory. The guard:

* leaves the session and process group of hpc-kernels (``setsid``), so a SIGKILL of that group does not
  reach it and it can clean up after the build;
* is a *child subreaper*: processes the runtime orphans stay below it, where it can find them;
* starts the runtime with ``PR_SET_PDEATHSIG = SIGKILL`` (Apptainer passes its own death on down its
  chain of processes), so the build dies even when the guard itself is SIGKILLed;
* every :data:`POLL` seconds looks at its owner: when the hpc-kernels process is gone (pid and start
  time), or has cancelled the build (removed ``owner.json``), it SIGKILLs every process below it; when the
  owner is gone it also removes the build's temporary places (a live owner does that itself);
* touches ``owner.json`` every :data:`hpc_kernels.build.temp.HEARTBEAT` seconds (builds on other hosts
  judge a work directory's staleness by it), and holds ``guard.lock`` in the private tmpdir while it runs.

Run as ``python -I -S .../hpc_kernels/build/guard.py RUNTIME ARGS...``, like the kernel launcher (``-I``: no
PYTHONPATH of a module environment can shadow us; ``-S``: no ``site``). Without ``$HPC_KERNELS_BUILD_RECORD``
(spython's ``singularity --version``) it simply becomes the runtime.
"""

from __future__ import annotations

import os
import sys

if not __package__:
    # Run as a script (``-I`` leaves the script's directory off sys.path): find our own package.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import contextlib
import ctypes
import fcntl
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from hpc_kernels import procfs
from hpc_kernels.build import temp as buildtemp

POLL = 0.2
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    """``prctl(option, value)``; False where it is not available (not Linux) or refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def zombie_children(pid: int) -> list[int]:
    """Children of ``pid`` that have exited and wait to be reaped."""
    return [c for c in procfs.children(pid) if (got := procfs.info(c)) is not None and got.zombie]


def reap(pids: list[int], keep: int = 0) -> None:
    """Collect the exit status of zombie children (not ``keep``: subprocess collects its own)."""
    for pid in pids:
        if pid != keep:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)


def kill_all_below(me: int, keep: int = 0, rounds: int = 200) -> None:
    """SIGKILL every process below ``me`` until none is left (a process may fork while we look)."""
    for _ in range(rounds):
        reap(zombie_children(me), keep)
        live = procfs.descendants(me)
        if not live:
            return
        for proc in live:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.02)


class _Stop(Exception):
    pass


def guard(argv: list[str], temp: buildtemp.BuildTemp) -> int:
    """Run the runtime ``argv`` for the build ``temp`` and watch its owner; the runtime's exit code."""
    me = os.getpid()
    with contextlib.suppress(OSError):
        os.setsid()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    lock_fd = os.open(temp.tmpdir / buildtemp.GUARD_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    stop: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop.append(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    boot = procfs.boot_id()

    owner = procfs.ProcRef(temp.owner.pid, temp.owner.start)

    def owner_gone() -> bool:
        return boot != temp.owner.boot or not owner.alive()

    if owner_gone():  # hpc-kernels died before we got here: nothing to run
        return _abort(me, 0, temp, owner_dead=True, lock_fd=lock_fd)

    def pdeathsig() -> None:
        # In the runtime, between fork and exec: die with the guard, even when it is SIGKILLed.
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != me:
            os._exit(1)

    # preexec_fn is unsafe with threads; the guard has none.
    child = subprocess.Popen(argv, preexec_fn=pdeathsig)
    beat = time.monotonic()
    while True:
        try:
            code = child.wait(timeout=POLL)
            break
        except subprocess.TimeoutExpired:
            pass
        if stop or owner_gone() or not temp.record.exists():
            return _abort(me, child.pid, temp, owner_dead=owner_gone(), lock_fd=lock_fd, child=child)
        if time.monotonic() - beat > buildtemp.HEARTBEAT:
            beat = time.monotonic()
            with contextlib.suppress(OSError):
                os.utime(temp.record)
    kill_all_below(me, keep=child.pid)  # whatever the runtime left running (none, normally)
    os.close(lock_fd)
    return code if code >= 0 else 128 - code


def _abort(me: int, child_pid: int, temp: buildtemp.BuildTemp, owner_dead: bool, lock_fd: int,
           child: subprocess.Popen[bytes] | None = None) -> int:
    """Kill the build; when its owner is dead, remove its temporary places too."""
    kill_all_below(me, keep=child_pid)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
    if owner_dead:
        problems = buildtemp.remove(temp)
        for problem in problems:
            print(f"hpc-kernels: could not remove {problem}; 'hpc-kernels gc' will try again",
                  file=sys.stderr)
    os.close(lock_fd)
    return 128 + signal.SIGKILL


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``RUNTIME ARGS...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: buildguard.py RUNTIME [ARGS...]", file=sys.stderr)
        return 2
    record = os.environ.pop(buildtemp.ENV_RECORD, "")
    if not record:
        os.execvp(args[0], args)
    try:
        temp = buildtemp.load(Path(record))
    except (OSError, ValueError) as exc:
        print(f"hpc-kernels: cannot read the build record {record}: {exc}", file=sys.stderr)
        return 1
    try:
        return guard(args, temp)
    except OSError as exc:
        print(f"hpc-kernels: the build guard failed: {exc}", file=sys.stderr)
        return 1


def argv() -> list[str]:
    """How the ``singularity`` shim starts the guard: ``python -I -S /abs/path/of/hpc_kernels/build/guard.py``."""
    return [sys.executable, "-I", "-S", os.path.abspath(__file__)]


if __name__ == "__main__":
    raise SystemExit(main())
