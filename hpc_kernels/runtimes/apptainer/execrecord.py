"""An exec-mode kernel's record (``<host state dir>/kernels/<id>.json``): who the launcher is, the Jupyter
process it lives for, its descendants as the watcher saw them; and what of the kernel is left once the
launcher is gone. Import-light: the launcher writes it on every exec-mode kernel start.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass

from hpc_kernels import paths, procfs
from hpc_kernels.procfs import ProcInfo, ProcRef

# why: typing is not loaded on the launcher's path (python -S)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Set inside the container of every exec-mode kernel: its record's id.
ENV_KERNEL = "HPC_KERNELS_KERNEL_ID"
FORMAT = 1
#: Seconds a kernel whose Jupyter process died gets to exit on SIGTERM before SIGKILL.
GRACE = 3.0
#: After the launcher has gone, a second look this much later (a helper may still be on its way out).
SETTLE = 0.5
#: gc leaves a record this young alone while its watcher has not said it runs (it is starting).
START_GRACE = 10.0
#: Without pidfds (Linux < 5.3) the watcher looks this often whether the launcher or parent died.
POLL_FALLBACK = 0.5


@dataclass(frozen=True)
class KernelRecord:
    """What the watcher of one exec-mode kernel owns (``kernels/<id>.json``)."""

    id: str
    kernel: str
    image: str
    #: The launcher, which became the Apptainer starter: the pid jupyter_client knows.
    launcher: ProcRef
    #: The launcher leads its own session (jupyter_client starts kernels so): the session is the kernel's.
    session: bool
    #: The Jupyter process the kernel lives for ($JPY_PARENT_PID: the server or client that started it).
    parent: ProcRef | None
    created: float
    watcher: ProcRef | None = None
    #: The launcher's descendants seen so far (the kernel, ``squashfuse_ll``...), with their names.
    procs: tuple[tuple[ProcRef, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data."""
        def ref(r: ProcRef | None) -> list[int] | None:
            return [r.pid, r.start] if r else None

        return {"format": FORMAT, "id": self.id, "kernel": self.kernel, "image": self.image,
                "launcher": ref(self.launcher), "session": self.session, "parent": ref(self.parent),
                "created": self.created, "watcher": ref(self.watcher),
                "procs": [[r.pid, r.start, comm] for r, comm in self.procs]}

    @classmethod
    def from_json(cls, data: Any) -> KernelRecord:
        """Inverse of :meth:`to_json`; ``ValueError`` for anything we did not write."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a kernel record of this version")
        try:
            procs = tuple((_proc(p[:2]), _text(p[2])) for p in data.get("procs") or [])
            return cls(id=_text(data["id"]), kernel=_text(data["kernel"]), image=_text(data["image"]),
                       launcher=_proc(data["launcher"]), session=data["session"] is True,
                       parent=_ref(data.get("parent")), created=float(data["created"]),
                       watcher=_ref(data.get("watcher")), procs=procs)
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ValueError(f"damaged kernel record: {exc}") from None


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def _ref(value: Any) -> ProcRef | None:
    return None if value is None else _proc(value)


def _proc(value: Any) -> ProcRef:
    pid, start = value
    if not (isinstance(pid, int) and isinstance(start, int) and pid > 0 and start >= 0):
        raise TypeError(f"{value!r} is not a process")
    return ProcRef(pid, start)


def records_path() -> str:
    """Where this host's exec-kernel records live."""
    return os.path.join(paths.host_state_path(), "kernels")


def write_record(record: KernelRecord, path: str) -> None:
    """Write ``record`` atomically (a file beside it, then a rename; no tempfile import on the launch path)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record.to_json(), fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_record(path: str) -> KernelRecord | None:
    """The record at ``path``; None when it is gone. ``ValueError`` when it is damaged."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    return KernelRecord.from_json(data)


# ----------------------------------------------------------------------------- finding what is left


def leftovers(record: KernelRecord, late: bool = False) -> list[ProcInfo]:
    """Our processes that belong to the kernel of ``record``, once its launcher has ended.

    Found by what was really started, never by a name: (1) the descendants recorded while the launcher
    ran (pid and start time: exact); (2) processes carrying the kernel's marker variable (the kernel and
    everything it started, daemonised or not); (3) when the launcher led its own session, the rest of that
    session (Apptainer's ``squashfuse_ll``, in a process group of its own): see
    :func:`procfs.session_leftovers` (``late``: gc, long after, keeps only Apptainer's helpers there).
    """
    found: dict[int, ProcInfo] = {}
    for ref, _comm in record.procs:
        now = procfs.info(ref.pid)
        if now is not None and now.ref == ref and not now.zombie:
            found[ref.pid] = now
    for pid in procfs.marked(ENV_KERNEL, record.id):
        now = procfs.info(pid)
        if now is not None and not now.zombie:
            found[pid] = now
    if record.session:
        for now in procfs.session_leftovers(record.launcher, helpers_only=late):
            found[now.pid] = now
    found.pop(os.getpid(), None)
    return sorted(found.values(), key=lambda p: p.pid)


def clean(record: KernelRecord, late: bool = False) -> list[ProcInfo]:
    """SIGKILL what is left of the kernel of ``record`` (twice, :data:`SETTLE` apart); what was killed."""
    killed: dict[int, ProcInfo] = {}
    for attempt in range(2):
        left = leftovers(record, late)
        done = set(procfs.kill(p.ref for p in left))
        killed.update((p.pid, p) for p in left if p.pid in done)
        if attempt == 0:
            time.sleep(SETTLE)
    return sorted(killed.values(), key=lambda p: p.pid)


def record_paths() -> list[str]:
    """The records on this host, oldest name first."""
    directory = records_path()
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in names]


def remove_record(path: str) -> None:
    """Remove a record (gone already is fine)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
