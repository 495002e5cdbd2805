"""A shared instance's records in this host's state (``instances/NAME/``): the instance, its attachments
(one per attached kernel), its lock, and the processes its kernels left behind. Import-light (the launcher).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_kernels import procfs
from hpc_kernels.locks import flock_held, locked
from hpc_kernels.procfs import ProcRef
from hpc_kernels.runtimes.apptainer.instance import (
    ENV_ATTACHMENT,
    ENV_INSTANCE,
    IDLE,
    KERNELS,
    LOCK_TIMEOUT,
    NAME_RE,
    RECORD,
)

# ----------------------------------------------------------------------------- processes


def marked_processes(instance: str) -> list[tuple[int, str]]:
    """(pid, attachment id) of processes whose environment names ``instance`` (this user's only)."""
    want = f"{ENV_INSTANCE}={instance}".encode()
    prefix = f"{ENV_ATTACHMENT}=".encode()
    found: list[tuple[int, str]] = []
    for pid, environ in procfs.processes("environ"):
        if want in environ:
            ids = [v[len(prefix) :].decode(errors="replace") for v in environ if v.startswith(prefix)]
            found.append((pid, ids[0] if ids else ""))
    return found


def _kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def kill_marked(instance: str, attachments: set[str] | None = None) -> list[int]:
    """SIGKILL processes of ``instance`` (only those of ``attachments`` when given); their pids."""
    killed = []
    for pid, attachment in marked_processes(instance):
        if (attachments is None or attachment in attachments) and _kill(pid):
            killed.append(pid)
    return killed


def helpers_left(record: InstanceRecord, late: bool = False) -> list[procfs.ProcInfo]:
    """Apptainer's helpers an ended instance left behind: a SIGKILL of its starter leaves its
    ``squashfuse_ll`` running, reparented, holding the image (measured with Apptainer 1.4, unprivileged).
    They are the rest of the starter's session; ``late`` (gc) keeps only Apptainer's own helper programs."""
    starter = record.starter
    return procfs.session_leftovers(starter, helpers_only=late) if starter is not None else []


def clear_leftovers(record: InstanceRecord, late: bool = False) -> list[int]:
    """SIGKILL what an ended instance left: its kernels' processes and Apptainer's helpers; their pids."""
    return kill_marked(record.name) + procfs.kill(p.ref for p in helpers_left(record, late))


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class InstanceRecord:
    """What we know about a running instance (``instance.json``)."""

    name: str
    kernel: str
    image: str
    user: str
    host: str
    job: str
    pid: int
    pid_start: int
    started_at: float
    idle_timeout: float
    binary: str
    #: The instance's ``Apptainer instance: USER [NAME]`` process, parent of ``pid``, and the leader of the
    #: session its helpers (``squashfuse_ll``) run in: a SIGKILL of it leaves them behind (0: unknown).
    starter_pid: int = 0
    starter_start: int = 0

    @property
    def proc(self) -> ProcRef:
        """The instance's process (the one ``--pid-file`` names)."""
        return ProcRef(self.pid, self.pid_start)

    @property
    def starter(self) -> ProcRef | None:
        """The instance's starter, when it was recorded."""
        return ProcRef(self.starter_pid, self.starter_start) if self.starter_pid > 1 else None

    def running(self) -> bool:
        """True while the instance's process lives."""
        return self.proc.alive()


@dataclass(frozen=True)
class Attachment:
    """One kernel attached to an instance (``kernels/ID.json``): its runtime process."""

    id: str
    pid: int
    pid_start: int
    connection_file: str
    attached_at: float
    #: The Jupyter process the kernel lives for ($JPY_PARENT_PID): once it is gone, so is the kernel (0: none).
    parent_pid: int = 0
    parent_start: int = 0

    def alive(self) -> bool:
        """True while the kernel's ``apptainer exec`` (the former launcher) runs."""
        return ProcRef(self.pid, self.pid_start).alive()

    def orphaned(self) -> bool:
        """True when the process that started the kernel has exited (nobody can talk to the kernel now)."""
        return self.parent_pid > 1 and not ProcRef(self.parent_pid, self.parent_start).alive()


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_pid(v: Any) -> bool:
    return _is_int(v) and v > 0


def _is_number(v: Any) -> bool:
    # NaN fails ``v >= 0``: a timeout or a time must be a real number.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


#: What each field of a record must be: records are files, and a damaged one must not kill the reaper.
_RECORD_CHECKS: dict[str, Callable[[Any], bool]] = {
    "name": lambda v: isinstance(v, str) and bool(NAME_RE.match(v)), "kernel": _is_str, "image": _is_str,
    "user": _is_str, "host": _is_str, "job": _is_str, "pid": _is_pid, "pid_start": _is_int,
    "started_at": _is_number, "idle_timeout": _is_number, "binary": _is_str,
}
_ATTACHMENT_CHECKS: dict[str, Callable[[Any], bool]] = {
    "id": lambda v: isinstance(v, str) and bool(NAME_RE.match(v)), "pid": _is_pid, "pid_start": _is_int,
    "connection_file": _is_str, "attached_at": _is_number,
}


def _bad_field(data: Any, checks: Mapping[str, Callable[[Any], bool]]) -> str | None:
    """What is wrong with a record's data (None when every field is what we write)."""
    if not isinstance(data, dict):
        return "not a JSON object"
    for key, check in checks.items():
        if key not in data:
            return f"it has no '{key}'"
        if not check(data[key]):
            return f"'{key}' is {data[key]!r}"
    return None


def read_record(d: Path) -> InstanceRecord | None:
    """The instance record in ``d``, or None (missing, unreadable or damaged counts as no instance:
    :func:`record_problem` says which)."""
    data = _load(d / RECORD)
    if data is None or _bad_field(data, _RECORD_CHECKS):
        return None
    try:  # fields with a default may be missing (a record written by an earlier version)
        return InstanceRecord(**{k: data[k] for k in InstanceRecord.__dataclass_fields__ if k in data})
    except TypeError:
        return None


def record_problem(d: Path) -> str | None:
    """Why the instance record in ``d`` exists but cannot be used; None when it is fine or absent."""
    path = d / RECORD
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read the instance record {path}: {exc.strerror}"
    try:
        bad = _bad_field(json.loads(raw), _RECORD_CHECKS)
    except ValueError:
        bad = "not valid JSON"
    return f"the instance record {path} is damaged: {bad}" if bad else None


def attachments(d: Path) -> list[Attachment]:
    """Every attachment record in ``d`` (live or not; damaged ones are skipped)."""
    found = []
    for path in sorted((d / KERNELS).glob("*.json")):
        data = _load(path)
        if data is not None and not _bad_field(data, _ATTACHMENT_CHECKS):
            with contextlib.suppress(TypeError):  # fields with a default may be missing (an earlier version)
                found.append(Attachment(**{k: data[k] for k in Attachment.__dataclass_fields__ if k in data}))
    return found


def _clear_state(d: Path) -> None:
    """Forget an instance's record, attachments and idle mark (the directory and locks stay)."""
    for path in [d / RECORD, d / IDLE, d / "pid", *(d / KERNELS).glob("*.json")]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def forget(d: Path) -> None:
    """Remove an instance's state directory (we hold its lock; names change per image and job,
    so directories must not pile up). Removing a lock file is safe: see :func:`_lock`. Files we
    did not write keep the directory."""
    _clear_state(d)
    for child in (d / KERNELS, d / "lock", d / "reaper.lock"):
        with contextlib.suppress(OSError):
            if child.is_dir():
                child.rmdir()
            else:
                child.unlink()
    with contextlib.suppress(OSError):
        d.rmdir()


def _lock(path: Path, blocking: bool = True) -> contextlib.AbstractContextManager[bool]:
    """An instance's lock: it survives gc removing and recreating the state directory, lives in a
    private directory (another user cannot take it), and is not waited for longer than
    :data:`LOCK_TIMEOUT` (see :func:`hpc_kernels.locks.locked`)."""
    return locked(path, blocking, timeout=LOCK_TIMEOUT, private=True)


def reaper_running(d: Path) -> bool:
    """True when a reaper holds ``d/reaper.lock`` (creates nothing: ``d`` may be going away)."""
    return flock_held(d / "reaper.lock")
