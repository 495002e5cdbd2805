"""A job kernel's watcher (own session, outside jupyter_client's process group): when its launcher dies and
no successor comes within ``GRACE`` s (at once when the connection file is gone: a final shutdown), it
cancels the job.

``python -I -S -m hpc_kernels.runtimes.job.watcher watch SESSION_FILE LAUNCHER_PID``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Any

from hpc_kernels import slurm
from hpc_kernels.adapters.slurm import Slurm
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.fsutil import atomic_write
from hpc_kernels.runtimes.job.control import read_json
from hpc_kernels.runtimes.job.session import GRACE, JOB_PREFIX, job_name, launcher_alive, remove_session, sessions_dir
from hpc_kernels.runtimes.parent import wait_for_parent

# ----------------------------------------------------------------------------- the watcher


def cancel_session(session: dict[str, Any], why: str) -> None:
    """End a session's job (or, in an allocation the user holds, only our step and srun)."""
    job = str(session.get("job_id") or "")
    if session.get("reused"):
        agent = read_json(str(sessions_dir() / f"{session['sid']}.agent.json")) or {}
        step = str(agent.get("step_id") or "")
        if job and step.isdigit():
            Slurm().cancel([f"{job}.{step}"])
        if launcher_alive(session, "srun_pid"):
            with contextlib.suppress(OSError):
                os.kill(int(session["srun_pid"]), signal.SIGKILL)
    elif job:
        Slurm().cancel([job])
    else:  # the launcher died during sbatch: find the job by its name
        name = job_name(str(session.get("kernel")), str(session.get("sid")))
        Slurm().cancel([j for j, n in Slurm().named(JOB_PREFIX).items() if n == name])
    print(f"hpc-kernels watcher: cancelled job {job or '(by name)'} of kernel '{session.get('kernel')}': {why}",
          file=sys.stderr, flush=True)


def watch(session_file: str, launcher: int) -> None:
    """Wait for the launcher to end; then, unless a successor (a restart) claims the session within
    :data:`GRACE` s, end the job. A connection file that is gone means a final shutdown: end it at once."""
    wait_for_parent(launcher)
    deadline = time.monotonic() + GRACE
    while True:
        session = read_json(session_file)
        if session is None:
            return
        if int(session.get("launcher_pid") or 0) != launcher and launcher_alive(session):
            return  # a successor took over; its own watcher looks after it from now on
        final = not os.path.exists(str(session.get("connection_file")))
        if session.get("state") == "ended":
            # Its job is over. The record refuses automatic restarts (which would resubmit) until the kernel
            # is shut down for good; after GRACE s it is left for 'hpc-kernels gc'.
            if final:
                remove_session(str(session["sid"]))
                return
            if time.monotonic() >= deadline:
                return
            time.sleep(0.2)
            continue
        if final or time.monotonic() >= deadline:
            cancel_session(session, "the kernel was shut down" if final else
                           f"its launcher is gone and no restart came within {GRACE:g} s")
            if final and session.get("job_id") and not session.get("reused"):
                _write_exit(str(session["job_id"]))
            remove_session(str(session["sid"]))
            return
        time.sleep(0.2)


def _write_exit(job_id: str) -> None:
    """A kernel shut down on purpose ended well: ``hpc-kernels jobs`` says COMPLETED, not CANCELLED."""
    with contextlib.suppress(OSError):
        atomic_write(slurm.jobs_dir() / f"{job_id}.exit", "0\n", private=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m hpc_kernels.runtimes.job.watcher watch SESSION_FILE LAUNCHER_PID`` (the watcher)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] != "watch" or not args[2].isdigit():
        print("usage: python -m hpc_kernels.runtimes.job.watcher watch SESSION_FILE LAUNCHER_PID", file=sys.stderr)
        return 2
    try:
        watch(args[1], int(args[2]))
    except (HpcKernelsError, OSError) as exc:
        print(f"hpc-kernels watcher: {exc}", file=sys.stderr)
        return 1
    return 0



if __name__ == "__main__":
    # jupyter_client's signals are for the kernel, not for us: the cleanup must run whatever happens.
    for _sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(_sig, signal.SIG_IGN)
    raise SystemExit(main())
