"""What our helper processes (watchers) wait for: the launcher that started them (later the runtime client
it became) and the Jupyter process the kernel lives for (``$JPY_PARENT_PID``). No runtime owns it.
"""

from __future__ import annotations

import contextlib
import os
import select
import time

from hpc_kernels import procfs


def parent_arg() -> str:
    """``PID:START`` of the Jupyter process the kernel lives for (``$JPY_PARENT_PID``: the server or client
    that started it), ``0:0`` when there is none."""
    ref = procfs.jupyter_parent()
    return f"{ref.pid}:{ref.start}" if ref else "0:0"


def parse_parent(arg: str) -> procfs.ProcRef | None:
    pid, _, start = arg.partition(":")
    return procfs.ProcRef(int(pid), int(start)) if int(pid) > 1 else None


def wait_for_parent(pid: int, grandparent: procfs.ProcRef | None = None) -> bool:
    """Block until our parent ``pid`` (the launcher, later the client it became) has exited, or until
    ``grandparent`` (the process that started the launcher) has; True in the second case."""
    fds: list[int] = []
    for ref in [procfs.ProcRef(pid, 0), grandparent]:
        if ref is not None:
            with contextlib.suppress(AttributeError, OSError):
                fds.append(os.pidfd_open(ref.pid))
    try:
        while True:
            # Reparented: the launcher died (before we got here, too; its pid may be reused since).
            if os.getppid() != pid:
                return False
            if grandparent is not None and not grandparent.alive():
                return True
            if len(fds) == 1 + (grandparent is not None):
                select.select(fds, [], [])
            else:  # no pidfds (Linux < 5.3)
                time.sleep(0.5)
    finally:
        for fd in fds:
            os.close(fd)


def end_client(pid: int, grace: float = 5.0) -> None:
    """After the kernel's container or process was removed, its client exits; SIGKILL it if it has not."""
    me = procfs.proc_ref(pid)
    deadline = time.monotonic() + grace
    while me is not None and me.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if me is not None:
        procfs.kill([me])
