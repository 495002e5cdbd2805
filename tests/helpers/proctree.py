"""Processes as the tests see them, read from /proc directly (not through hpc_kernels): what was really
started, and whether it still runs. Used to check that nothing of a kernel outlives it."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Proc:
    """A process as started: pid, start time (clock ticks since boot) and name."""

    pid: int
    start: int
    comm: str


def stat(pid: int) -> tuple[str, str, int, int] | None:
    """(comm, state, ppid, start) of ``pid``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return text[text.find("(") + 1 : text.rfind(")")], fields[0], int(fields[1]), int(fields[19])


def _table() -> dict[int, tuple[str, str, int, int]]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            got = stat(int(entry))
            if got is not None:
                found[int(entry)] = got
    return found


def tree(root: int) -> set[Proc]:
    """``root`` and its live descendants (by parent pid)."""
    table = _table()
    kids: dict[int, list[int]] = {}
    for pid, (_comm, _state, ppid, _start) in table.items():
        kids.setdefault(ppid, []).append(pid)
    found: set[Proc] = set()
    queue = [root]
    while queue:
        pid = queue.pop()
        if pid in table and table[pid][1] not in ("Z", "X"):
            found.add(Proc(pid, table[pid][3], table[pid][0]))
            queue += kids.get(pid, [])
    return found


def running(procs: Iterable[Proc]) -> list[Proc]:
    """Those of ``procs`` that still run (the same process: same start time; zombies have ended)."""
    left = []
    for p in procs:
        now = stat(p.pid)
        if now is not None and now[3] == p.start and now[1] not in ("Z", "X"):
            left.append(p)
    return sorted(left, key=lambda p: p.pid)


def holding(image: Path, since: int) -> list[Proc]:
    """Our live processes started at or after ``since`` with a file descriptor on ``image`` (Apptainer's
    starters and ``squashfuse_ll`` hold the SIF open; the starter's name shows only the file name)."""
    want = image.stat()
    found = []
    for pid, (comm, state, _ppid, start) in _table().items():
        if start < since or state in ("Z", "X"):
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != os.getuid():
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                    found.append(Proc(pid, start, comm))
                    break
    return sorted(found, key=lambda p: p.pid)


def now_ticks() -> int:
    """The current time as a process start time (clock ticks since boot)."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * TICKS) - 1


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds passed; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def kill_all(procs: Iterable[Proc]) -> None:
    """SIGKILL each of ``procs`` (clean-up after a failed test)."""
    for p in procs:
        with contextlib.suppress(OSError):
            os.kill(p.pid, signal.SIGKILL)
