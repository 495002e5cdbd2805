"""Reading other processes from /proc (Linux): how leftovers of killed launchers are found."""

from __future__ import annotations

import os
from collections.abc import Iterator


def processes(part: str) -> Iterator[tuple[int, list[bytes]]]:
    """``(pid, fields)`` of every other process whose ``/proc/<pid>/<part>`` (``cmdline``,
    ``environ``) we may read, split at NUL bytes; processes that vanish or are not ours are skipped."""
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/{part}", "rb") as fh:
                yield int(entry.name), fh.read().split(b"\0")
        except OSError:  # gone, or another user's
            continue
