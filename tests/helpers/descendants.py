"""A process's descendants as a snapshot (pid -> command name, start time) and which of them survive: for the
tests that kill a build (tests/real/test_build_kill.py, tests/unit/test_buildtemp.py).

Moved from test_build_kill as it was; tests/helpers/proctree.py is the other process-tree helper (``Proc``s).
"""

from __future__ import annotations

import os
import time
from typing import Any


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, command name, start time) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    comm = stat[stat.find("(") + 1 : stat.rfind(")")]
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), comm, int(fields[19])


def tree(root: int) -> dict[int, tuple[str, int]]:
    """Every live descendant of ``root``: pid -> (command name, start time)."""
    table: dict[int, tuple[int, str, int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            info = _stat(int(entry.name))
            if info:
                table[int(entry.name)] = info
    found: dict[int, tuple[str, int]] = {}
    todo = [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, comm, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = (comm, start)
                todo.append(pid)
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def survivors(snapshot: dict[int, tuple[str, int]]) -> list[str]:
    """The processes of ``snapshot`` still alive (same pid and start time)."""
    alive = []
    for pid, (comm, start) in snapshot.items():
        info = _stat(pid)
        if info and info[2] == start:
            alive.append(f"{pid} {comm}")
    return alive


def wait_until(predicate: Any, timeout: float, step: float = 0.2) -> float:
    """Seconds until ``predicate()`` held, or the timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout and not predicate():
        time.sleep(step)
    return time.monotonic() - start
